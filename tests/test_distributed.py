"""Distributed training on CPU processes (gloo): equivalence to one process, exact resume after kill -9,
corrupt checkpoints, NaN stops, shared branch draws, and a two-node rendezvous on localhost.

Every launch is a real `torchrun` (or `python -m picomaml.launch` for one process) wrapped in `timeout`.
The model is tiny (d 24, 2 blocks, 32-token rows of real OLMo ids), so each launch takes seconds."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from picomaml.devtools import tiny_run

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PICOMAML_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json"
WALL_CLOCK = ("tokens_per_s", "mfu")  # the only fields that differ between identical runs
LAUNCH_TIMEOUT = 150

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Prepared 33-id rows of 20 C4 documents (train) and Paloma-format C4 documents (eval)."
    from picomaml.config import DataConfig
    from picomaml.data import prepare
    from picomaml.tokenizer import load_tokenizer
    tok = load_tokenizer(DataConfig(tokenizer_path=str(TOKENIZER)))
    out = tmp_path_factory.mktemp("data")
    prepare(sorted((SHARED / "corpus/train").glob("c4-sample.0[12].json.gz")), out / "train", 32, tok,
            log=lambda m: None)
    prepare(sorted((SHARED / "corpus/eval").glob("c4_100_domains_*.jsonl.gz")), out / "eval", 32, tok,
            log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def tiny(data, runs, name, *overrides):
    "Command-line overrides of a seconds-long run: the shared tiny run, three steps of 8 rows, evaluated every 2."
    return tiny_run(data, runs, name, TOKENIZER, "train.steps=3", "train.global_batch=8", "train.lr=1e-2",
                    "train.warmup_steps=2", "checkpoint.every=1", "eval.every=2", *overrides)


def command(nproc, overrides, extra_torchrun=("--standalone",)):
    "`timeout`-wrapped launch command: plain python for one process, torchrun otherwise."
    launch = ["-m", "picomaml.launch", *overrides]
    if nproc == 1 and not extra_torchrun: return ["timeout", str(LAUNCH_TIMEOUT), sys.executable, *launch]
    return ["timeout", str(LAUNCH_TIMEOUT), sys.executable, "-m", "torch.distributed.run", *extra_torchrun,
            f"--nproc_per_node={nproc}", *launch]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(nproc, overrides, check=True, extra_torchrun=("--standalone",)):
    "Run one launch to completion; return (returncode, stderr)."
    p = subprocess.run(command(nproc, overrides, extra_torchrun), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=LAUNCH_TIMEOUT + 30)
    if check: assert p.returncode == 0, f"launch failed ({p.returncode}):\n{p.stderr[-12000:]}"
    return p.returncode, p.stderr


def weights(run_dir, step):
    "All parameters (backbone and head) of checkpoint `step`."
    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    return {**load_file(ckpt / "model.safetensors"),
            **{f"head.{k}": v for k, v in load_file(ckpt / "head.safetensors").items()}}


def metrics(run_dir, drop=WALL_CLOCK):
    "One record per step: the training line and the evaluation line of a step merged, wall-clock fields dropped."
    merged = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k not in drop})
    return [merged[step] for step in sorted(merged)]


def assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= tol, f"parameters differ by up to {worst:.2e}"


# --- 1 process vs 2 processes on the same global batch ------------------------------------------------------

@pytest.fixture(scope="module")
def ar_two(data, runs):
    "Next-token steps only, 2 processes × 4 rows of one 8-row branch micro-batch."
    launch(2, tiny(data, runs, "ar-2", "maml.rho=0", "train.branch_batch=8", *EQUAL))
    return runs / "ar-2"


# Adam divides by sqrt(v) + eps, so a float-rounding difference in a near-zero gradient element (summation order
# differs between 1 and 2 processes) moves that parameter by up to ~lr x (relative rounding): the tolerance of
# 1e-5 is checked at lr 1e-3 (the papers' peak is 3e-4).
EQUAL = ("train.lr=1e-3", "spectra.every=3", "spectra.grad_rows=2", "spectra.grad_batch=1")


def test_ar_steps_one_process_equals_two(data, runs, ar_two):
    # one process holds all 8 rows and runs them in two memory chunks of 4: the same gradient as 2 ranks × 4
    launch(1, tiny(data, runs, "ar-1", "maml.rho=0", "train.branch_batch=8", "train.chunk_rows=4", *EQUAL),
           extra_torchrun=())
    assert_close(weights(runs / "ar-1", 3), weights(ar_two, 3))
    one, two = metrics(runs / "ar-1"), metrics(ar_two)
    # step 0: an evaluation only
    assert all(r["n_maml"] == 0 and r["n_next_token"] == 1 for r in one + two if "loss" in r)
    assert all(abs(a.get("loss", 0) - b.get("loss", 0)) < 1e-5 and abs(a["paloma_ppl"] - b["paloma_ppl"]) < 1e-3
               for a, b in zip(one, two) if "paloma_ppl" in a)
    # the spectra's gradient pass shared over two ranks (groups of one row each) gives one process's spectra
    # (groups of two); spectra are taken at step 0 and step 3: 2 steps x 2 layers x 3 matrices x (weight, gradient)
    spectra = [[json.loads(line) for line in (run / "spectra.jsonl").read_text().splitlines()]
               for run in (runs / "ar-1", ar_two)]
    assert {r["step"] for r in spectra[0]} == {0, 3}
    assert len(spectra[0]) == len(spectra[1]) == 2 * 2 * 3 * 2 and all(
        (a["layer"], a["matrix"], a["kind"]) == (b["layer"], b["matrix"], b["kind"])
        and torch.allclose(torch.tensor(a["singular_values"]), torch.tensor(b["singular_values"]), rtol=1e-3, atol=1e-8)
        for a, b in zip(*spectra))


def test_maml_steps_one_process_equals_two(data, runs):
    # episodes only; the head's dropout is off because a query row's dropout mask depends on the rank that holds it
    common = ("maml.rho=1", "maml.head_dropout=0", *EQUAL)
    launch(1, tiny(data, runs, "maml-1", *common, "train.branch_batch=8"), extra_torchrun=())
    launch(2, tiny(data, runs, "maml-2", *common, "train.branch_batch=8"))
    assert_close(weights(runs / "maml-1", 3), weights(runs / "maml-2", 3))
    one, two = metrics(runs / "maml-1"), metrics(runs / "maml-2")
    assert all(r["n_next_token"] == 0 and r["n_maml"] == 1 and r["branches"] == "M" for r in one + two if "loss" in r)
    for a, b in zip(*([r for r in run if "loss" in r] for run in (one, two))):  # step 0 is an evaluation only
        for key in ("loss", "support_acc", "query_acc", "head_weight_mean", "head_weight_std", "head_grad_norm"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])


def test_released_episode_settings_on_two_ranks(data, runs):
    # the released presets' episode settings: every rank builds its own episode from its 64 pool rows, its query set its
    # support set, read at the [MASK] by the vocabulary-indexed head, on 33-id rows cropped to their last 25 ids
    released = ("maml.rho=1", "maml.head_dropout=0", "smlmt.episode_scope=rank", "smlmt.query_source=support",
                "smlmt.readout=mask", "maml.head_output=vocab", "data.seq_len=24", "data.row_len=33",
                "smlmt.pool_rows=128", "train.schedule=linear", "train.decay_steps=1000", "train.branch_batch=8",
                *EQUAL)
    launch(2, tiny(data, runs, "released-2", *released))
    launch(2, tiny(data, runs, "gathered-2", *released, "smlmt.episode_scope=gathered"))
    own, gathered = weights(runs / "released-2", 3), weights(runs / "gathered-2", 3)
    assert any(not torch.equal(own[k], gathered[k]) for k in own)  # two episodes of 64 rows are not one of 128
    log = [r for r in metrics(runs / "released-2") if "loss" in r]
    assert len(log) == 3 and all(r["n_maml"] == 1 and 0 <= r["query_acc"] <= 1 and r["query_loss"] > 0 for r in log)
    from picomaml.config import load_config
    saved = load_config(runs / "released-2" / "config.yaml")
    assert (saved.smlmt.episode_scope, saved.smlmt.query_source, saved.data.row_len) == ("rank", "support", 33)


# --- kill -9 and resume ----------------------------------------------------------------------------------------

HYBRID = ("maml.rho=0.5", "train.steps=8", "train.branch_batch=4", "checkpoint.every=2")


@pytest.fixture(scope="module")
def hybrid(data, runs):
    "An uninterrupted hybrid run (2 processes, 2 draws of 4 rows per step, a checkpoint every 2 steps)."
    launch(2, tiny(data, runs, "hybrid", *HYBRID))
    return runs / "hybrid"


def test_every_rank_takes_the_same_branches(hybrid):
    # the loop all-reduces each micro-step's branch and raises if ranks disagree; the run finished, with both branches
    log = metrics(hybrid)
    assert {c for r in log if "loss" in r for c in r["branches"]} == {"N", "M"}  # step 0 is an evaluation only
    assert all(r["n_maml"] == r["branches"].count("M") and r["n_next_token"] == r["branches"].count("N")
               for r in log if "loss" in r)


def test_kill_9_and_resume_is_bitwise_identical(data, runs, hybrid):
    kill_after = random.randint(1, 6)  # metrics lines (optimizer steps) seen before the kill
    overrides = tiny(data, runs, "killed", *HYBRID)
    proc = subprocess.Popen(command(2, overrides), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = runs / "killed" / "metrics.jsonl"
    deadline = time.time() + LAUNCH_TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= kill_after: break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed at step {kill_after}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    launch(2, overrides)
    final = weights(hybrid, 8)
    resumed = weights(runs / "killed", 8)
    assert all(torch.equal(final[k], resumed[k]) for k in final), f"weights differ after a kill at step {kill_after}"
    assert metrics(runs / "killed") == metrics(hybrid), f"metrics differ after a kill at step {kill_after}"


def rank_process(launcher: subprocess.Popen, rank: int, deadline: float) -> psutil.Process:
    "The training process of `rank` under a launch (torchrun's worker, or the one python process of a plain launch)."
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try: environ, cmdline = child.environ(), child.cmdline()
            except psutil.Error: continue
            if "picomaml.launch" in cmdline and environ.get("RANK", "0") == str(rank) \
                    and "torch.distributed.run" not in cmdline:
                return child
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_the_step_in_hand_and_the_relaunch_loses_nothing(data, runs, hybrid, nproc):
    """SLURM's SIGTERM before a preemption, sent to the last rank only: every rank stops after the same step, rank 0
    checkpoints it though none was scheduled, the processes exit 75, and the relaunch ends where the uninterrupted
    run does."""
    signal_after = random.randint(1, 5)  # optimizer steps logged before the signal
    name = f"preempted-{nproc}"
    overrides = tiny(data, runs, name, *HYBRID, "checkpoint.every=100")  # scheduled: step 0 and the last step only
    # one process: plain python, its own status
    errors, launcher = runs / f"{name}.err", ("--standalone",) if nproc > 1 else ()
    with open(errors, "w") as err:
        proc = subprocess.Popen(command(nproc, overrides, launcher), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        log, deadline = runs / name / "metrics.jsonl", time.time() + LAUNCH_TIMEOUT
        target = rank_process(proc, nproc - 1, deadline)
        while proc.poll() is None and time.time() < deadline:
            if log.exists() and sum('"loss"' in line for line in log.read_text().splitlines()) >= signal_after: break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the signal at step {signal_after}"
        target.send_signal(signal.SIGTERM)
        signalled = time.time()
        proc.wait(timeout=60)
    stderr = errors.read_text()
    assert (proc.returncode == 75) if nproc == 1 else ("exitcode  : 75" in stderr and proc.returncode != 0), \
        stderr[-3000:]
    assert time.time() - signalled < 30  # the step in hand and one checkpoint: within torchrun's 30 s to its SIGKILL
    trained = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]
    stopped = trained[-1]
    assert stopped >= signal_after and stopped < 8, (stopped, signal_after)
    assert (runs / name / "checkpoints" / f"step_{stopped:06d}" / "training_state.pt").is_file(), \
        "the step in hand was not saved"
    # rank 0 says it, once
    assert f"a preemption signal after step {stopped}:" in stderr and stderr.count("[preempted]") == 1
    launch(nproc, overrides, extra_torchrun=launcher)
    # every step once: none lost, none repeated
    assert [r["step"] for r in metrics(runs / name) if "loss" in r] == list(range(1, 9))
    if nproc == 2:  # the uninterrupted run is two processes too: bitwise the same
        final, resumed = weights(hybrid, 8), weights(runs / name, 8)
        assert all(torch.equal(final[k], resumed[k]) for k in final), f"weights differ after SIGTERM at step {stopped}"
        assert metrics(runs / name) == metrics(hybrid)


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(data, runs, hybrid):
    import shutil
    shutil.copytree(hybrid, runs / "corrupt")
    latest = runs / "corrupt" / "checkpoints" / "step_000008" / "model.safetensors"
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    latest.write_bytes(bytes(blob))
    _, stderr = launch(2, tiny(data, runs, "corrupt", *HYBRID))
    assert ("step_000008/model.safetensors fails its SHA-256 check" in stderr
            and "trying the previous checkpoint" in stderr)
    final = weights(hybrid, 8)
    assert all(torch.equal(v, weights(runs / "corrupt", 8)[k]) for k, v in final.items())  # steps 7-8 redone exactly
    assert metrics(runs / "corrupt") == metrics(hybrid)


# --- NaN ------------------------------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, runs, monkeypatch):
    from lightning.fabric import Fabric

    import picomaml.lm_loss as L
    import picomaml.train as T
    from picomaml.checkpoints import find_resumable
    from picomaml.config import ConfigError, load_config
    calls, real = [], L.next_token_loss_sum
    def poisoned(model, rows):  # draws 5 and 6 are optimizer step 3 (2 draws a step, one chunk each)
        calls.append(1)
        return real(model, rows) * (float("nan") if len(calls) >= 5 else 1.0)
    monkeypatch.setattr(L, "next_token_loss_sum", poisoned)
    cfg = load_config(None, tiny(data, runs, "nan", "maml.rho=0", "train.branch_batch=4", "train.steps=6",
                                 "checkpoint.every=2"))
    with pytest.raises(FloatingPointError,
                       match=r"step 3: loss is nan.*known good is step_000000.*checkpoint.resume_from=step_000000"):
        T.train(cfg, Fabric(accelerator="cpu", devices=1, precision="32-true"))
    ckpts = runs / "nan" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"  # written before step 3, but not known good
    assert (sorted(p.name for p in ckpts.glob("step_*")) == ["step_000000", "step_000002"]
            and find_resumable(ckpts)[0].name == "step_000002")
    assert [r["step"] for r in metrics(runs / "nan")] == [0, 1, 2]  # step 0: the evaluation of the initial weights
    # the way out the message gives works: a plain relaunch is refused a changed lr, the named checkpoint accepts it
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.001"):
        T.train(load_config(None, [*tiny(data, runs, "nan", "maml.rho=0", "train.branch_batch=4", "train.steps=6",
                                         "checkpoint.every=2"),
                                   "train.lr=1e-3"]), Fabric(accelerator="cpu", devices=1, precision="32-true"))
    T.train(load_config(None, [*tiny(data, runs, "nan", "maml.rho=0", "train.branch_batch=4", "train.steps=6",
                                     "checkpoint.every=2"),
                               "train.lr=1e-3", "checkpoint.resume_from=step_000000"]),
            Fabric(accelerator="cpu", devices=1, precision="32-true"))
    assert [r["step"] for r in metrics(runs / "nan")] == [0, 1, 2, 3, 4, 5, 6]
    history = [json.loads(l) for l in (runs / "nan" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 0 and history[-1]["changes"]["train.lr"] == [0.01, 0.001]


# --- two nodes ------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_on_localhost(data, runs, ar_two):
    port = free_port()
    overrides = tiny(data, runs, "two-nodes", "maml.rho=0", "train.branch_batch=8", *EQUAL)
    nodes = [subprocess.Popen(command(1, overrides, ("--nnodes=2", f"--node_rank={rank}",
                                                     f"--rdzv-endpoint=127.0.0.1:{port}")),
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [node.communicate(timeout=LAUNCH_TIMEOUT + 30)[1] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    # two nodes of one process compute exactly what one node of two processes does
    two_nodes, one_node = weights(runs / "two-nodes", 3), weights(ar_two, 3)
    assert all(torch.equal(v, one_node[k]) for k, v in two_nodes.items())


def test_runs_dir_must_be_shared_by_the_nodes(data, runs, tmp_path):
    "Two nodes whose logging.runs_dir is not one directory: every rank stops at the start with one line naming it."
    port = free_port()
    base = tiny(data, runs, "not-shared", "maml.rho=0", "train.branch_batch=8")
    own = [base, [*base, f"logging.runs_dir={tmp_path / 'node-1-local'}"]]  # node 1 sees a directory of its own
    nodes = [subprocess.Popen(command(1, own[rank], ("--nnodes=2", f"--node_rank={rank}",
                                                     f"--rdzv-endpoint=127.0.0.1:{port}")),
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    errors = [node.communicate(timeout=LAUNCH_TIMEOUT + 30)[1] for node in nodes]
    assert all(n.returncode != 0 for n in nodes)
    assert all("is not on a file system every node sees" in e for e in errors), errors[0][-2000:] + errors[1][-2000:]
    assert not (runs / "not-shared" / "checkpoints").exists()  # stopped before any work


# --- a slow uplink ---------------------------------------------------------------------------------------------

def test_a_slow_hub_upload_does_not_time_out_the_other_rank(data, runs, tmp_path):
    ("Each upload takes 4 s, the collectives' timeout is 2 s: "
     "rank 0 uploads in the background, rank 1 never waits for it.")
    record = tmp_path / "uploads.jsonl"
    overrides = tiny(data, runs, "slow-hub", "maml.rho=0", "train.branch_batch=8", "train.steps=2",
                     "train.collective_timeout_s=2", "logging.hub_repo=me/slow-hub")
    cmd = ["timeout", str(LAUNCH_TIMEOUT), sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(ROOT / "tests" / "slow_hub_launch.py"), str(record), "4", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT + 30)
    assert p.returncode == 0, p.stderr[-4000:]
    uploaded = [json.loads(line)["revision"] for line in record.read_text().splitlines()]
    assert (uploaded == ["step_000000", "step_000001", "step_000002"]
            and "3 checkpoints uploaded to me/slow-hub" in p.stdout)
