"The NER sweep CLI: a killed sweep resumes without redoing finished rows; a torn last line is tolerated."
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder, save_pretrained

ROOT = Path(__file__).resolve().parents[1]

def sweep_cli(grid, out, *extra, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.setdefault("PICOMAML_DATA", str(ROOT.parent / "shared" / "data"))
    return subprocess.run([sys.executable, "-m", "picomaml.ner_sweep", "--grid", str(grid), "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=300)

def test_killed_sweep_resumes(tmp_path):
    torch.manual_seed(0)
    save_pretrained(PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                            max_seq_len=128)), tmp_path / "ckpt")
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4}, "max_train_sentences": 8,
                         "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
            "grids": [{"heads": ["linear", "crf"], "regimes": ["head"], "datasets": ["sk_snk"], "seeds": [0, 1],
                       "runs": [{"run": "t", "arm": "maml", "size": "tiny", "checkpoint": str(tmp_path / "ckpt")}]}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    out = tmp_path / "results.jsonl"
    first = sweep_cli(tmp_path / "g.yaml", out, "--limit", "1")  # stands in for a sweep killed after its first row
    assert first.returncode == 0, first.stderr
    assert len(out.read_text().splitlines()) == 1
    with open(out, "a") as f: f.write('{"key": "t|')  # and a row torn by the kill
    second = sweep_cli(tmp_path / "g.yaml", out)
    assert second.returncode == 0, second.stderr
    assert "torn last line" in second.stderr and "3 runs finished" in second.stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4

def test_missing_checkpoint_is_named(tmp_path):
    grid = {"grids": [{"runs": [{"run": "x", "arm": "maml", "size": "tiny", "checkpoint": str(tmp_path / "absent")}]}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    res = sweep_cli(tmp_path / "g.yaml", tmp_path / "r.jsonl")
    assert res.returncode != 0 and "absent" in res.stderr and not (tmp_path / "r.jsonl").exists()


def test_two_workers_write_what_one_writes(tmp_path):
    "Two CPU workers on one results file: every job once, the same rows (as a set of keys and values) as one process."
    torch.manual_seed(0)
    save_pretrained(PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                            max_seq_len=128)), tmp_path / "ckpt")
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4}, "max_train_sentences": 8,
                         "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
            "grids": [{"heads": [head], "regimes": [regime], "datasets": ["sk_snk"],
                       "runs": [{"run": "t", "arm": "maml", "size": "tiny", "checkpoint": str(tmp_path / "ckpt")},
                                {"run": "u", "arm": "vanilla", "size": "tiny", "checkpoint": str(tmp_path / "ckpt")}]}
                      for head, regime in (("linear", "head"), ("crf", "full"))]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    one_thread = {"OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    one = sweep_cli(tmp_path / "g.yaml", tmp_path / "one.jsonl", "--device", "cpu", env_extra=one_thread)
    assert one.returncode == 0, one.stderr
    # what a killed launch leaves: claims of jobs that never finished
    stale = tmp_path / ".two.jsonl.claims" / "an-earlier-launch"
    stale.mkdir(parents=True)
    first_key = json.loads((tmp_path / "one.jsonl").read_text().splitlines()[0])["key"]
    (stale / hashlib.sha1(first_key.encode()).hexdigest()).write_text("worker 0, killed\n")
    two = sweep_cli(tmp_path / "g.yaml", tmp_path / "two.jsonl", "--device", "cpu", "--workers", "2",
                    env_extra=one_thread)
    assert two.returncode == 0, two.stderr
    assert "4 runs finished" in two.stdout and "2 workers" in two.stderr
    wall_clock = {"seconds"}
    rows = lambda name: sorted(json.dumps({k: v for k, v in json.loads(l).items() if k not in wall_clock},
                                          sort_keys=True)
                               for l in (tmp_path / name).read_text().splitlines())
    assert len(rows("two.jsonl")) == 4 and rows("two.jsonl") == rows("one.jsonl")
    logs = sorted((tmp_path / "two-workers").glob("worker-*.log"))
    assert len(logs) == 2 and all("runs finished" in log.read_text() for log in logs)
    assert not stale.exists()  # the relaunch dropped the earlier launch's claims
