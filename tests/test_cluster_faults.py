"""Issue 21: faults a cluster brings, through the real commands. Two writers on one run directory or one results
file: the second is refused with one line naming the holder, writes nothing, and takes over once the holder is
gone. A full disk (a file-size limit, `ulimit -f`, in the child) during a checkpoint and during a sweep: one line
naming the file, every earlier result and the newest good checkpoint intact, and a relaunch finishes the work.
(Preemption is tests/test_distributed.py's; one line per mistake is tests/test_user_errors.py's.)"""
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from commands import SHARED, TOKENIZER, command, prepare_rows, run, snapshot, tiny
from safetensors.torch import load_file, save_file

from picomaml.checkpoints import file_sha256, read_checkpoint, read_meta
from picomaml.runlog import lock_file_of, read_records, write_json_atomic

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    "A workspace: prepared rows, one finished two-step run, and a grid of two jobs on its last checkpoint."
    ws = tmp_path_factory.mktemp("cluster")
    prepare_rows(ws)
    done = run(["picomaml.launch", *tiny(ws)])
    assert done.returncode == 0, done.stderr[-3000:]
    grid = {"grids": [{"heads": ["linear"], "datasets": ["sk_snk"], "seeds": [1, 2], "test_sets": ["sk_snk"],
                       "max_train_sentences": 4, "max_eval_sentences": 4,
                       "runs": [{"run": "run", "arm": "vanilla", "size": "tiny",
                                 "checkpoint": str(ws / "runs/run/checkpoints/step_000002")}]}]}
    (ws / "grid.yaml").write_text(yaml.safe_dump(grid))
    # copies of the run whose last checkpoint has a flipped byte, or a NaN weight (with digests to match)
    for bad in ("flipped", "nan"):
        shutil.copytree(ws / "runs/run", ws / "runs" / bad)
        (ws / f"grid-{bad}.yaml").write_text(yaml.safe_dump(grid).replace("runs/run/checkpoints",
                                                                          f"runs/{bad}/checkpoints"))
    flipped = ws / "runs/flipped/checkpoints/step_000002/model.safetensors"
    blob = bytearray(flipped.read_bytes()); blob[-3] ^= 1; flipped.write_bytes(bytes(blob))
    nan = ws / "runs/nan/checkpoints/step_000002/model.safetensors"
    tensors = load_file(nan)
    tensors[next(iter(tensors))][0, 0] = float("nan")
    save_file(tensors, nan, metadata={"format": "pt"})
    meta = read_meta(nan.parent)
    write_json_atomic(nan.parent / "checkpoint.json",
                      {**meta, "sha256": {**meta["sha256"], "model.safetensors": file_sha256(nan)}})
    return ws


def sweep(ws, out, *more, grid="grid.yaml"):
    return ["picomaml.ner_sweep", "--grid", str(ws / grid), "--out", str(out), *more,
            f"data.tokenizer_path={TOKENIZER}", "ner.max_len=32"]


def error_line(proc) -> str:
    "The one `error: ...` line of a refused command (exit status 2, no traceback)."
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def frozen_holder(ws, args, lock, log):
    "Start a real command and stop it (SIGSTOP) as soon as it holds `lock`: a live writer that writes nothing more."
    argv, kw = command(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    proc, deadline = subprocess.Popen(argv, **kw), time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"the holder ended or never locked: {log.read_text()[-2000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGSTOP)
    # a thread inside a write() finishes it before it stops: wait until every thread of the group is stopped
    group = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    while not all(stopped(p.pid) for p in group):
        assert time.monotonic() < deadline, "the holder did not stop"
        time.sleep(0.02)
    return proc


def stopped(pid: int) -> bool:
    "Whether every thread of process `pid` is stopped (state T in /proc/<pid>/task/*/stat)."
    states = [stat.read_text().rsplit(")", 1)[1].split()[0] for stat in Path(f"/proc/{pid}/task").glob("*/stat")]
    return bool(states) and all(state in "Tt" for state in states)


def kill(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# (what is written twice, the holder's command, the second command, the holder's lock, what the refusal names)
TWO_WRITERS = [
    ("run directory", lambda ws: ["picomaml.launch", *tiny(ws, "busy", "train.steps=100000")],
     lambda ws: ["picomaml.launch", *tiny(ws, "busy")], lambda ws: ws / "runs/busy/.lock",
     lambda ws: f"run directory {ws}/runs/busy"),
    ("results file", lambda ws: sweep(ws, ws / "ner/busy.jsonl"), lambda ws: sweep(ws, ws / "ner/busy.jsonl"),
     lambda ws: lock_file_of(ws / "ner/busy.jsonl"), lambda ws: f"results file {ws}/ner/busy.jsonl"),
]


@pytest.mark.parametrize("what,holder,second,lock,named", TWO_WRITERS, ids=[t[0] for t in TWO_WRITERS])
def test_a_second_writer_is_refused_and_takes_over_from_a_dead_one(ws, what, holder, second, lock, named):
    first = frozen_holder(ws, holder(ws), lock(ws), ws / f"holder-{what.replace(' ', '-')}.log")
    try:
        written = lock(ws).parent
        before = snapshot(written)
        refused = run(second(ws))
        assert f"{named(ws)} is in use by {socket.gethostname()} pid {first.pid} since " in error_line(refused)
        assert snapshot(written) == before, "the refused launch wrote"
    finally: kill(first)
    after = run(second(ws))  # the holder was killed: its lock is taken over and the work done once
    assert after.returncode == 0, after.stderr[-3000:]
    assert f"taking over the lock left by {socket.gethostname()} pid {first.pid}" in after.stderr
    if what == "results file":
        assert sorted(r["seed"] for r in read_records(ws / "ner/busy.jsonl")) == [1, 2]
    else: assert [r["step"] for r in read_records(ws / "runs/busy/metrics.jsonl") if "loss" in r] == [1, 2]


def file_size_limit(limit: int):
    ("A preexec_fn: files of this process may not grow past `limit` bytes "
     "(writes past it fail with EFBIG, like a full disk).")
    def limited():
        # the kernel's default for SIGXFSZ kills; ignored, the write fails instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return limited


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(ws):
    shutil.copytree(ws / "runs/run", ws / "runs/full")
    checkpoints = ws / "runs/full/checkpoints"
    # its meta gains "confirmed"
    weights = lambda: {f: d for f, d in snapshot(checkpoints / "step_000002").items() if f != "checkpoint.json"}
    good = weights()
    # the weights still fit, the optimizer state no longer
    limit = (checkpoints / "step_000002" / "training_state.pt").stat().st_size - 1
    failed = run(["picomaml.launch", *tiny(ws, "full", "train.steps=4")], preexec_fn=file_size_limit(limit))
    assert f"{checkpoints / 'step_000003'}: file too large while writing it (needs about" in error_line(failed)
    # no temporary dir
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000000", "step_000001", "step_000002"]
    assert (checkpoints / "latest").read_text() == "step_000002\n" and weights() == good
    assert read_checkpoint(checkpoints / "step_000002")[2]["step"] == 2
    relaunched = run(["picomaml.launch", *tiny(ws, "full", "train.steps=4")])
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert "resuming from" in relaunched.stdout and "step 2 of 4" in relaunched.stdout
    assert [r["step"] for r in read_records(ws / "runs/full/metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_a_full_disk_during_a_sweep_keeps_every_earlier_row(ws):
    out = ws / "ner/full.jsonl"
    assert run(sweep(ws, out, "--limit", "1")).returncode == 0
    first = out.read_bytes()
    failed = run(sweep(ws, out), preexec_fn=file_size_limit(len(first) + 20))  # the next row starts, then finds no room
    assert f"{out}: file too large while writing it" in error_line(failed)
    assert out.read_bytes() == first, "the earlier row changed, or a part of the new one was left"
    finished = run(sweep(ws, out))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(r["seed"] for r in read_records(out)) == [1, 2]


def spectra(ws, run):
    return ["picomaml.spectra", "--checkpoints", str(ws / "runs" / run / "checkpoints"),
            "--batch", str(ws / "data/eval"), "--rows", "4", "--layers", "attention.q_proj",
            "--out", str(ws / f"spectra-{run}.jsonl")]


# (which reader, its command, what the one line names)
BAD_CHECKPOINTS = [
    ("sweep, a flipped byte", lambda ws: sweep(ws, ws / "ner/flipped.jsonl", grid="grid-flipped.yaml"),
     "runs/flipped/checkpoints/step_000002/model.safetensors fails its SHA-256 check"),
    ("sweep, a NaN weight", lambda ws: sweep(ws, ws / "ner/nan.jsonl", grid="grid-nan.yaml"),
     "runs/nan/checkpoints/step_000002: 1 weight tensors hold NaN or infinite values"),
    ("spectra, a flipped byte", lambda ws: spectra(ws, "flipped"),
     "step_000002/model.safetensors fails its SHA-256 check"),
    ("spectra, a NaN weight", lambda ws: spectra(ws, "nan"),
     "step_000002: 1 weight tensors hold NaN or infinite values"),
]


@pytest.mark.parametrize("reader,args,named", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_refused_by_every_reader(ws, reader, args, named):
    refused = run(args(ws))
    assert named in error_line(refused)
    if reader.startswith("sweep"):
        assert not read_records(args(ws)[4]), "a row of a bad checkpoint was recorded as done"
    else: assert sorted({r["step"] for r in read_records(args(ws)[-1])}) == [0, 1]  # the good steps before it are kept
