"""Issue 7: the smoke pipeline produces every result figure and table of both papers, and the tables are
stable."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from commands import smoke_runs_lock

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "runs" / "smoke"

# every figure and table of both papers that reports a result (paper 1 Table 1 and paper 2 Tables 6-7 describe
# the setup; paper 2 Tables 1, 3 and Fig. 8 are hand-written linguistics)
P1_FIGURES = [f"p1_fig{i}_" for i in range(1, 7)]
P1_TABLES = [f"p1_table{i}_" for i in range(2, 10)]
P2_FIGURES = [f"p2_fig{i}_" for i in [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]]
P2_TABLES = [f"p2_table{i}_" for i in (2, 4, 5)]


def shared_data() -> str | None:
    "$PICOMAML_DATA, else ../shared/data beside the clone (as the Makefile does), else None."
    beside = ROOT.parent / "shared" / "data"
    return os.environ.get("PICOMAML_DATA") or (str(beside) if beside.is_dir() else None)


def run_pipeline(*args):
    env = {**os.environ, "PICOMAML_DATA": shared_data(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "picomaml.pipeline", "smoke", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def outputs(directory: Path, prefixes, suffixes) -> dict:
    found = {}
    for prefix in prefixes:
        for suffix in suffixes:
            hits = sorted(directory.glob(f"{prefix}*{suffix}"))
            assert hits, f"no {prefix}*{suffix} in {directory}"
            found[hits[0].name] = hashlib.sha256(hits[0].read_bytes()).hexdigest()
    return found


@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data or PICOMAML_DATA")
def test_smoke_pipeline_writes_every_output_and_tables_are_stable():
    with smoke_runs_lock(): smoke_pipeline_writes_every_output_and_tables_are_stable()


def smoke_pipeline_writes_every_output_and_tables_are_stable():
    shutil.rmtree(SMOKE, ignore_errors=True)
    log = run_pipeline()
    assert "pretrain demo-maml" in log and "ner sweep smoke" in log
    figures, tables = SMOKE / "figures", SMOKE / "paper_tables"
    outputs(figures, P1_FIGURES + P2_FIGURES, [".png", ".pdf"])
    first = outputs(tables, P1_TABLES + P2_TABLES, [".md", ".tex", ".csv"])
    table2 = (tables / next(n for n in first if n.startswith("p1_table2_") and n.endswith(".md"))).read_text()
    assert "demo-maml" in table2 and "demo-vanilla" in table2 and "missing" not in table2

    log = run_pipeline()  # everything done: only the sweep check and the notebooks run again
    assert "pretrain demo-maml: already done, skipped" in log and "0 runs finished" in log
    assert outputs(tables, P1_TABLES + P2_TABLES, [".md", ".tex", ".csv"]) == first

    checkpoints = SMOKE / "demo-maml" / "checkpoints"  # issue 21: `latest` alone does not make a run finished
    final = checkpoints / (checkpoints / "latest").read_text().strip()
    weights = (final / "model.safetensors").read_bytes()
    shutil.rmtree(final)
    log = run_pipeline("--stages", "pretrain")
    named = lambda p: p.relative_to(ROOT)  # the profile's runs_dir, runs/smoke, is relative to the repository root
    assert f"{named(final)}, which {named(checkpoints / 'latest')} names, is gone: training demo-maml again" in log, \
        log[-3000:]
    assert (final / "model.safetensors").read_bytes() == weights  # resumed and trained again, bitwise
