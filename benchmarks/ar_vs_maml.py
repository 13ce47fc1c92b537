"""AR micro-batch vs MAML micro-batch, equal tokens, on the tiny Pico decoder (one process).

    PICOMAML_DATA=../shared/data python benchmarks/ar_vs_maml.py [--data data/pretokenized/train] [--repeats 5]

(the tokenizer comes from $PICOMAML_DATA or the Hub, as in `picomaml.tokenizer.load_tokenizer`).

An episode of the papers' shape (32-way, 4 support + 4 query windows of 32 tokens) holds 8,192 tokens;
the AR micro-batch it is compared with holds the same 8,192 tokens (64 rows of 128). Both are timed
forward + backward as the training loop runs them (`picomaml.train.next_token_loss_sum` and
`picomaml.maml.maml_step`, cached support features, ten inner steps); building the episode from a
512-row pool is timed on its own. Target (the task's): MAML <= 1.5x AR. Prints a Markdown table.
"""
import argparse
import statistics
import time

import torch

from picomaml.config import load_config
from picomaml.data import ShardRows
from picomaml.maml import maml_step
from picomaml.smlmt import build_episode
from picomaml.train import build_model, episode_tables, next_token_loss_sum


def timed(fn, repeats: int) -> float:
    "Median wall time of fn() in seconds, after one warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/pretokenized/train", help="prepared 129-id rows (make data)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cfg = load_config("configs/demo.yaml", [f"data.train_path={args.data}"])
    model, head, _ = build_model(cfg, torch.device("cpu"))
    rows = ShardRows(args.data, cfg.data.seq_len + 1, cfg.model.vocab_size)
    pool = rows.rows(range(cfg.smlmt.pool_rows))  # (512, 129)
    word_start, alpha_len, special = episode_tables(cfg)
    make_episode = lambda: build_episode(pool, cfg.smlmt, word_start, alpha_len, special, cfg.data.mask_id, cfg.train.seed, 0)
    episode = make_episode()
    episode_tokens = episode.support_ids.numel() + episode.query_ids.numel()
    ar_rows = pool[: episode_tokens // cfg.data.seq_len]  # (64, 129): the same number of tokens

    def ar():
        next_token_loss_sum(model, ar_rows).backward(); model.zero_grad(set_to_none=True)

    def episode_step():
        maml_step(model, head, episode, cfg.maml, inner_seed=0); model.zero_grad(set_to_none=True); head.zero_grad(set_to_none=True)

    t_ar, t_maml, t_build = timed(ar, args.repeats), timed(episode_step, args.repeats), timed(make_episode, args.repeats)
    print(f"tiny Pico (d {cfg.model.d_model}, {cfg.model.n_layers} blocks, vocab {cfg.model.vocab_size}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| micro-batch | tokens | seconds | x AR |\n|---|---|---|---|")
    print(f"| AR ({len(ar_rows)} rows x {cfg.data.seq_len}) | {len(ar_rows) * cfg.data.seq_len} | {t_ar:.3f} | 1.00 |")
    print(f"| MAML episode ({cfg.smlmt.n_way}-way {cfg.smlmt.k_shot}+{cfg.smlmt.q_query}, W {cfg.smlmt.window}) "
          f"| {episode_tokens} | {t_maml:.3f} | {t_maml / t_ar:.2f} |")
    print(f"| MAML episode + building it from {cfg.smlmt.pool_rows} rows | {episode_tokens} | {t_maml + t_build:.3f} "
          f"| {(t_maml + t_build) / t_ar:.2f} |")


if __name__ == "__main__":
    main()
