# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The hybrid training loop
#
# > Paper 1, Appendix A (Algorithms 1 and 2): one loop over branch micro-batches; each is, with
# > probability rho, a first-order MAML episode on an SMLMT task, else an ordinary next-token step.
#
# This notebook is the pretraining loop of paper 1 §3–§4.1 and paper 2 §3: Lightning Fabric for
# processes and collectives, AdamW with warmup and cosine decay, `global_batch / branch_batch` hybrid
# draws per optimizer step, checkpoints that resume bit for bit, a `metrics.jsonl` line per optimizer
# step and Paloma perplexity every `eval.every` steps. Its neighbours hold what the loop calls:
# `06_lm_loss` the next-token loss and the perplexities, `06_checkpoints` the run directory,
# `06_plan` the memory plan and FLOP counts, `05_maml` the episode step. The pieces come first, each
# tested on toy tensors; `train` at the end puts them in one flat loop that reads like the
# paper's pseudocode.
#
# **Gradients equal a one-process run.** Every rank's loss is its share of the global objective
# (a sum over its rows divided by the global count), and the gradients are summed over ranks with one
# all-reduce per optimizer step. We do not wrap the model in DDP: DDP averages (so each loss would
# need a factor of world size), needs `find_unused_parameters` because the two branches use different
# parameters (the MAML head is idle on next-token steps, the output layer on MAML steps), and never
# sees the first-order head gradient, which is written into `phi_0.grad` by hand after the backward
# pass. Summing one flat gradient buffer at the optimizer step is what DDP with `no_sync` over the
# accumulation does, without those three problems.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections import deque
from pathlib import Path

import torch
from tqdm.auto import tqdm

from picomaml.checkpoints import (NoResumableCheckpoint, checkpoint_due, confirm_checkpoint, find_resumable, has_training_state,
                                  list_checkpoints, newest_confirmed, prune_training_state, read_checkpoint, read_meta,
                                  truncate_metrics, upload_checkpoint, write_checkpoint)
from picomaml.config import Config, ConfigError, config_changes, ensure_writable, load_config, save_config
from picomaml.data import batch_for_step, eval_batches, open_rows, read_eval_rows
from picomaml.lm_loss import eval_sums, next_token_backward, perplexities
from picomaml.maml import MAMLHead, maml_step
from picomaml.model import PicoDecoder, count_parameters, load_checked
from picomaml.names import step_dir_name
from picomaml.plan import ar_flops, device_memory_gb, episode_flops, peak_flops, plan_run
from picomaml.smlmt import build_episode
from picomaml.spectra import record_spectra
from picomaml.tokenizer import load_tokenizer

# %% [markdown]
# ## Branch micro-batches and memory chunks
#
# Paper 1 §4.1 and paper 2 §3: "micro batches of 256 sequences are accumulated eight times giving an
# effective batch of 2048 (1024 for the 11M model)". The 256-sequence micro-batch is the unit of the
# hybrid rule: it is drawn MAML or next-token as a whole, and as an episode it is the pool the SMLMT
# task is built from (Algorithm 1: `X ← AllGather(B)`). So an optimizer step takes
# `global_batch / branch_batch` draws, and each rank holds `branch_batch / world_size` rows of each.
# How many of those rows a device runs forward and backward at once is a separate, memory-only
# setting (`train.chunk_rows`, see `06_lm_loss`); it never changes the result.

# %%
#| export
def branch_layout(tc, world_size: int) -> tuple[int, int]:
    "(hybrid draws per optimizer step, rows of one branch micro-batch on each rank); an error naming the keys if uneven."
    if tc.global_batch % tc.branch_batch:
        raise ConfigError(f"train.global_batch={tc.global_batch} must be a multiple of train.branch_batch={tc.branch_batch} "
                          f"(paper: 2048 = 8 × 256); change one of them")
    if tc.branch_batch % world_size:
        raise ConfigError(f"train.branch_batch={tc.branch_batch} must be a multiple of the world size {world_size}, so each "
                          f"rank holds the same number of rows; change it or the number of processes")
    return tc.global_batch // tc.branch_batch, tc.branch_batch // world_size

# %%
from picomaml.config import TrainConfig
assert branch_layout(TrainConfig(global_batch=2048, branch_batch=256), 4) == (8, 64)  # the papers on 4 GPUs
assert branch_layout(TrainConfig(global_batch=1024, branch_batch=256), 4) == (4, 64)  # tiny
assert branch_layout(TrainConfig(global_batch=16, branch_batch=16), 2) == (1, 8)  # the CPU demo
for _bad, _key in ((TrainConfig(global_batch=2048, branch_batch=300), "train.global_batch=2048"),
                   (TrainConfig(global_batch=2048, branch_batch=256), "train.branch_batch=256")):
    try: branch_layout(_bad, 3 if _key.startswith("train.branch") else 4); raise AssertionError(_key)
    except ConfigError as e: assert _key in str(e)

# %% [markdown]
# ## Learning-rate schedule
#
# Linear warmup to the peak over `warmup_steps`, then decay to `min_lr_ratio × lr` over `decay_steps`
# (0: the whole run): cosine in the papers, linear for the `released` preset (whose 200,000-step decay
# is nearly constant over 6,000 steps, as the released trainer's schedule was), or constant. It is a pure function of the step
# (nanoGPT's `get_lr`), so resuming needs only the step, not a scheduler object.

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
# ## Which branch: one shared draw per micro-batch
#
# Algorithm 1 draws r ~ U(0, 1) on rank 0 and broadcasts it, so every rank takes the same branch. We
# draw it from a generator seeded by (seed, step), which every rank holds: the same numbers with no
# communication, and the same numbers again after a resume. `rho` = 0 never gives an episode
# (r ≥ 0); `rho` = 1 always does (r < 1).

# %%
#| export
def mix_seed(*parts) -> int:
    "A 63-bit seed from (seed, step, micro-step, tag, ...), stable across processes and runs."
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

def branch_draws(seed: int, step: int, accumulation: int, rho: float) -> list[bool]:
    "For each micro-step of optimizer step `step`: True for a MAML episode, False for next-token loss."
    r = torch.rand(accumulation, generator=torch.Generator().manual_seed(mix_seed(seed, step, "branch")))
    return (r < rho).tolist()

# %%
_draws = [b for s in range(200) for b in branch_draws(42, s, 4, 0.5)]
assert 0.4 < sum(_draws) / len(_draws) < 0.6 and branch_draws(42, 7, 4, 0.5) == branch_draws(42, 7, 4, 0.5)
assert not any(b for s in range(50) for b in branch_draws(0, s, 4, 0.0))
assert all(b for s in range(50) for b in branch_draws(0, s, 4, 1.0))

# %% [markdown]
# ## Collectives: the pool, the support features and the gradients
#
# Paper 1 Appendix A distributes an episode three ways. The SMLMT **pool** is gathered from every rank's
# rows (Algorithm 1: `X ← AllGather(B)`), so every rank builds the identical episode from
# (seed, micro-step). The episode's **support** rows are split over ranks for the backbone forward,
# and the features gathered back so every rank runs the identical inner loop; the **query** rows are
# split and each rank backpropagates its share. Parts may differ in size by one row
# (`tensor_split`), so the gather pads to the largest part and trims.

# %%
#| export
def part_sizes(n: int, world_size: int) -> list[int]:
    "Sizes of `n` rows split into `world_size` contiguous parts (`torch.tensor_split`)."
    return [len(p) for p in torch.arange(n).tensor_split(world_size)]

def part_slice(n: int, world_size: int, rank: int) -> slice:
    "This rank's contiguous part of `n` rows."
    sizes = part_sizes(n, world_size)
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

def gather_parts(fabric, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    "Every rank's part (sizes[r] rows) concatenated in rank order, on every rank."
    if fabric.world_size == 1: return local
    padded = local.new_zeros((max(sizes), *local.shape[1:]))  # (max part, ...)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in sizes]  # world × (max part, ...)
    torch.distributed.all_gather(gathered, padded)  # plain collective: rows and no-grad features need no autograd
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)])

# %%
assert part_sizes(10, 3) == [4, 3, 3] and part_slice(10, 3, 1) == slice(4, 7) and part_slice(10, 3, 2) == slice(7, 10)
assert part_slice(5, 1, 0) == slice(0, 5)

# %% [markdown]
# The gradients of all parameters (backbone and head) are summed over ranks in one flat all-reduce
# per optimizer step. A parameter no branch touched this step has no gradient on any rank (all ranks
# take the same branches) and stays without one, so AdamW leaves it alone, exactly as in one process.

# %%
#| export
def sum_gradients(fabric, params: list[torch.nn.Parameter]) -> None:
    "Replace every existing .grad by its sum over ranks (one all-reduce)."
    with_grad = [p for p in params if p.grad is not None]
    if fabric.world_size == 1 or not with_grad: return
    flat = fabric.all_reduce(torch.cat([p.grad.flatten() for p in with_grad]), reduce_op="sum")
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad])): p.grad.copy_(g.view_as(p))

# %% [markdown]
# ## Where an episode's pool comes from
#
# In the papers the pool is the branch micro-batch itself: the 256 rows a next-token step would have
# used, gathered from every rank (Algorithm 1: `X ← AllGather(B)`), so the data order is the same
# whichever branch is drawn. That is `smlmt.pool_rows = 0`. An episode needs at least K + Q free
# occurrences of N eligible words in its pool (`04_smlmt` measures how many rows that takes), which
# a small branch micro-batch cannot offer: the CPU demo's 16 rows of 128 tokens are far too few for a
# 32-way task. There `smlmt.pool_rows` sets a larger pool, read from a **second data order** (same
# rows, seed derived from `train.seed`, positions laid out like the branch micro-batches' but
# `pool_rows` per draw). Both orders are pure functions of (seed, step, draw), so a resumed run reads
# the same rows and the gathered pool is the same for any world size.

# %%
#| export
def pool_layout(cfg: Config, world_size: int, rows_per_rank: int) -> tuple[int, int]:
    "(pool rows each rank reads, seed of their data order): the branch micro-batch, or `smlmt.pool_rows` of a second order."
    if cfg.smlmt.pool_rows == 0: return rows_per_rank, cfg.train.seed
    if cfg.smlmt.pool_rows % world_size:
        raise ConfigError(f"smlmt.pool_rows={cfg.smlmt.pool_rows} must be a multiple of the world size {world_size}")
    return cfg.smlmt.pool_rows // world_size, mix_seed(cfg.train.seed, "pool") % 2**31

# %%
from picomaml.config import load_config
assert pool_layout(load_config(None, ["smlmt.pool_rows=0"]), 4, 64) == (64, 42)
assert pool_layout(load_config(None, ["smlmt.pool_rows=512"]), 2, 8)[0] == 256
try: pool_layout(load_config(None, ["smlmt.pool_rows=63"]), 2, 8); raise AssertionError
except ConfigError as e: assert "smlmt.pool_rows=63" in str(e)

# %% [markdown]
# ## Setting up a run
#
# Precision (paper 1 §4.1): bf16 autocast on GPU, float32 on CPU. Plain fp16 would need a loss
# scaler around the hand-written MAML backward, so it is refused. Model and head are initialised
# from `train.seed` on every rank (identical without a broadcast); AdamW steps backbone and head
# together (paper 1 Appendix A: the outer update covers the backbone and the head). Its settings
# beyond the peak lr are the configuration's, by default pico-train's `torch.optim.AdamW(params, lr)`
# (`00_config`; `docs/settings.md` lists every setting the papers leave unstated).

# %%
#| export
def resolve_precision(precision: str, accelerator: str) -> str:
    "Fabric precision for `train.precision` on `accelerator` ('cuda' or 'cpu')."
    if precision == "auto": return "bf16-mixed" if accelerator == "cuda" else "32-true"
    if precision == "16-mixed":
        raise ConfigError("train.precision=16-mixed needs a gradient scaler, which the first-order MAML backward does not "
                          "use; set train.precision to bf16-mixed, 32-true or auto")
    return precision

def build_model(cfg: Config, device) -> tuple:
    "(backbone, MAML head, AdamW over both), identically initialised on every rank from train.seed."
    torch.manual_seed(cfg.train.seed)
    model = PicoDecoder(cfg.model).to(device)
    head = MAMLHead(cfg.model.d_model, cfg.smlmt.n_way, cfg.maml, cfg.model.vocab_size).to(device)
    tc = cfg.train
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  eps=tc.eps, weight_decay=tc.weight_decay)
    return model, head, optimizer

# %%
assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("auto", "cuda") == "bf16-mixed"
try: resolve_precision("16-mixed", "cuda"); raise AssertionError
except ConfigError as e: assert "train.precision" in str(e)

# %% [markdown]
# Test: a paper preset (pico-tiny-maml, shrunk to two blocks and a 64-id vocabulary) starts where
# pico-train starts. The embedding is, bit for bit, a plain `nn.Embedding` built first under
# `train.seed` (N(0, 1)), every linear weight lies inside and fills PyTorch's bound 1/√fan_in, the
# optimizer's settings are exactly those of `torch.optim.AdamW(params, lr)`, and nothing is clipped.
# The earlier choices are options: `model.init=normal`, `train.beta2=0.95`, `train.grad_clip=1.0`.

# %%
from torch import nn
from picomaml.config import PRESETS_DIR
_shrink = ["model.n_layers=2", "model.vocab_size=64", "model.max_seq_len=32"]
_paper = load_config(PRESETS_DIR / "pico-tiny-maml.yaml", _shrink)
_model, _head, _opt = build_model(_paper, torch.device("cpu"))
torch.manual_seed(_paper.train.seed)
assert torch.equal(_model.embedding_proj.weight, nn.Embedding(64, _paper.model.d_model).weight)
assert all(0.95 / m.in_features ** 0.5 < m.weight.abs().max() <= 1 / m.in_features ** 0.5 for m in _model.modules() if isinstance(m, nn.Linear))
assert _opt.defaults == torch.optim.AdamW(_model.parameters(), lr=_paper.train.lr).defaults and _paper.train.grad_clip == 0
assert (_opt.defaults["betas"], _opt.defaults["weight_decay"]) == ((0.9, 0.999), 0.01)
_old = load_config(PRESETS_DIR / "pico-tiny-maml.yaml", _shrink + ["model.init=normal", "train.beta2=0.95", "train.grad_clip=1.0"])
_model, _, _opt = build_model(_old, torch.device("cpu"))
assert abs(_model.embedding_proj.weight.std().item() - 0.02) < 1e-3 and _opt.defaults["betas"] == (0.9, 0.95) and _old.train.grad_clip == 1.0

# %% [markdown]
# ## The memory chunk, from the plan
#
# `train.chunk_rows = 0` asks the planner (`06_plan`) for the largest chunk the device fits; a set
# value is checked the same way. A configuration that cannot fit is refused here, before the data is
# opened or step 1 runs, with the planner's one-line reason naming the setting to change.

# %%
#| export
def memory_chunk(cfg: Config, world_size: int, device: torch.device) -> int:
    "Rows per forward/backward chunk on this device: `train.chunk_rows`, or the planner's choice; refuses a plan that does not fit."
    plan = plan_run(cfg, world_size, device_memory_gb(device), device=device.type)
    if not plan.fits: raise ConfigError(plan.reason)
    return cfg.train.chunk_rows or plan.chunk_rows

# %% [markdown]
# ## Resume or start
#
# With `checkpoint.resume` (the default) a run continues from the newest checkpoint that keeps its
# training state and passes its checks (`picomaml.checkpoints.find_resumable`), or from the one named
# by `checkpoint.resume_from`; rank 0 chooses it and broadcasts the choice, and says which. Before
# anything is loaded, the new configuration is compared with the run's `config.yaml`
# (`picomaml.config.config_changes`): a change that would alter the training trajectory is refused
# with the list of differences, unless the run is deliberately branched from a named checkpoint; the
# changes that are accepted are appended to `config_history.jsonl` with the step they take effect.
# A run whose checkpoints cannot be resumed from stops with what was found rather than starting over
# on top of its history, and a run told not to resume refuses a directory that already has
# checkpoints.

# %%
#| export
def check_resume_config(cfg: Config, run_dir: Path) -> dict:
    "The accepted changes against the run's config.yaml; ConfigError listing any change that alters the trajectory."
    saved = run_dir / "config.yaml"
    if not saved.is_file(): return {}
    trajectory, safe = config_changes(load_config(saved), cfg)
    if trajectory and not cfg.checkpoint.resume_from:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in trajectory.items())
        raise ConfigError(f"{run_dir} was trained with other settings ({listed}); resuming would continue a different run. "
                          f"Relaunch with the run's own settings ({saved}), choose another logging.run_name, or branch "
                          f"deliberately from a checkpoint with checkpoint.resume_from=step_NNNNNN")
    return {**trajectory, **safe}

def choose_checkpoint(cfg: Config, root: Path):
    "The checkpoint to resume from (newest resumable, or checkpoint.resume_from) as find_resumable's tuple; None to start."
    if not cfg.checkpoint.resume_from: return find_resumable(root)
    name = cfg.checkpoint.resume_from if cfg.checkpoint.resume_from.startswith("step_") else step_dir_name(int(cfg.checkpoint.resume_from))
    with_state = [d.name for _, d in list_checkpoints(root) if has_training_state(d)]
    if name not in with_state:
        raise ConfigError(f"checkpoint.resume_from={cfg.checkpoint.resume_from}: {root / name} is not a checkpoint with training state; "
                          f"those with one: {', '.join(with_state) or 'none'}")
    return root / name, read_checkpoint(root / name)

# %%
import tempfile
with tempfile.TemporaryDirectory() as _tmp:
    save_config(load_config(None, ["maml.rho=0.5"]), Path(_tmp) / "config.yaml")
    assert check_resume_config(load_config(None, ["maml.rho=0.5", "eval.every=10"]), Path(_tmp)) == {"eval.every": (100, 10)}
    try: check_resume_config(load_config(None, ["maml.rho=0", "train.lr=0.1"]), Path(_tmp)); raise AssertionError("accepted rho 0.5 -> 0")
    except ConfigError as e: assert all(t in str(e) for t in ("maml.rho: 0.5 -> 0.0", "train.lr: 0.0003 -> 0.1", "checkpoint.resume_from"))
    assert "train.lr" in check_resume_config(load_config(None, ["train.lr=0.1", "checkpoint.resume_from=step_000002"]), Path(_tmp))

# %%
#| export
def resume_or_start(fabric, cfg: Config, run_dir: Path, model, head, optimizer) -> int:
    "Load the chosen checkpoint into model/head/optimizer/RNG if resuming; return the step to start from."
    root = run_dir / "checkpoints"
    has_ckpts = any(root.glob("step_*"))
    if has_ckpts and not cfg.checkpoint.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints and checkpoint.resume=false: set checkpoint.resume=true to "
                          f"continue that run, or choose another logging.run_name")
    found, changes, problem = None, {}, ""
    if fabric.global_rank == 0 and has_ckpts:
        try: changes, found = check_resume_config(cfg, run_dir), choose_checkpoint(cfg, root)
        except (ConfigError, NoResumableCheckpoint) as e: problem = str(e)
    name, problem = fabric.broadcast((found[0].name if found else "", problem), src=0)
    if problem: raise ConfigError(problem)
    step = 0
    if name:
        weights, head_weights, meta, state = found[1] if found else read_checkpoint(root / name)
        load_checked(model, weights, str(root / name / "model.safetensors"), f"the run configuration (model.* of this launch, saved in "
                     f"{run_dir / 'config.yaml'})")
        head.load_state_dict(head_weights)
        optimizer.load_state_dict(state["optimizer"])
        if meta["world_size"] == fabric.world_size:  # clone: set_rng_state of a view with a storage offset segfaults (torch 2.13)
            torch.set_rng_state(state["rng_cpu"][fabric.global_rank].clone())
        step = meta["step"]
    if fabric.global_rank == 0:
        start_run_directory(cfg, run_dir, step, changes)
        if name: print(f"[{cfg.logging.run_name}] resuming from {root / name} (step {step} of {cfg.train.steps})"
                       + ("; later checkpoints are rewritten as the run re-reaches them" if cfg.checkpoint.resume_from else ""), flush=True)
    fabric.barrier()
    return step

def start_run_directory(cfg: Config, run_dir: Path, step: int, changes: dict) -> None:
    "Write config.yaml, record accepted configuration changes, cut the metrics log back to `step`."
    run_dir.mkdir(parents=True, exist_ok=True)
    if changes:
        with open(run_dir / "config_history.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    # resume_from is an instruction for this launch, not a property of the run: the saved configuration does not keep it
    save_config(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume_from="")), run_dir / "config.yaml")
    truncate_metrics(run_dir / "metrics.jsonl", step)

# %% [markdown]
# Saving gathers every rank's RNG state to rank 0, which writes the checkpoint (weights, head and
# metadata, plus the training state), drops the training state of checkpoints older than the newest
# `checkpoint.keep_state`, and uploads if asked; the others wait at a barrier so nobody runs ahead
# of a checkpoint that is still being written.

# %%
#| export
def save_training_state(fabric, cfg: Config, run_dir: Path, step: int, model, head, optimizer, hub_api=None) -> None:
    "Checkpoint `step` (weights, head, optimizer, every rank's RNG, data position) atomically; rank 0 writes."
    rng = gather_parts(fabric, torch.get_rng_state()[None].to(fabric.device), [1] * fabric.world_size).cpu()  # (world, n)
    if fabric.global_rank == 0:
        meta = {"data_position": step * cfg.train.global_batch, "world_size": fabric.world_size, "run_name": cfg.logging.run_name}
        root = run_dir / "checkpoints"
        directory = write_checkpoint(root, step, model, head, meta, {"optimizer": optimizer.state_dict(), "rng_cpu": rng})
        prune_training_state(root, cfg.checkpoint.keep_state)
        if cfg.logging.hub_repo: upload_checkpoint(directory, cfg.logging.hub_repo, hub_api)
    fabric.barrier()

# %% [markdown]
# ## Paloma evaluation, in parallel over ranks
#
# The evaluation rows (the first `eval.max_rows` of the split) are read once when the run starts
# (`picomaml.data.read_eval_rows`), so a streamed split is not re-read every 100 steps; each rank
# evaluates a strided share and the sums are all-reduced.

# %%
#| export
def evaluate(fabric, model, eval_rows: torch.Tensor, ec, eos_id: int) -> dict:
    "Token-weighted and per-document Paloma perplexity; each rank a strided share of the rows, sums all-reduced."
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=fabric.device)
    for batch in eval_batches(eval_rows, ec.batch_size, fabric.global_rank, fabric.world_size):
        with fabric.autocast(): sums += eval_sums(model, batch.to(fabric.device), eos_id)
    model.train()
    return perplexities(fabric.all_reduce(sums, reduce_op="sum").cpu() if fabric.world_size > 1 else sums.cpu())

# %% [markdown]
# ## Monitoring
#
# One JSON line per optimizer step in `metrics.jsonl` (paper 1 §4.1 and Figs. 1, 3, 4):
# `step` (optimizer steps completed), `loss` (the objective the optimizer saw: the mean over the
# step's micro-batches of their next-token or query loss), `ar_loss` and `query_loss` (their means
# over the step's AR and episode micro-batches; `null` when there were none), `n_ar` / `n_maml` and
# `branches` (the branch sequence, `A`/`M`), `lr`, `grad_norm` (before clipping), `support_acc`
# (phi_T on the support set), `query_acc`, `head_w_mean` / `head_w_std` (phi_T's logits layer),
# `head_grad_norm` (the head's summed gradient), `tokens` (AR tokens plus episode window tokens),
# `tokens_per_s` and `mfu`; and at evaluation steps a second line of the same step with `eval_loss`,
# `paloma_ppl` and `paloma_doc_ppl`, written after that step's checkpoint (readers merge the lines of a step).
# `tokens_per_s` and `mfu` are wall-clock measurements: everything else is a deterministic function of
# the configuration, so a resumed run's log equals an uninterrupted run's once those two are removed.
#
# The step's statistics are accumulated per rank in one float64 vector and all-reduced once; every
# entry is a sum over ranks, then turned into the logged means by `step_record`.

# %%
#| export
STATS = ("loss", "ar_loss", "query_loss", "n_ar", "n_maml", "support_acc", "query_correct", "query_count",
         "head_w_mean", "head_w_std", "tokens", "flops")

def step_record(totals: torch.Tensor, world_size: int) -> dict:
    "Logged means from the all-reduced per-rank sums of STATS."
    t = dict(zip(STATS, totals.tolist()))
    n_ar, n_maml = round(t["n_ar"] / world_size), round(t["n_maml"] / world_size)
    per_episode = lambda key, ranks=world_size: t[key] / ranks / n_maml if n_maml else None  # same value on every rank
    return {"loss": t["loss"], "ar_loss": t["ar_loss"] / n_ar if n_ar else None,
            "query_loss": per_episode("query_loss", 1), "n_ar": n_ar, "n_maml": n_maml,
            "support_acc": per_episode("support_acc"), "query_acc": t["query_correct"] / t["query_count"] if n_maml else None,
            "head_w_mean": per_episode("head_w_mean"), "head_w_std": per_episode("head_w_std"), "tokens": round(t["tokens"])}

# %%
_sums = torch.tensor([2.0, 3.0, 0.9, 2, 2, 1.5, 30, 40, 0.2, 1.0, 1000, 0], dtype=torch.float64)  # 2 ranks, 1 AR + 1 episode
_rec = step_record(_sums, 2)
assert (_rec["n_ar"], _rec["n_maml"], _rec["ar_loss"], _rec["query_loss"]) == (1, 1, 3.0, 0.9)
assert (_rec["support_acc"], _rec["query_acc"], _rec["head_w_std"]) == (0.75, 0.75, 0.5)
assert step_record(torch.tensor([1.0, 2.0, 0, 4, 0, 0, 0, 0, 0, 0, 10, 0], dtype=torch.float64), 2)["query_acc"] is None

# %% [markdown]
# Small pieces the loop calls: statistics; the finiteness check (a NaN/inf loss or gradient stops
# the run **before** the optimizer step, so no checkpoint ever holds the weights it would give); the
# confirmation of checkpoints (a checkpoint's weights are judged by the loss they give one step later:
# finite, and not `EXPLODING` times the median of the last 20 losses, so a step that blew the weights
# up to 1e6 without a NaN yet is never called good); the tokenizer tables SMLMT needs; and the
# spectra hook (`picomaml.spectra.record_spectra` on the first `spectra.grad_rows` evaluation rows,
# every `spectra.every` steps, into `<run>/spectra.jsonl`). When the run stops on a NaN, the message
# names the newest confirmed checkpoint and the setting that resumes from it
# (`checkpoint.resume_from`), which also accepts the lower learning rate the relaunch needs.

# %%
#| export
def add_stats(stats: dict, **values) -> None:
    "Add named values to this rank's statistics of the step."
    for key, value in values.items(): stats[key] += value

def check_finite(record: dict, run_dir: Path) -> None:
    "Raise FloatingPointError on a NaN/inf loss or gradient norm, naming the step and a way back that works."
    bad = [key for key in ("loss", "grad_norm") if not math.isfinite(record[key])]
    if not bad: return
    good = newest_confirmed(Path(run_dir) / "checkpoints")
    way_back = (f"The newest checkpoint known good is {good.name} (its weights gave loss {read_meta(good)['next_loss']:.4g} at the next "
                f"step): relaunch with checkpoint.resume_from={good.name} and a lower train.lr, or set train.grad_clip"
                if good else "No checkpoint with training state is known good: start again under another logging.run_name with a "
                "lower train.lr, or set train.grad_clip")
    raise FloatingPointError(f"step {record['step']}: {' and '.join(f'{k} is {record[k]}' for k in bad)}; stopped before the optimizer "
                             f"step, so no checkpoint holds these weights. {way_back}")

EXPLODING = 10.0  # a loss this many times the median of the run's recent losses is a divergence, not noise

def confirm_if_healthy(root: Path, step: int, loss: float, recent: list) -> None:
    "Confirm checkpoint `step`, if one was written, when the loss its weights gave is finite and not exploding."
    directory = root / step_dir_name(step)
    exploding = bool(recent) and loss > EXPLODING * statistics.median(recent)
    if (directory / "checkpoint.json").is_file() and math.isfinite(loss) and not exploding: confirm_checkpoint(directory, loss)

def episode_tables(cfg: Config) -> tuple:
    "(word_start, alpha_len, special ids) of the tokenizer, for SMLMT episodes."
    tok = load_tokenizer(cfg.data)
    return tok.word_start_table(), tok.alpha_len_table(), [tok.eos_id]

def record_run_spectra(model, eval_rows: torch.Tensor, cfg: Config, step: int, run_dir: Path) -> None:
    "Weight and gradient spectra of `spectra.layers` on the fixed evaluation batch, appended to spectra.jsonl."
    record_spectra(model, eval_rows[: cfg.spectra.grad_rows], cfg.spectra.layers, step, run_dir / "spectra.jsonl")

# %%
try: check_finite({"step": 7, "loss": float("nan"), "grad_norm": 1.0}, Path("/nonexistent")); raise AssertionError
except FloatingPointError as e: assert "step 7: loss is nan" in str(e) and "No checkpoint with training state is known good" in str(e)
check_finite({"step": 7, "loss": 1.0, "grad_norm": 2.0}, Path("/nonexistent"))

# %% [markdown]
# **After the checkpoint, not before.** Evaluation and spectra run after the step's checkpoint is on
# disk: if they fail (a streamed evaluation set that cannot be read, a full disk), the optimizer step
# is not lost, and the relaunch resumes from that checkpoint and runs the monitoring it missed.

# %%
#| export
def monitoring_due(cfg: Config, step: int) -> tuple[bool, bool]:
    "(evaluate?, record spectra?) at completed optimizer step `step`."
    return (bool(cfg.eval.every) and step > 0 and step % cfg.eval.every == 0,
            bool(cfg.spectra.every) and step > 0 and step % cfg.spectra.every == 0)

def monitoring_missing(cfg: Config, run_dir: Path, step: int) -> tuple[bool, bool]:
    "(evaluation, spectra) that are due at `step` but absent from the run's logs (a crash between checkpoint and log)."
    want_eval, want_spectra = monitoring_due(cfg, step)
    logged = lambda path, key: path.is_file() and any(f'"step": {step},' in l and key in l for l in path.read_text().splitlines())
    return (want_eval and not logged(run_dir / "metrics.jsonl", "paloma_ppl"),
            want_spectra and not logged(run_dir / "spectra.jsonl", '"per"'))

def monitor(fabric, cfg: Config, run_dir: Path, model, eval_rows, step: int, what: tuple[bool, bool]) -> None:
    "Evaluate and/or record spectra at `step`, appending an evaluation line to metrics.jsonl on rank 0."
    do_eval, do_spectra = what
    if do_eval:
        record = {"step": step, **evaluate(fabric, model, eval_rows, cfg.eval, cfg.data.eos_id)}
        if fabric.global_rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as f: f.write(json.dumps(record) + "\n")
        fabric.log_dict({k: v for k, v in record.items() if k != "step"}, step=step)
    if do_spectra and fabric.global_rank == 0: record_run_spectra(model, eval_rows, cfg, step, run_dir)

# %%
_mcfg = load_config(None, ["eval.every=20", "spectra.every=40"])
assert monitoring_due(_mcfg, 40) == (True, True) and monitoring_due(_mcfg, 20) == (True, False) and monitoring_due(_mcfg, 0) == (False, False)
with tempfile.TemporaryDirectory() as _tmp:
    (Path(_tmp) / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    assert monitoring_missing(_mcfg, Path(_tmp), 40) == (True, True)
    (Path(_tmp) / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n{"step": 40, "paloma_ppl": 9.0}\n')
    assert monitoring_missing(_mcfg, Path(_tmp), 40) == (False, True)

# %% [markdown]
# ## The two branches
#
# An **episode** (Algorithm 1) reads this rank's rows of the pool and gathers them, builds the
# episode of (seed, draw) from the identical pool on every rank, and runs `picomaml.maml.maml_step`
# with the support windows split over ranks (features gathered back) and the query windows split.
# A **next-token** draw (Algorithm 2) backpropagates this rank's share of the micro-batch's mean loss,
# chunk by chunk. Both return this rank's statistics of the draw.

# %%
#| export
def episode_draw(fabric, cfg: Config, model, head, pool_source, tables, step: int, draw: int, accum: int, pool: tuple) -> dict:
    "One MAML episode on the gathered pool of (step, draw); returns this rank's statistics."
    rank, world, (rows_per_rank, seed) = fabric.global_rank, fabric.world_size, pool
    local = batch_for_step(pool_source, step, draw, rank, world, rows_per_rank, accum, seed)  # (pool rows / world, T + 1)
    rows = gather_parts(fabric, local.to(fabric.device), [rows_per_rank] * world)  # (pool rows, T + 1)
    episode = build_episode(rows, cfg.smlmt, *tables, cfg.data.mask_id, cfg.train.seed, step * accum + draw)
    n_support, n_query = len(episode.support_labels), len(episode.query_labels)
    with fabric.autocast():
        out = maml_step(model, head, episode, cfg.maml, gather=lambda f: gather_parts(fabric, f, part_sizes(n_support, world)),
                        support_part=part_slice(n_support, world, rank), query_part=part_slice(n_query, world, rank),
                        loss_scale=1 / accum, inner_seed=mix_seed(cfg.train.seed, step, draw, "inner"))
    window, my_support = episode.support_ids.shape[1], part_sizes(n_support, world)[rank]
    return dict(loss=out["loss"] / accum, query_loss=out["loss"], n_maml=1, support_acc=out["support_acc"],
                query_correct=out["query_correct"], query_count=out["query_count"], head_w_mean=out["head_weight_mean"],
                head_w_std=out["head_weight_std"], tokens=(my_support + out["query_count"]) * window,
                flops=episode_flops(cfg.model, my_support * window, out["query_count"] * window, window))

def next_token_draw(fabric, cfg: Config, model, train_rows, step: int, draw: int, accum: int, rows_per_rank: int, chunk_rows: int) -> dict:
    "One next-token micro-batch: this rank's rows, `chunk_rows` at a time; returns this rank's statistics."
    rows = batch_for_step(train_rows, step, draw, fabric.global_rank, fabric.world_size, rows_per_rank, accum, cfg.train.seed)
    seq_len = rows.shape[1] - 1
    global_targets = cfg.train.branch_batch * seq_len  # the micro-batch's mean is over every rank's targets
    loss_sum = next_token_backward(model, rows, chunk_rows, global_targets * accum, fabric.autocast, fabric.device)
    share = loss_sum / global_targets
    return dict(loss=share / accum, ar_loss=share, n_ar=1, tokens=rows.shape[0] * seq_len,
                flops=ar_flops(cfg.model, rows.shape[0] * seq_len, seq_len))

# %% [markdown]
# ## The loop
#
# Paper 1, Algorithms 1 and 2, one branch micro-batch at a time. Per optimizer step: set the
# learning rate; for each draw, seed the RNG from (seed, step, draw, rank) so dropout is a function of
# the position in the run and a resumed run repeats it exactly, and run the drawn branch. Then sum the
# gradients over ranks, check them, clip, and step AdamW. Log the step, checkpoint it when due
# (step 0 too, before the first step), and only then evaluate.

# %%
#| export
def train(cfg: Config, fabric, hub_api=None) -> Path:
    "Pretrain under `cfg` on a launched Fabric (Algorithms 1 and 2); returns the run directory."
    tc, rank, world, device = cfg.train, fabric.global_rank, fabric.world_size, fabric.device
    accum, rows_per_rank = branch_layout(tc, world)
    chunk_rows = memory_chunk(cfg, world, device)
    run_dir = Path(cfg.logging.runs_dir) / cfg.logging.run_name
    if rank == 0: ensure_writable(run_dir, "logging.runs_dir", need_bytes=16 * count_parameters(cfg.model))  # one full checkpoint
    model, head, optimizer = build_model(cfg, device)
    model.activation_checkpointing = tc.activation_checkpointing
    params = [*model.parameters(), *head.parameters()]
    train_rows = open_rows(cfg.data, "train", cfg.model.vocab_size)
    eval_rows = read_eval_rows(cfg.data, cfg.eval.max_rows, cfg.model.vocab_size) if cfg.eval.every or cfg.spectra.every else None
    if cfg.maml.rho > 0:
        pool = pool_layout(cfg, world, rows_per_rank)
        pool_source = train_rows if cfg.smlmt.pool_rows == 0 else open_rows(cfg.data, "train", cfg.model.vocab_size)
        tables = episode_tables(cfg)
    peak = peak_flops(device)
    start = resume_or_start(fabric, cfg, run_dir, model, head, optimizer)
    if start == 0: save_training_state(fabric, cfg, run_dir, 0, model, head, optimizer, hub_api)
    else: monitor(fabric, cfg, run_dir, model, eval_rows, start, fabric.broadcast(monitoring_missing(cfg, run_dir, start), src=0))
    bar = tqdm(total=tc.steps, initial=start, disable=rank != 0 or not cfg.logging.progress_bar, desc=cfg.logging.run_name)
    recent_losses = deque(maxlen=20)
    for step in range(start, tc.steps):
        lr = lr_at(step, tc)
        for group in optimizer.param_groups: group["lr"] = lr
        started, stats = time.perf_counter(), dict.fromkeys(STATS, 0.0)
        branches = branch_draws(tc.seed, step, accum, cfg.maml.rho)
        for draw, is_episode in enumerate(branches):
            torch.manual_seed(mix_seed(tc.seed, step, draw, rank))
            if is_episode: add_stats(stats, **episode_draw(fabric, cfg, model, head, pool_source, tables, step, draw, accum, pool))
            else: add_stats(stats, **next_token_draw(fabric, cfg, model, train_rows, step, draw, accum, rows_per_rank, chunk_rows))
        sum_gradients(fabric, params)
        totals = torch.tensor([stats[k] for k in STATS] + [float(b) for b in branches], dtype=torch.float64, device=device)
        totals = (fabric.all_reduce(totals, reduce_op="sum") if world > 1 else totals).cpu()
        if any(v not in (0, world) for v in totals[len(STATS):].tolist()):
            raise RuntimeError(f"step {step + 1}: ranks took different branches {totals[len(STATS):].tolist()}; the branch draw must be shared")
        record = {"step": step + 1, **step_record(totals[: len(STATS)], world), "lr": lr,
                  "branches": "".join("M" if b else "A" for b in branches)}
        head_grads = [p.grad for p in head.parameters() if p.grad is not None]
        record["head_grad_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in head_grads])).item() if head_grads else None
        record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf).item()
        check_finite(record, run_dir)
        if rank == 0: confirm_if_healthy(run_dir / "checkpoints", step, record["loss"], list(recent_losses))
        recent_losses.append(record["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        record["tokens_per_s"] = record["tokens"] / elapsed
        record["mfu"] = totals[STATS.index("flops")].item() / elapsed / (peak * world) if peak else None
        if rank == 0 and ((step + 1) % cfg.logging.log_every == 0 or step + 1 == tc.steps):
            with open(run_dir / "metrics.jsonl", "a") as f: f.write(json.dumps(record) + "\n")
        fabric.log_dict({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)
        if checkpoint_due(step + 1, cfg.checkpoint, tc.steps): save_training_state(fabric, cfg, run_dir, step + 1, model, head, optimizer, hub_api)
        monitor(fabric, cfg, run_dir, model, eval_rows, step + 1, monitoring_due(cfg, step + 1))
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", branches=record["branches"])
    bar.close()
    return run_dir

# %% [markdown]
# ## A tiny run, start to finish
#
# Real data, tiny model: 20 C4 documents prepared into 33-id rows, a two-block d = 24 decoder (the
# real 50,304-row vocabulary, since the rows hold real OLMo ids), one CPU process. Next-token training
# only (rho = 0) must lower the loss, never build an episode and write the whole run directory.

# %%
import os
from lightning.fabric import Fabric
from picomaml.config import load_config
from picomaml.data import prepare
from safetensors.torch import load_file

SHARED = Path(os.environ.get("PICOMAML_DATA", "/work/shared/data"))
_tok = load_tokenizer(load_config(None, [f"data.tokenizer_path={SHARED}/tokenizer/olmo-7b-0724-tokenizer.json"]).data)
_data = Path(tempfile.mkdtemp())
prepare(sorted((SHARED / "corpus/train").glob("c4-sample.0[12].json.gz")), _data / "train", 32, _tok, log=lambda m: None)
prepare(sorted((SHARED / "corpus/eval").glob("c4_100_domains_*.jsonl.gz")), _data / "eval", 32, _tok, log=lambda m: None)

def tiny_config(runs_dir, *overrides):
    "A seconds-long configuration on the prepared rows."
    return load_config(None, [
        "model.d_model=24", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96", "model.max_seq_len=32",
        f"data.train_path={_data}/train", f"data.eval_path={_data}/eval", "data.seq_len=32", f"data.tokenizer_path={_tok.source}",
        "train.steps=8", "train.global_batch=8", "train.branch_batch=4", "train.lr=1e-2", "train.warmup_steps=2", "checkpoint.every=4",
        "smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=12", "smlmt.pool_rows=64", "smlmt.exclude_top=30",
        "maml.head_hidden=16", "maml.head_layers=2", "eval.every=4", "eval.max_rows=16", "eval.batch_size=8",
        "spectra.every=0", f"logging.runs_dir={runs_dir}", "logging.progress_bar=false", *overrides])

def read_metrics(run_dir):
    "A run's metrics, the lines of one step (training, then evaluation) merged."
    merged = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines(): merged.setdefault(json.loads(line)["step"], {}).update(json.loads(line))
    return [merged[step] for step in sorted(merged)]

_fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
_runs = Path(tempfile.mkdtemp())
_real_build = build_episode
build_episode = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rho = 0 built an episode"))
try: _run = train(tiny_config(_runs, "maml.rho=0", "logging.run_name=ar"), _fabric)
finally: build_episode = _real_build
_log = read_metrics(_run)
assert [r["step"] for r in _log] == list(range(1, 9)) and all(r["n_maml"] == 0 and r["n_ar"] == 2 for r in _log)
assert _log[-1]["loss"] < _log[0]["loss"] - 0.3, [r["loss"] for r in _log]
assert all(r["query_loss"] is None and r["support_acc"] is None and r["head_grad_norm"] is None for r in _log)
assert _log[3]["paloma_ppl"] > _log[7]["paloma_ppl"] and "paloma_doc_ppl" in _log[7] and "paloma_ppl" not in _log[4]
assert sorted(p.name for p in (_run / "checkpoints").iterdir()) == ["latest", "step_000000", "step_000004", "step_000008"]
assert [p.parent.name for p in sorted((_run / "checkpoints").glob("*/training_state.pt"))] == ["step_000004", "step_000008"]  # keep_state 2
assert load_config(_run / "config.yaml").maml.rho == 0
print(*(f"step {r['step']}: loss {r['loss']:.3f} lr {r['lr']:.4f} {r['tokens_per_s']:.0f} tok/s" for r in _log), sep="\n")

# %% [markdown]
# Episodes only (rho = 1): no next-token step is ever taken, every step logs the episode metrics,
# and the head's weights move (AdamW steps it with the backbone).

# %%
_run = train(tiny_config(_runs, "maml.rho=1", "logging.run_name=maml", "train.steps=3", "eval.every=0",
                         "checkpoint.log_spaced=true"), _fabric)
_log = read_metrics(_run)
assert all(r["n_ar"] == 0 and r["n_maml"] == 2 and r["branches"] == "MM" and r["ar_loss"] is None for r in _log)
assert all(0 <= r["support_acc"] <= 1 and 0 <= r["query_acc"] <= 1 and r["head_grad_norm"] > 0 for r in _log)
assert all(math.isclose(r["loss"], r["query_loss"], rel_tol=1e-12) for r in _log)
_head0, _head3 = (load_file(_run / f"checkpoints/step_00000{s}/head.safetensors") for s in (0, 3))
assert all(not torch.equal(_head0[k], _head3[k]) for k in _head0)
print(*(f"step {r['step']}: query loss {r['query_loss']:.3f} support acc {r['support_acc']:.2f} query acc {r['query_acc']:.2f}" for r in _log), sep="\n")

# %% [markdown]
# A failing evaluation loses nothing: here the Paloma evaluation of step 4 fails (a streamed
# evaluation set that cannot be read, say). Step 4's checkpoint is already on disk, so the relaunch
# resumes there instead of at step 0, runs the evaluation it missed, and finishes.

# %%
_real_evaluate = evaluate
evaluate = lambda *a, **k: (_ for _ in ()).throw(OSError("evaluation set unreadable"))
try: train(tiny_config(_runs, "maml.rho=0", "logging.run_name=eval-fails"), _fabric); raise AssertionError("the evaluation did not fail")
except OSError: pass
finally: evaluate = _real_evaluate
assert (_runs / "eval-fails" / "checkpoints" / "latest").read_text().strip() == "step_000004"
assert [r["step"] for r in read_metrics(_runs / "eval-fails")] == [1, 2, 3, 4] and "paloma_ppl" not in read_metrics(_runs / "eval-fails")[3]
_log = read_metrics(train(tiny_config(_runs, "maml.rho=0", "logging.run_name=eval-fails"), _fabric))
assert [r["step"] for r in _log] == list(range(1, 9)) and "paloma_ppl" in _log[3] and "paloma_ppl" in _log[7]
