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
# # Devices
#
# > Which device a process runs on, and what that device can do: whether CUDA is usable (and, if
# > not, the likely reason), bf16 by compute capability, peak FLOP/s by device name, the CUDA
# > allocator's settings, and how a SLURM job binds its GPUs.
#
# Everything that behaves differently on a GPU starts here. Pretraining (`07_launch`), the NER
# sweep (`12_ner_sweep`), the spectra command (`08_spectra`) and the pipeline (`30_pipeline`) ask
# these functions which device to use, so a GPU node that cannot run CUDA (a CPU-only torch wheel, a
# driver older than the wheel, `CUDA_VISIBLE_DEVICES` empty, a container started without GPUs)
# stops before any work with one line, instead of running four gloo processes in float32 for weeks.
# The planner (`06_plan`) takes the same precision rule, so what it plans is what runs.
#
# Nothing here needs a GPU to be tested: every function takes the facts it reads (the CUDA module,
# the environment, a device name) as arguments, and the tests pass stand-ins.

# %%
#| default_exp device

# %%
#| export
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from picomaml.config import ConfigError

# %%
import types


# %% [markdown]
# ## Is CUDA usable, and if not, why?
#
# `torch.cuda.is_available()` answers only yes or no. A user on a rented node needs the reason, so
# `cuda_problem` checks the causes in the order they occur: a torch build without CUDA, a
# `CUDA_VISIBLE_DEVICES` that hides every GPU, no NVIDIA driver or device files (a container started
# without `--gpus`), a driver that the CUDA runtime rejects (its own message), and finally fewer
# visible GPUs than the run asks for. It returns `''` when `min_devices` GPUs can be used.

# %%
#| export
def cuda_problem(min_devices: int = 1, env=None, cuda=torch.cuda, cuda_version=None, device_files=None) -> str:
    "Why this process cannot use `min_devices` CUDA GPUs, as one clause naming the likely cause; '' when it can."
    env = os.environ if env is None else env
    cuda_version = torch.version.cuda if cuda_version is None else cuda_version
    if not cuda_version:
        return f"torch {torch.__version__} is a CPU-only build (install the CUDA wheel of torch on the GPU machine)"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
    if not cuda.is_available():
        files = sorted(Path("/dev").glob("nvidia[0-9]*")) if device_files is None else device_files
        if not files:
            return "no NVIDIA device files (/dev/nvidia0, ...): the machine, container or job was started without GPUs"
        try: cuda.init()
        except Exception as e: return f"CUDA does not initialise: {' '.join(str(e).split())[:200]}"
        return "torch.cuda.is_available() is False although the driver initialises"
    count = cuda.device_count()
    if count < min_devices: return f"only {count} GPU{'s' if count != 1 else ''} visible, {min_devices} needed"
    return ""

def require_cuda(min_devices: int, what: str, cpu_way: str, **facts) -> None:
    ("Raise ConfigError (one line: what needs GPUs, the likely cause, how to run on CPU anyway) "
     "unless CUDA serves `min_devices`.")
    problem = cuda_problem(min_devices, **facts)
    if problem:
        raise ConfigError(f"{what} runs on {min_devices} CUDA GPU{'s' if min_devices > 1 else ''}, but {problem}. "
                          f"To run on CPU anyway: {cpu_way}")


# %% [markdown]
# Tests, with stand-ins for `torch.cuda`: each cause is named, and a machine with enough GPUs has none.

# %%
from picomaml.devtools import raises


def fake_cuda(available=True, count=4, init_error=None):
    "A stand-in for torch.cuda with `count` devices, or none, and the error its init raises."
    def init():
        if init_error: raise RuntimeError(init_error)
    return types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count if available else 0,
                                 init=init)

_gpu = dict(cuda_version="12.8", device_files=[Path("/dev/nvidia0")])
assert cuda_problem(4, env={}, cuda=fake_cuda(), **_gpu) == ""
assert "CPU-only build" in cuda_problem(1, env={}, cuda=fake_cuda(), cuda_version="", device_files=[])
assert "hides every GPU" in cuda_problem(1, env={"CUDA_VISIBLE_DEVICES": ""}, cuda=fake_cuda(), **_gpu)
assert "started without GPUs" in cuda_problem(1, env={}, cuda=fake_cuda(False), cuda_version="12.8", device_files=[])
_old = "The NVIDIA driver on your system is too old (found version 11040)."
assert "too old (found version 11040)" in cuda_problem(1, env={}, cuda=fake_cuda(False, init_error=_old), **_gpu)
assert cuda_problem(4, env={}, cuda=fake_cuda(count=2), **_gpu) == "only 2 GPUs visible, 4 needed"
raises(lambda: require_cuda(4, "the paper profile", "--device cpu", env={}, cuda=fake_cuda(count=1), **_gpu),
          "the paper profile runs on 4 CUDA GPUs, but only 1 GPU visible, 4 needed. To run on CPU anyway: --device cpu")
print("this machine:", cuda_problem() or "CUDA is usable")

# %% [markdown]
# ## Which device a command uses
#
# The NER sweep and the spectra command take `--device`: `auto` (the default) is this process's GPU
# when CUDA is usable (the `LOCAL_RANK`-th, so a worker started for GPU k uses GPU k), else the CPU,
# said on one line; `cuda` or `cuda:K` insists on a GPU and fails with the cause; `cpu` is the CPU.

# %%
#| export
DEVICE_CHOICES = "auto, cpu, cuda or cuda:K"

def resolve_device(requested: str = "auto", env=None, say=print, **facts) -> torch.device:
    "The torch.device of `--device` (auto | cpu | cuda | cuda:K); a one-line error if a GPU is asked for and unusable."
    env = os.environ if env is None else env
    if requested == "cpu": return torch.device("cpu")
    if requested == "auto":
        problem = cuda_problem(1, env=env, **facts)
        if not problem:
            return torch.device("cuda", int(env.get("LOCAL_RANK", 0)) % facts.get("cuda", torch.cuda).device_count())
        say(f"[device] no usable GPU ({problem}): running on the CPU")
        return torch.device("cpu")
    if not (requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit())):
        raise ConfigError(f"--device {requested!r} is not one of {DEVICE_CHOICES}")
    index = int(requested[5:]) if ":" in requested else 0
    require_cuda(index + 1, f"--device {requested}", "--device cpu", env=env, **facts)
    return torch.device("cuda", index)


# %%
_said = []
assert resolve_device("cpu") == torch.device("cpu")
assert resolve_device("auto", env={"LOCAL_RANK": "2"}, cuda=fake_cuda(), **_gpu) == torch.device("cuda", 2)
assert resolve_device("auto", env={}, say=_said.append, cuda=fake_cuda(False), cuda_version="12.8",
                      device_files=[]) == torch.device("cpu")
assert _said and _said[0].startswith("[device] no usable GPU (no NVIDIA device files")
assert resolve_device("cuda:3", env={}, cuda=fake_cuda(), **_gpu) == torch.device("cuda", 3)
raises(lambda: resolve_device("cuda:3", env={}, cuda=fake_cuda(count=2), **_gpu), "only 2 GPUs visible, 4 needed")
raises(lambda: resolve_device("gpu"), "--device 'gpu' is not one of auto, cpu, cuda or cuda:K")

# %% [markdown]
# ## Precision by compute capability
#
# `train.precision: auto` is bf16-mixed on a GPU and float32 (`32-true`) on CPU. bf16 tensor cores
# arrived with compute capability 8.0 (Ampere: A100, A10, RTX 30xx); on older GPUs (V100 7.0, T4 7.5)
# bf16 matmuls are emulated or refused, so `auto` is float32 there, and an explicit `bf16-mixed` is an
# error naming the key. `16-mixed` needs a gradient scaler, which the first-order MAML backward does
# not use, so it is refused everywhere. The planner (`06_plan`) calls the same function, so a float32
# run is planned with float32 activations and the attention kernel float32 gets on CUDA.

# %%
#| export
BF16_CAPABILITY = (8, 0)  # compute capability of the first GPUs with bf16 tensor cores (Ampere)

def resolve_precision(precision: str, accelerator: str, capability: tuple | None = None,
                      key: str = "train.precision") -> str:
    ("The precision (`bf16-mixed` or `32-true`) that setting `key`=`precision` means on `accelerator` "
     "('cuda' or 'cpu') of `capability`.")
    if precision == "16-mixed":
        raise ConfigError(f"{key}=16-mixed needs a gradient scaler, which the first-order MAML backward does not "
                          f"use; set {key} to bf16-mixed, 32-true or auto")
    bf16_ok = accelerator != "cuda" or capability is None or tuple(capability) >= BF16_CAPABILITY
    if precision == "auto": return "bf16-mixed" if accelerator == "cuda" and bf16_ok else "32-true"
    if precision == "bf16-mixed" and not bf16_ok:
        raise ConfigError(f"{key}=bf16-mixed needs a GPU of compute capability 8.0 or newer (Ampere); this one has "
                          f"{capability[0]}.{capability[1]}: set {key}=auto (float32 here)")
    return precision

def cuda_capability(device) -> tuple | None:
    "Compute capability (major, minor) of a CUDA device, None for any other device."
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


# %%
assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("auto", "cuda", (9, 0)) == "bf16-mixed"
assert resolve_precision("auto", "cuda", (7, 0)) == "32-true" and resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
raises(lambda: resolve_precision("bf16-mixed", "cuda", (7, 5)),
       "compute capability 8.0 or newer (Ampere); this one has 7.5")
raises(lambda: resolve_precision("16-mixed", "cuda", (9, 0)), "gradient scaler")
assert cuda_capability("cpu") is None

# %% [markdown]
# ## Peak FLOP/s by device name
#
# MFU divides the model FLOPs of a step by the device's peak. The peak differs between cards that
# share a family name: an H100 SXM does 989 dense bf16 TFLOP/s, the PCIe card 756 and the NVL card
# 835, so matching "H100" alone logs the PCIe and NVL cards' MFU 15–25 % low. The table holds dense
# (not 2:4-sparse) bf16 tensor-core peaks from NVIDIA's and AMD's data sheets, the most specific name
# first; `torch.cuda.get_device_name` returns e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB". An unknown card has no peak: MFU is then not logged,
# rather than logged against a wrong number (`--gpu-tflops` gives the planner one by hand).

# %%
#| export
PEAK_TFLOPS = (  # (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s), most specific first
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("A40", 150.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)

def peak_tflops(device_name: str) -> float | None:
    "Dense bf16 peak TFLOP/s of a GPU by its name (torch.cuda.get_device_name), None if unknown."
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), None)


# %%
assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
assert peak_tflops("NVIDIA H100 NVL") == 835 and peak_tflops("NVIDIA H200") == 989
assert (peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA L40S") == 362
        and peak_tflops("NVIDIA L4") == 121)
assert peak_tflops("NVIDIA A10G") == 70 and peak_tflops("Tesla V100-SXM2-16GB") is None

# %% [markdown]
# ## The CUDA allocator
#
# The caching allocator fragments when tensor sizes vary from step to step, as they do here
# (next-token chunks, 64-token episode windows, evaluation batches): a run can fail to allocate with
# gigabytes reserved but free. `expandable_segments:True` lets a segment grow instead, and PyTorch
# reads `PYTORCH_CUDA_ALLOC_CONF` once, when CUDA first allocates. So every command calls
# `configure_cuda_allocator` at its start, before anything touches a GPU, and keeps whatever the user
# set themselves.

# %%
#| export
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"

def configure_cuda_allocator(env=None) -> str:
    "Add expandable_segments:True to PYTORCH_CUDA_ALLOC_CONF (unless the user set it); return the value."
    env = os.environ if env is None else env
    current = env.get(ALLOC_CONF, "")
    if "expandable_segments" not in current:
        env[ALLOC_CONF] = ",".join(filter(None, [current, "expandable_segments:True"]))
    return env[ALLOC_CONF]


# %%
assert configure_cuda_allocator({}) == "expandable_segments:True"
assert (configure_cuda_allocator({ALLOC_CONF: "max_split_size_mb:512"})
        == "max_split_size_mb:512,expandable_segments:True")
assert configure_cuda_allocator({ALLOC_CONF: "expandable_segments:False"}) == "expandable_segments:False"


# %% [markdown]
# ## Peak memory of a phase
#
# On CUDA the trainer records each phase's peak (`torch.cuda.max_memory_allocated`, reset when the
# phase starts) beside what the planner predicted (`06_plan`), so `metrics.jsonl` shows whether the
# plan held. On a CPU there is no per-process allocator counter to read: the value is `None`.

# %%
#| export
def _measurable(device) -> bool:
    "A CUDA device whose allocator can be read (not one named on a machine without CUDA, as in `recorded_moves`)."
    return torch.device(device).type == "cuda" and torch.cuda.is_available()

def reset_peak_memory(device) -> None:
    "Start a new peak-memory measurement on a CUDA device (nothing elsewhere)."
    if _measurable(device): torch.cuda.reset_peak_memory_stats(device)

def peak_memory_gib(device) -> float | None:
    "GiB allocated at the peak since the last reset on a CUDA device; None elsewhere."
    return torch.cuda.max_memory_allocated(device) / 2**30 if _measurable(device) else None


# %%
reset_peak_memory("cpu")
assert peak_memory_gib("cpu") is None


# %% [markdown]
# ## One GPU per task under SLURM
#
# `srun` with `--ntasks-per-node=N --gpus-per-node=N` shows every task all N GPUs, and Lightning puts
# task k on GPU k. With `--gpus-per-task=1` (or `--gpu-bind=single:1`) each task sees only its own
# GPU, as device 0, while Lightning still asks for device k: it fails inside Lightning with an
# unclear message. `slurm_binding_problem` recognises that case from the environment (several tasks
# on this node, started by SLURM rather than torchrun, fewer visible GPUs than tasks) and says how to
# bind instead.

# %%
#| export
def slurm_binding_problem(env=None, visible_gpus: int | None = None) -> str:
    "Why this SLURM task cannot find its GPU (one GPU bound per task), with the binding that works; '' otherwise."
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "LOCAL_RANK" in env or "SLURM_NTASKS_PER_NODE" not in env: return ""
    tasks = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    visible = torch.cuda.device_count() if visible_gpus is None else visible_gpus
    if tasks <= 1 or visible == 0 or visible >= tasks: return ""
    return (f"SLURM started {tasks} tasks on this node but each sees {visible} GPU{'s' if visible > 1 else ''} "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '?')}, as --gpus-per-task=1 binds them): "
            f"give every task "
            f"the node's GPUs (#SBATCH --ntasks-per-node={tasks} --gpus-per-node={tasks}, no --gpus-per-task), "
            f"or start one "
            f"torchrun per node (srun --ntasks-per-node=1 torchrun --nproc_per_node={tasks} -m picomaml.launch ...)")


# %%
_slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "2"}
assert "--gpus-per-node=4" in slurm_binding_problem(_slurm, visible_gpus=1)
assert (slurm_binding_problem(_slurm, visible_gpus=4) == ""
        and slurm_binding_problem({**_slurm, "LOCAL_RANK": "0"}, 1) == "")
assert slurm_binding_problem({}, visible_gpus=1) == ""


# %% [markdown]
# ## Testing GPU placement on a CPU
#
# A GPU path can be wrong in a way no CPU run notices: a model never moved to the GPU runs, slowly,
# on the CPU. `recorded_moves` makes that visible on a CPU machine. Inside it, every `Module.to` and
# `Tensor.to` is recorded with the device it asks for, and a move to the stand-in device (default
# `cuda:1`) runs as a move to the CPU, so code asked to run on `cuda:1` runs here while the record
# shows what it moved, and where. The NER sweep's and the spectra command's placement tests use it.

# %%
#| export
def _requested_device(args, kwargs):
    "The device a `.to(...)` call asks for, or None (a dtype-only or tensor-like call)."
    device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
    return None if device is None else torch.device(device)

@contextlib.contextmanager
def recorded_moves(stand_in: str = "cuda:1"):
    ("Record (what, device) of every Module.to / Tensor.to inside; moves to `stand_in` run on the CPU, "
     "so CUDA paths run here.")
    moves, stand_in, inside = [], torch.device(stand_in), []  # `inside`: a Module.to moving its own tensors is one move
    real = {torch.nn.Module: torch.nn.Module.to, torch.Tensor: torch.Tensor.to}
    def recording(kind):
        def to(self, *args, **kwargs):
            device = _requested_device(args, kwargs)
            if device is not None and not inside:
                moves.append((type(self).__name__ if kind is torch.nn.Module else "Tensor", device))
            if device == stand_in:
                args, kwargs = ((("cpu", *args[1:]), kwargs) if "device" not in kwargs
                                else (args, {**kwargs, "device": "cpu"}))
            inside.append(kind)
            try: return real[kind](self, *args, **kwargs)
            finally: inside.pop()
        return to
    torch.nn.Module.to, torch.Tensor.to = recording(torch.nn.Module), recording(torch.Tensor)
    try: yield moves
    finally: torch.nn.Module.to, torch.Tensor.to = real[torch.nn.Module], real[torch.Tensor]


# %%
with recorded_moves() as _moves:
    _lin = torch.nn.Linear(2, 2).to("cuda:1")
    _x = torch.ones(3, 2).to(torch.device("cuda", 1), non_blocking=True)
    _y = _lin(_x).to(dtype=torch.float64).to(device="cpu")
assert _moves == [("Linear", torch.device("cuda", 1)), ("Tensor", torch.device("cuda", 1)),
                  ("Tensor", torch.device("cpu"))]
assert (_y.dtype == torch.float64 and torch.nn.Module.to is torch.nn.Module.to
        and torch.ones(1).to("cpu").device.type == "cpu")
