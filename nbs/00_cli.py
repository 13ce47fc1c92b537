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
# # Command-line errors
#
# > How every command ends on a mistake the user can fix: one line naming what is wrong and what to do.
# > `run_command` turns configuration, file and disk errors into `error: ...` and exit status 2, and
# > `ensure_writable` checks an output directory before any work is done.

# %%
#| default_exp cli

# %%
#| export
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from picomaml.config import ConfigError


# %% [markdown]
# ## One line for a user's mistake
#
# Every command (`launch`, `sweep`, `spectra`, `data`, `pipeline`, `plan`) runs its `main` through
# `run_command`. A mistake a user can make and fix (a setting, a missing or unreadable file, data in
# the wrong format, a full or read-only disk, a diverged run) ends the command with one line,
# `error: <what is wrong, where, what to do>`, and exit status 2; the messages are written where the
# error is found, so they can name the key or file. Anything else is a bug and keeps its traceback,
# as does every error when `PICOMAML_TRACEBACK=1`.

# %%
#| export
class UserError(RuntimeError):
    "A failure the user can fix (a corrupt or unresumable run directory, a diverged run); the message says how."

# ValueError covers ConfigError and the format errors
USER_ERRORS = (ValueError, OSError, FloatingPointError, UserError)

def run_command(main, argv=None):
    "Run a command's `main(argv)`; a user error ends it with one line `error: ...` and exit status 2."
    try: return main(argv)
    except USER_ERRORS as e:
        if os.environ.get("PICOMAML_TRACEBACK"): raise
        message = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message: message += f": {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None

def ensure_writable(directory, setting: str, need_bytes: int = 0) -> Path:
    "Create `directory` if needed and check it takes a file (and `need_bytes` more), else ConfigError naming `setting`."
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"): pass
    except OSError as e:
        raise ConfigError(f"{setting}: cannot write to {directory} ({e.strerror}); "
                          f"choose a writable directory") from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise ConfigError(f"{setting}: {directory} has {free / 2**30:.1f} GiB free "
                          f"but needs {need_bytes / 2**30:.1f} GiB; "
                          f"free some space or choose another directory")
    return directory


# %%
import contextlib
import io
import stat

from picomaml.devtools import raises


def _fails(): raise ConfigError("train.lr=-1.0 is out of range:\n it must be > 0")
with contextlib.redirect_stderr(io.StringIO()) as _err:
    e = raises(lambda: run_command(lambda argv: _fails()), kind=SystemExit)
    assert e.code == 2
assert _err.getvalue() == "error: train.lr=-1.0 is out of range: it must be > 0\n"
raises(lambda: run_command(lambda argv: 1 / 0), kind=ZeroDivisionError)  # a bug keeps its traceback
with tempfile.TemporaryDirectory() as _tmp:
    assert ensure_writable(Path(_tmp) / "runs", "logging.runs_dir").is_dir()
    os.chmod(_tmp, stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(_tmp, os.W_OK):
            print("(running as a user who can write anywhere: the read-only case is not checkable here)")
        else:
            e = raises(lambda: ensure_writable(Path(_tmp) / "other", "logging.runs_dir"), kind=ConfigError)
            assert str(e).startswith("logging.runs_dir: cannot write to")
    finally: os.chmod(_tmp, stat.S_IRWXU)
    raises(lambda: ensure_writable(_tmp, "sweep --out", need_bytes=2**60), "GiB free but needs", kind=ConfigError)
