"""Issue 19.6: `ner_sweep --released MIRROR` finetunes the authors' released checkpoints from a local mirror in the release
layout (`<repo>/` the final model, `<repo>/step_<N>/` each step), through the real command, resumable, with one-line errors;
and `make released` is the paper profile's NER and report stages over them (its sweep commands)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder, save_pretrained
from picomaml.names import step_dir_name
from picomaml.pipeline import PROFILES, sweep_command

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("PICOMAML_DATA") or str(ROOT.parent / "shared" / "data")


@pytest.fixture
def mirror(tmp_path):
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128))
    for repo, steps in (("pico-lm/pico-maml-decoder-tiny", (0, 100)), ("pico-lm/pico-decoder-tiny", ())):
        save_pretrained(model, tmp_path / "mirror" / repo)
        for step in steps: save_pretrained(model, tmp_path / "mirror" / repo / step_dir_name(step))
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4}, "max_train_sentences": 8, "max_eval_sentences": 4,
                         "test_sets": ["tl_trg"]},
            "grids": [{"heads": ["linear"], "regimes": ["head"], "datasets": ["sk_snk"],
                       "runs": [{"arm": "maml", "size": "tiny", "step": "scheduled"}, {"arm": "vanilla", "size": "tiny"}]}]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    return tmp_path


def sweep(tmp: Path, *extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "picomaml.ner_sweep", "--grid", str(tmp / "g.yaml"), "--out", str(tmp / "r.jsonl"),
            "--device", "cpu", *extra]
    env = {**os.environ, "PICOMAML_DATA": DATA, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not Path(DATA).is_dir(), reason="needs ../shared/data or PICOMAML_DATA")
def test_released_mirror_through_the_sweep_command(mirror):
    first = sweep(mirror, "--released", str(mirror / "mirror"))
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in (mirror / "r.jsonl").read_text().splitlines()]
    maml = mirror / "mirror" / "pico-lm" / "pico-maml-decoder-tiny"
    assert sorted((r["pretraining_run"], r["checkpoint"], r["step"]) for r in rows) == [
        ("pico-tiny-maml", str(maml / step_dir_name(0)), 0), ("pico-tiny-maml", str(maml / step_dir_name(100)), 100),
        ("pico-tiny-vanilla", str(mirror / "mirror" / "pico-lm" / "pico-decoder-tiny"), None)]
    again = sweep(mirror, "--released", str(mirror / "mirror"))
    assert again.returncode == 0 and "0 runs finished" in again.stdout  # resumable: every job is done
    local = sweep(mirror)  # without --released the grid names local runs, which do not exist
    assert local.returncode != 0 and "pico-tiny-maml" in local.stderr and "Traceback" not in local.stderr


@pytest.mark.skipif(not Path(DATA).is_dir(), reason="needs ../shared/data or PICOMAML_DATA")
def test_released_mirror_without_the_step_is_one_line(mirror):
    grid = yaml.safe_load((mirror / "g.yaml").read_text())
    grid["grids"][0]["runs"] = [{"arm": "vanilla", "size": "tiny", "step": [100]}]
    (mirror / "g.yaml").write_text(yaml.safe_dump(grid))
    proc = sweep(mirror, "--released", str(mirror / "mirror"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and not (mirror / "r.jsonl").exists()
    assert "pico-lm/pico-decoder-tiny" in proc.stderr and "has no checkpoint of step(s) [100]" in proc.stderr


def test_make_released_is_the_paper_grids_over_the_release():
    released = PROFILES["released"]
    assert released.grids == PROFILES["paper"].grids and released.paper_scale and released.nproc == 1
    for grid in released.grids:
        cmd = sweep_command(grid, released)
        assert cmd[cmd.index("--released") + 1] == "hub" and cmd[cmd.index("--device") + 1] == "cuda"
    assert "released:" in (ROOT / "Makefile").read_text() and "python -m picomaml.pipeline released" in (ROOT / "Makefile").read_text()
