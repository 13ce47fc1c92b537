"""Issue 11: `make rehearse` — the `paper` profile end to end under the rehearsal's shrink transform: every stage,
preset, grid and report, two pretraining seeds, data streamed through the Hub code path, all 31 outputs written and
no cell marked missing. This is what `make paper` runs on 4 GPUs, shrunk to minutes on CPUs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from picomaml.checkpoints import list_checkpoints
from picomaml.config import load_config
from picomaml.names import OUTPUTS, output_files
from picomaml.pipeline import PROFILES

ROOT = Path(__file__).resolve().parent.parent
REHEARSE = ROOT / PROFILES["rehearse"].runs_dir


def shared_data() -> str | None:
    "$PICOMAML_DATA, else ../shared/data beside the clone (as the Makefile does), else None."
    beside = ROOT.parent / "shared" / "data"
    return os.environ.get("PICOMAML_DATA") or (str(beside) if beside.is_dir() else None)


def disk_usage(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data or PICOMAML_DATA")
def test_rehearsal_runs_the_paper_profile_and_fills_every_output():
    shutil.rmtree(REHEARSE, ignore_errors=True)
    committed = {p: p.read_bytes() for d in ("figures", "paper_tables") for p in sorted((ROOT / d).iterdir())}
    env = {**os.environ, "PICOMAML_DATA": shared_data(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "picomaml.pipeline", "rehearse"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    profile = PROFILES["rehearse"]
    # every pretraining run of the paper profile, for both seeds, streamed through the Hub path, with step 0 and every cadence step
    runs = sorted(p.name for p in REHEARSE.iterdir() if (p / "config.yaml").is_file())
    assert len(runs) == len(profile.sizes) * 2 * len(profile.seeds) == 16, runs
    for name in runs:
        steps = [s for s, _ in list_checkpoints(REHEARSE / name / "checkpoints")]
        assert steps == list(range(0, 4)), (name, steps)  # step 0 and every step of 3 (the cadence of 100 / 2,000, at least 1)
        assert len(list((REHEARSE / name / "checkpoints").glob("*/training_state.pt"))) == 2  # checkpoint.keep_state
        run_cfg = load_config(REHEARSE / name / "config.yaml")
        assert run_cfg.data.source == "hub" and Path(run_cfg.data.train_hub).parent == REHEARSE / "hub"
    # all 31 outputs, none in the committed folders, and no cell the papers fill marked missing
    for output in OUTPUTS:
        folder = REHEARSE / ("figures" if "_fig" in output else "paper_tables")
        for name in output_files(output):
            assert (folder / name).is_file(), f"{output}: {name} not written"
    tables = {p.name: p.read_text() for p in (REHEARSE / "paper_tables").glob("*.md")}
    missing = [name for name, text in tables.items() if "missing" in text]
    assert not missing, f"tables with missing cells: {missing}"
    panels = {name: notes for name, notes in json.loads((REHEARSE / "figures" / "missing.json").read_text()).items() if notes}
    assert not panels, f"figure panels marked missing: {panels}"
    assert {p: p.read_bytes() for d in ("figures", "paper_tables") for p in sorted((ROOT / d).iterdir())} == committed
    assert disk_usage(REHEARSE) < 3e9
    assert "[pipeline] ner sweep paper1" in proc.stdout and "[pipeline] reports" in proc.stdout
