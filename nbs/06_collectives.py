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
# # Ranks and collectives
#
# > How ranks share one hybrid optimizer step: rows, branch draws, episode tensors and gradients.
# > How many branch micro-batches a step draws and which rows each rank holds, the branch draw every
# > rank agrees on, the episode's pool, support features and query rows gathered or split, and the
# > gradients summed once per step.
#
# Paper 1 App. A.1 (and paper 2 App. C.1), "Multi-GPU processing": "A Bernoulli draw is done on one
# GPU and broadcast so all ranks choose the same objective. Support and query tensors are constructed
# on rank 0 then scattered, because per-rank random masks would destroy gradient equivalence. Every
# GPU performs the same ten head updates before any gradient is communicated." This notebook is that
# section. The training loop (`06_train`) calls these pieces; the checkpoint writer (`06_resume`)
# gathers every rank's RNG state with `gather_parts`.
#
# **Gradients equal a one-process run.** Every rank's loss is its share of the global objective
# (a sum over its rows divided by the global count), and the gradients are summed over ranks with one
# all-reduce per optimizer step. We do not wrap the model in DDP: DDP averages (so each loss would
# need a factor of world size), needs `find_unused_parameters` because the two branches use different
# parameters (the MAML head is idle on next-token steps, the output layer on MAML steps), and never
# sees the first-order head gradient, which is written into `phi_0.grad` by hand after the backward
# pass. Summing one flat gradient buffer at the optimizer step is what DDP with `no_sync` over the
# accumulation does, without those three problems. Nothing is communicated between the inner and
# the outer phase of an episode, so the "stray early all_reduce" of App. A.1 cannot happen.

# %%
#| default_exp collectives

# %%
#| export
from __future__ import annotations

import torch

from picomaml.config import Config, ConfigError
from picomaml.names import mix_seed


# %% [markdown]
# ## Branch micro-batches
#
# Paper 1 §3.3 and paper 2 §2.4: "micro batches of 256 sequences are accumulated eight times giving an
# effective batch of 2048 (1024 for the 11M model)". The 256-sequence micro-batch is the unit of the
# hybrid rule: it is drawn MAML or next-token as a whole, and as an episode it is the pool the SMLMT
# task is built from (paper 1 App. A, Algorithm 1: `X ← AllGather(B)`). So an optimizer step takes
# `global_batch / branch_batch` draws, and each rank holds `branch_batch / world_size` rows of each.
# How many of those rows a device runs forward and backward at once is a separate, memory-only
# setting (`train.chunk_rows`, see `06_lm_loss`); it never changes the result.

# %%
#| export
def branch_layout(tc, world_size: int) -> tuple[int, int]:
    "(hybrid draws per optimizer step, rows of one branch micro-batch on each rank); error naming the keys if uneven."
    # that global_batch splits into branch micro-batches is TrainConfig's rule (00_config);
    # the world size is the launch's
    if tc.branch_batch % world_size:
        raise ConfigError(f"train.branch_batch={tc.branch_batch} must be a multiple of the world size {world_size}, "
                          f"so each rank holds the same number of rows; change it or the number of processes")
    return tc.global_batch // tc.branch_batch, tc.branch_batch // world_size


# %%
from picomaml.config import TrainConfig
from picomaml.devtools import raises

assert branch_layout(TrainConfig(global_batch=2048, branch_batch=256), 4) == (8, 64)  # the papers on 4 GPUs
assert branch_layout(TrainConfig(global_batch=1024, branch_batch=256), 4) == (4, 64)  # tiny
assert branch_layout(TrainConfig(global_batch=16, branch_batch=16), 2) == (1, 8)  # the CPU demo
raises(lambda: branch_layout(TrainConfig(global_batch=2048, branch_batch=256), 3), "train.branch_batch=256",
       "world size 3", kind=ConfigError)
# the config's own rule
raises(lambda: TrainConfig(global_batch=2048, branch_batch=300), "train.global_batch=2048", kind=ConfigError)


# %% [markdown]
# ## Which branch: one shared draw per micro-batch
#
# Algorithm 1 (paper 1 App. A) draws r ~ U(0, 1) on rank 0 and broadcasts it, so every rank takes
# the same branch (App. A.1). We draw it from a generator seeded by (seed, step), which every rank
# holds: the same numbers with no communication, and the same numbers again after a resume. `rho` = 0
# never gives an episode (r ≥ 0); `rho` = 1 always does (r < 1).

# %%
#| export
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
# Paper 1 App. A distributes an episode three ways. The SMLMT **pool** is gathered from every rank's
# rows (Algorithm 1: `X ← AllGather(B)`), so every rank builds the identical episode from
# (seed, micro-step): the same tensors App. A.1 builds on rank 0 and scatters, without the scatter.
# The episode's **support** rows are split over ranks for the backbone forward, and the features
# gathered back so every rank runs the identical inner loop; the **query** rows are split and each
# rank backpropagates its share. Parts may differ in size by one row (`tensor_split`), so the gather
# pads to the largest part and trims.

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
# A rank can hold no rows of an episode's query part (a tiny episode on many ranks) and then skips
# the backbone (`05_maml`: CUDA kernels reject an empty batch): its parameters have no gradient where
# the other ranks' have one. So the ranks first agree on which parameters have a gradient anywhere (a
# small all-reduce of flags) and the rank without one contributes zeros. `sum_over_ranks` is the same
# flat all-reduce for any list of tensors (the spectra's gradients, `08_spectra`).

# %%
#| export
def sum_over_ranks(fabric, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    "Elementwise sums over ranks of same-shaped tensors (one flat all-reduce); with one rank, the tensors themselves."
    if fabric.world_size == 1 or not tensors: return list(tensors)
    flat = torch.cat([t.flatten() for t in tensors])
    torch.distributed.all_reduce(flat)  # plain collective: sums of detached tensors need no autograd
    return [g.view_as(t) for t, g in zip(tensors, flat.split([t.numel() for t in tensors]))]

def sum_gradients(fabric, params: list[torch.nn.Parameter]) -> None:
    "Sum each .grad over ranks in place (a rank without one adds zeros); one with no gradient on any rank keeps none."
    if fabric.world_size == 1: return
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device if params else "cpu")
    anywhere = sum_over_ranks(fabric, [torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                                                     device=device)])[0]
    with_grad = [p for p, flag in zip(params, anywhere.tolist()) if flag]
    for p in with_grad:
        if p.grad is None: p.grad = torch.zeros_like(p)
    for p, total in zip(with_grad, sum_over_ranks(fabric, [p.grad for p in with_grad])): p.grad.copy_(total)


# %% [markdown]
# Test on three CPU processes (gloo; forked, so they see this notebook's functions). Each rank holds
# its `tensor_split` part of 10 rows (4, 3 and 3 rows): the gather gives every rank all 10 in order.
# Each rank's parameter `a` has gradient rank + 1 and `b` none: after the sum, `a.grad` is 1 + 2 + 3
# on every rank and `b` still has none. `c` has a gradient on rank 2 only (the others held no rows):
# after the sum every rank has rank 2's. With one process all of it is the identity.

# %%
import multiprocessing
import tempfile
from types import SimpleNamespace


def _ranks_check(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    fabric = SimpleNamespace(world_size=world, all_reduce=lambda t, reduce_op: (torch.distributed.all_reduce(t), t)[1])
    rows = torch.arange(20.0).view(10, 2)  # (10, 2)
    assert torch.equal(gather_parts(fabric, rows[part_slice(10, world, rank)], part_sizes(10, world)), rows)
    a, b, c = (torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
               torch.nn.Parameter(torch.zeros(2)))
    a.grad = torch.full((2, 3), rank + 1.0)
    if rank == 2: c.grad = torch.tensor([5.0, 7.0])
    sum_gradients(fabric, [a, b, c])
    assert (torch.equal(a.grad, torch.full((2, 3), 6.0)) and b.grad is None
            and torch.equal(c.grad, torch.tensor([5.0, 7.0])))
    assert torch.equal(sum_over_ranks(fabric, [torch.ones(3) * rank])[0], torch.full((3,), 3.0))
    torch.distributed.destroy_process_group()

with tempfile.TemporaryDirectory() as _tmp:
    _procs = [multiprocessing.get_context("fork").Process(target=_ranks_check, args=(r, 3, f"{_tmp}/store"))
              for r in range(3)]
    for _p in _procs: _p.start()
    for _p in _procs: _p.join(timeout=120)
    for _p in _procs:
        if _p.is_alive(): _p.kill()  # a hung rank fails the test below instead of lingering
    assert [_p.exitcode for _p in _procs] == [0, 0, 0], [_p.exitcode for _p in _procs]

_one = SimpleNamespace(world_size=1)
_x = torch.ones(3, 2)
assert gather_parts(_one, _x, [3]) is _x
_a = torch.nn.Parameter(torch.zeros(2)); _a.grad = torch.ones(2)
sum_gradients(_one, [_a]); assert torch.equal(_a.grad, torch.ones(2))
assert sum_over_ranks(_one, [_x])[0] is _x


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
    "(pool rows per rank, seed of their data order): the branch micro-batch, or `smlmt.pool_rows` of a second order."
    if cfg.smlmt.pool_rows == 0: return rows_per_rank, cfg.train.seed
    if cfg.smlmt.pool_rows % world_size:
        raise ConfigError(f"smlmt.pool_rows={cfg.smlmt.pool_rows} must be a multiple of the world size {world_size}")
    return cfg.smlmt.pool_rows // world_size, mix_seed(cfg.train.seed, "pool") % 2**31


# %%
from picomaml.config import load_config

assert pool_layout(load_config(None, ["smlmt.pool_rows=0"]), 4, 64) == (64, 42)
assert pool_layout(load_config(None, ["smlmt.pool_rows=512"]), 2, 8)[0] == 256
raises(lambda: pool_layout(load_config(None, ["smlmt.pool_rows=63"]), 2, 8), "smlmt.pool_rows=63", kind=ConfigError)
