"The NER sweep CLI: a killed sweep resumes without redoing finished rows; a torn last line is tolerated."
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

def sweep_cli(grid, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.setdefault("PICOMAML_DATA", str(ROOT.parent / "shared" / "data"))
    return subprocess.run([sys.executable, "-m", "picomaml.ner_sweep", "--grid", str(grid), "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=300)

def test_killed_sweep_resumes(tmp_path):
    torch.manual_seed(0)
    save_pretrained(PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128)), tmp_path / "ckpt")
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
