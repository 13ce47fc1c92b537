"The GPU check's dry mode (`pytest benchmarks`): the same code on CPU with tiny shapes covers every part of the check."
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_covers_every_part(tmp_path):
    "Through the shell script: (a) eager and compiled rows with every phase planned; (b) prepare, launch, kill, resume,"
    " evaluation, spectra and NER jobs through the real commands; (c) two processes against one."
    out = tmp_path / "check.md"
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--out", str(out), "--sizes", "tiny",
                           "--steps", "2"], cwd=ROOT, timeout=470, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[1] for row in rows] == ["eager", "torch.compile"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[2] == "2 / 4, 2" and cells[3].startswith("32-true; training: ") and float(cells[4]) > 0
        assert all(cell.startswith("– / ") and cell.endswith(" MiB") and float(cell.split()[2]) > 0
                   for cell in cells[8:13])
    b = text.split("## (b)")[1].split("## (c)")[0]
    assert ("relaunch resumed: yes" in b and "each once" in b and "all losses finite: yes" in b
            and "killed (SIGKILL) at step_" in b)
    assert "| training step |" in b and "| evaluation |" in b and "| spectra |" in b
    ner = [line for line in b.splitlines() if line.startswith(("| linear", "| crf"))]
    # NER under bf16 autocast, on the device given
    assert len(ner) == 4 and all(" | cpu | bf16-mixed | " in line for line in ner)
    assert "2 processes (gloo) against 1" in text.split("## (c)")[1] and "within" in text.split("## (c)")[1]


def test_error_rows_keep_the_table_shape():
    "A failed or skipped run is one row with as many cells as the others."
    phases = dict.fromkeys(gpu_check.PHASES)
    ok = {"size": "tiny", "compile": False, "chunk": 2, "rows": 4, "spectra_batch": 2, "precision": "32-true",
          "kernels": {"training": "flash", "float32": "flash"}, "seconds": 1.0, "first_seconds": 2.0,
          "tokens_per_s": 10.0, "mfu": None, "measured": phases, "reserved_ratio": None,
          "predicted": dict.fromkeys(gpu_check.PHASES, 2**20)}
    lines = gpu_check.table([ok, {"size": "large", "compile": True,
                                  "error": "skipped: out of time budget"}]).splitlines()
    assert len({line.count("|") for line in lines}) == 1 and "skipped" in lines[-1]


def test_missing_packages_are_named_in_one_line(tmp_path):
    "An interpreter without the project's packages: one line naming them and the install command, before anything runs."
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHON": str(bare / "bin" / "python"), "PATH": "/usr/bin:/bin"})
    assert (done.returncode == 2 and done.stderr.count("\n") == 1 and "torch" in done.stderr
            and "pip install -r requirements.txt" in done.stderr)
