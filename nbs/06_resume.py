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
# # Resuming a run
#
# > Where a launch starts, what it saves, and which checkpoint is known good to go back to.
# > Which checkpoint a relaunch resumes from and under which settings, the run directory it starts,
# > the training state every checkpoint saves from every rank, and the checks that stop a run before
# > a NaN or a divergence reaches a checkpoint.
#
# The papers' runs are 6,000 optimizer steps (paper 1 §3.3, on four A100 GPUs; paper 2 §2.4), long
# enough to be interrupted, and their checkpoints are what both papers analyse afterwards (paper 1
# §6, paper 2 §4.1). A resumed run must be the run it continues: the same settings, the same weights,
# optimizer state, RNG and data position, so that its log and final weights equal an uninterrupted
# run's (`06_train` tests this end to end, `tests/test_distributed.py` after `kill -9`). The store
# itself (layout, atomic writes, digests, which checkpoints keep their state) is `06_checkpoints`.

# %%
#| default_exp resume

# %%
#| export
from __future__ import annotations

import dataclasses
import math
import signal
import statistics
import sys
import threading
from pathlib import Path

import torch

from picomaml.checkpoints import (
    LOCK_FILE,
    NoResumableCheckpoint,
    confirm_checkpoint,
    find_resumable,
    has_training_state,
    list_checkpoints,
    newest_confirmed,
    prune_training_state,
    read_checkpoint,
    read_meta,
    write_checkpoint,
)
from picomaml.collectives import gather_parts
from picomaml.config import Config, ConfigError, config_changes, load_config, save_config
from picomaml.model import load_checked
from picomaml.names import step_dir_name
from picomaml.runlog import RunBusy, append_records, take_lock, truncate_after


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
        raise ConfigError(f"{run_dir} was trained with other settings ({listed}); resuming would continue a "
                          f"different run. "
                          f"Relaunch with the run's own settings ({saved}), choose another logging.run_name, or branch "
                          f"deliberately from a checkpoint with checkpoint.resume_from=step_NNNNNN")
    return {**trajectory, **safe}

def choose_checkpoint(cfg: Config, root: Path):
    "The checkpoint to resume from (newest resumable, or checkpoint.resume_from), as find_resumable's tuple; or None."
    if not cfg.checkpoint.resume_from: return find_resumable(root)
    name = (cfg.checkpoint.resume_from if cfg.checkpoint.resume_from.startswith("step_")
            else step_dir_name(int(cfg.checkpoint.resume_from)))
    with_state = [d.name for _, d in list_checkpoints(root) if has_training_state(d)]
    if name not in with_state:
        raise ConfigError(f"checkpoint.resume_from={cfg.checkpoint.resume_from}: {root / name} is not a checkpoint "
                          f"with training state; "
                          f"those with one: {', '.join(with_state) or 'none'}")
    return root / name, read_checkpoint(root / name)


# %%
import tempfile

from picomaml.devtools import raises

with tempfile.TemporaryDirectory() as _tmp:
    save_config(load_config(None, ["maml.rho=0.5"]), Path(_tmp) / "config.yaml")
    assert (check_resume_config(load_config(None, ["maml.rho=0.5", "eval.every=10"]), Path(_tmp))
            == {"eval.every": (100, 10)})
    e = raises(lambda: check_resume_config(load_config(None, ["maml.rho=0", "train.lr=0.1"]), Path(_tmp)),
               kind=ConfigError)
    assert all(t in str(e) for t in ("maml.rho: 0.5 -> 0.0", "train.lr: 0.0003 -> 0.1", "checkpoint.resume_from"))
    assert "train.lr" in check_resume_config(load_config(None, ["train.lr=0.1", "checkpoint.resume_from=step_000002"]),
                                             Path(_tmp))

# %% [markdown]
# Test: `checkpoint.resume_from` takes a step directory's name or its step number, and only a
# checkpoint that keeps its training state; without it, the newest one that does.

# %%
from picomaml.devtools import TINY_MODEL
from picomaml.maml import MAMLHead
from picomaml.model import PicoDecoder

_tiny = [*TINY_MODEL, "model.vocab_size=64", "smlmt.n_way=4", "maml.head_hidden=16", "maml.head_layers=2"]
_cfg = load_config(None, _tiny)
torch.manual_seed(0)
_model, _head = PicoDecoder(_cfg.model), MAMLHead(24, 4, _cfg.maml, 64)
with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp)
    for _step in (0, 2, 4):
        write_checkpoint(_root, _step, _model, _head, {"world_size": 1}, None if _step == 0 else {"step": _step})
    assert choose_checkpoint(_cfg, _root)[0].name == "step_000004"
    assert choose_checkpoint(load_config(None, [*_tiny, 'checkpoint.resume_from="2"']), _root)[0].name == "step_000002"
    raises(lambda: choose_checkpoint(load_config(None, [*_tiny, "checkpoint.resume_from=step_000000"]), _root),
           "those with one: step_000002, step_000004", kind=ConfigError)


# %% [markdown]
# The run directory a launch starts from: its resolved configuration (without `resume_from`, an
# instruction for this launch and not a property of the run), the accepted changes, and a metrics log
# cut back to the step it resumes from, so the steps it redoes are not logged twice.

# %%
#| export
def start_run_directory(cfg: Config, run_dir: Path, step: int, changes: dict) -> None:
    "Write config.yaml, record accepted configuration changes, cut the metrics log back to `step`."
    run_dir.mkdir(parents=True, exist_ok=True)
    if changes:
        append_records(run_dir / "config_history.jsonl",
                       [{"step": step, "changes": {k: list(v) for k, v in changes.items()}}])
    # resume_from is an instruction for this launch, not a property of the run: the saved configuration does not keep it
    save_config(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume_from="")),
                run_dir / "config.yaml")
    truncate_after(run_dir / "metrics.jsonl", step)


# %%
import json

with tempfile.TemporaryDirectory() as _tmp:
    _run = Path(_tmp) / "run"
    start_run_directory(load_config(None, ["train.lr=0.1", "checkpoint.resume_from=step_000002"]), _run, 0, {})
    assert (not (_run / "config_history.jsonl").exists()
            and load_config(_run / "config.yaml").checkpoint.resume_from == "")
    (_run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    start_run_directory(load_config(None, ["train.lr=0.1"]), _run, 2, {"train.lr": (0.0003, 0.1)})
    assert [json.loads(l)["step"] for l in (_run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (json.loads((_run / "config_history.jsonl").read_text())
            == {"step": 2, "changes": {"train.lr": [0.0003, 0.1]}})


# %%
#| export
def resume_or_start(run) -> int:
    "Load the chosen checkpoint into `run`'s model, head, optimizer and RNG if resuming; return the step to start from."
    fabric, cfg, run_dir = run.fabric, run.cfg, run.run_dir
    root = run_dir / "checkpoints"
    has_ckpts = any(root.glob("step_*"))
    if has_ckpts and not cfg.checkpoint.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints and checkpoint.resume=false: set "
                          f"checkpoint.resume=true to "
                          f"continue that run, or choose another logging.run_name")
    found, changes, problem = None, {}, ""
    if fabric.global_rank == 0:
        try:
            # one launch per run directory, until train() ends
            take_lock(run_dir / LOCK_FILE, f"run directory {run_dir}")
            if has_ckpts: changes, found = check_resume_config(cfg, run_dir), choose_checkpoint(cfg, root)
        except (ConfigError, NoResumableCheckpoint, RunBusy) as e: problem = str(e)
    name, problem = fabric.broadcast((found[0].name if found else "", problem), src=0)
    if problem: raise ConfigError(problem)
    step = 0
    if name:
        weights, head_weights, meta, state = found[1] if found else read_checkpoint(root / name)
        load_checked(run.model, weights, str(root / name / "model.safetensors"),
                     f"the run configuration (model.* of this launch, saved in "
                     f"{run_dir / 'config.yaml'})")
        run.head.load_state_dict(head_weights)
        run.optimizer.load_state_dict(state["optimizer"])
        # clone: set_rng_state of a view with a storage offset segfaults (torch 2.13)
        if meta["world_size"] == fabric.world_size:
            torch.set_rng_state(state["rng_cpu"][fabric.global_rank].clone())
        step = meta["step"]
    if step > cfg.train.steps:  # every rank read the same checkpoint: all raise, before config.yaml is rewritten
        raise ConfigError(f"train.steps={cfg.train.steps} is below step {step}, which {run_dir} resumes from: "
                          f"nothing would be trained. "
                          f"Raise train.steps, resume from an earlier checkpoint (checkpoint.resume_from=step_...), "
                          f"or choose another "
                          f"logging.run_name")
    if fabric.global_rank == 0:
        start_run_directory(cfg, run_dir, step, changes)
        if name: print(f"[{cfg.logging.run_name}] resuming from {root / name} (step {step} of {cfg.train.steps})"
                       + ("; later checkpoints are rewritten as the run re-reaches them" if cfg.checkpoint.resume_from
                          else ""), flush=True)
    fabric.barrier()
    return step


# %% [markdown]
# ## Saving the training state
#
# Saving gathers every rank's RNG state to rank 0, which writes the checkpoint (weights, head and
# metadata, plus the training state), drops the training state of checkpoints older than the newest
# `checkpoint.keep_state`, and hands it to the Hub uploads if asked (`06_checkpoints`: they run on a
# background thread, so the barrier does not wait for the uplink); the others wait at a barrier so
# nobody runs ahead of a checkpoint that is still being written.

# %%
#| export
def save_training_state(run, step: int) -> None:
    "Checkpoint `run` at `step` (weights, head, optimizer, every rank's RNG, data position) atomically; rank 0 writes."
    fabric, cfg = run.fabric, run.cfg
    # (world, n)
    rng = gather_parts(fabric, torch.get_rng_state()[None].to(fabric.device), [1] * fabric.world_size).cpu()
    if fabric.global_rank == 0:
        meta = {"data_position": step * cfg.train.global_batch, "world_size": fabric.world_size,
                "run_name": cfg.logging.run_name}
        root = run.run_dir / "checkpoints"
        directory = write_checkpoint(root, step, run.model, run.head, meta,
                                     {"optimizer": run.optimizer.state_dict(), "rng_cpu": rng})
        prune_training_state(root, cfg.checkpoint.keep_state)
        if run.uploads is not None: run.uploads.submit(directory)
    fabric.barrier()


# %% [markdown]
# Test, one CPU process: a fresh directory starts at step 0; a checkpoint saved at step 3 is what a
# relaunch loads into freshly initialised objects (weights, head, AdamW moments and the RNG state, so
# the next random numbers are the same); and a launch told not to resume refuses the directory.

# %%
from lightning.fabric import Fabric

from picomaml.layout import Run

_fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")

def _toy_run(seed: int, run_dir: Path, cfg=_cfg) -> Run:
    "A run of a toy model, head and AdamW, initialised from `seed`."
    torch.manual_seed(seed)
    model, head = PicoDecoder(cfg.model), MAMLHead(24, 4, cfg.maml, 64)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    return Run(cfg=cfg, fabric=_fabric, model=model, head=head, optimizer=optimizer, run_dir=run_dir)

with tempfile.TemporaryDirectory() as _tmp:
    _run = Path(_tmp) / "run"
    _first = _toy_run(0, _run)
    _model, _head, _opt = _first.model, _first.head, _first.optimizer
    assert resume_or_start(_first) == 0 and (_run / "config.yaml").is_file()
    for _p in _first.params: _p.grad = torch.randn_like(_p)
    _opt.step()
    save_training_state(_first, 3)
    _next = torch.rand(5)  # what the run draws after the checkpoint
    _meta = read_meta(_run / "checkpoints/step_000003")
    assert (_meta["step"], _meta["data_position"], _meta["world_size"]) == (3, 3 * _cfg.train.global_batch, 1)
    _second = _toy_run(1, _run)
    _model2, _head2, _opt2 = _second.model, _second.head, _second.optimizer
    assert resume_or_start(_second) == 3
    assert torch.equal(torch.rand(5), _next)
    assert all(torch.equal(a, b) for a, b in zip([*_model.state_dict().values(), *_head.state_dict().values()],
                                                 [*_model2.state_dict().values(), *_head2.state_dict().values()]))
    _s, _s2 = _opt.state_dict()["state"], _opt2.state_dict()["state"]
    assert _s.keys() == _s2.keys() and all(torch.equal(_s[i][k], _s2[i][k])
                                           for i in _s for k in ("exp_avg", "exp_avg_sq"))
    raises(lambda: resume_or_start(_toy_run(1, _run, load_config(None, [*_tiny, "checkpoint.resume=false"]))),
           "checkpoint.resume=false", kind=ConfigError)

# %% [markdown]
# ## Preemption: a signal saves the step in hand
#
# A cluster stops a job with a signal first and SIGKILL later: SLURM sends SIGTERM (or what
# `--signal` names, e.g. `--signal=USR1@120` two minutes ahead) before it preempts a job or ends it
# at its time limit, then SIGKILL after `KillWait` (30 s by default). Dying on the signal would lose
# up to `checkpoint.every - 1` optimizer steps each time. Instead `PreemptionFlag` notes SIGTERM and
# SIGUSR1; at the end of every optimizer step all ranks agree whether any of them was signalled (one
# all-reduce of one number, so they stop at the same step even when only one rank got the signal);
# if so, rank 0 checkpoints that step with its training state (unless the schedule just did), and
# every process exits with status 75 (`PREEMPTED_EXIT`, sysexits' `EX_TEMPFAIL`: try again). The
# relaunch of the same command resumes there, so no completed optimizer step is lost; the time from
# the signal to the exit is the rest of the step in hand plus one checkpoint write. A repeated signal
# is noted, not obeyed: under `torchrun` the workers get the group's SIGTERM and torchrun's own
# forward of it, and torchrun SIGKILLs its workers 30 s after it forwards, so `--signal` must leave
# more than a step and a checkpoint write before that (`07_launch`, "On a cluster").

# %%
#| export
PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: the run saved its state on a preemption signal; relaunch (requeue) it
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

class PreemptionFlag:
    "Notes a preemption signal instead of dying, so the loop can save its step; `restore()` puts the old handlers back."
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.received = None  # the first signal's name
        on_main = threading.current_thread() is threading.main_thread()  # handlers can only be installed there
        self.previous = {s: signal.signal(s, self.note) for s in signals} if on_main else {}

    def note(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items(): signal.signal(s, handler)

def preemption_agreed(fabric, flag: PreemptionFlag) -> bool:
    "Whether any rank was signalled; all ranks get the same answer (a sum over ranks), so all stop after the same step."
    noted = torch.tensor([float(flag.received is not None)], device=fabric.device)
    return (fabric.all_reduce(noted, reduce_op="sum") if fabric.world_size > 1 else noted).item() > 0

class Preempted(SystemExit):
    "A run that saved step `step` on a preemption signal: exits with PREEMPTED_EXIT for a requeue script."
    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT)
        self.step = step

def stop_for_preemption(run, step: int, *, saved: bool) -> None:
    "Checkpoint `run` at `step` (unless already `saved`), say so on rank 0, raise Preempted."
    run_dir = run.run_dir
    if not saved: save_training_state(run, step)
    if run.fabric.global_rank == 0:
        print(f"[preempted] a preemption signal after step {step}: {run_dir / 'checkpoints' / step_dir_name(step)} "
              f"holds it; relaunch the "
              f"same command to resume (exit status {PREEMPTED_EXIT})", file=sys.stderr, flush=True)
    raise Preempted(step)


# %% [markdown]
# Test: the flag notes a signal (here raised in this process) instead of ending it, keeps the first
# of two, and gives the old handler back; the stop checkpoints the step with its training state and
# exits with status 75.

# %%
import os

_before = signal.getsignal(signal.SIGTERM)
_flag = PreemptionFlag()
assert _flag.received is None and not preemption_agreed(_fabric, _flag)
os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGTERM)
assert _flag.received == "SIGUSR1" and preemption_agreed(_fabric, _flag)
_flag.restore()
assert signal.getsignal(signal.SIGTERM) == _before
with tempfile.TemporaryDirectory() as _tmp:
    _run = Path(_tmp) / "run"
    _stopped = _toy_run(0, _run)
    resume_or_start(_stopped)
    e = raises(lambda: stop_for_preemption(_stopped, 5, saved=False), kind=Preempted)
    assert e.code == PREEMPTED_EXIT == 75 and e.step == 5
    assert has_training_state(_run / "checkpoints" / "step_000005")


# %% [markdown]
# ## Known-good checkpoints and NaN stops
#
# The finiteness check (a NaN/inf loss or gradient stops the run **before** the optimizer step, so
# no checkpoint ever holds the weights it would give) and the confirmation of checkpoints (a
# checkpoint's weights are judged by the loss they give one step later: finite, and not `EXPLODING`
# times the median of the last 20 losses, so a step that blew the weights up to 1e6 without a NaN yet
# is never called good). When the run stops on a NaN, the message names the newest confirmed
# checkpoint and the setting that resumes from it (`checkpoint.resume_from`), which also accepts the
# lower learning rate the relaunch needs.

# %%
#| export
def check_finite(record: dict, run_dir: Path) -> None:
    "Raise FloatingPointError on a NaN/inf loss or gradient norm, naming the step and a way back that works."
    bad = [key for key in ("loss", "grad_norm") if not math.isfinite(record[key])]
    if not bad: return
    good = newest_confirmed(Path(run_dir) / "checkpoints")
    way_back = (f"The newest checkpoint known good is {good.name} (its weights gave loss "
                f"{read_meta(good)['next_loss']:.4g} at the next "
                f"step): relaunch with checkpoint.resume_from={good.name} and a lower train.lr, or set train.grad_clip"
                if good else "No checkpoint with training state is known good: start again under another "
                "logging.run_name with a "
                "lower train.lr, or set train.grad_clip")
    raise FloatingPointError(f"step {record['step']}: {' and '.join(f'{k} is {record[k]}' for k in bad)}; "
                             f"stopped before the optimizer "
                             f"step, so no checkpoint holds these weights. {way_back}")

EXPLODING = 10.0  # a loss this many times the median of the run's recent losses is a divergence, not noise

def confirm_if_healthy(root: Path, step: int, loss: float, recent: list) -> None:
    "Confirm checkpoint `step`, if one was written, when the loss its weights gave is finite and not exploding."
    directory = root / step_dir_name(step)
    exploding = bool(recent) and loss > EXPLODING * statistics.median(recent)
    if (directory / "checkpoint.json").is_file() and math.isfinite(loss) and not exploding:
        confirm_checkpoint(directory, loss)


# %%
raises(lambda: check_finite({"step": 7, "loss": float("nan"), "grad_norm": 1.0}, Path("/nonexistent")),
       "step 7: loss is nan", "No checkpoint with training state is known good", kind=FloatingPointError)
check_finite({"step": 7, "loss": 1.0, "grad_norm": 2.0}, Path("/nonexistent"))

# %% [markdown]
# Test: of three checkpoints with training state, step 2's weights gave a loss 11 times the recent
# median and step 4's a NaN; only step 0 is confirmed, and the NaN message sends the relaunch there.

# %%
with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp) / "checkpoints"
    for _step in (0, 2, 4): write_checkpoint(_root, _step, _model, _head, {"world_size": 1}, {"step": _step})
    confirm_if_healthy(_root, 0, 4.0, [])
    confirm_if_healthy(_root, 1, 4.0, [4.0])  # no checkpoint at step 1: nothing to confirm
    confirm_if_healthy(_root, 2, 44.0, [4.0, 4.0, 3.0])
    confirm_if_healthy(_root, 4, float("nan"), [4.0, 4.0, 3.0])
    assert [read_meta(_root / step_dir_name(s)).get("confirmed", False) for s in (0, 2, 4)] == [True, False, False]
    raises(lambda: check_finite({"step": 5, "loss": 2.0, "grad_norm": float("inf")}, Path(_tmp)),
           "grad_norm is inf", "checkpoint.resume_from=step_000000", "loss 4 ", kind=FloatingPointError)
