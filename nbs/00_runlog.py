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
# # The run log
#
# > One writer for every file a run or a sweep keeps: the JSON-lines logs (`metrics.jsonl`,
# > `spectra.jsonl`, `config_history.jsonl`, the NER results tables), the small JSON and text
# > files replaced whole (`config.yaml`, `checkpoint.json`, `latest`, the sweep's side files), and
# > the lock that keeps a second launch off a run directory or a results file.
#
# A run lives for days on a cluster, is preempted, requeued, killed, and sometimes launched twice
# by mistake; the disk it writes to fills up. Whatever happens, what was already written must stay
# readable, and a failure must say which file and what to do. Every writer in the package comes
# through here, so each of these guarantees is made once:
#
# - **appends are durable and whole**: one locked `O_APPEND` write of complete lines, every byte
#   checked, `fsync`ed; a write that fails is cut back, so the file ends on the last good line;
# - **a torn last line** (a crash in the middle of a write) is read past with a warning, and the next
#   append starts on a fresh line;
# - **a resume cuts a log back** to the step it resumes from, so no step is logged twice;
# - **replaced files are atomic**: written to a temporary file, `fsync`ed, renamed over the old one;
# - **a full disk** (or a quota, or a file-size limit) is one line naming the file, what it needed
#   and what is free, and the temporary file is removed;
# - **one writer per run directory and results file**: an exclusive lock, refused with one line
#   naming the holder's host and pid; a lock left by a dead process is taken over.
#
# The module imports nothing from the rest of the package, so every other module can use it.

# %%
#| default_exp runlog

# %%
#| export
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

# %%
import subprocess
import sys
import tempfile

_tmp = Path(tempfile.mkdtemp())

# %% [markdown]
# ## Checked writes
#
# `os.write` may write fewer bytes than it was given (a signal, a nearly full disk), and says so
# only in its return value; a writer that ignores it reports success over half a line. When the
# disk is full the kernel answers `ENOSPC`; a quota gives `EDQUOT` and a file-size limit (`ulimit
# -f`) `EFBIG`. The three are one condition for the user: there was no room for this file.
# Libraries that write on their own (safetensors, torch) wrap the `OSError` in their own exception
# types, so `space_cause` looks through the chain and the message text.

# %%
#| export
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

class OutOfSpace(OSError):
    "A write the disk, a quota or a file-size limit could not hold; the message names the file and the space."

def space_cause(error: BaseException) -> str | None:
    "What ran out (\"No space left on device\", ...) if `error` or its cause is a full disk, a quota or a size limit."
    while error is not None:
        if isinstance(error, OSError) and error.errno in SPACE_ERRNOS: return os.strerror(error.errno)
        # safetensors: "(os error 28)"
        if found := [os.strerror(n) for n in SPACE_ERRNOS if os.strerror(n) in str(error)]: return found[0]
        error = error.__cause__ or error.__context__
    return None

def format_bytes(n: float) -> str:
    "`n` bytes in B, kB, MB or GB (powers of 1000)."
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB": return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000

def out_of_space(path, need: int, error: BaseException) -> OutOfSpace:
    "The one-line error for a write of `need` bytes to `path` that found no room."
    path = Path(path)
    where = next(p for p in (path, *path.parents) if p.exists())
    usage, cause = shutil.disk_usage(where), space_cause(error) or "no space"
    return OutOfSpace(f"{path}: {cause.lower()} while writing it (needs about {format_bytes(need)}; "
                      f"{format_bytes(usage.free)} free on the file system of {where}). "
                      f"Nothing written before was lost: free some space (or raise the quota or "
                      f"`ulimit -f`) and relaunch the same command")

def write_all(fd: int, data: bytes, path) -> None:
    "Write every byte of `data` to `fd` (a short write continues where it stopped); no room: OutOfSpace naming `path`."
    view = memoryview(data)
    try:
        while view: view = view[os.write(fd, view):]
    except OSError as e:
        if e.errno in SPACE_ERRNOS: raise out_of_space(path, len(view), e) from None
        raise

# %% [markdown]
# `/dev/full` is the kernel's full disk: every write to it fails with `ENOSPC`.

# %%
from picomaml.devtools import raises

_fd = os.open("/dev/full", os.O_WRONLY)
raises(lambda: write_all(_fd, b"x" * 2500, "/dev/full"),
       "/dev/full: no space left on device while writing it (needs about 2.5 kB")
os.close(_fd)
assert space_cause(RuntimeError("Error while serializing: I/O error: File too large (os error 27)")) == "File too large"
assert space_cause(RuntimeError("unexpected pos 576 vs 534")) is None
assert [format_bytes(n) for n in (12, 2500, 3.2e9)] == ["12 B", "2.5 kB", "3.2 GB"]

# %% [markdown]
# ## JSON-lines logs
#
# Every log a run keeps is JSON lines: one record per line, appended as the run goes. An append is
# one `write` under an exclusive `flock` of the file (the NER sweep's workers share one results file),
# of whole lines only, then `fsync`: a line that the call returned from survives a power cut. If the
# write fails part-way the file is cut back to its size before it, so what was there stays intact.

# %%
#| export
def append_records(path, records: list[dict], *, sort_keys: bool = False) -> Path:
    "Append `records` as JSON lines in one locked, checked, fsynced write (on a fresh line after a torn one)."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # other appenders wait; released when fd closes
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        text = ("\n" if torn else "") + "".join(json.dumps(r, sort_keys=sort_keys) + "\n" for r in records)
        try:
            write_all(fd, text.encode(), path)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)  # no partial line is left behind
            raise
    finally: os.close(fd)
    return path

def read_records(path) -> list[dict]:
    "The records of a JSON-lines file, skipping with a warning the lines an interrupted write left; [] if absent."
    path, records = Path(path), []
    if not path.is_file(): return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip(): continue
        try: records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: skipping a line that is not JSON (a write interrupted by a crash?)",
                          stacklevel=2)
    return records

# %%
_log = _tmp / "metrics.jsonl"
append_records(_log, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
with open(_log, "a") as _f: _f.write('{"step": 3, "lo')  # a crash in the middle of a line
append_records(_log, [{"step": 3, "loss": 1.2}])
with warnings.catch_warnings(record=True) as _w:
    warnings.simplefilter("always")
    assert [r["step"] for r in read_records(_log)] == [1, 2, 3]
assert "metrics.jsonl:3: skipping" in str(_w[0].message)
assert read_records(_tmp / "absent.jsonl") == []

# %% [markdown]
# A failed append leaves the file as it was: here the file-size limit is set just past the file's
# size, in a child process (a limit cannot be raised again once lowered), so the write of the new
# line stops part-way; the file is cut back to its complete lines and the error names it.

# %%
_size = _log.stat().st_size
_child = subprocess.run([sys.executable, "-c", f"""
import resource, signal, sys
from picomaml.runlog import append_records
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({_size + 10}, resource.RLIM_INFINITY))
try: append_records({str(_log)!r}, [{{"step": 4, "loss": 1.0, "note": "x" * 100}}])
except OSError as e: sys.exit(str(e))"""], capture_output=True, text=True)
assert "metrics.jsonl: file too large while writing it" in _child.stderr, _child.stderr
assert _log.stat().st_size == _size and _log.read_text().endswith('"loss": 1.2}\n')

# %% [markdown]
# ### Looking records up, and cutting a log back on resume
#
# A run that resumes from step $s$ continues its logs from there: lines after step $s$ came from
# steps that are trained again, and a line torn by the crash is dropped. A relaunch also asks
# whether an evaluation due at step $s$ made it into the log before the crash: that is a lookup by
# the record's `step`, never a search of the text.

# %%
#| export
def logged_steps(path, key: str) -> set[int]:
    "The steps of the records in JSON-lines file `path` that carry `key`."
    return {r["step"] for r in read_records(path) if key in r and "step" in r}

def truncate_after(path, last_step: int) -> None:
    "Keep only the complete lines of JSON-lines log `path` whose step is at most `last_step` (atomically)."
    path = Path(path)
    if not path.exists(): return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try: record = json.loads(line)
        except json.JSONDecodeError: continue
        if line.endswith("\n") and record["step"] <= last_step: kept.append(line)
    write_text_atomic(path, "".join(kept))

def drop_torn_tail(path) -> None:
    "Cut a JSON-lines file after its last complete line, with a warning (before a launch's appenders start)."
    if not Path(path).exists(): return
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        line = data.count(b"\n") + 1
        warnings.warn(f"{path}:{line}: torn last line removed (an interrupted write); its record will be redone",
                      stacklevel=2)
        with open(path, "r+b") as f: f.truncate(data.rfind(b"\n") + 1)

# %% [markdown]
# ## Files replaced whole
#
# A file that is rewritten rather than appended to (a run's `config.yaml`, a checkpoint's
# `checkpoint.json`, the `latest` pointer) is written beside itself and renamed over the old one: a
# reader sees the old file or the new one, never a mixture. If the write fails the temporary file is
# removed and the old file is untouched.

# %%
#| export
def write_text_atomic(path, text: str) -> Path:
    "Replace `path` by `text` atomically (temporary file, every byte checked, fsync, rename)."
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = text.encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data, path)
            os.fsync(fd)
        finally: os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

def write_json_atomic(path, data: dict, indent: int | None = 1) -> Path:
    "Replace `path` by `data` as JSON (keys sorted, indented by `indent`), atomically."
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True) + "\n")

# %%
_log = _tmp / "run.jsonl"
append_records(_log, [{"step": s, "loss": 1 / s} for s in (1, 2, 3)] + [{"step": 2, "paloma_ppl": 9.0}])
with open(_log, "a") as _f: _f.write('{"step": 4, "lo')
truncate_after(_log, 2)
assert [r["step"] for r in read_records(_log)] == [1, 2, 2] and logged_steps(_log, "paloma_ppl") == {2}
append_records(_log, [{"step": 3, "note": "paloma_ppl pending"}])  # the key's name in a value is no evaluation
# a text search for '"step": 3' and 'paloma_ppl' would say step 3 was evaluated
assert logged_steps(_log, "paloma_ppl") == {2}
write_json_atomic(_tmp / "checkpoint.json", {"step": 2})
assert json.loads((_tmp / "checkpoint.json").read_text()) == {"step": 2} and not list(_tmp.glob("*.tmp"))

# %% [markdown]
# ## One writer per run directory and results file
#
# Two launches on one run directory (a job submitted twice, a requeue that started before the old
# job died) would each append every metrics line and race to rename the same checkpoint; two sweeps
# on one results file would each run and record every job. Each writer takes an exclusive lock
# first: a `flock` on a lock file that it holds until it ends. The kernel releases it when the
# process dies however it dies (`kill -9` included), so a lock left by a dead process is simply
# taken over; the file keeps the last holder's host, pid and start time, which is what a refused
# launch prints. On a shared file system the lock is the file system's (NFS v4 and Lustre with
# `flock` mounts share it between nodes); where it offers none, the launch goes on with a warning.

# %%
#| export
class RunBusy(OSError):
    "A run directory or results file that another running process holds."

_HELD: dict[Path, list] = {}  # lock file -> [fd, how many nested holds of this process]

def lock_holder() -> str:
    "This process as a lock file records it: host, pid and start time."
    return f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"

def take_lock(path, what: str) -> None:
    "Hold the exclusive lock file `path` (for `what`) until release_lock; RunBusy naming a live holder."
    path = Path(path).absolute()
    if path in _HELD: _HELD[path][1] += 1; return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunBusy(f"{what} is in use by {holder} (lock {path}): a second writer would duplicate its records. "
                      f"Wait for that process to end or stop it, then relaunch") from None
    except OSError as e:  # a file system without locks (ENOLCK, EOPNOTSUPP)
        os.close(fd)
        return warnings.warn(f"{path}: the file system offers no locks ({e.strerror}); "
                             f"a second launch on {what} is not refused")
    if previous := os.pread(fd, 4096, 0).decode(errors="replace").strip():
        warnings.warn(f"{what}: taking over the lock left by {previous}, which is no longer running", stacklevel=2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (lock_holder() + "\n").encode(), 0)
    _HELD[path] = [fd, 1]

def release_lock(path) -> None:
    "Give up one hold of lock file `path`; the last one clears the holder and unlocks it."
    path = Path(path).absolute()
    if path not in _HELD: return
    _HELD[path][1] -= 1
    if _HELD[path][1] == 0:
        fd, _ = _HELD.pop(path)
        os.ftruncate(fd, 0)  # a clean end leaves no holder to report
        os.close(fd)

def lock_file_of(path) -> Path:
    "The lock file of a results file: `.<name>.lock` beside it."
    return Path(path).with_name(f".{Path(path).name}.lock")

@contextlib.contextmanager
def exclusive_lock(path, what: str):
    "Hold lock file `path` (for `what`) for the `with` block."
    take_lock(path, what)
    try: yield
    finally: release_lock(path)

# %% [markdown]
# A second process is refused while the first holds the lock, and gets it once the first is gone:
# here the holder is a child that takes the lock and waits; `kill -9` leaves its record in the
# lock file, which the next holder reports as taken over.

# %%
_lock = _tmp / "run" / ".lock"
_holder = subprocess.Popen([sys.executable, "-c",
                            f"from picomaml.runlog import take_lock; take_lock({str(_lock)!r}, 'x'); "
                            "print('held', flush=True); import time; time.sleep(60)"],
                           stdout=subprocess.PIPE, text=True)
assert _holder.stdout.readline() == "held\n"
raises(lambda: take_lock(_lock, "run directory runs/x"),
       f"run directory runs/x is in use by {socket.gethostname()} pid {_holder.pid}")
_holder.kill(); _holder.wait(); _holder.stdout.close()
with warnings.catch_warnings(record=True) as _w:
    warnings.simplefilter("always")
    with exclusive_lock(_lock, "run directory runs/x"):
        with exclusive_lock(_lock, "run directory runs/x"): pass  # nested holds of one process are one lock
        assert f"pid {os.getpid()}" in _lock.read_text()
assert f"taking over the lock left by {socket.gethostname()} pid {_holder.pid}" in str(_w[0].message)
assert _lock.read_text() == "" and not _HELD  # released: the next launch has nothing to take over
assert lock_file_of("runs/ner/demo-results.jsonl") == Path("runs/ner/.demo-results.jsonl.lock")

# %%
#| hide
shutil.rmtree(_tmp)
