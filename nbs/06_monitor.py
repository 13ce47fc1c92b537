# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Monitoring a run
#
# > What a pretraining run logs: a record per optimizer step, Paloma perplexity and spectra on schedule.
# > The step's statistics summed over ranks, Paloma evaluation shared out over ranks, the weight and
# > gradient spectra, and when each is due.
#
# Paper 1 §3.3: "Every 100 steps we evaluate Paloma perplexity (Magnusson et al., 2024) and log the
# singular values of three attention and three feed-forward matrices to compute effective rank
# (Diehl Martinez et al., 2024). Query and support accuracies are also tracked." Paper 2 §2.4 logs
# the same. Perplexity is paper 1's Table 2 and Fig. 1, the accuracies and head statistics Figs. 3
# and 4, the spectra §6 and Fig. 5. The training loop (`06_train`) calls these pieces once per
# optimizer step.

# %%
#| default_exp monitor

# %%
#| export
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from picomaml.collectives import sum_over_ranks
from picomaml.config import Config
from picomaml.data import document_batches
from picomaml.device import peak_memory_gib, reset_peak_memory
from picomaml.lm_loss import document_sums, perplexities
from picomaml.runlog import append_records, logged_steps
from picomaml.spectra import loss_gradients, select_matrices, spectrum_records

# %% [markdown]
# ## One line per optimizer step
#
# One JSON line per optimizer step in `metrics.jsonl` (paper 1 §3.3 and Figs. 1, 3, 4):
# `step` (optimizer steps completed), `loss` (the objective the optimizer saw: the mean over the
# step's draws of their next-token or query loss), `next_token_loss` and `query_loss` (their means
# over the step's next-token draws and episodes; `null` when there were none), `n_next_token` /
# `n_maml` and `branches` (the branch sequence: `N` a next-token draw, `M` an episode), `lr`,
# `grad_norm` (before clipping), `support_acc` and `support_loss` (phi_T on the support set),
# `query_acc`, and the same four of phi_0 — the head before its inner loop — as `support_acc_phi0`,
# `support_loss_phi0`, `query_acc_phi0` and `query_loss_phi0` (so whether the inner loop adapted is a
# number), `head_weight_mean` / `head_weight_std` (phi_T's logits layer), `head_grad_norm` (the head's
# summed gradient), `tokens` (next-token tokens plus episode window tokens), `tokens_per_s` and `mfu`;
# and at evaluation steps a second line of the same step with `eval_loss`, `paloma_ppl` and
# `paloma_doc_ppl`, written after that step's checkpoint (readers merge the lines of a step).
# `tokens_per_s` and `mfu` are wall-clock measurements: everything else is a deterministic function of
# the configuration, so a resumed run's log equals an uninterrupted run's once those two are removed.
#
# Each draw returns this rank's `StepStats`; the step adds them up, all-reduces them as one float64
# vector (every field a sum over ranks), and `step_record` turns the sums into the logged means.

# %%
#| export
@dataclass
class StepStats:
    "One rank's sums over the draws of an optimizer step: all-reduced as one vector, logged as means by `step_record`."
    loss: float = 0.0  # this rank's share of the step's objective
    next_token_loss: float = 0.0  # the next-token draws' mean losses, summed over draws
    query_loss: float = 0.0  # the episodes' query losses, summed (this rank's share of each)
    n_next_token: float = 0.0  # next-token draws (each rank counts every one)
    n_maml: float = 0.0  # episodes (each rank counts every one)
    support_acc: float = 0.0  # phi_T's support accuracy, summed over episodes
    support_loss: float = 0.0  # phi_T's support loss, summed over episodes
    query_correct: float = 0.0  # phi_T's correct query predictions on this rank
    query_count: float = 0.0  # query examples on this rank
    support_acc_phi0: float = 0.0  # the same four of phi_0, the head before its inner loop
    support_loss_phi0: float = 0.0
    query_correct_phi0: float = 0.0
    query_loss_phi0: float = 0.0  # summed over this rank's query examples
    head_weight_mean: float = 0.0  # phi_T's logits layer, summed over episodes
    head_weight_std: float = 0.0
    tokens: float = 0.0  # tokens through the model on this rank
    flops: float = 0.0  # model FLOPs on this rank

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(*(a + b for a, b in zip(self.as_list(), other.as_list())))

    def as_list(self) -> list[float]:
        "The fields in order, as plain floats (for the one all-reduce)."
        return [float(getattr(self, f.name)) for f in fields(self)]

def step_record(totals: StepStats, world_size: int) -> dict:
    "Logged means from the all-reduced per-rank sums of a step's statistics."
    t = asdict(totals)
    n_next_token, n_maml = round(t["n_next_token"] / world_size), round(t["n_maml"] / world_size)
    per_episode = lambda key, ranks=world_size: t[key] / ranks / n_maml if n_maml else None  # same value on every rank
    query_share = lambda key: t[key] / t["query_count"] if n_maml else None  # over every query example of the step
    return {"loss": t["loss"], "next_token_loss": t["next_token_loss"] / n_next_token if n_next_token else None,
            "query_loss": per_episode("query_loss", 1), "n_next_token": n_next_token, "n_maml": n_maml,
            "support_acc": per_episode("support_acc"), "query_acc": query_share("query_correct"),
            "support_loss": per_episode("support_loss"), "support_acc_phi0": per_episode("support_acc_phi0"),
            "support_loss_phi0": per_episode("support_loss_phi0"), "query_acc_phi0": query_share("query_correct_phi0"),
            "query_loss_phi0": query_share("query_loss_phi0"), "head_weight_mean": per_episode("head_weight_mean"),
            "head_weight_std": per_episode("head_weight_std"), "tokens": round(t["tokens"])}


# %%
_stats = StepStats(loss=0.5, next_token_loss=2.0, n_next_token=1) + StepStats(loss=0.25, n_maml=1)
assert (_stats.loss, _stats.next_token_loss, _stats.n_next_token, _stats.n_maml, _stats.flops) == (0.75, 2.0, 1, 1, 0.0)
# 2 ranks, 1 next-token draw + 1 episode; phi_0: support accuracy 0.05 and loss 3.4 on each rank, 2 of 40 queries right,
# summed loss 136
_sums = StepStats(loss=2.0, next_token_loss=3.0, query_loss=0.9, n_next_token=2, n_maml=2, support_acc=1.5,
                  support_loss=1.0, query_correct=30, query_count=40, support_acc_phi0=0.1, support_loss_phi0=6.8,
                  query_correct_phi0=2, query_loss_phi0=136.0, head_weight_mean=0.2, head_weight_std=1.0, tokens=1000)
_rec = step_record(_sums, 2)
assert (_rec["n_next_token"], _rec["n_maml"], _rec["next_token_loss"], _rec["query_loss"]) == (1, 1, 3.0, 0.9)
assert (_rec["support_acc"], _rec["query_acc"], _rec["head_weight_std"], _rec["support_loss"]) == (0.75, 0.75, 0.5, 0.5)
assert (_rec["support_acc_phi0"], _rec["support_loss_phi0"], _rec["query_acc_phi0"],
        _rec["query_loss_phi0"]) == (0.05, 3.4, 0.05, 3.4)
assert StepStats(*_sums.as_list()) == _sums  # the all-reduced vector reads back field by field
_no_episode = step_record(StepStats(loss=1.0, next_token_loss=2.0, n_next_token=4, tokens=10), 2)
assert (_no_episode["query_acc"] is None and _no_episode["query_loss_phi0"] is None
        and _no_episode["next_token_loss"] == 1.0)


# %% [markdown]
# ## Paloma evaluation, in parallel over ranks
#
# The evaluation documents (the whole split, or its first `eval.max_documents`) are read once when the
# run starts (`picomaml.data.read_eval_documents`), so a streamed split is not re-read every 100 steps;
# each rank scores a strided share of them, each document on its own, and the sums are all-reduced
# (`06_lm_loss` turns them into perplexities: the per-document mean, pico-train's measure, and the
# token-weighted one).

# %%
#| export
def evaluate(fabric, model, documents: list, ec) -> dict:
    "Per-document and token-weighted Paloma perplexity; each rank a strided share of the documents, sums all-reduced."
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=fabric.device)
    for ids, lengths in document_batches(documents, ec.batch_size, fabric.global_rank, fabric.world_size):
        with fabric.autocast(): sums += document_sums(model, ids.to(fabric.device, non_blocking=True), lengths)
    model.train()
    return perplexities(fabric.all_reduce(sums, reduce_op="sum").cpu() if fabric.world_size > 1 else sums.cpu())


# %% [markdown]
# Test: on a toy decoder (one CPU process), evaluating 10 documents in batches of 4 gives the
# perplexities of all 10 at once, and leaves the model in training mode.

# %%
import math

from lightning.fabric import Fabric

from picomaml.config import EvalConfig, load_config
from picomaml.devtools import TINY_MODEL
from picomaml.model import PicoDecoder

_cfg = load_config(None, [*TINY_MODEL, "model.vocab_size=64", "data.eos_id=3", "eval.every=20", "spectra.every=40",
                          "eval.batch_size=4"])
_fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
torch.manual_seed(0)
_model, _rows = PicoDecoder(_cfg.model), torch.randint(0, 64, (10, 17))  # rows (10, T + 1): the spectra's
_documents = [torch.randint(0, 64, (n,)) for n in (5, 17, 9, 2, 12, 17, 3, 8, 16, 4)]
_ppl = evaluate(_fabric, _model, _documents, EvalConfig(batch_size=4))
assert _model.training
with torch.no_grad(): _whole = perplexities(document_sums(_model.eval(), *next(document_batches(_documents, 10))))
_model.train()
assert _ppl.keys() == _whole.keys() and all(math.isclose(_ppl[k], _whole[k], rel_tol=1e-6)
                                             for k in _ppl), (_ppl, _whole)


# %% [markdown]
# ## Spectra
#
# The spectra (`08_spectra`) of `spectra.layers` in every block, weights and the gradient of the mean
# next-token loss over the evaluation split's packed rows (all of them, or the first `spectra.grad_rows`),
# every `spectra.every` steps and at step 0,
# appended to `<run>/spectra.jsonl`. The ranks share the rows (a strided share each, `batch_rows` at a
# time: the planner's `spectra_batch`, so the float32 pass fits the device), their gradient sums are
# added in one all-reduce, and rank 0 computes the singular values and writes the records.

# %%
#| export
def record_run_spectra(fabric, model, rows: torch.Tensor, cfg: Config, step: int, run_dir: Path, *,
                       batch_rows: int | None = None) -> None:
    ("Weight and gradient spectra of `spectra.layers` on the fixed evaluation rows, shared over ranks; "
     "rank 0 appends to spectra.jsonl.")
    params = select_matrices(model, cfg.spectra.layers)
    mine = rows[fabric.global_rank :: fabric.world_size]  # (about grad_rows / world, T + 1)
    grads = loss_gradients(model, mine, params, batch_rows, denominator=rows[:, 1:].numel())
    grads = dict(zip(grads, sum_over_ranks(fabric, list(grads.values()))))
    if fabric.global_rank == 0: append_records(run_dir / "spectra.jsonl", spectrum_records(step, params, grads))


# %% [markdown]
# Test: in groups of two rows the records are those of one pass over the whole batch (`08_spectra`).

# %%
import json
import tempfile

import numpy as np

from picomaml.spectra import compute_spectra

with tempfile.TemporaryDirectory() as _tmp:
    record_run_spectra(_fabric, _model, _rows, _cfg, 40, Path(_tmp), batch_rows=2)
    _lines = [json.loads(l) for l in (Path(_tmp) / "spectra.jsonl").read_text().splitlines()]
    # blocks × spectra.layers × (weight, gradient)
    assert {l["step"] for l in _lines} == {40} and len(_lines) == 2 * 3 * 2
    _whole = compute_spectra(_model, _rows, _cfg.spectra.layers, 40)
    assert all(np.allclose(a["singular_values"], b["singular_values"], rtol=1e-4, atol=1e-9)
               for a, b in zip(_lines, _whole))


# %% [markdown]
# ## When: after the checkpoint, not before
#
# Evaluation and spectra run after the step's checkpoint is on disk: if they fail (a streamed
# evaluation set that cannot be read, a full disk), the optimizer step is not lost, and the relaunch
# resumes from that checkpoint and runs the monitoring it missed (`monitoring_missing`). Both are due
# at step 0 too, on the initial weights, as pico-train records them: the curves then start where
# training starts.

# %%
#| export
def monitoring_due(cfg: Config, step: int) -> tuple[bool, bool]:
    "(evaluate?, record spectra?) at completed optimizer step `step`."
    return (bool(cfg.eval.every) and step % cfg.eval.every == 0,
            bool(cfg.spectra.every) and step % cfg.spectra.every == 0)

def monitoring_missing(cfg: Config, run_dir: Path, step: int) -> tuple[bool, bool]:
    "(evaluation, spectra) that are due at `step` but absent from the run's logs (a crash between checkpoint and log)."
    want_eval, want_spectra = monitoring_due(cfg, step)
    return (want_eval and step not in logged_steps(run_dir / "metrics.jsonl", "paloma_ppl"),
            want_spectra and step not in logged_steps(run_dir / "spectra.jsonl", "per"))

def monitor(run, step: int, due: tuple[bool, bool]) -> None:
    ("Evaluate and/or record spectra of `run` (a `picomaml.layout.Run`) at `step`; "
     "rank 0 appends them (on CUDA: each one's peak GiB).")
    fabric, metrics = run.fabric, run.run_dir / "metrics.jsonl"
    do_eval, do_spectra = due
    if do_eval:
        reset_peak_memory(fabric.device)
        record = {"step": step, **evaluate(fabric, run.model, run.documents, run.cfg.eval)}
        if (peak := peak_memory_gib(fabric.device)) is not None: record["eval_peak_gib"] = peak
        if fabric.global_rank == 0: append_records(metrics, [record])
        fabric.log_dict({k: v for k, v in record.items() if k != "step"}, step=step)
    if do_spectra:
        reset_peak_memory(fabric.device)
        record_run_spectra(fabric, run.model, run.spectra_rows, run.cfg, step, run.run_dir,
                           batch_rows=run.layout.spectra_batch)
        if (peak := peak_memory_gib(fabric.device)) is not None and fabric.global_rank == 0:
            append_records(metrics, [{"step": step, "spectra_peak_gib": peak}])


# %%
_mcfg = load_config(None, ["eval.every=20", "spectra.every=40"])
assert (monitoring_due(_mcfg, 40) == (True, True) and monitoring_due(_mcfg, 20) == (True, False)
        and monitoring_due(_mcfg, 30) == (False, False))
assert (monitoring_due(_mcfg, 0) == (True, True)
        and monitoring_due(load_config(None, ["eval.every=0", "spectra.every=0"]), 0) == (False, False))
with tempfile.TemporaryDirectory() as _tmp:
    (Path(_tmp) / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    assert monitoring_missing(_mcfg, Path(_tmp), 40) == (True, True)
    (Path(_tmp) / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n{"step": 40, "paloma_ppl": 9.0}\n')
    assert monitoring_missing(_mcfg, Path(_tmp), 40) == (False, True)

# %% [markdown]
# Test: what `monitor` writes at a step where both are due is exactly what `monitoring_missing` looks
# for, so a relaunch after it finds nothing missing.

# %%
from picomaml.layout import Run, StepLayout

with tempfile.TemporaryDirectory() as _tmp:
    (Path(_tmp) / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    assert monitoring_missing(_cfg, Path(_tmp), 40) == (True, True)
    _run = Run(cfg=_cfg, fabric=_fabric, model=_model, head=None, optimizer=None, run_dir=Path(_tmp),
               documents=_documents, spectra_rows=_rows,
               layout=StepLayout(draws=1, rows_per_rank=10, chunk_rows=10, pool_rows=10, pool_seed=0, spectra_batch=4))
    monitor(_run, 40, monitoring_due(_cfg, 40))
    assert monitoring_missing(_cfg, Path(_tmp), 40) == (False, False)
    assert json.loads((Path(_tmp) / "metrics.jsonl").read_text().splitlines()[-1]) == {
        "step": 40, **evaluate(_fabric, _model, _documents, _cfg.eval)}
