"""Issue 11: `make rehearse` — the `paper` profile end to end under the rehearsal's shrink transform: every stage,
preset, grid and report, two pretraining seeds, data streamed through the Hub code path, all 31 outputs written and
no cell marked missing. This is what `make paper` runs on 4 GPUs, shrunk to minutes on CPUs."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from picomaml.checkpoints import list_checkpoints
from picomaml.config import load_config
from picomaml.names import OUTPUTS, output_files
from picomaml.pipeline import PROFILES, SHRINK
from picomaml.report import reported_numbers

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
    proc = subprocess.run([sys.executable, "-m", "picomaml.pipeline", "rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    profile = PROFILES["rehearse"]
    # every pretraining run of the paper profile, for both seeds, streamed through the Hub path, with step 0 and every
    # cadence step
    runs = sorted(p.name for p in REHEARSE.iterdir() if (p / "config.yaml").is_file())
    # and the released reading, first seed
    assert len(runs) == len(profile.sizes) * (2 * len(profile.seeds) + 1) == 20, runs
    for name in runs:
        steps = [s for s, _ in list_checkpoints(REHEARSE / name / "checkpoints")]
        # step 0 and every step of 3 (the cadence of 100 / 2,000, at least 1)
        assert steps == list(range(0, 4)), (name, steps)
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
    panels = {name: notes for name, notes in json.loads((REHEARSE / "figures" / "missing.json").read_text()).items()
              if notes}
    assert not panels, f"figure panels marked missing: {panels}"
    assert {p: p.read_bytes() for d in ("figures", "paper_tables") for p in sorted((ROOT / d).iterdir())} == committed
    assert disk_usage(REHEARSE) < 3e9
    assert "[pipeline] ner sweep paper1" in proc.stdout and "[pipeline] reports" in proc.stdout
    # the scorecard: every reported number has a row; at the rehearsal's scale only the data's own statistics are
    # compared
    card = pd.read_csv(REHEARSE / "paper_tables" / "scorecard.csv", dtype=str, keep_default_na=False)
    assert (set(reported_numbers().key) <= set(card.key)
            and "Scorecard (tiny, small, medium, large runs): " in proc.stdout)
    compared = card[card.verdict != "not comparable"]
    assert len(compared) and set(compared["our table"]) <= {"p2_table4_span_statistics",
                                                            "p2_table5_particles_oov"}, compared


# --- every command printed in the README or a notebook is run (or named as run by another test) -----------------

def printed_commands() -> dict:
    "Commands in ```sh blocks and `inline` spans of the README and the notebooks' prose -> where they are printed."
    def commands(text):
        found = [line.split("  #")[0].strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)
                 for line in block.splitlines()]
        found += [span.strip() for span in re.findall(
            r"`((?:python -m picomaml|make |torchrun|papermill|mkdir -p runs/reports|srun )[^`]*)`", text)]
        return [c for c in found if c]
    where = {}
    for c in commands((ROOT / "README.md").read_text()): where.setdefault(c, set()).add("README.md")
    for nb in sorted((ROOT / "nbs").glob("*.py")):
        prose = "\n".join(l[2:] if l.startswith("# ") else l[1:] if l.startswith("#") else ""
                          for l in nb.read_text().splitlines())
        for c in commands(prose): where.setdefault(c, set()).add(nb.name)
    return where


def is_usage_pattern(command: str) -> bool:
    ("A command with placeholders (`--config X`, `[--seeds ...]`, `HOST0`) or a bare program name "
     "is a usage pattern, not a command.")
    return ("[" in command or "..." in command or re.search(r"\s(X|C|N|M|T|F|HOST0:\d+)(\s|$)", command) is not None
            or command in ("torchrun", "python -m picomaml.launch", "python -m picomaml.plan",
                           "python -m picomaml.pipeline paper"))


RUNS = str(REHEARSE.relative_to(ROOT))
# a printed launch, fewer steps and blocks
SMALL = ["train.steps=2", "model.n_layers=2", "eval.max_documents=8", "logging.progress_bar=false"]
COVERED = {  # printed commands another test runs (or whose exact work it runs, shrunk), by that test
    "make demo": "tests/test_pipeline_smoke.py::test_smoke_pipeline_writes_every_output_and_tables_are_stable",
    "python -m picomaml.pipeline demo":
        "tests/test_pipeline_smoke.py::test_smoke_pipeline_writes_every_output_and_tables_are_stable",
    "python -m picomaml.pipeline smoke":
        "tests/test_pipeline_smoke.py::test_smoke_pipeline_writes_every_output_and_tables_are_stable",
    "python -m picomaml.pipeline demo --stages reports":
        "tests/test_pipeline_smoke.py::test_smoke_pipeline_writes_every_output_and_tables_are_stable",
    "make rehearse": "tests/test_rehearsal.py::test_rehearsal_runs_the_paper_profile_and_fills_every_output",
    "python -m picomaml.pipeline rehearse":
        "tests/test_rehearsal.py::test_rehearsal_runs_the_paper_profile_and_fills_every_output",
    "make test": ".ci/run",
    "make docs": "tests/test_docs.py::test_make_docs_site_in_headless_chromium",
    "make sync": "Makefile check (run by make test): the same nbdev_clean, nbdev_export and README steps",
    "srun python -m picomaml.launch ...": "tests/test_distributed.py::test_two_node_rendezvous_on_localhost",
}


def runnable(command: str, tmp: Path) -> list[str] | None:
    ("The argv a printed command is run with here: as printed, with the rehearsal's runs standing in for the paper's, "
     "shrunk where noted.")
    from picomaml.pipeline import PROFILES
    rehearse = PROFILES["rehearse"]
    # the paper's stages are the rehearsal's
    if command.startswith("python -m picomaml.pipeline paper") or command == "make paper":
        # CPU: said so
        return ["python", "-m", "picomaml.pipeline", "paper", *command.split()[4:], "--device", "cpu", "--stages"]
    # its sweep: 12_ner_sweep, through a stand-in Hub
    if command in ("python -m picomaml.pipeline released", "make released"):
        return ["python", "-m", "picomaml.pipeline", "released", "--device", "cpu", "--stages"]
    if "picomaml.launch" in command and "--help" not in command:
        argv = shlex.split(command.replace("torchrun", "python -m torch.distributed.run"))
        large = "pico-large-maml" in command
        extra = [*rehearse.overrides, *rehearse.size_overrides["large"], "train.device=cpu"] if large else SMALL
        # one fresh run per command
        return [*argv, *extra, f"logging.runs_dir={tmp}", f"logging.run_name=printed-{abs(hash(command))}"]
    if command.startswith("python -m picomaml.ner_sweep"):
        return [*shlex.split(command.replace("runs/ner/", f"{tmp}/")), "--runs-dir", RUNS, "--limit", "2",
                "--grid-overrides", json.dumps(rehearse.grid_overrides)]
    # over the rehearsal's spectra rows (the papers' whole split is thousands of rows through the 50k-word output)
    if command.startswith("python -m picomaml.spectra"):
        local = (command.replace("runs/", f"{RUNS}/").replace("data/pretokenized/eval", f"{RUNS}/shards/eval")
                 .replace("--out spectra.jsonl", f"--out {tmp}/spectra.jsonl"))
        return [*shlex.split(local), "--rows", str(SHRINK["spectra_rows"])]
    # the folder papermill writes into, made first (a fresh clone has none)
    if command.startswith("mkdir -p runs/reports && papermill"):
        return shlex.split(command.split("&& ", 1)[1].replace("runs/reports/", f"{tmp}/"))
    # the release's plan needs no Hub and no GPU
    if command.startswith(("python -m picomaml.plan", "python -m picomaml.launch --help",
                           "python -m picomaml.devtools readme", "python -m picomaml.pipeline released --plan")):
        return shlex.split(command)
    if command == "make compare":
        return ["python", "-m", "picomaml.devtools", "compare"]
    if command == "source .venv/bin/activate && nbdev_export":
        return ["bash", "-c", f"source {Path(sys.executable).parent}/activate && nbdev_export"]
    return None


@pytest.mark.skipif(shared_data() is None, reason="needs ../shared/data or PICOMAML_DATA")
def test_every_printed_command_runs(tmp_path):
    assert (REHEARSE / "figures").is_dir(), "runs after the rehearsal, whose runs stand in for the paper's"
    env = {**os.environ, "PICOMAML_DATA": shared_data(), "HF_HUB_OFFLINE": "1"}
    unaccounted, failed = [], []
    for command, where in sorted(printed_commands().items()):
        if is_usage_pattern(command): continue
        if command in COVERED:
            path, _, name = COVERED[command].partition("::")
            assert not name or f"def {name}(" in (ROOT / path).read_text(), \
                f"{command}: {COVERED[command]} does not exist"
            continue
        argv = runnable(command, tmp_path)
        if argv is None: unaccounted.append(f"{command} ({', '.join(sorted(where))})"); continue
        argv = [sys.executable, "-m", "papermill", *argv[1:]] if argv[0] == "papermill" else \
            [sys.executable if a == "python" else a for a in argv]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        # ranks' one-line errors, before torchrun's report
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        if proc.returncode != 0:
            failed.append(f"{command} ({', '.join(sorted(where))}): "
                          f"{errors[:1] or (proc.stderr or proc.stdout)[-800:]}")
    assert not unaccounted, f"printed commands no test runs: {unaccounted}"
    assert not failed, "\n\n".join(failed)
