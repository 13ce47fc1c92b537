"""Issue 19.6: `ner_sweep --released MIRROR` finetunes the authors' released checkpoints from a local mirror in the
release layout (`<repo>/` the final model, `<repo>/step_<N>/` each step), through the real command, resumable, with
one-line errors; and `make released` is the paper profile's NER and report stages over them: its sweep commands, its
plan, and the whole profile shrunk (`pipeline rehearse-released`) over a mirror of the papers' eight models at the
rehearsal's sizes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from picomaml.checkpoints import scheduled_steps
from picomaml.config import PRESETS_DIR, ModelConfig, load_config
from picomaml.model import PicoDecoder, save_pretrained
from picomaml.names import step_dir_name
from picomaml.ner_sweep import RELEASED_REPOS
from picomaml.pipeline import PROFILES, shrink_size, sweep_command

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("PICOMAML_DATA") or str(ROOT.parent / "shared" / "data")


@pytest.fixture
def mirror(tmp_path):
    torch.manual_seed(0)
    model = PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128))
    for repo, steps in (("pico-lm/pico-maml-decoder-tiny", (0, 100)), ("pico-lm/pico-decoder-tiny", ())):
        save_pretrained(model, tmp_path / "mirror" / repo)
        for step in steps: save_pretrained(model, tmp_path / "mirror" / repo / step_dir_name(step))
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4}, "max_train_sentences": 8,
                         "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
            "grids": [{"heads": ["linear"], "regimes": ["head"], "datasets": ["sk_snk"],
                       "runs": [{"arm": "maml", "size": "tiny", "step": "scheduled"},
                                {"arm": "vanilla", "size": "tiny"}]}]}
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
    assert ("released:" in (ROOT / "Makefile").read_text() and
            "python -m picomaml.pipeline released" in (ROOT / "Makefile").read_text())


def release_mirror(root: Path, sizes) -> Path:
    "The papers' eight models at the rehearsal's sizes, release layout: <repo>/ (main), and each scheduled MAML step."
    for size in sizes:
        cfg = load_config(PRESETS_DIR / f"pico-{size}-maml.yaml", shrink_size(size))
        for arm, repo in RELEASED_REPOS.items():
            torch.manual_seed(len(size))
            model = PicoDecoder(cfg.model)
            save_pretrained(model, root / repo.format(size=size))
            steps = scheduled_steps(cfg.checkpoint, cfg.train.steps) if arm == "maml" else []
            for step in steps: save_pretrained(model, root / repo.format(size=size) / step_dir_name(step))
    return root


PRETRAINING_OUTPUTS = {"p1_fig1_loss_paloma", "p1_fig3_support_query_acc", "p1_fig4_head_weights", "p1_fig5_per",
                       "p1_fig6_phase_transition", "p2_fig10_train_loss", "p2_fig11_paloma", "p2_fig12_query_acc",
                       "p2_fig13_support_acc", "p2_fig14_head_weight_mean", "p2_fig15_head_weight_std",
                       "p1_table2_loss_paloma", "p1_text_episode_accuracy", "p1_text_speedup"}


@pytest.mark.skipif(not Path(DATA).is_dir(), reason="needs ../shared/data or PICOMAML_DATA")
def test_make_released_shrunk_through_a_release_mirror(tmp_path):
    """The released profile end to end, shrunk: its plan, both papers' NER grids over the mirror, every NER figure and
    table filled, the pretraining outputs (the release carries no training logs) marked missing, and the scorecard."""
    profile = PROFILES["rehearse-released"]
    mirror, runs = release_mirror(tmp_path / "mirror", profile.sizes), ROOT / profile.runs_dir
    shutil.rmtree(runs, ignore_errors=True)
    env = {**os.environ, "PICOMAML_DATA": DATA, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "picomaml.pipeline", "rehearse-released", "--released-mirror", str(mirror)]
    plan = subprocess.run([*command, "--plan"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0 and not runs.exists(), plan.stderr[-2000:]  # a plan runs nothing
    assert ("paper1.yaml: 160 jobs on 8 checkpoints" in plan.stdout and
            "paper2.yaml: 165 jobs on 12 checkpoints" in plan.stdout), plan.stdout
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for grid in ("paper1", "paper2")
            for line in (runs / "ner" / f"{grid}-results.jsonl").read_text().splitlines()]
    assert len(rows) == 325 and all(r["checkpoint"].startswith(str(mirror)) for r in rows)
    steps = sorted({r["step"] for r in rows if r["size"] == "medium" and r["arm"] == "maml" and r["step"] is not None})
    assert steps == [0, 1, 2, 3]  # paper 2's checkpoint sweep: every step the mirror holds
    missing = {name for name, notes in json.loads((runs / "figures" / "missing.json").read_text()).items() if notes}
    missing |= {p.stem for p in (runs / "paper_tables").glob("*.md")
                if "missing" in p.read_text() and p.stem != "scorecard"}
    assert missing == PRETRAINING_OUTPUTS, missing ^ PRETRAINING_OUTPUTS
    card = pd.read_csv(runs / "paper_tables" / "scorecard.csv", dtype=str, keep_default_na=False)
    ner = card[card["our table"].str.match(r"p1_table[3-9]|p2_table")]
    assert len(ner) > 200 and not ner.ours.isin(["", "missing"]).any(), ner[ner.ours.isin(["", "missing"])]
    assert "Scorecard (tiny, small, medium, large runs): " in proc.stdout
