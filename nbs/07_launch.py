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
# # Launching a run
#
# > `python -m picomaml.launch --config X [section.key=value ...]`: one process, or as many as
# > `torchrun` (or SLURM) starts, on one node or several.
#
# The launcher turns a preset plus command-line overrides into a `Config` (`picomaml.config`),
# creates a Lightning Fabric that matches the processes it was started in, runs `picomaml.train.train`
# and shuts the process group down cleanly. It contains no training logic.
#
# ```sh
# python -m picomaml.launch --config configs/demo.yaml                                 # one process
# torchrun --standalone --nproc_per_node=2 -m picomaml.launch --config configs/demo.yaml
# python -m picomaml.launch --help                                                     # every option
# ```
#
# **Several nodes.** Start the same command on every node with torchrun's rendezvous, e.g. for two
# nodes of four GPUs:
#
# ```sh
# torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 --rdzv-endpoint HOST0:29500 -m picomaml.launch --config X   # on HOST0
# torchrun --nnodes 2 --node_rank 1 --nproc_per_node 4 --rdzv-endpoint HOST0:29500 -m picomaml.launch --config X   # on HOST1
# ```
#
# (`--rdzv-backend c10d --rdzv-id JOB` instead of `--node_rank` lets torchrun assign ranks.) Under
# SLURM, `srun python -m picomaml.launch ...` with `--ntasks-per-node` = GPUs per node works without
# torchrun: Fabric reads the SLURM variables. Either way `logging.runs_dir` must be on a file system
# every node sees (rank 0 writes checkpoints; every rank reads them when resuming).

# %%
#| default_exp launch

# %%
#| export
from __future__ import annotations

import argparse
import importlib.util
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from picomaml.checkpoints import CheckpointUploads
from picomaml.cli import run_command
from picomaml.config import Config, ConfigError, format_help, load_config
from picomaml.device import (
    configure_cuda_allocator,
    cuda_problem,
    require_cuda,
    resolve_precision,
    slurm_binding_problem,
)
from picomaml.train import train


# %% [markdown]
# ## How many processes, on how many nodes
#
# Fabric requires devices × num_nodes = world size (Lightning's `Fabric(devices, num_nodes)`). torchrun exports `WORLD_SIZE` and
# `LOCAL_WORLD_SIZE` (processes on this node); SLURM exports `SLURM_NTASKS_PER_NODE` and
# `SLURM_NNODES`. With neither, the run is one process.

# %%
#| export
def devices_and_nodes(env=os.environ) -> tuple[int, int]:
    "(processes per node, nodes) of the launch this process is part of."
    if "WORLD_SIZE" in env:
        world, local = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        if world % local: raise RuntimeError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: "
                                             f"give every node the same --nproc_per_node")
        return local, world // local
    if "SLURM_NTASKS_PER_NODE" in env and "SLURM_NNODES" in env:
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), int(env["SLURM_NNODES"])
    return 1, 1


# %%
from picomaml.devtools import raises

assert devices_and_nodes({}) == (1, 1)
assert devices_and_nodes({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) == (2, 1)
assert devices_and_nodes({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}) == (4, 2)
assert devices_and_nodes({"SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_NNODES": "2"}) == (4, 2)
raises(lambda: devices_and_nodes({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}), "LOCAL_WORLD_SIZE=2", kind=RuntimeError)


# %% [markdown]
# ## The Fabric
#
# `train.device` says where the processes run (`00_device`). `cuda` (the paper presets) needs a usable
# GPU for every process of the node and stops otherwise, before anything is read or written, with
# one line naming the likely cause and the way to run on CPU anyway (`train.device=cpu`); `auto` (the
# demo) takes the GPUs when CUDA is usable and otherwise runs CPU processes, saying so on one line;
# `cpu` runs CPU processes. GPUs talk over NCCL, CPU processes over gloo. The precision follows
# `train.precision` on the device's compute capability (bf16 from 8.0 on). A SLURM job that binds one
# GPU to each task is refused with the binding that works. Several processes use the `ddp` strategy
# only for its process group and collectives: the training loop sums gradients itself (see
# `picomaml.train`). Optional loggers go through Fabric: TensorBoard (`logging.tensorboard`) and
# Weights & Biases (`logging.wandb_project`); each needs its package, and asking for one that is
# not installed is an error that says which package to install.

# %%
#| export
def make_loggers(cfg: Config) -> list:
    "Fabric loggers asked for by `logging.tensorboard` / `logging.wandb_project`."
    run_dir, loggers = Path(cfg.logging.runs_dir) / cfg.logging.run_name, []
    if cfg.logging.tensorboard:
        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise ConfigError("logging.tensorboard=true needs the `tensorboard` package (pip install tensorboard)")
        from lightning.fabric.loggers import TensorBoardLogger  # deferred: imports the optional tensorboard package
        loggers.append(TensorBoardLogger(root_dir=run_dir / "tensorboard", name="", version=""))
    if cfg.logging.wandb_project:
        if not importlib.util.find_spec("wandb"):
            raise ConfigError(f"logging.wandb_project={cfg.logging.wandb_project!r} needs the `wandb` package "
                              "(pip install wandb)")
        from lightning.pytorch.loggers import WandbLogger  # deferred: imports the optional wandb package
        loggers.append(WandbLogger(project=cfg.logging.wandb_project, name=cfg.logging.run_name, save_dir=str(run_dir)))
    return loggers

def choose_accelerator(cfg: Config, devices: int, env=os.environ, say=lambda line: print(line, flush=True),
                       **facts) -> str:
    "'cuda' or 'cpu' for `train.device` and `devices` local processes; a one-line error if GPUs asked for are unusable."
    if cfg.train.device == "cpu": return "cpu"
    binding = slurm_binding_problem(env, facts.get("cuda", torch.cuda).device_count())
    if binding: raise ConfigError(binding)  # GPUs are there, bound so that Lightning cannot find them
    if cfg.train.device == "cuda":
        require_cuda(devices, "train.device=cuda", "train.device=cpu (or the `auto` of configs/demo.yaml)", env=env,
                     **facts)
    elif problem := cuda_problem(devices, env=env, **facts):
        if env.get("RANK", env.get("SLURM_PROCID", "0")) == "0":
            say(f"[launch] train.device=auto: no usable GPU ({problem}); running {devices} CPU process(es) in float32")
        return "cpu"
    return "cuda"

def make_fabric(cfg: Config, env=os.environ):
    "A Fabric for this launch: accelerator, world size and precision from the environment and `cfg`."
    from lightning.fabric import Fabric  # deferred: a heavy import that `--help` and config errors should not wait for
    from lightning.fabric.strategies import DDPStrategy
    devices, num_nodes = devices_and_nodes(env)
    accelerator = choose_accelerator(cfg, devices, env)
    capability = torch.cuda.get_device_capability(0) if accelerator == "cuda" else None
    strategy = (DDPStrategy(timeout=timedelta(seconds=cfg.train.collective_timeout_s)) if devices * num_nodes > 1
                else "auto")
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                  precision=resolve_precision(cfg.train.precision, accelerator, capability), loggers=make_loggers(cfg))


# %% [markdown]
# Tests, with a stand-in for `torch.cuda` (`00_device`): GPUs asked for and present; asked for on a
# machine without them (one line, and the way to run on CPU); `auto` on a CPU machine (said, then
# CPU); `cpu`; a SLURM job that bound one GPU to each of its four tasks.

# %%
from types import SimpleNamespace

_cuda = lambda n: SimpleNamespace(is_available=lambda: n > 0, device_count=lambda: n, init=lambda: None)
_gpus, _none = (dict(cuda_version="12.8", device_files=[Path("/dev/nvidia0")]),
                dict(cuda_version="12.8", device_files=[]))
_asks = {d: load_config(None, [f"train.device={d}"]) for d in ("cuda", "auto", "cpu")}
assert choose_accelerator(_asks["cuda"], 4, env={}, cuda=_cuda(4), **_gpus) == "cuda"
raises(lambda: choose_accelerator(_asks["cuda"], 4, env={}, cuda=_cuda(0), **_none),
          "train.device=cuda runs on 4 CUDA GPUs, but no NVIDIA device files (/dev/nvidia0, ...): "
          "the machine, container or "
                   "job was started without GPUs. To run on CPU anyway: train.device=cpu")
_said = []
assert (choose_accelerator(_asks["auto"], 2, env={}, say=_said.append, cuda=_cuda(0), **_none) == "cpu"
        and "running 2 CPU process" in _said[0])
assert choose_accelerator(_asks["cpu"], 4, env={}) == "cpu"
_slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "3"}
raises(lambda: choose_accelerator(_asks["cuda"], 4, env=_slurm, cuda=_cuda(1), **_gpus), "--gpus-per-node=4")

# %%
_fabric = make_fabric(load_config(None, ["train.device=cpu"]), env={})
assert _fabric.world_size == 1 and make_loggers(Config()) == []
if not importlib.util.find_spec("tensorboard"):
    raises(lambda: make_loggers(load_config(None, ["logging.tensorboard=true"])), "pip install tensorboard",
           kind=ConfigError)


# %% [markdown]
# ## Clean shutdown
#
# With torch 2.13 and gloo, leaving the process group to the interpreter's exit aborted about one
# run in 27, and `barrier(); destroy_process_group()` hung in 2 of 50; a short sleep between the two
# was clean in 45 of 45 (our measurement on the 2-core CPU machine). After an error there is no barrier (the other ranks may be
# gone): the group is destroyed and the process exits with status 1.

# %%
#| export
def shutdown(ok: bool = True) -> None:
    "Tear the process group down: barrier and a short pause after success, directly after an error."
    if not (dist.is_available() and dist.is_initialized()): return
    if ok:
        dist.barrier()
        time.sleep(0.5)
    dist.destroy_process_group()


# %% [markdown]
# ## Several nodes: one file system
#
# Rank 0 writes the checkpoints and every rank reads them when the run resumes, so `logging.runs_dir`
# must be one directory that every node sees (NFS, Lustre, ...). A node-local path of the same name
# looks the same and is not: after a relaunch each node would resume from its own files, or from
# none. So on several nodes rank 0 writes a token into `runs_dir` at the start, every rank looks for
# it (for up to ten seconds, for a network file system's caches), and unless all of them find it the
# launch stops on every rank with one line naming the directory.

# %%
#| export
def check_shared_directory(fabric, directory, nodes: int, wait_s: float = 10.0) -> None:
    "On several nodes, ConfigError on every rank unless every rank can read the token rank 0 writes into `directory`."
    if nodes <= 1: return
    directory = Path(directory)
    token = fabric.broadcast(uuid.uuid4().hex if fabric.global_rank == 0 else None, src=0)
    path = directory / f".shared-check-{token}"
    if fabric.global_rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    fabric.barrier()
    deadline = time.monotonic() + wait_s
    while not (seen := path.is_file() and path.read_text() == token) and time.monotonic() < deadline: time.sleep(0.5)
    blind = int(fabric.all_reduce(torch.tensor(0.0 if seen else 1.0, device=fabric.device), reduce_op="sum").item())
    if fabric.global_rank == 0: path.unlink(missing_ok=True)
    if blind:
        raise ConfigError(f"logging.runs_dir={directory} is not on a file system every node sees: "
                          f"{blind} of {fabric.world_size} "
                          f"ranks cannot read the file rank 0 wrote there; "
                          f"put logging.runs_dir on a shared file system (NFS, Lustre, ...)")


# %% [markdown]
# One node needs no check; the two-node refusal is tested with a real two-node launch on localhost whose
# second node is given its own `runs_dir` (`tests/test_distributed.py`).

# %%
check_shared_directory(_fabric, "/nonexistent/not-checked", nodes=1)


# %% [markdown]
# ## On a cluster: preemption and requeue
#
# A preempted or timed-out job gets a signal before it is killed. The loop (`06_train`, `06_resume`)
# notes SIGTERM and SIGUSR1, finishes the optimizer step in hand, checkpoints it on rank 0 once every
# rank agrees, and exits with status 75 (`picomaml.resume.PREEMPTED_EXIT`), so a job script can tell
# "saved, run me again" from a failure (1, or 2 for a user error) and from success (0). Under SLURM,
# ask for the signal early enough for a step and a checkpoint write, start the ranks with `srun`
# (each task gets the signal; srun's exit status is the tasks'), and requeue on 75: the relaunch
# resumes from that checkpoint. `docs/cluster.md` has the job script, what `torchrun` does with the
# signal (it forwards it and kills its workers 30 s later), and the shared file system's rules.
# `tests/test_distributed.py` sends SIGTERM to one rank of a running two-process launch and checks
# that both stop after the same step, the step is saved and the relaunch ends bitwise where an
# uninterrupted run does.

# %% [markdown]
# ## The command line
#
# `--config` names a preset (optional: without one the papers' defaults apply); every other
# argument is a `section.key=value` override. `--help` prints every option with its comment
# (`picomaml.config.format_help`). Configuration errors are printed as one line, without a traceback.
# CUDA's allocator is configured (`00_device`) before anything can touch a GPU. After training the
# process group is shut down, and only then does rank 0 wait for its last Hub uploads
# (`06_checkpoints`): a slow uplink cannot hold the other ranks at a collective past its timeout.

# %%
#| export
def parse_args(argv=None) -> argparse.Namespace:
    "Arguments of `python -m picomaml.launch`."
    p = argparse.ArgumentParser(prog="python -m picomaml.launch", add_help=False,
                                description="Pretrain a Pico decoder (hybrid first-order MAML + next-token).")
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/demo.yaml")
    p.add_argument("--help", "-h", action="store_true", help="print every option and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)

def run_launched(cfg: Config, fabric, nodes: int = 1, hub_api=None) -> Path:
    "Train on a launched Fabric, shut the process group down, finish rank 0's Hub uploads; returns the run directory."
    uploads = (CheckpointUploads(cfg.logging.hub_repo, hub_api) if cfg.logging.hub_repo and fabric.global_rank == 0
               else None)
    try:
        check_shared_directory(fabric, cfg.logging.runs_dir, nodes)
        run_dir = train(cfg, fabric, uploads)
    except BaseException:
        shutdown(ok=False)
        raise
    shutdown()
    if uploads is not None:
        print(f"[launch] {uploads.wait()} checkpoints uploaded to {cfg.logging.hub_repo}", flush=True)
    return run_dir

def main(argv=None) -> Path | None:
    "Entry point: parse, build the Fabric, train, shut down."
    configure_cuda_allocator()  # before anything touches a GPU
    args = parse_args(argv)
    if args.help:
        print("usage: [torchrun ... -m | python -m] picomaml.launch [--config PRESET] [section.key=value ...]\n")
        print(format_help())
        return None
    cfg = load_config(args.config, args.overrides)
    fabric = make_fabric(cfg)
    fabric.launch()
    return run_launched(cfg, fabric, nodes=devices_and_nodes()[1])


# %%
import contextlib
import io

with contextlib.redirect_stdout(io.StringIO()) as _out: assert main(["--help"]) is None
assert "maml.rho (float, 0.5" in _out.getvalue() and "usage:" in _out.getvalue()
_args = parse_args(["--config", "configs/demo.yaml", "train.steps=5", "maml.rho=0"])
assert _args.config == "configs/demo.yaml" and _args.overrides == ["train.steps=5", "maml.rho=0"]

# %%
#| export
if __name__ == "__main__" and "__file__" in globals(): run_command(main)

# %% [markdown]
# ## Will it fit? The plan before the launch
#
# `python -m picomaml.plan` (`06_plan`) answers before any GPU is touched: per-device memory of each
# phase (weights, gradients, AdamW state, the activations of one memory chunk, the episode,
# evaluation, spectra), the memory chunk it chooses, tokens and FLOPs per optimizer step, the wall
# time at a given MFU and the checkpoint disk of the run. It exits 0 when the run fits and 2 with one
# line naming the setting to change:
#
# ```sh
# python -m picomaml.plan --config configs/pico-large-maml.yaml --gpus 4 --gpu-memory-gb 80 --gpu-tflops 312 --mfu 0.4
# ```
#
# `train` asks the same planner, with the device's real memory (`picomaml.plan.device_memory_gb`),
# for the chunk when `train.chunk_rows` is 0, and refuses a run that will not fit before the data is
# opened or step 1 runs, with the same one-line reason.

# %%
import tempfile

from picomaml.config import PRESETS_DIR
from picomaml.plan import main as plan_main

_large = str(PRESETS_DIR / "pico-large-maml.yaml")
with contextlib.redirect_stdout(io.StringIO()) as _plan, contextlib.redirect_stderr(io.StringIO()) as _err:
    assert plan_main(["--config", _large, "--gpus", "4", "--gpu-memory-gb", "80", "--gpu-tflops", "312"]) == 0
    assert plan_main(["--config", _large, "--gpus", "4", "--gpu-memory-gb", "16"]) == 2
assert _err.getvalue().startswith("error: ") and " set " in _err.getvalue() and " h for 6,000 steps" in _plan.getvalue()
# a model that cannot fit is not launched
_e = raises(lambda: main(["--config", str(PRESETS_DIR / "demo.yaml"), "model.d_model=12288", "model.ffn_hidden=49152",
                          f"logging.runs_dir={tempfile.mkdtemp()}"]), kind=ConfigError)
assert "model.d_model" in str(_e) or "memory" in str(_e)
print(_plan.getvalue()[:1500])

# %% [markdown]
# ## Running a configuration from this notebook
#
# N = the number of GPUs, or 2 CPU processes (gloo) without GPUs, through torchrun. This is the demo
# (minutes on two CPU cores), so it is flagged `slow` and `nbdev_test` skips it; set `CONFIG` to
# another preset to run that instead. The demo's prepared data must exist (the `data` stage of `make demo`).

# %%
#| slow
import subprocess
import sys

CONFIG = "configs/demo.yaml"
n_proc = torch.cuda.device_count() or 2
root = Path("..").resolve()
subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_proc}",
                "-m", "picomaml.launch", "--config", CONFIG], cwd=root, check=True, timeout=1800)
