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
# # The checkpoint store
#
# > One home for a run's directory layout: what a checkpoint holds, how it is written so a crash
# > never leaves half of one, how it is verified, which ones keep the optimizer state, and how a
# > run finds the one to resume from. The trainer writes through it; the spectra, the NER sweep,
# > the pipeline and the launcher read through it.
#
# The papers' runs checkpoint every 100 steps (paper 2 App. F, Table 6), and both papers analyse
# those checkpoints afterwards: paper 1 §6 reads the spectra of every checkpoint, paper 2 §4.1
# finetunes NER heads on all 61 of the medium model's (steps 0, 100, …, 6000). Only a resume needs
# the optimizer's state.

# %%
#| default_exp checkpoints

# %%
#| export
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picomaml.cli import UserError
from picomaml.model import load_pretrained, save_pretrained
from picomaml.names import STEP_DIR, step_dir_name
from picomaml.runlog import out_of_space, space_cause, write_json_atomic, write_text_atomic

# %% [markdown]
# ## The layout
#
# ```
# <runs_dir>/<run_name>/config.yaml                  resolved configuration
#                       metrics.jsonl                one JSON line per optimizer step (+ one per evaluation)
#                       spectra.jsonl                singular values and PER, every spectra.every steps
#                       config_history.jsonl         settings changed on a resume, with the step they took effect
#                       .lock                        host and pid of the launch writing the run (empty when none)
#                       checkpoints/step_000100/     model.safetensors + config.json   the decoder (Hugging Face format)
#                                                    head.safetensors                  the MAML head
#                                                    checkpoint.json                   step, data position, world size, SHA-256 of the files
#                                                    training_state.pt                 AdamW state and every rank's RNG (newest few only)
#                       checkpoints/latest           text: the newest complete step directory
# ```
#
# `model.safetensors` + `config.json` are what `picomaml.model.load_pretrained` reads, so any
# checkpoint loads as a model. `training_state.pt` holds only tensors and plain types and is read
# with `torch.load(weights_only=True)`: no pickled code is ever run. The learning rate is a function
# of the step, so there is no scheduler state.
#
# **Why the optimizer state is kept only in the newest `checkpoint.keep_state` checkpoints.** AdamW's
# two moments are 8 bytes a parameter, twice the fp32 weights: over 61 checkpoints × 8 runs that is
# most of a terabyte for the large model alone, and nothing but a resume reads it. A weights-only
# checkpoint is still complete for every analysis.

# %%
#| export
WEIGHT_FILES = ("model.safetensors", "head.safetensors")
META_FILE, STATE_FILE, LATEST_FILE = "checkpoint.json", "training_state.pt", "latest"
LOCK_FILE = ".lock"  # in the run directory: held by the one launch that writes it (00_runlog)

def file_sha256(path) -> str:
    "Hex SHA-256 of a file."
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""): digest.update(block)
    return digest.hexdigest()

def state_bytes(state) -> int:
    "Bytes of the tensors in a (nested) state: what writing it to disk needs, near enough."
    if isinstance(state, torch.Tensor): return state.numel() * state.element_size()
    if isinstance(state, dict): return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)): return sum(state_bytes(v) for v in state)
    return 0


# %% [markdown]
# ## Writing
#
# A checkpoint is written into a temporary directory and renamed into place, then `latest` is
# replaced by a rename too: a crash at any moment leaves either the old or the new checkpoint
# complete, never a half-written one under a `step_` name. Only `checkpoint.json` is written last
# inside the temporary directory, and it carries the digests of the other files. A disk that fills
# up part-way removes the temporary directory and ends in one line (`00_runlog`'s `OutOfSpace`)
# naming the checkpoint and the space it needs; the checkpoints before it are untouched.

# %%
#| export
def write_checkpoint(root, step: int, model, head, meta: dict, training_state: dict | None = None) -> Path:
    "Write `<root>/step_NNNNNN` atomically (weights, head, meta, optional training state), then point `latest` at it."
    root, name = Path(root), step_dir_name(step)
    tmp, final = root / f".tmp_{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, tmp / "head.safetensors")
        if training_state is not None:
            # a Python file: its OSError says why it failed
            with open(tmp / STATE_FILE, "wb") as f: torch.save(training_state, f)
        files = [f for f in (*WEIGHT_FILES, STATE_FILE) if (tmp / f).is_file()]
        write_json_atomic(tmp / META_FILE, {**meta, "step": step, "sha256": {f: file_sha256(tmp / f) for f in files}})
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if space_cause(e):
            raise out_of_space(final, state_bytes([model.state_dict(), head.state_dict(), training_state]), e) from None
        raise
    shutil.rmtree(final, ignore_errors=True)  # a step re-reached after falling back past a corrupt checkpoint
    os.replace(tmp, final)
    write_latest(root, name)
    return final

def write_latest(root, name: str) -> None:
    "Point `<root>/latest` at checkpoint directory `name` (atomically)."
    write_text_atomic(Path(root) / LATEST_FILE, name + "\n")


# %% [markdown]
# ## Listing and reading
#
# `list_checkpoints` is the one reader of the layout: every `step_` directory that holds a loadable
# model (`model.safetensors` + `config.json`), by step. A temporary `.tmp_` directory of an interrupted
# save is never listed; a directory of downloaded Hub checkpoints in the same layout is.
# Reading verifies the SHA-256 digests before anything is used, so a truncated or bit-flipped file
# is caught even where the safetensors header still parses.

# %%
#| export
class CheckpointCorrupt(UserError):
    "A checkpoint directory whose files are missing, unreadable or fail their checksum."

def list_checkpoints(root) -> list[tuple[int, Path]]:
    "`[(step, directory)]` of the complete checkpoints under `root`, by step; [] if there are none."
    root = Path(root)
    found = [(int(m.group(1)), d) for d in (root.iterdir() if root.is_dir() else [])
             if (m := STEP_DIR.match(d.name)) and d.is_dir()]
    return sorted((s, d) for s, d in found if (d / "model.safetensors").is_file() and (d / "config.json").is_file())

def has_training_state(directory) -> bool:
    "Whether a checkpoint directory keeps the state a resume needs."
    return (Path(directory) / STATE_FILE).is_file()

def read_checkpoint(directory, with_state: bool = True) -> tuple[dict, dict, dict, dict | None]:
    "(model tensors, head tensors, meta, training state or None) of a checkpoint, verified against its digests."
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text())
        wanted = [f for f in meta["sha256"] if with_state or f != STATE_FILE]
        for name in wanted:
            if file_sha256(directory / name) != meta["sha256"][name]:
                raise CheckpointCorrupt(f"{directory / name} fails its SHA-256 check")
        state = torch.load(directory / STATE_FILE, map_location="cpu",
                           weights_only=True) if STATE_FILE in wanted else None
        return load_file(directory / "model.safetensors"), load_file(directory / "head.safetensors"), meta, state
    except CheckpointCorrupt: raise
    except Exception as e: raise CheckpointCorrupt(f"{directory} is unreadable: {type(e).__name__}: {e}") from e


# %% [markdown]
# ## Finding the checkpoint to resume from
#
# The newest checkpoint that keeps its training state and passes its checks. A corrupt one is
# skipped with a warning that names the file and the reason. If checkpoints exist but none can be
# resumed from, that is an error, not a fresh start: starting over would overwrite the run's
# history. The error lists what was found, so the user can decide.

# %%
#| export
class NoResumableCheckpoint(UserError):
    "A run directory with checkpoints of which none can be resumed from."

def find_resumable(root):
    ("The newest valid checkpoint with training state as (directory, (weights, head, meta, state)); "
     "None if there are no checkpoints.")
    found, problems = list_checkpoints(root), []
    for step, directory in reversed(found):
        if not has_training_state(directory):
            problems.append(f"{directory.name}: weights only"); continue
        try: return directory, read_checkpoint(directory)
        except CheckpointCorrupt as e:
            problems.append(f"{directory.name}: {e}")
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
    if found:
        raise NoResumableCheckpoint(f"{root} holds {len(found)} checkpoints but none can be resumed from "
                                    f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); "
                                    f"nothing was changed. Move the run directory away to start over, or choose "
                                    f"another logging.run_name")
    return None


# %% [markdown]
# ## Which checkpoints are known good
#
# A checkpoint of step s holds the weights after step s's update; the loss logged at step s was
# computed *before* it. So whether checkpoint s is any good is only known one step later, when its
# weights give step s + 1's loss. The trainer then marks it `confirmed` (a finite loss, not exploding
# against the run's recent losses, from finite weights). After a divergence the newest confirmed
# checkpoint is the one to go back to, and its training state is never pruned.

# %%
#| export
def read_meta(directory) -> dict:
    "A checkpoint's checkpoint.json."
    return json.loads((Path(directory) / META_FILE).read_text())

def confirm_checkpoint(directory, next_loss: float) -> None:
    "Mark a checkpoint as known good: its weights gave the finite, non-exploding loss `next_loss` at the next step."
    meta = read_meta(directory)
    write_json_atomic(Path(directory) / META_FILE, {**meta, "confirmed": True, "next_loss": next_loss})

def newest_confirmed(root) -> Path | None:
    "The newest confirmed checkpoint that still keeps its training state, or None."
    good = [d for _, d in list_checkpoints(root)
            if has_training_state(d) and (d / META_FILE).is_file() and read_meta(d).get("confirmed")]
    return good[-1] if good else None


# %% [markdown]
# ## Keeping the training state of the newest few

# %%
#| export
def prune_training_state(root, keep: int) -> list[Path]:
    ("Delete the training state of all but the newest `keep` checkpoints and the newest confirmed one (weights stay); "
     "return those pruned.")
    protect = newest_confirmed(root)
    with_state = [d for _, d in list_checkpoints(root) if has_training_state(d)]
    pruned = [d for d in with_state[:-keep] if d != protect]
    for directory in pruned:
        meta = read_meta(directory)
        meta["sha256"].pop(STATE_FILE, None)
        # first the digest, so a crash in between leaves a weights-only checkpoint
        write_json_atomic(directory / META_FILE, meta)
        (directory / STATE_FILE).unlink()
    return pruned


# %% [markdown]
# ## Which steps are checkpointed
#
# Every `checkpoint.every` steps, the last step, and step 0 (paper 2 §4 finetunes from the
# initialisation too). `checkpoint.log_spaced` adds steps 1, 2, 4, 8, … as Pythia does, which the CPU
# demo uses to see its short run's early dynamics.

# %%
#| export
def checkpoint_due(step: int, cc, total_steps: int) -> bool:
    "Whether completed optimizer step `step` is checkpointed under CheckpointConfig `cc`."
    log_spaced = cc.log_spaced and step > 0 and (step & (step - 1)) == 0
    return step % cc.every == 0 or step == total_steps or log_spaced

def scheduled_steps(cc, total_steps: int) -> list[int]:
    "Every step that a run of `total_steps` checkpoints, in order."
    return [s for s in range(total_steps + 1) if checkpoint_due(s, cc, total_steps)]


# %%
from picomaml.config import CheckpointConfig

assert scheduled_steps(CheckpointConfig(every=100), 6000) == list(range(0, 6001, 100))  # paper 2 §4: 61 checkpoints
assert scheduled_steps(CheckpointConfig(every=40, log_spaced=True), 120) == [0, 1, 2, 4, 8, 16, 32, 40, 64, 80, 120]
assert scheduled_steps(CheckpointConfig(every=100), 250) == [0, 100, 200, 250]


# %% [markdown]
# ## Uploading to the Hub
#
# With `logging.hub_repo` set, every checkpoint's weights and metadata go to a Hub model repository,
# one branch per step, as the released Pico models are published (`revision="step_100"`).
#
# An upload takes as long as the uplink needs: minutes for the large model's 2.3 GB. Uploading inside
# the checkpoint's barrier would hold every other rank at that barrier, and a slow upload outlasts the
# process group's timeout: the job is killed. So rank 0 hands each checkpoint to `CheckpointUploads`,
# which uploads in order on one background thread while training goes on; the launcher waits for the
# last uploads after the process group is shut down (`07_launch`). A failed upload does not stop the
# run (the checkpoint is on disk): it is reported with the others when the uploads are waited for.

# %%
#| export
def upload_checkpoint(directory, repo_id: str, api=None):
    "Upload a checkpoint's weights and metadata to Hub repo `repo_id` on branch `<step dir name>`."
    from huggingface_hub import HfApi  # deferred: only runs that upload need the Hub client
    api, name = api or HfApi(), Path(directory).name
    api.create_repo(repo_id, exist_ok=True)
    api.create_branch(repo_id, branch=name, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), path_in_repo=f"checkpoints/{name}",
                             revision=name, allow_patterns=["*.safetensors", "*.json"],
                             commit_message=f"checkpoint {name}")

class CheckpointUploads:
    ("Checkpoints uploaded to a Hub repository in order, on one background thread; "
     "`wait` finishes them and reports failures.")
    def __init__(self, repo_id: str, api=None):
        self.repo_id, self.api, self.pending = repo_id, api, []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-upload")

    def submit(self, directory) -> None:
        "Queue the upload of one checkpoint directory and return at once."
        self.pending.append((Path(directory), self.pool.submit(upload_checkpoint, directory, self.repo_id, self.api)))

    def wait(self) -> int:
        ("Finish every queued upload; UserError naming the checkpoints whose upload failed. "
         "Returns how many were uploaded.")
        failed = []
        for directory, future in self.pending:
            try: future.result()
            except Exception as e: failed.append(f"{directory.name} ({type(e).__name__}: {e})")
        self.pool.shutdown()
        if failed: raise UserError(f"{len(failed)} of {len(self.pending)} checkpoint uploads to {self.repo_id} failed: "
                                   f"{'; '.join(failed[:3])}. The checkpoints are on disk; upload them with "
                                   f"`huggingface-cli upload {self.repo_id} <checkpoint dir> checkpoints/<step> "
                                   f"--revision <step>`")
        return len(self.pending)


# %% [markdown]
# ## A round trip
#
# On a tiny decoder: the weights come back bitwise (and load with `load_pretrained`), the state
# comes back through `weights_only=True`, pruning keeps the newest states and every weight file, a
# bit flipped in the newest checkpoint makes `find_resumable` warn and fall back to the one before,
# and when no checkpoint can be resumed from it refuses instead of starting over.

# %%
import tempfile

from picomaml.config import MAMLConfig, ModelConfig
from picomaml.devtools import raises
from picomaml.maml import MAMLHead
from picomaml.model import PicoDecoder, load_checked

_tiny = ModelConfig(d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=64, max_seq_len=32)
torch.manual_seed(0)
_model, _head = PicoDecoder(_tiny), MAMLHead(24, 3, MAMLConfig(head_layers=2, head_hidden=8))
with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp) / "checkpoints"
    for _step in (0, 1, 2, 3):
        write_checkpoint(_root, _step, _model, _head, {"world_size": 1},
                         {"rng": torch.get_rng_state()[None], "step": _step})
        prune_training_state(_root, keep=2)
        if _step == 0: confirm_checkpoint(_root / "step_000000", next_loss=4.0)  # only step 0 is known good
    assert (_root / "latest").read_text() == "step_000003\n" and not list(_root.glob(".tmp_*"))
    assert [(s, has_training_state(d)) for s, d in list_checkpoints(_root)] == [(0, True), (1, False),
                                                                               (2, True), (3, True)]
    assert newest_confirmed(_root).name == "step_000000" and read_meta(_root / "step_000000")["next_loss"] == 4.0
    assert read_checkpoint(_root / "step_000000", with_state=False)[2]["step"] == 0  # weights-only still verifies
    _dir, (_weights, _head_weights, _meta, _state) = find_resumable(_root)
    assert _dir.name == "step_000003" and _meta["step"] == 3 and torch.equal(_state["rng"][0], torch.get_rng_state())
    _copy = load_checked(PicoDecoder(_tiny), _weights, "test")
    assert all(torch.equal(a, b) for a, b in zip(_copy.state_dict().values(), _model.state_dict().values()))
    assert torch.equal(load_pretrained(_dir).embedding_proj.weight, _model.embedding_proj.weight)
    _blob = bytearray((_dir / "model.safetensors").read_bytes()); _blob[-5] ^= 1
    (_dir / "model.safetensors").write_bytes(bytes(_blob))
    with warnings.catch_warnings(record=True) as _caught:
        warnings.simplefilter("always")
        _dir, (*_, _state) = find_resumable(_root)
    assert _dir.name == "step_000002" and _state["step"] == 2
    assert any("step_000003/model.safetensors fails its SHA-256 check" in str(w.message) for w in _caught)
    for _torn in ("step_000002", "step_000000"): (_root / _torn / STATE_FILE).write_bytes(b"torn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raises(lambda: find_resumable(_root), "holds 4 checkpoints but none can be resumed from", "weights only",
               kind=NoResumableCheckpoint)
    assert len(list_checkpoints(_root)) == 4  # nothing was deleted
    assert find_resumable(Path(_tmp) / "nothing-here") is None

# %% [markdown]
# ## Every reader verifies
#
# A checkpoint is read long after it was written, by the NER sweep, the spectra and the pipeline, and
# a damaged one must not be finetuned and its rows recorded as done (a relaunch would skip them).
# `load_backbone` is how every one of them loads a decoder: a local checkpoint's weights are checked
# against the digests its `checkpoint.json` records (once per process: a grid finetunes one
# checkpoint many times), and a decoder with a NaN or infinite weight is refused, wherever it came
# from (a Hub checkpoint has no digests to check, but its weights can still be non-finite).

# %%
#| export
_VERIFIED: set[Path] = set()  # checkpoint directories this process has verified

def verify_checkpoint(directory) -> None:
    ("Check the weight files of a local checkpoint against its checkpoint.json digests (once per process); "
     "CheckpointCorrupt if one fails.")
    directory = Path(directory).resolve()
    if directory in _VERIFIED or not (directory / META_FILE).is_file(): return
    digests = read_meta(directory).get("sha256", {})
    for name in (n for n in WEIGHT_FILES if n in digests):
        if not (directory / name).is_file() or file_sha256(directory / name) != digests[name]:
            raise CheckpointCorrupt(f"{directory / name} fails its SHA-256 check against {directory / META_FILE}: "
                                    f"the file is damaged or was replaced; restore it, or leave this checkpoint out")
    _VERIFIED.add(directory)

def load_backbone(source, revision: str | None = None, subfolder: str | None = None, cache_dir=None):
    ("A checkpoint's decoder (local directory or Hub repo), verified against its digests; "
     "CheckpointCorrupt if a weight is not finite.")
    if revision is None and Path(source).is_dir(): verify_checkpoint(Path(source) / (subfolder or ""))
    model = load_pretrained(source, revision, subfolder, cache_dir)
    if bad := [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]:
        where = f"{source}" + (f" (revision {revision})" if revision else "") + (f"/{subfolder}" if subfolder else "")
        raise CheckpointCorrupt(f"{where}: {len(bad)} weight tensors hold NaN or infinite values (first: {bad[0]}); "
                                f"a diverged or damaged checkpoint cannot be finetuned or analysed: "
                                f"use an earlier step")
    return model


# %% [markdown]
# A flipped byte and a NaN weight, each refused by name; a verified checkpoint is not hashed again.

# %%
#| hide
with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp) / "checkpoints"
    _good = write_checkpoint(_root, 1, _model, _head, {"world_size": 1})
    assert torch.equal(load_backbone(_good).embedding_proj.weight,
                       _model.embedding_proj.weight) and _good.resolve() in _VERIFIED
    _flipped = write_checkpoint(_root, 2, _model, _head, {"world_size": 1})
    _blob = bytearray((_flipped / "model.safetensors").read_bytes()); _blob[-5] ^= 1
    (_flipped / "model.safetensors").write_bytes(bytes(_blob))
    raises(lambda: load_backbone(_flipped), "step_000002/model.safetensors fails its SHA-256 check")
    _broken = PicoDecoder(_tiny)
    with torch.no_grad(): _broken.layers[0].attention.q_proj.weight[0, 0] = float("nan")
    _nan = write_checkpoint(_root, 3, _broken, _head, {"world_size": 1})
    raises(lambda: load_backbone(_nan),
           "1 weight tensors hold NaN or infinite values (first: layers.0.attention.q_proj.weight)")

# %% [markdown]
# A disk that fills up while a checkpoint is written: a file-size limit (in a child process, since
# it cannot be raised again) that the first checkpoint fits under and the next one's optimizer state
# does not. The error names the checkpoint and its size, no temporary directory is left, and the
# checkpoint before it, which `latest` still points at, is intact.

# %%
import dataclasses
import subprocess
import sys

with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp) / "checkpoints"
    write_checkpoint(_root, 1, _model, _head, {"world_size": 1})
    _limit = max(f.stat().st_size for f in (_root / "step_000001").iterdir()) + 1000
    _child = subprocess.run([sys.executable, "-c", f"""
import resource, signal, sys, torch
from picomaml.checkpoints import write_checkpoint
from picomaml.config import MAMLConfig, ModelConfig
from picomaml.maml import MAMLHead
from picomaml.model import PicoDecoder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({_limit}, resource.RLIM_INFINITY))
model = PicoDecoder(ModelConfig(**{dataclasses.asdict(_tiny)!r}))
state = {{"moments": torch.zeros(4 * {_limit})}}
try: write_checkpoint({str(_root)!r}, 2, model, MAMLHead(24, 3, MAMLConfig(head_layers=2, head_hidden=8)), {{}}, state)
except OSError as e: sys.exit(str(e))"""], capture_output=True, text=True)
    assert f"{_root / 'step_000002'}: file too large while writing it (needs about" in _child.stderr, _child.stderr
    assert (sorted(p.name for p in _root.iterdir()) == ["latest", "step_000001"]
            and (_root / "latest").read_text() == "step_000001\n")
    assert read_checkpoint(_root / "step_000001")[2]["step"] == 1

# %% [markdown]
# Test of the uploads, with a stand-in for the Hub client: `submit` returns before the upload is done
# (the client takes a second here), the uploads happen in order, and `wait` reports a failed one by name.

# %%
import threading
import time


class SlowHub:
    "A Hub client whose uploads take `seconds` and fail for the checkpoints named in `broken`."
    def __init__(self, seconds=0.0, broken=()): self.seconds, self.broken, self.uploaded = seconds, set(broken), []
    def create_repo(self, repo_id, exist_ok): pass
    def create_branch(self, repo_id, branch, exist_ok): pass
    def upload_folder(self, repo_id, folder_path, path_in_repo, revision, allow_patterns, commit_message):
        time.sleep(self.seconds)
        if revision in self.broken: raise ConnectionError("the uplink dropped")
        self.uploaded.append((revision, threading.current_thread().name))

_hub = SlowHub(seconds=1.0)
_uploads, _started = CheckpointUploads("me/run", _hub), time.perf_counter()
for _step in (0, 100): _uploads.submit(Path("/runs/x/checkpoints") / step_dir_name(_step))
assert time.perf_counter() - _started < 0.5 and _uploads.wait() == 2
assert [r for r, _ in _hub.uploaded] == ["step_000000", "step_000100"] and all(t.startswith("hub-upload")
                                                                               for _, t in _hub.uploaded)
_uploads = CheckpointUploads("me/run", SlowHub(broken={"step_000100"}))
for _step in (0, 100): _uploads.submit(Path("/runs/x/checkpoints") / step_dir_name(_step))
raises(lambda: _uploads.wait(), "1 of 2 checkpoint uploads to me/run failed: step_000100 (ConnectionError",
       kind=UserError)
