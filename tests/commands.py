"""What the command-line tests share: the local data, a seconds-long training configuration, running a real
command the way a user does (`python -m ...` from the repository root, offline), and a digest of a directory."""
import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from picomaml.devtools import tiny_run

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PICOMAML_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json"


def tiny(ws, name="run", *more):
    "A seconds-long run on the prepared rows of the workspace: the shared tiny configuration, one layer, two steps."
    return tiny_run(ws / "data", ws / "runs", name, TOKENIZER, "model.n_layers=1", "model.ffn_hidden=48",
                    "train.steps=2", "train.global_batch=4", "train.branch_batch=4", "train.warmup_steps=1",
                    "checkpoint.every=1", "maml.rho=0", "eval.every=0", *more)


def command(args, env=None, cwd=ROOT, **popen):
    "The argv and keywords that run `python -m <args>` as a user would: offline, on the local data, no traceback."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PICOMAML_DATA": str(SHARED), **(env or {})}
    env.pop("PICOMAML_TRACEBACK", None)
    return [sys.executable, "-m", *args], dict(cwd=cwd, env=env, text=True, **popen)


def run(args, env=None, cwd=ROOT, **popen):
    "Run `python -m <args>` to the end; its CompletedProcess with stdout and stderr."
    argv, kw = command(args, env, cwd, **popen)
    return subprocess.run(argv, capture_output=True, timeout=300, **kw)


def prepare_rows(ws):
    "Prepared train and eval rows of 32 tokens under `ws/data` (a small share of the local corpus)."
    for split, pattern in (("train", "corpus/train/c4-sample.01.json.gz"),
                           ("eval", "corpus/eval/c4_100_domains_*.jsonl.gz")):
        files = sorted(str(p) for p in SHARED.glob(pattern))
        done = run(["picomaml.data", "prepare", "--src", *files, "--out", str(ws / "data" / split), "--seq-len", "32",
                    "--tokenizer", str(TOKENIZER), "--max-documents", "40"])
        assert done.returncode == 0, done.stderr[-3000:]


def snapshot(directory: Path) -> dict:
    "`{relative path: SHA-256}` of every file under `directory`."
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@contextmanager
def smoke_runs_lock():
    "Held while a test writes or reads runs/smoke: under `make test`'s two workers two such tests may run at once."
    (ROOT / "runs").mkdir(exist_ok=True)
    with FileLock(ROOT / "runs" / ".smoke-tests.lock"):
        yield
