"""The GPU path's precision on CPU: a short run of the real training loop under `bf16-mixed` (CPU autocast
makes the casts CUDA's does), with both branches, evaluation, spectra, checkpoints and a resume, then one NER
job under bf16 autocast on its final checkpoint. Losses stay finite, every trainable parameter gets a
gradient, and the checkpoints load."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric import Fabric

from picomaml.config import DataConfig, load_config
from picomaml.data import prepare
from picomaml.model import load_pretrained
from picomaml.ner_sweep import read_rows, run_sweep
from picomaml.spectra import read_spectra
from picomaml.tokenizer import load_tokenizer
from picomaml.train import train

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PICOMAML_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json"

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


def bf16_config(data: Path, runs: Path, steps: int):
    ("Four steps of two draws (seed 3 draws both branches), evaluation, spectra and checkpoints every two steps, "
     "bf16-mixed.")
    return load_config(None, [
        "model.d_model=24", "model.n_layers=2", "model.n_heads=6", "model.n_kv_heads=2", "model.ffn_hidden=96",
        "model.max_seq_len=128", f"data.train_path={data}/train", f"data.eval_path={data}/eval", "data.seq_len=32",
        f"data.tokenizer_path={TOKENIZER}", f"train.steps={steps}", "train.global_batch=8", "train.branch_batch=4",
        "train.lr=1e-2", "train.warmup_steps=1", "train.seed=3", "train.precision=bf16-mixed", "train.device=cpu",
        "checkpoint.every=2", "smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=12",
        "smlmt.pool_rows=64", "smlmt.exclude_top=30", "maml.head_hidden=16", "maml.head_layers=2", "eval.every=2",
        "eval.max_documents=16", "eval.batch_size=8", "spectra.every=2", "spectra.grad_rows=4", "spectra.grad_batch=2",
        f"logging.runs_dir={runs}", "logging.run_name=bf16", "logging.progress_bar=false"])


def test_the_loop_and_a_ner_job_under_bf16_autocast(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOMAML_DATA", str(SHARED))  # Universal NER from the local copy
    tok = load_tokenizer(DataConfig(tokenizer_path=str(TOKENIZER)))
    prepare(sorted((SHARED / "corpus/train").glob("c4-sample.0[12].json.gz")), tmp_path / "data/train", 32, tok,
            log=lambda m: None)
    prepare(sorted((SHARED / "corpus/eval").glob("c4_100_domains_*.jsonl.gz")), tmp_path / "data/eval", 32, tok,
            log=lambda m: None)
    # indices (in the optimizer's order) of parameters with a gradient
    with_grad, real_step = set(), torch.optim.AdamW.step
    def recording_step(self, *args, **kwargs):
        with_grad.update(i for i, p in enumerate(p for group in self.param_groups for p in group["params"])
                         if p.grad is not None)
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    train(bf16_config(tmp_path / "data", tmp_path / "runs", steps=2), fabric)
    run = train(bf16_config(tmp_path / "data", tmp_path / "runs", steps=4), fabric)  # resumes at step 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert ([r["step"] for r in steps] == [1, 2, 3, 4]
            and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps))
    assert {b for r in steps for b in r["branches"]} == {"N", "M"}  # both branches ran under autocast
    assert all(math.isfinite(r["query_loss"]) for r in steps if r["n_maml"])
    assert all(math.isfinite(r["next_token_loss"]) for r in steps if r["n_next_token"])
    evaluated = [r for r in records if "paloma_doc_ppl" in r]
    # step 0 too
    assert [r["step"] for r in evaluated] == [0, 2, 4] and all(math.isfinite(r["paloma_doc_ppl"]) for r in evaluated)
    spectra = read_spectra(run / "spectra.jsonl")
    assert sorted(set(spectra.step)) == [0, 2, 4] and spectra.per.notna().all()
    model = load_pretrained(run / "checkpoints" / "step_000004")
    backbone_and_head = sum(1 for _ in model.parameters()) + 4  # two head layers: weight and bias each
    assert with_grad == set(range(backbone_and_head))  # every trainable parameter had a gradient at some step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4, "precision": "bf16-mixed"},
                         "max_train_sentences": 8, "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
            "grids": [{"heads": ["crf"], "regimes": ["full"], "datasets": ["sk_snk"],
                       "runs": [{"run": "bf16", "arm": "maml", "size": "tiny",
                                 "checkpoint": str(run / "checkpoints" / "step_000004")}]}]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert run_sweep(tmp_path / "grid.yaml", tmp_path / "ner.jsonl", overrides=[f"data.tokenizer_path={TOKENIZER}"],
                     device="cpu") == 1
    (row,) = read_rows(tmp_path / "ner.jsonl")
    assert (row["precision"] == "bf16-mixed" and all(math.isfinite(x) for x in row["loss_curve"])
            and 0 <= row["dev_f1"] <= 1)
