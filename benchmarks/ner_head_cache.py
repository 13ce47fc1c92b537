"""Head-only NER finetune time vs one backbone pass (issue 6 target: <= 1.5x).

Tiny Pico architecture (d 96, 12 blocks; features from `.hidden`, never the output layer), sk_snk,
ten epochs without early stopping. Prints: head-only with the feature cache, head-only recomputing
the backbone every batch and dev evaluation, one backbone pass over train + dev, and the ratios.
Usage: python benchmarks/ner_head_cache.py [--train-sentences 2000] [--epochs 10]
"""
import argparse, dataclasses, os, time
from pathlib import Path
import torch
from picomaml.config import DataConfig, ModelConfig, NERConfig
from picomaml.model import PicoDecoder
from picomaml.ner import NERTagger, finetune, window_features
from picomaml.ner_data import encode_split, load_split
from picomaml.tokenizer import load_tokenizer

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-sentences", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--uncached", action=argparse.BooleanOptionalAction, default=True, help="also time the recomputing path")
    a = p.parse_args()
    os.environ.setdefault("PICOMAML_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    encode, cfg = load_tokenizer(DataConfig()).encode, NERConfig()
    train = encode_split(load_split("sk_snk", "train", cfg)[:a.train_sentences], encode, cfg.max_len)
    dev = encode_split(load_split("sk_snk", "dev", cfg), encode, cfg.max_len)
    torch.manual_seed(0)
    backbone = PicoDecoder(ModelConfig(d_model=96, ffn_hidden=384, n_layers=12, n_heads=12, n_kv_heads=4))
    t0 = time.perf_counter()
    for split in (train, dev): window_features(NERTagger(backbone), split, cfg.batch_size)
    one_pass = time.perf_counter() - t0
    print(f"sk_snk: {len(train.windows)} train + {len(dev.windows)} dev windows, {a.epochs} epochs, torch threads {torch.get_num_threads()}")
    print(f"{'path':<34}{'head':<8}{'seconds':>9}{'x one pass':>12}")
    print(f"{'one backbone pass (train + dev)':<34}{'-':<8}{one_pass:>9.1f}{1:>12.2f}")
    for head in ("linear", "crf"):
        run_cfg = dataclasses.replace(cfg, head=head, epochs=a.epochs, patience=a.epochs)
        for cached in (True, False) if a.uncached else (True,):
            _, hist = finetune(backbone, train, dev, run_cfg, cache=cached)
            name = "head-only, cached features" if cached else "head-only, backbone every epoch"
            print(f"{name:<34}{head:<8}{hist['time_s']:>9.1f}{hist['time_s'] / one_pass:>12.2f}", flush=True)

if __name__ == "__main__": main()
