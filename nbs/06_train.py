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
# # The hybrid training loop
#
# > The pretraining loop of paper 1 App. A (Algorithms 1 and 2), one branch micro-batch at a time.
# > Each micro-batch is, with probability rho, a first-order MAML episode on an SMLMT task, else an
# > ordinary next-token step.
#
# This notebook is the pretraining loop of paper 1 §3 and §3.3 (paper 2 §2.3 and §2.4): the hybrid
# objective on Lightning Fabric's processes, AdamW with warmup and cosine decay, and
# `global_batch / branch_batch` hybrid draws per optimizer step. Its neighbours hold what the loop
# calls: `05_maml` the episode step, `06_collectives` how ranks split rows and episodes and sum the
# gradients, `06_lm_loss` the next-token loss, `06_monitor` the `metrics.jsonl` record of each step
# and the Paloma perplexity and spectra every `eval.every` / `spectra.every` steps, `06_plan` the
# memory plan and FLOP counts, and `06_resume` (on the store of `06_checkpoints`) the checkpoints that
# resume bit for bit. What is left here is the learning-rate schedule, the model's setup and the two
# branches, each tested on toy tensors; `train` at the end puts them in one flat loop that reads like
# the paper's pseudocode, and the tests after it run that loop end to end.
#
# **Gradients equal a one-process run.** Every rank's loss is its share of the global objective
# (a sum over its rows divided by the global count), and the gradients are summed over ranks with one
# all-reduce per optimizer step (`06_collectives` explains why this is not DDP).

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import torch
from tqdm.auto import tqdm

from picomaml.checkpoints import LOCK_FILE, checkpoint_due
from picomaml.cli import ensure_writable
from picomaml.collectives import branch_draws, gather_parts, part_sizes, part_slice, sum_gradients
from picomaml.config import Config, ConfigError
from picomaml.data import RowPrefetcher, batch_for_step, open_rows, read_eval_documents, read_eval_rows
from picomaml.device import cuda_capability, peak_memory_gib, reset_peak_memory
from picomaml.layout import Run, step_layout
from picomaml.lm_loss import next_token_backward
from picomaml.maml import MAMLHead, maml_step
from picomaml.model import PicoDecoder, count_parameters
from picomaml.monitor import StepStats, monitor, monitoring_due, monitoring_missing, step_record
from picomaml.names import mix_seed
from picomaml.plan import Plan, device_memory_gb, episode_flops, next_token_flops, peak_flops, plan_run
from picomaml.resume import (
    PreemptionFlag,
    check_finite,
    confirm_if_healthy,
    preemption_agreed,
    resume_or_start,
    save_training_state,
    stop_for_preemption,
)
from picomaml.runlog import append_records, release_lock
from picomaml.smlmt import build_episode
from picomaml.tokenizer import load_tokenizer


# %% [markdown]
# ## Learning-rate schedule
#
# Linear warmup to the peak over `warmup_steps`, then decay to `min_lr_ratio × lr` over `decay_steps`
# (0: the whole run): cosine in the papers (paper 1 §3.3 and paper 2 §2.4: "2500-step warm-up and
# cosine decay"), linear for the `released` preset (whose 200,000-step decay is nearly constant over
# 6,000 steps, as the released trainer's schedule was), or constant. It is a pure function of the
# step (nanoGPT's `get_lr`), so resuming needs only the step, not a scheduler object.

# %%
#| export
def lr_at(step: int, tc) -> float:
    "Learning rate of optimizer step `step` (0-based) under TrainConfig `tc`."
    if step < tc.warmup_steps: return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant": return tc.lr
    span = max(1, (tc.decay_steps or tc.steps) - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * shape)


# %%
from picomaml.config import TrainConfig

_tc = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
assert lr_at(0, _tc) == 0.1 and lr_at(9, _tc) == 1.0 and lr_at(10, _tc) == 1.0
assert abs(lr_at(60, _tc) - 0.55) < 1e-12 and abs(lr_at(110, _tc) - 0.1) < 1e-12  # cosine midpoint, floor
_lin = TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="linear", decay_steps=210)
assert abs(lr_at(110, _lin) - 0.5) < 1e-12  # halfway through a 200-step linear decay
assert lr_at(100, TrainConfig(warmup_steps=10, lr=1.0, schedule="constant")) == 1.0


# %% [markdown]
# ## Setting up a run
#
# Precision (paper 2 App. F: "BF16 Mixed"): bf16 autocast on GPUs that have bf16 tensor cores,
# float32 on CPU and older GPUs; plain fp16 would need a loss scaler around the hand-written MAML
# backward, so it is refused (`picomaml.device.resolve_precision`, `00_device`). Model and head are
# initialised from `train.seed` on every rank (identical without a broadcast); AdamW steps backbone
# and head together (paper 1 App. A: the outer update covers the backbone and the head). Its settings
# beyond the peak lr are the configuration's, by default pico-train's `torch.optim.AdamW(params, lr)`
# (`00_config`; `docs/settings.md` lists every setting the papers leave unstated).

# %%
#| export
def build_model(cfg: Config, device) -> tuple:
    "(backbone, MAML head, AdamW over both), identically initialised on every rank from train.seed."
    torch.manual_seed(cfg.train.seed)
    model = PicoDecoder(cfg.model).to(device)
    head = MAMLHead(cfg.model.d_model, cfg.smlmt.n_way, cfg.maml, cfg.model.vocab_size).to(device)
    tc = cfg.train
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  eps=tc.eps, weight_decay=tc.weight_decay)
    return model, head, optimizer


# %% [markdown]
# Test: a paper preset (pico-tiny-maml, shrunk to two blocks and a 64-id vocabulary) starts where
# pico-train starts. The embedding is, bit for bit, a plain `nn.Embedding` built first under
# `train.seed` (N(0, 1)), every linear weight lies inside and fills PyTorch's bound 1/√fan_in, the
# optimizer's settings are exactly those of `torch.optim.AdamW(params, lr)`, and nothing is clipped.
# The earlier choices are options: `model.init=normal`, `train.beta2=0.95`, `train.grad_clip=1.0`.

# %%
from torch import nn

from picomaml.config import PRESETS_DIR, load_config

_shrink = ["model.n_layers=2", "model.vocab_size=64", "model.max_seq_len=32"]
_paper = load_config(PRESETS_DIR / "pico-tiny-maml.yaml", _shrink)
_model, _head, _opt = build_model(_paper, torch.device("cpu"))
torch.manual_seed(_paper.train.seed)
assert torch.equal(_model.embedding_proj.weight, nn.Embedding(64, _paper.model.d_model).weight)
assert all(0.95 / m.in_features ** 0.5 < m.weight.abs().max() <= 1 / m.in_features ** 0.5
           for m in _model.modules() if isinstance(m, nn.Linear))
assert _opt.defaults == torch.optim.AdamW(_model.parameters(), lr=_paper.train.lr).defaults
assert _paper.train.grad_clip == 0
assert (_opt.defaults["betas"], _opt.defaults["weight_decay"]) == ((0.9, 0.999), 0.01)
_old = load_config(PRESETS_DIR / "pico-tiny-maml.yaml",
                   _shrink + ["model.init=normal", "train.beta2=0.95", "train.grad_clip=1.0"])
_model, _, _opt = build_model(_old, torch.device("cpu"))
assert abs(_model.embedding_proj.weight.std().item() - 0.02) < 1e-3
assert _opt.defaults["betas"] == (0.9, 0.95) and _old.train.grad_clip == 1.0


# %% [markdown]
# ## The memory chunk, from the plan
#
# `train.chunk_rows = 0` asks the planner (`06_plan`) for the largest chunk the device fits, and
# `spectra.grad_batch = 0` for the largest group of the spectra's float32 gradient pass; set values are
# checked the same way and used as given. The plan is made for this device: its memory, and on CUDA
# its compute capability (which decides bf16 or float32, and with it the attention kernel). A
# configuration that cannot fit is refused here, before the data is opened or step 1 runs, with the
# planner's one-line reason naming the setting to change.

# %%
#| export
def memory_plan(cfg: Config, world_size: int, device: torch.device) -> Plan:
    "The planner's plan of this run on this device (memory chunk, spectra groups); refuses a plan that does not fit."
    plan = plan_run(cfg, world_size, device_memory_gb(device), device=device.type, capability=cuda_capability(device))
    if not plan.fits: raise ConfigError(plan.reason)
    return plan


# %% [markdown]
# ## The two branches
#
# An **episode** (paper 1 App. A, Algorithm 1) reads this rank's rows of the pool and gathers them,
# builds the episode of (seed, draw) from the identical pool on every rank, and runs
# `picomaml.maml.maml_step` with the support windows split over ranks (features gathered back) and the
# query windows split (`06_collectives`). With `smlmt.episode_scope = "rank"` (the released trainer's
# reading, `docs/released-trainer.md`) nothing is gathered: each rank builds an episode of the same
# (seed, draw) from its own rows, adapts its own head copy on it, and the query losses of the ranks'
# episodes are averaged (each backpropagated at 1/world, summed with the gradients).
# A **next-token** draw (Algorithm 2) backpropagates this rank's share of the micro-batch's mean loss,
# chunk by chunk. Both are given this rank's rows (read ahead by the loop) and return this rank's
# statistics of the draw (`06_monitor` sums them over ranks). Episodes also need the tokenizer's word
# tables (`04_smlmt`), read once when the run starts.

# %%
#| export
def episode_tables(cfg: Config) -> tuple:
    "(word_start, alpha_len, special ids) of the tokenizer, for SMLMT episodes."
    tok = load_tokenizer(cfg.data)
    return tok.word_start_table(), tok.alpha_len_table(), [tok.eos_id]

def episode_draw(run: Run, step: int, draw: int, rows: torch.Tensor) -> StepStats:
    "One MAML episode of (step, draw) from this rank's pool `rows`, gathered or on their own; this rank's statistics."
    fabric, cfg, draws = run.fabric, run.cfg, run.layout.draws
    rank, world = fabric.global_rank, fabric.world_size
    own = cfg.smlmt.episode_scope == "rank"  # the released trainer: every rank its own episode, from its own rows
    rows = rows.to(fabric.device, non_blocking=True)
    pool = rows if own else gather_parts(fabric, rows, [len(rows)] * world)  # (pool rows, T + 1)
    episode = build_episode(pool, cfg.smlmt, *run.tables, cfg.data.mask_id, seed=cfg.train.seed,
                            step=step * draws + draw)
    n_support, n_query = len(episode.support_labels), len(episode.query_labels)
    # an own episode's query loss is one of `world` averaged; a gathered one is split over ranks, then summed
    share = world if own else 1
    with fabric.autocast():
        split = {} if own else dict(gather=lambda f: gather_parts(fabric, f, part_sizes(n_support, world)),
                                    support_part=part_slice(n_support, world, rank),
                                    query_part=part_slice(n_query, world, rank))
        out = maml_step(run.model, run.head, episode, cfg.maml, **split, loss_scale=1 / (draws * share),
                        inner_seed=mix_seed(cfg.train.seed, step, draw, "inner"))
    window, my_support = episode.support_ids.shape[1], n_support if own else part_sizes(n_support, world)[rank]
    return StepStats(loss=out["loss"] / (draws * share), query_loss=out["loss"] / share, n_maml=1,
                     support_acc=out["support_acc"], support_loss=out["support_loss"],
                     support_acc_phi0=out["support_acc_phi0"], support_loss_phi0=out["support_loss_phi0"],
                     query_correct=out["query_correct"], query_count=out["query_count"],
                     query_correct_phi0=out["query_correct_phi0"], query_loss_phi0=out["query_loss_phi0_sum"],
                     head_weight_mean=out["head_weight_mean"], head_weight_std=out["head_weight_std"],
                     tokens=(my_support + out["query_count"]) * window,
                     flops=episode_flops(cfg.model, my_support * window, out["query_count"] * window, window))

def next_token_draw(run: Run, rows: torch.Tensor) -> StepStats:
    "One next-token draw on this rank's `rows` (rows per rank, T + 1), in memory chunks; this rank's statistics."
    fabric, cfg, draws = run.fabric, run.cfg, run.layout.draws
    seq_len = rows.shape[1] - 1
    global_targets = cfg.train.branch_batch * seq_len  # the draw's mean is over every rank's targets
    loss_sum = next_token_backward(run.model, rows, run.layout.chunk_rows, global_targets * draws, fabric.autocast,
                                   fabric.device)
    share = loss_sum / global_targets
    return StepStats(loss=share / draws, next_token_loss=share, n_next_token=1, tokens=rows.shape[0] * seq_len,
                     flops=next_token_flops(cfg.model, rows.shape[0] * seq_len, seq_len))


# %% [markdown]
# ## Setting up the run
#
# Algorithm 1, line 1 ("Initialize model f_theta, head h_phi, outer optimizer"), and what the loop
# reads on every step: the memory plan and the step layout (`06_layout`), the run directory (rank 0
# checks that one full checkpoint fits on its disk), the row sources of the two branches (the
# next-token stream; the episode pool, the same stream or `smlmt.pool_rows` rows of a second order),
# the tokenizer's word tables, and the evaluation sets.

# %%
#| export
def start_run(cfg: Config, fabric, uploads=None) -> Run:
    "The run of `cfg` on a launched Fabric: plan, layout, modules, AdamW, row sources, word tables, evaluation sets."
    plan = memory_plan(cfg, fabric.world_size, fabric.device)
    run_dir, vocab = Path(cfg.logging.runs_dir) / cfg.logging.run_name, cfg.model.vocab_size
    if fabric.global_rank == 0:  # room for one full checkpoint before anything is trained
        ensure_writable(run_dir, "logging.runs_dir", need_bytes=16 * count_parameters(cfg.model))
    model, head, optimizer = build_model(cfg, fabric.device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    run = Run(cfg=cfg, fabric=fabric, model=model, head=head, optimizer=optimizer, run_dir=run_dir,
              layout=step_layout(cfg, fabric.world_size, plan), uploads=uploads)
    run.sources[False] = open_rows(cfg.data, "train", vocab, block_rows=cfg.train.branch_batch)
    if cfg.maml.rho > 0:
        pool_rows = cfg.smlmt.pool_rows
        run.sources[True] = run.sources[False] if pool_rows == 0 else open_rows(cfg.data, "train", vocab, pool_rows)
        run.tables = episode_tables(cfg)
    if cfg.eval.every:
        run.documents = read_eval_documents(cfg.data, cfg.eval.max_documents, cfg.model.max_seq_len, vocab)
    if cfg.spectra.every: run.spectra_rows = read_eval_rows(cfg.data, cfg.spectra.grad_rows, vocab)
    return run


# %% [markdown]
# ## The draws of one step
#
# Lines 4–19 of Algorithm 1 for one optimizer step. The branch of every draw is one shared Bernoulli
# draw of (seed, step) (`06_collectives`: every rank computes the same one, so nothing is broadcast).
# Each draw's rows are read ahead on a background thread while the previous draw trains
# (`RowPrefetcher`, `03_data`); before the draw runs, the RNG is seeded from (seed, step, draw, rank),
# so dropout is a function of the position in the run and a resumed run repeats it exactly. Each
# draw backpropagates at `1 / draws` and returns this rank's `StepStats` (`06_monitor`).

# %%
#| export
def step_branches(run: Run, step: int) -> list[bool]:
    "The branch of each draw of `step`: True an episode (probability rho), else a next-token draw; equal on all ranks."
    return branch_draws(run.cfg.train.seed, step, run.layout.draws, run.cfg.maml.rho)

def rows_reader(run: Run, step: int, draw: int, episode: bool):
    "The read of this rank's rows of (step, draw): its part of the episode's pool, or of the next-token draw."
    layout, rank, world = run.layout, run.fabric.global_rank, run.fabric.world_size
    rows, seed = (layout.pool_rows, layout.pool_seed) if episode else (layout.rows_per_rank, run.cfg.train.seed)
    return lambda: batch_for_step(run.sources[episode], step, draw, rank, world, rows_per_rank=rows,
                                  accum_steps=layout.draws, seed=seed)

def take_rows(run: Run, ahead: RowPrefetcher, step: int, draw: int, branches: list[bool]) -> torch.Tensor:
    "This draw's rows, read while the previous draw trained; asks for the next draw's (or the next step's first)."
    rows = ahead.take((step, draw), rows_reader(run, step, draw, branches[draw]))
    if draw + 1 < len(branches): ahead.ask((step, draw + 1), rows_reader(run, step, draw + 1, branches[draw + 1]))
    elif step + 1 < run.cfg.train.steps:
        ahead.ask((step + 1, 0), rows_reader(run, step + 1, 0, step_branches(run, step + 1)[0]))
    return rows

def accumulate_draws(run: Run, ahead: RowPrefetcher, step: int) -> tuple[StepStats, list[bool]]:
    "Every draw of `step` backpropagated (an episode or a next-token loss); this rank's statistics and the branches."
    branches, stats = step_branches(run, step), StepStats()
    for draw, is_episode in enumerate(branches):
        rows = take_rows(run, ahead, step, draw, branches)
        torch.manual_seed(mix_seed(run.cfg.train.seed, step, draw, run.fabric.global_rank))
        stats += episode_draw(run, step, draw, rows) if is_episode else next_token_draw(run, rows)
    return stats, branches


# %% [markdown]
# ## The outer update
#
# After the last draw (Algorithm 1, lines 20–22: "OptimizerStep(); SchedulerStep(); ZeroGrad();
# AggregateMetrics"): the step's statistics are summed over ranks in one all-reduce, together with
# every rank's branches (a rank that drew differently would silently train another objective, so it
# is an error); the gradients are clipped (`train.grad_clip`, off in the papers; the norm is logged
# either way), checked for NaN (`06_resume`: stop before a bad step reaches a checkpoint), and
# AdamW steps backbone and head together.

# %%
#| export
def step_totals(run: Run, step: int, stats: StepStats, branches: list[bool]) -> StepStats:
    "This step's statistics summed over ranks; an error if the ranks drew different branches."
    fabric, world = run.fabric, run.fabric.world_size
    totals = torch.tensor(stats.as_list() + [float(b) for b in branches], dtype=torch.float64, device=fabric.device)
    totals = (fabric.all_reduce(totals, reduce_op="sum") if world > 1 else totals).cpu().tolist()
    n = len(totals) - len(branches)
    if any(v not in (0, world) for v in totals[n:]):
        raise RuntimeError(f"step {step + 1}: ranks took different branches {totals[n:]}; "
                           f"the branch draw must be shared")
    return StepStats(*totals[:n])

def outer_update(run: Run, step: int, record: dict, recent_losses: deque) -> None:
    "Clip, check and take the AdamW step of `step`, adding the gradient norms to its `record`."
    head_grads = [p.grad for p in run.head.parameters() if p.grad is not None]
    record["head_grad_norm"] = (torch.linalg.vector_norm(torch.stack([g.norm() for g in head_grads])).item()
                                if head_grads else None)
    clip = run.cfg.train.grad_clip if run.cfg.train.grad_clip > 0 else math.inf
    record["grad_norm"] = torch.nn.utils.clip_grad_norm_(run.params, clip).item()
    check_finite(record, run.run_dir)
    if run.fabric.global_rank == 0:
        confirm_if_healthy(run.run_dir / "checkpoints", step, record["loss"], list(recent_losses))
    recent_losses.append(record["loss"])
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


# %% [markdown]
# ## The step's record
#
# The logged line of the step (`06_monitor`) with its learning rate and branches, and two wall-clock
# measures: tokens per second and the model FLOP utilisation against the device's peak (none on
# CPU); on CUDA also the step's peak memory, to compare with the plan. Rank 0 appends it every
# `logging.log_every` steps and at the last; every rank hands it to Fabric's loggers.

# %%
#| export
def log_step(run: Run, step: int, record: dict, totals: StepStats, started: float) -> None:
    "Add the step's throughput to its record and write it (rank 0, every logging.log_every steps and at the last)."
    fabric, peak = run.fabric, peak_flops(run.fabric.device)
    elapsed = time.perf_counter() - started
    record["tokens_per_s"] = record["tokens"] / elapsed
    record["mfu"] = totals.flops / elapsed / (peak * fabric.world_size) if peak else None
    if (step_peak := peak_memory_gib(fabric.device)) is not None: record["peak_gib"] = step_peak
    if fabric.global_rank == 0 and ((step + 1) % run.cfg.logging.log_every == 0 or step + 1 == run.cfg.train.steps):
        append_records(run.run_dir / "metrics.jsonl", [record])
    fabric.log_dict({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)


# %% [markdown]
# ## The loop
#
# Paper 1 App. A, Algorithm 1 (Algorithm 2 is its rho = 0 case), one optimizer step at a time, as
# nanoGPT's `train.py` reads. Before the first step: resume or start (`06_resume`: a relaunch
# continues its newest good checkpoint; rank 0 holds the run directory's lock from here), checkpoint
# step 0, and evaluate the initial weights. After every step: log it, checkpoint it when due (rank 0
# hands it to the Hub uploads when `logging.hub_repo` is set), stop with that step saved if any rank
# got a preemption signal, and only then evaluate, so a failing evaluation never loses a step.

# %%
#| export
def train(cfg: Config, fabric, uploads=None) -> Path:
    "Pretrain under `cfg` on a launched Fabric (Algorithms 1 and 2); the run directory. `uploads`: rank 0's to the Hub."
    tc, run = cfg.train, start_run(cfg, fabric, uploads)
    ahead = RowPrefetcher(pin=fabric.device.type == "cuda")
    # from here on, SIGTERM/SIGUSR1 save the step in hand and exit 75
    recent_losses, preemption = deque(maxlen=20), PreemptionFlag()
    try:
        start = resume_or_start(run)
        if start == 0: save_training_state(run, 0)
        # step 0: the initial weights evaluated; a relaunch runs what its last launch missed
        if start == 0: due = monitoring_due(cfg, 0)
        else: due = fabric.broadcast(monitoring_missing(cfg, run.run_dir, start), src=0)
        monitor(run, start, due)
        bar = tqdm(total=tc.steps, initial=start, disable=fabric.global_rank != 0 or not cfg.logging.progress_bar,
                   desc=cfg.logging.run_name)
        for step in range(start, tc.steps):
            # the learning rate of this step: warmup, then cosine (or linear) decay
            started, lr = time.perf_counter(), lr_at(step, tc)
            for group in run.optimizer.param_groups: group["lr"] = lr
            reset_peak_memory(fabric.device)
            # every draw: an SMLMT episode with probability rho, else a next-token loss; backward at 1 / draws
            stats, branches = accumulate_draws(run, ahead, step)
            # one all-reduce of the gradients: each rank's loss was its share of the global objective
            sum_gradients(fabric, run.params)
            totals = step_totals(run, step, stats, branches)
            record = {"step": step + 1, **step_record(totals, fabric.world_size), "lr": lr,
                      "branches": "".join("M" if b else "N" for b in branches)}
            # clip, NaN and divergence checks, AdamW over backbone and head
            outer_update(run, step, record, recent_losses)
            log_step(run, step, record, totals, started)
            # checkpoint when due; on a preemption signal save this step and exit for a requeue
            saved = checkpoint_due(step + 1, cfg.checkpoint, tc.steps)
            if saved: save_training_state(run, step + 1)
            if step + 1 < tc.steps and preemption_agreed(fabric, preemption):
                stop_for_preemption(run, step + 1, saved=saved)
            # Paloma and spectra after the checkpoint, so a failing evaluation loses no step
            monitor(run, step + 1, monitoring_due(cfg, step + 1))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", branches=record["branches"])
    finally:
        ahead.close()
        preemption.restore()
        release_lock(run.run_dir / LOCK_FILE)
    bar.close()
    return run.run_dir


# %% [markdown]
# ## A tiny run, start to finish
#
# Real data, tiny model: 20 C4 documents prepared into 33-id rows, a two-block d = 24 decoder (the
# real 50,304-row vocabulary, since the rows hold real OLMo ids), one CPU process. Next-token training
# only (rho = 0) must lower the loss, never build an episode and write the whole run directory.

# %%
import os
import tempfile

from lightning.fabric import Fabric
from safetensors.torch import load_file

from picomaml.config import load_config
from picomaml.data import prepare
from picomaml.devtools import tiny_run
from picomaml.runlog import read_records

SHARED = Path(os.environ.get("PICOMAML_DATA", "/work/shared/data"))
_tok = load_tokenizer(load_config(None, [f"data.tokenizer_path={SHARED}/tokenizer/olmo-7b-0724-tokenizer.json"]).data)
_data = Path(tempfile.mkdtemp())
for _split, _files in (("train", "c4-sample.0[12].json.gz"), ("eval", "c4_100_domains_*.jsonl.gz")):
    prepare(sorted((SHARED / "corpus" / _split).glob(_files)), _data / _split, 32, _tok, log=lambda m: None)

def tiny_config(runs_dir, *overrides):
    "A seconds-long configuration on the prepared rows (the shared tiny model and episode, `90_devtools`)."
    return load_config(None, tiny_run(_data, runs_dir, "run", _tok.source, "train.steps=8", "train.global_batch=8",
                                      "train.branch_batch=4", "train.lr=1e-2", "train.warmup_steps=2",
                                      "checkpoint.every=4", "eval.every=4", *overrides))

def read_metrics(run_dir):
    "A run's metrics, the lines of one step (training, then evaluation) merged."
    merged = {}
    for record in read_records(Path(run_dir) / "metrics.jsonl"): merged.setdefault(record["step"], {}).update(record)
    return [merged[step] for step in sorted(merged)]

_fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
_runs = Path(tempfile.mkdtemp())
_real_build = build_episode
build_episode = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rho = 0 built an episode"))
try: _run = train(tiny_config(_runs, "maml.rho=0", "logging.run_name=ar"), _fabric)
finally: build_episode = _real_build
_log = read_metrics(_run)
assert "paloma_doc_ppl" in _log[0] and "loss" not in _log[0]  # step 0: the initial weights evaluated, before any step
_log = _log[1:]
assert [r["step"] for r in _log] == list(range(1, 9)) and all(r["n_maml"] == 0 and r["n_next_token"] == 2 for r in _log)
assert _log[-1]["loss"] < _log[0]["loss"] - 0.3, [r["loss"] for r in _log]
assert all(r["query_loss"] is None and r["support_acc"] is None and r["head_grad_norm"] is None for r in _log)
assert _log[3]["paloma_ppl"] > _log[7]["paloma_ppl"] and "paloma_doc_ppl" in _log[7] and "paloma_ppl" not in _log[4]
_checkpoints = _run / "checkpoints"
assert sorted(p.name for p in _checkpoints.iterdir()) == ["latest", "step_000000", "step_000004", "step_000008"]
# keep_state 2: the newest two keep their training state
assert [p.parent.name for p in sorted(_checkpoints.glob("*/training_state.pt"))] == ["step_000004", "step_000008"]
assert load_config(_run / "config.yaml").maml.rho == 0
print(*(f"step {r['step']}: loss {r['loss']:.3f} lr {r['lr']:.4f} {r['tokens_per_s']:.0f} tok/s" for r in _log),
      sep="\n")

# %% [markdown]
# Episodes only (rho = 1): no next-token step is ever taken, every step logs the episode metrics,
# and the head's weights move (AdamW steps it with the backbone).

# %%
_run = train(tiny_config(_runs, "maml.rho=1", "logging.run_name=maml", "train.steps=3", "eval.every=0",
                         "checkpoint.log_spaced=true"), _fabric)
_log = read_metrics(_run)
assert all(r["n_next_token"] == 0 and r["n_maml"] == 2 and r["branches"] == "MM" for r in _log)
assert all(r["next_token_loss"] is None for r in _log)
assert all(0 <= r["support_acc"] <= 1 and 0 <= r["query_acc"] <= 1 and r["head_grad_norm"] > 0 for r in _log)
assert all(math.isclose(r["loss"], r["query_loss"], rel_tol=1e-12) for r in _log)
_head0, _head3 = (load_file(_run / f"checkpoints/step_00000{s}/head.safetensors") for s in (0, 3))
assert all(not torch.equal(_head0[k], _head3[k]) for k in _head0)
print(*(f"step {r['step']}: query loss {r['query_loss']:.3f} support acc {r['support_acc']:.2f} "
        f"query acc {r['query_acc']:.2f}" for r in _log),
      sep="\n")

# %% [markdown]
# Episodes one per rank (`smlmt.episode_scope = "rank"`, the released trainer's reading). In one
# process it is the gathered episode exactly (the same rows, nothing to gather): the run's weights and
# log equal the run above. On two ranks each rank builds its own episode from its own rows and
# gathers nothing (the stand-in fabric below has no collective at all, so a gather would fail), and
# the two ranks' gradients and logged query loss are the average of the two one-process episodes.

# %%
_ranked = train(tiny_config(_runs, "maml.rho=1", "logging.run_name=maml-rank", "train.steps=3", "eval.every=0",
                            "checkpoint.log_spaced=true", "smlmt.episode_scope=rank"), _fabric)
_strip = lambda log: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in log]
assert _strip(read_metrics(_ranked)) == _strip(read_metrics(_run))
assert all(torch.equal(v, load_file(_ranked / "checkpoints/step_000003/model.safetensors")[k])
           for k, v in load_file(_run / "checkpoints/step_000003/model.safetensors").items())

# %%
import contextlib
from types import SimpleNamespace

from picomaml.layout import StepLayout

_cfg = tiny_config(_runs, "maml.rho=1", "maml.head_dropout=0", "smlmt.episode_scope=rank")
_tables, _pools = episode_tables(_cfg), open_rows(_cfg.data, "train", _cfg.model.vocab_size).rows(range(128)).split(64)
def _rank_grads(world: int, rank: int, local) -> tuple[dict, float]:
    "Gradients and query loss one rank's draw leaves, on a stand-in fabric without collectives."
    model, head, optimizer = build_model(_cfg, torch.device("cpu"))  # seeded by train.seed: the same start every call
    fabric = SimpleNamespace(global_rank=rank, world_size=world, device=torch.device("cpu"),
                             autocast=contextlib.nullcontext)
    n = len(local)
    layout = StepLayout(draws=1, rows_per_rank=n, chunk_rows=n, pool_rows=n, pool_seed=0, spectra_batch=0)
    run = Run(cfg=_cfg, fabric=fabric, model=model, head=head, optimizer=optimizer, run_dir=_runs, layout=layout,
              tables=_tables)
    out = episode_draw(run, 0, 0, local)
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate((model, head))
             for n, p in m.named_parameters() if p.grad is not None}
    return grads, out.query_loss
_alone = [_rank_grads(1, 0, pool) for pool in _pools]  # each rank's rows as a one-process episode
_ranks = [_rank_grads(2, r, pool) for r, pool in enumerate(_pools)]
assert all(torch.allclose(_ranks[0][0][n] + _ranks[1][0][n], (_alone[0][0][n] + _alone[1][0][n]) / 2, atol=1e-7)
           for n in _alone[0][0])
assert math.isclose(_ranks[0][1] + _ranks[1][1], (_alone[0][1] + _alone[1][1]) / 2, rel_tol=1e-9)
assert not all(torch.allclose(_alone[0][0][n], _alone[1][0][n]) for n in _alone[0][0])  # the two ranks' episodes differ

# %% [markdown]
# A failing evaluation loses nothing: here the Paloma evaluation of step 4 fails (a streamed
# evaluation set that cannot be read, say). Step 4's checkpoint is already on disk, so the relaunch
# resumes there instead of at step 0, runs the evaluation it missed, and finishes.

# %%
import picomaml.monitor
from picomaml.devtools import raises

_real_evaluate, _calls = picomaml.monitor.evaluate, []
def _fails_at_step_4(*args, **kwargs):  # the second evaluation: step 0's is the first
    _calls.append(1)
    if len(_calls) == 2: raise OSError("evaluation set unreadable")
    return _real_evaluate(*args, **kwargs)
picomaml.monitor.evaluate = _fails_at_step_4
try: raises(lambda: train(tiny_config(_runs, "maml.rho=0", "logging.run_name=eval-fails"), _fabric), kind=OSError)
finally: picomaml.monitor.evaluate = _real_evaluate
assert (_runs / "eval-fails" / "checkpoints" / "latest").read_text().strip() == "step_000004"
_log = read_metrics(_runs / "eval-fails")
assert [r["step"] for r in _log] == [0, 1, 2, 3, 4] and "paloma_ppl" not in _log[4]
_log = read_metrics(train(tiny_config(_runs, "maml.rho=0", "logging.run_name=eval-fails"), _fabric))
assert [r["step"] for r in _log] == list(range(0, 9)) and all("paloma_ppl" in _log[s] for s in (0, 4, 8))
