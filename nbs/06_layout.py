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
# # The step layout and the run object
#
# > What every optimizer step of a run has in common, computed once, and what the loop carries from
# > step to step.
# > The frozen layout of one step over draws and ranks, and the run object that the loop's pieces
# > (`episode_draw`, `next_token_draw`, `save_training_state`, `monitor`) take instead of a dozen
# > separate arguments.
#
# Paper 1 App. A, Algorithm 1 reads each step as: for every sub-batch of the global batch, gather the
# rows, draw the branch, run an episode or a next-token loss, backpropagate at `1 / accum_steps`, and
# step the optimizer after the last one. How those sub-batches fall on ranks (how many draws a step
# takes, how many rows each rank holds, how many rows one forward pass may take in memory, how many
# rows of which data order an episode's pool reads) depends only on the configuration, the process
# count and the memory plan, so it is worked out once when the run starts and frozen: a step cannot
# change it half way. Everything else a step touches (the launched Fabric, backbone, head, AdamW, the
# row sources, the tokenizer's word tables, the evaluation sets read once) is the **run**.

# %%
#| default_exp layout

# %%
#| export
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from picomaml.collectives import branch_layout, pool_layout
from picomaml.config import Config


# %% [markdown]
# ## The step layout
#
# One name per concept, used everywhere below: a **draw** is one branch micro-batch of
# `train.branch_batch` rows (Algorithm 1's sub-batch), an optimizer step takes `draws =
# global_batch / branch_batch` of them (the papers' `accum_steps`: 2048 / 256 = 8); each rank holds
# `rows_per_rank` rows of a next-token draw; the **pool** is the rows an episode is built from
# (`pool_rows` per rank, read in the data order of `pool_seed`: the draw's own rows by default, or
# `smlmt.pool_rows` of a second order); `chunk_rows` and `spectra_batch` are the memory plan's
# (`06_plan`): rows per forward/backward chunk and per group of the spectra's gradient pass.

# %%
#| export
@dataclass(frozen=True)
class StepLayout:
    "How every optimizer step of a run falls on draws, ranks and memory chunks (computed once, then fixed)."
    draws: int  # hybrid draws (branch micro-batches) per optimizer step: global_batch / branch_batch
    rows_per_rank: int  # rows of one next-token draw on each rank: branch_batch / world size
    chunk_rows: int  # rows per forward/backward chunk on each rank (the memory plan's)
    pool_rows: int  # rows of an episode's pool that each rank reads
    pool_seed: int  # seed of the pool's data order (train.seed when the pool is the draw's own rows)
    spectra_batch: int  # rows per group of the spectra's gradient pass (the memory plan's; 0 without spectra)


def step_layout(cfg: Config, world_size: int, plan) -> StepLayout:
    "The layout of `cfg`'s steps on `world_size` ranks under the memory `plan` (a `picomaml.plan.Plan`)."
    draws, rows_per_rank = branch_layout(cfg.train, world_size)
    pool_rows, pool_seed = pool_layout(cfg, world_size, rows_per_rank)
    return StepLayout(draws=draws, rows_per_rank=rows_per_rank, chunk_rows=plan.chunk_rows, pool_rows=pool_rows,
                      pool_seed=pool_seed, spectra_batch=plan.spectra_batch)


# %% [markdown]
# Test: the papers' step on four GPUs (pico-small, 2048 rows) is eight draws of 64 rows per rank, the episode's pool the
# draw's own rows in the same order; a separate pool of 512 rows is 128 per rank in an order of its
# own; the layout cannot be changed once made.

# %%
import dataclasses
from types import SimpleNamespace

from picomaml.config import PRESETS_DIR, load_config
from picomaml.devtools import raises

_plan = SimpleNamespace(chunk_rows=16, spectra_batch=8)
_paper = load_config(PRESETS_DIR / "pico-small-maml.yaml")
_layout = step_layout(_paper, 4, _plan)
assert (_layout.draws, _layout.rows_per_rank, _layout.chunk_rows, _layout.spectra_batch) == (8, 64, 16, 8)
assert (_layout.pool_rows, _layout.pool_seed) == (64, _paper.train.seed)
_separate = step_layout(load_config(PRESETS_DIR / "pico-small-maml.yaml", ["smlmt.pool_rows=512"]), 4, _plan)
assert _separate.pool_rows == 128 and _separate.pool_seed != _paper.train.seed
raises(lambda: setattr(_layout, "draws", 4), kind=dataclasses.FrozenInstanceError)


# %% [markdown]
# ## The run object
#
# What one training run carries from step to step. `train` (`06_train`) makes it once; the pieces
# of a step read what they need from it, so `episode_draw(run, step, draw, rows)` says which episode
# it is and nothing else. The modules are the ones the papers name: the backbone f_theta, the head
# h_phi and the outer optimizer over both (Algorithm 1, line 1). `sources` maps "is this draw an
# episode?" to the row source that draw reads (the next-token stream, or the pool's); `documents` and
# `spectra_rows` are the evaluation sets, read once when the run starts (`06_monitor`).

# %%
#| export
@dataclass
class Run:
    "What a pretraining run carries between steps: the launched Fabric, the trained modules, where it writes and reads."
    cfg: Config
    fabric: object  # the launched Lightning Fabric (rank, world size, device, autocast, collectives)
    model: torch.nn.Module  # the backbone f_theta
    head: torch.nn.Module  # the MAML head h_phi
    optimizer: torch.optim.Optimizer  # AdamW over backbone and head: the outer update
    run_dir: Path  # runs_dir / run_name: config.yaml, metrics.jsonl, spectra.jsonl, checkpoints/
    layout: StepLayout | None = None  # None outside the loop (saving or resuming a checkpoint needs none)
    sources: dict = field(default_factory=dict)  # is an episode -> the row source its draws read
    tables: tuple | None = None  # the tokenizer's (word_start, alpha_len, special ids) for SMLMT episodes
    documents: list | None = None  # Paloma evaluation documents (eval.every > 0)
    spectra_rows: torch.Tensor | None = None  # fixed evaluation rows of the spectra's gradients (spectra.every > 0)
    uploads: object = None  # rank 0's Hub uploads of each checkpoint (logging.hub_repo), or None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        "Every parameter the outer update steps: the backbone's, then the head's."
        return [*self.model.parameters(), *self.head.parameters()]


# %%
from torch import nn

_run = Run(cfg=_paper, fabric=None, model=nn.Linear(3, 2), head=nn.Linear(2, 4, bias=False), optimizer=None,
           run_dir=Path("runs/x"))
assert [p.shape for p in _run.params] == [(2, 3), (2,), (4, 2)] and _run.layout is None and _run.sources == {}
