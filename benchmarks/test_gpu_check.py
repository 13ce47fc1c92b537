"The GPU check's dry mode (`pytest benchmarks`): the same code on CPU with tiny shapes writes a complete table."
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_row(tmp_path):
    "Through the shell script: eager and compiled (aot_eager) rows of the tiny size, every phase planned, none failed."
    out = tmp_path / "check.md"
    subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--out", str(out), "--sizes", "tiny", "--steps", "2"],
                   cwd=ROOT, check=True, timeout=170, capture_output=True)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[1] for row in rows] == ["eager", "torch.compile"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[2] == "2 / 4" and float(cells[3]) > 0 and float(cells[5].replace(",", "")) > 0  # chunk / rows, s/step, tokens/s
        assert all(cell.startswith("– / ") and cell.endswith(" MiB") and float(cell.split()[2]) > 0 for cell in cells[7:10])


def test_error_rows_keep_the_table_shape():
    "A failed or skipped run is one row with as many cells as the others."
    ok = {"size": "tiny", "compile": False, "chunk": 2, "rows": 4, "seconds": 1.0, "first_seconds": 2.0, "tokens_per_s": 10.0,
          "mfu": None, "measured": dict.fromkeys(("next-token chunk", "episode", "optimizer step")), "reserved_ratio": None,
          "predicted": dict.fromkeys(("next-token chunk", "episode", "optimizer step"), 2**20)}
    lines = gpu_check.table([ok, {"size": "large", "compile": True, "error": "skipped: out of time budget"}]).splitlines()
    assert len({line.count("|") for line in lines}) == 1 and "skipped" in lines[-1]
