"""A known-answer test that the MAML branch can train at all: a planted corpus where every class word is
predictable from its context, the real training loop with rho = 1, and three readings of the inner loop.

The corpus: 16 class words (real OLMo single-token words of four or more letters), each always preceded by its own
cue (a two-letter word), amid two-letter filler words. With `smlmt.min_word_chars = 3` only the class words can be
episode classes, and a class is identified by the token just before its [MASK] (`smlmt.readout = mask`). An 8-way
4-shot episode relabels its classes at random, so the head before its inner loop (phi_0) can only be at chance
(1/8) on it; any accuracy above chance after the inner loop (phi_T) is the inner loop's doing, and its climb over
training is the backbone learning features the inner loop can use.

- An inner loop that can adapt (ten steps at 0.5; `05_maml`'s known-answer table says the rate must be large):
  query accuracy starts at chance and climbs well above it (measured 0.63-0.80 over four seeds after 60 steps).
- The papers as written (ten steps at 1e-3): query accuracy stays at chance, phi_T no better than phi_0.
- The released trainer's reading (vocabulary-indexed head, 0.01): the head's logits are read at the class ids, so
  phi_0 can learn to predict the masked word itself; its accuracy climbs with phi_T's, without adaptation.

Thresholds: 32 query examples a step, so the mean of the last 10 steps has a standard error near 0.02 at chance;
"well above chance" is 0.4 (over 3x chance, more than ten standard errors), "at chance" is below 0.25."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PICOMAML_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json"
CHANCE, AT_CHANCE, WELL_ABOVE = 1 / 8, 0.25, 0.4

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


def planted_rows(tok, n_rows: int, row_len: int = 65, pairs: int = 6, n_classes: int = 16,
                 seed: int = 0) -> list[list[int]]:
    "Rows of two-letter filler words with `pairs` (cue, class word) bigrams each; every class word has its own cue."
    word_start, alpha_len = tok.word_start_table().numpy(), tok.alpha_len_table().numpy()
    ids, rng = np.arange(len(word_start)), np.random.default_rng(seed)
    # past the most common words
    classes = rng.choice(ids[(word_start > 0) & (alpha_len >= 4)][1000:], n_classes, replace=False)
    two_letter = rng.permutation(ids[(word_start > 0) & (alpha_len == 2)])  # never classes: shorter than min_word_chars
    cues, fillers = two_letter[:n_classes], two_letter[n_classes:n_classes + 300]
    rows = []
    for _ in range(n_rows):
        row = rng.choice(fillers, row_len)
        # odd positions: bigrams never overlap
        for at in rng.choice(np.arange(1, row_len - 1, 2), pairs, replace=False):
            c = rng.integers(n_classes)
            row[at - 1], row[at] = cues[c], classes[c]
        rows.append(row.tolist())
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from picomaml.config import load_config
    from picomaml.data import write_shard
    from picomaml.tokenizer import load_tokenizer
    out = tmp_path_factory.mktemp("planted")
    (out / "train").mkdir()
    write_shard(planted_rows(load_tokenizer(load_config(None, [f"data.tokenizer_path={TOKENIZER}"]).data), 4096),
                out / "train" / "a.parquet")
    return out


def episode_curves(corpus: Path, name: str, *overrides) -> dict:
    ("Train a tiny model on episodes only (rho = 1) for 60 steps; "
     "the per-step query and support accuracies of phi_0 and phi_T.")
    from lightning.fabric import Fabric

    from picomaml.config import load_config
    from picomaml.train import train
    cfg = load_config(None, [
        "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
        "model.max_seq_len=64", f"data.train_path={corpus}/train", "data.seq_len=64",
        f"data.tokenizer_path={TOKENIZER}", "train.steps=60", "train.global_batch=64", "train.branch_batch=64",
        "train.lr=3e-3", "train.warmup_steps=5", "checkpoint.every=1000", "smlmt.n_way=8", "smlmt.k_shot=4",
        "smlmt.q_query=4", "smlmt.window=12", "smlmt.exclude_top=0", "smlmt.min_word_chars=3", "smlmt.readout=mask",
        "maml.rho=1", "maml.head_hidden=32", "maml.head_layers=2", "maml.head_dropout=0", "eval.every=0",
        "spectra.every=0", f"logging.runs_dir={corpus}/runs", f"logging.run_name={name}", "logging.progress_bar=false",
        *overrides])
    run = train(cfg, Fabric(accelerator="cpu", devices=1, precision="32-true"))
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"query_acc"' in line]
    return {key: np.array([r[key] for r in log])
            for key in ("query_acc", "query_acc_phi0", "support_acc", "support_acc_phi0")}


def summary(name: str, c: dict) -> str:
    "One line: query accuracy first and last, and the last steps' phi_0 and support accuracies."
    last = {key: values[-10:].mean() for key, values in c.items()}
    return (f"{name}: query accuracy {c['query_acc'][:5].mean():.2f} (first 5 steps) -> "
            f"{last['query_acc']:.2f} (last 10); phi_0 {last['query_acc_phi0']:.2f}; "
            f"support {last['support_acc']:.2f} (phi_0 {last['support_acc_phi0']:.2f})")


def test_an_adapting_inner_loop_learns_the_planted_task(corpus):
    c = episode_curves(corpus, "adapting", "maml.inner_lr=0.5")
    print(summary("inner lr 0.5", c))
    # from chance to well above it
    assert c["query_acc"][:5].mean() < AT_CHANCE < WELL_ABOVE < c["query_acc"][-10:].mean()
    # phi_0 still knows nothing of the labels: the gain is adaptation
    assert c["query_acc_phi0"][-10:].mean() < AT_CHANCE
    assert c["support_acc"][-10:].mean() > c["support_acc_phi0"][-10:].mean() + 0.3


def test_the_papers_inner_loop_stays_at_chance(corpus):
    c = episode_curves(corpus, "as-written", "maml.inner_lr=1e-3")
    print(summary("inner lr 1e-3 (the papers)", c))
    assert c["query_acc"][-10:].mean() < AT_CHANCE and abs(c["query_acc"][-10:].mean() - CHANCE) < 0.06
    assert abs(c["query_acc"][-10:].mean() - c["query_acc_phi0"][-10:].mean()) < 0.03  # phi_T is phi_0: no adaptation


def test_the_released_reading_predicts_without_adapting(corpus):
    c = episode_curves(corpus, "released", "maml.inner_lr=0.01", "maml.head_output=vocab")
    print(summary("vocabulary head, inner lr 0.01 (released)", c))
    assert c["query_acc_phi0"][-10:].mean() > WELL_ABOVE  # phi_0 alone predicts the masked word from its cue
    assert c["query_acc"][-10:].mean() - c["query_acc_phi0"][-10:].mean() < 0.15  # and the inner loop adds little
