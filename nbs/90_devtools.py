# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Developer tools
#
# > README generation without Quarto, and the checks that keep the artifact's files in step.
#
# nbdev renders `nbs/index.ipynb` into README.md through Quarto, which cannot be installed on the
# machines this project is built on (its PyPI package downloads the binary at install time). The README is plain Markdown anyway, so we render
# it ourselves: markdown cells as they are, code cells as fenced Python, text outputs as fenced text.
# `make test` regenerates it and fails when the committed README differs.

# %%
#| default_exp devtools

# %%
#| export
from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

from picomaml.names import NEAR_ZERO_BASE, NEAR_ZERO_F1

# %% [markdown]
# ## Expected errors
#
# Every notebook tests its error messages the same way: `raises(fn, *needles)` calls `fn` and
# requires an exception (of `kind`) whose message holds every needle, so a test says in one line what
# goes wrong and what the user is told. It returns the exception for anything else worth checking.

# %%
#| export
def raises(fn, *needles: str, kind: type | tuple = Exception) -> BaseException:
    "Call `fn`; require it to raise `kind` with every needle in its message; return the exception."
    try: fn()
    except kind as e:
        missing = [n for n in needles if n not in str(e)]
        assert not missing, f"{type(e).__name__}: {e}\n lacks {missing}"
        return e
    raise AssertionError(f"no {getattr(kind, '__name__', kind)} raised; expected one naming {needles}")

# %%
assert str(raises(lambda: int("x"), "invalid literal", "'x'", kind=ValueError)).startswith("invalid literal")
for wrong in (lambda: raises(lambda: 1), lambda: raises(lambda: int("x"), "no such words"),
              lambda: raises(lambda: int("x"), kind=KeyError)):
    try: wrong(); failed = False
    except (AssertionError, ValueError): failed = True
    assert failed  # no error, a message without the needle, an error of another kind: each fails the test


# %% [markdown]
# ## One tiny configuration for the tests
#
# The notebooks' and the command-line tests' seconds-long runs share one model and one episode:
# a two-block decoder of width 24 (4 query and 2 key/value heads, 32 positions), a 4-way 2-shot
# episode of 12-token windows from a 64-row pool, and a two-layer head of width 16. `tiny_run` adds
# the data, tokenizer and run directory of a run on 33-id rows prepared by `picomaml.data prepare`;
# each test appends what it is about (later overrides win).

# %%
#| export
TINY_MODEL = ("model.d_model=24", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96",
              "model.max_seq_len=32")
TINY_EPISODE = ("smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=12", "smlmt.pool_rows=64",
                "smlmt.exclude_top=30", "maml.head_hidden=16", "maml.head_layers=2")

def tiny_run(data, runs, name: str, tokenizer, *more: str) -> list[str]:
    "Overrides of a seconds-long run on the 33-id rows of `data`/{train,eval}: the tiny model and episode, then `more`."
    return [*TINY_MODEL, f"data.train_path={data}/train", f"data.eval_path={data}/eval", "data.seq_len=32",
            f"data.tokenizer_path={tokenizer}", *TINY_EPISODE, "eval.max_documents=16", "eval.batch_size=8",
            "spectra.every=0",
            f"logging.runs_dir={runs}", f"logging.run_name={name}", "logging.progress_bar=false", *more]


# %%
from picomaml.config import load_config

_tiny = load_config(None, tiny_run("d", "r", "x", "tok.json", "model.n_layers=1", "smlmt.n_way=8"))
assert (_tiny.model.d_model, _tiny.model.n_layers, _tiny.smlmt.n_way, _tiny.smlmt.k_shot) == (24, 1, 8, 2)
assert (_tiny.data.train_path, _tiny.logging.runs_dir, _tiny.logging.run_name) == ("d/train", "r", "x")


# %%
#| export
def _output_text(output) -> str:
    "The plain-text form of one notebook output (stream or text/plain), or ''."
    if output.get("output_type") == "stream": return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")

def notebook_markdown(nb_path) -> str:
    "Render a notebook as Markdown: prose, fenced code, fenced text outputs; nbdev directives dropped."
    nb = nbformat.read(str(nb_path), as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown": parts.append(cell.source.strip())
        if cell.cell_type != "code": continue
        lines = cell.source.splitlines()
        directives = {l.replace(" ", "") for l in lines if l.startswith("#|")}
        code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
        if "#|hide" in directives or not code: continue
        parts.append(f"```python\n{code}\n```")
        text = "".join(_output_text(o) for o in cell.get("outputs", [])).strip()
        if text: parts.append(f"```\n{text}\n```")
    return "\n\n".join(parts) + "\n"


# %%
import tempfile

_nb = nbformat.v4.new_notebook(cells=[
    nbformat.v4.new_markdown_cell("# Title\n\nSome prose."),
    nbformat.v4.new_code_cell("#| hide\nimport secret"),
    nbformat.v4.new_code_cell("#| eval: false\nprint(1)", outputs=[nbformat.v4.new_output("stream", text="1\n")]),
])
with tempfile.TemporaryDirectory() as tmp:
    nbformat.write(_nb, f"{tmp}/x.ipynb")
    md = notebook_markdown(f"{tmp}/x.ipynb")
assert md == "# Title\n\nSome prose.\n\n```python\nprint(1)\n```\n\n```\n1\n```\n", md

# %% [markdown]
# The README carries a one-line banner saying where it comes from, so nobody edits it by hand.

# %%
#| export
README_BANNER = ("<!-- Generated from nbs/index.ipynb by `python -m picomaml.devtools readme`; "
                 "edit the notebook, not this file. -->\n\n")

def write_readme(root=".") -> Path:
    "Regenerate README.md from nbs/index.ipynb under `root`."
    root = Path(root)
    out = root / "README.md"
    out.write_text(README_BANNER + notebook_markdown(root / "nbs" / "index.ipynb"))
    return out


# %% [markdown]
# ## Pins
#
# conda cannot run here, so `environment.yml` is kept honest by comparison: its pip section must pin
# exactly the packages and versions of `requirements.txt`.

# %%
#| export
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s#;]+)")

def requirement_pins(lines) -> dict:
    "`{package: version}` for every `name==version` line; anything else unpinned is an error."
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line: continue
        m = _PIN.match(line)
        if not m: raise ValueError(f"requirement {line!r} is not pinned as name==version")
        pins[m[1].lower().replace("_", "-")] = m[2]
    return pins

def environment_pins(path) -> dict:
    "The pip pins of a conda environment.yml."
    deps = yaml.safe_load(Path(path).read_text())["dependencies"]
    pip = next((d["pip"] for d in deps if isinstance(d, dict) and "pip" in d), [])
    return requirement_pins(pip)


# %%
assert (requirement_pins(["torch==2.13.0  # the CPU wheel here", "", "# c", "PyYAML==6.0.3"])
        == {"torch": "2.13.0", "pyyaml": "6.0.3"})
try: requirement_pins(["lightning>=2"]); raise AssertionError
except ValueError as e: assert "lightning>=2" in str(e)

# %% [markdown]
# ## How regenerated outputs differ from the committed ones
#
# `make demo` rewrites `figures/` and `paper_tables/`. `make compare` reruns nothing: it reads each
# table as committed (`git show HEAD:<file>`) and as it is now, and reports every cell that changed,
# by row and column; figures are compared by their bytes and by the "missing" notes they record
# (`figures/missing.json`). A rerun on the same machine reproduces the tables byte for byte (the smoke
# test checks it), but another CPU (another core count, and so another float summation order in the
# matrix products) moves a 120-step CPU run's numbers a little, and a few NER spans more or less move
# a small F1 a lot. So a changed cell is judged by the uncertainty it states:
#
# - a cell with an interval, `mean [low, high]`, is **reproduced** when the rerun's mean lies inside
#   the committed interval or the two intervals overlap;
# - a relative-change cell marked `base ≈ 0` (`picomaml.names.NEAR_ZERO_BASE`: its vanilla F1 is
#   within noise of zero, where the ratio is not interpretable) is judged by the two absolute F1 it
#   carries, `(F1 <maml> vs <vanilla>)`: reproduced when each moved by at most `NEAR_ZERO_F1`;
# - a cell of bare numbers (a perplexity, a loss; no interval) is reproduced when each number moved
#   by at most `--rtol` (5 %: two CPUs differ by about 1 % on the demo's pretraining numbers).

# %%
#| export
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")
INTERVAL = re.compile(rf"^\s*({NUMBER.pattern}) \[({NUMBER.pattern}), ({NUMBER.pattern})\]")
ABSOLUTE_F1 = re.compile(rf"\(F1 ({NUMBER.pattern}) vs ({NUMBER.pattern})")

def numbers(cell: str) -> list[float]:
    "The numbers in a table cell ('0.12 ± 0.03 (n=2)' -> [0.12, 0.03, 2.0])."
    return [float(n.replace(",", "")) for n in NUMBER.findall(cell)]

def interval(cell: str) -> tuple[float, float, float] | None:
    "(mean, low, high) of a 'mean [low, high] ...' cell, else None."
    m = INTERVAL.match(cell)
    return tuple(numbers(g)[0] for g in m.groups()) if m else None

def absolute_f1(cell: str) -> tuple[float, float] | None:
    "The (MAML, vanilla) F1 a relative-change cell carries, else None."
    m = ABSOLUTE_F1.search(cell)
    return (numbers(m.group(1))[0], numbers(m.group(2))[0]) if m else None


# %%
assert (numbers("0.120 ± 0.031 (n=2)") == [0.12, 0.031, 2.0] and numbers("2,704.1") == [2704.1]
        and numbers("missing") == [])
assert interval("-13.4 [-46.7, +31.6] (F1 0.052 vs 0.060)") == (-13.4, -46.7, 31.6) and interval("2704") is None
assert absolute_f1("n/a (F1 0.200 vs 0.000; base ≈ 0)") == (0.2, 0.0) and absolute_f1("0.41 [0.3, 0.5]") is None


# %%
#| export
def compare_cell(old: str, new: str, rtol: float) -> tuple[str, bool] | None:
    "None if equal; else how the cell changed and whether it counts as reproduced (by interval, absolute F1 or `rtol`)."
    if old == new: return None
    change = f"{old!r} -> {new!r}"
    if NEAR_ZERO_BASE in old + new and absolute_f1(old) and absolute_f1(new):
        moved = max(abs(b - a) for a, b in zip(absolute_f1(old), absolute_f1(new)))
        return (f"{change} ({NEAR_ZERO_BASE}: F1 moved {moved:.3f}{', reproduced' if moved <= NEAR_ZERO_F1 else ''})",
                moved <= NEAR_ZERO_F1)
    if interval(old) and interval(new):
        (_, low, high), (new_mean, new_low, new_high) = interval(old), interval(new)
        inside, overlap = low <= new_mean <= high, new_low <= high and low <= new_high
        how = "rerun inside the committed interval" if inside else "intervals overlap" if overlap else None
        return f"{change} ({how + ', reproduced' if how else 'intervals disjoint'})", how is not None
    a, b = numbers(old), numbers(new)
    if len(a) != len(b) or not a: return change, False
    worst = max(abs(y - x) / max(abs(x), 1e-12) for x, y in zip(a, b))
    return f"{change} ({100 * worst:.2g} %{', within tolerance' if worst <= rtol else ''})", worst <= rtol

def compare_tables(old_csv: str, new_csv: str, rtol: float) -> list[tuple[str, str, str, bool]]:
    "(row label, column, change, reproduced) of every cell that differs between two CSV tables."
    old, new = list(csv.reader(old_csv.splitlines())), list(csv.reader(new_csv.splitlines()))
    if not old or not new or old[0] != new[0] or len(old) != len(new):
        return [("(table)", "(shape)",
                 f"{len(old)} x {len(old[0]) if old else 0} -> {len(new)} x {len(new[0]) if new else 0}", False)]
    changes = []
    for row_old, row_new in zip(old[1:], new[1:]):
        for column, a, b in zip(old[0], row_old, row_new):
            change = compare_cell(a, b, rtol)
            if change: changes.append((" ".join(row_old[:2]), column, *change))
    return changes


# %%
assert compare_cell("2704", "2730", 0.05) == ("'2704' -> '2730' (0.96 %, within tolerance)", True)
assert (compare_cell("0.10", "0.20", 0.05) == ("'0.10' -> '0.20' (1e+02 %)", False)
        and compare_cell("x", "x", 0.05) is None)
_changes = compare_tables("model,ppl,f1\ndemo-maml,2704,0.10\n", "model,ppl,f1\ndemo-maml,2730,0.20\n", 0.05)
assert [(r, c, ok) for r, c, _, ok in _changes] == [("demo-maml 2704", "ppl", True), ("demo-maml 2704", "f1", False)]

# %% [markdown]
# The issue's own example: paper 1 Table 3 "seen full" went from −13.4 [−46.7, +31.6] to −0.4 [−34.9,
# +41.2] on another machine — 97 % apart as numbers, but the rerun lies inside the committed interval.
# A near-zero base is read by its F1: −100 → +75.9 % is a move of 0.007 F1.

# %%
assert compare_cell("-13.4 [-46.7, +31.6]", "-0.4 [-34.9, +41.2]", 0.05)[1]
assert compare_cell("+5.0 [+1.0, +9.0]", "+20.0 [+12.0, +30.0]", 0.05) == (
    "'+5.0 [+1.0, +9.0]' -> '+20.0 [+12.0, +30.0]' (intervals disjoint)", False)
assert "intervals overlap, reproduced" in compare_cell("+5.0 [+1.0, +9.0]", "+12.0 [+8.0, +16.0]", 0.05)[0]
_flagged = compare_cell(f"-100.0 [-100.0, -100.0] (F1 0.000 vs 0.004; {NEAR_ZERO_BASE})",
                        f"+75.9 [-100.0, +300.0] (F1 0.007 vs 0.004; {NEAR_ZERO_BASE})", 0.05)
assert _flagged[1] and f"{NEAR_ZERO_BASE}: F1 moved 0.007, reproduced" in _flagged[0]
assert not compare_cell(f"+0.0 (F1 0.010 vs 0.010; {NEAR_ZERO_BASE})", f"+900.0 (F1 0.100 vs 0.010; {NEAR_ZERO_BASE})",
                        0.05)[1]


# %%
#| export
def committed(path: Path, root: Path, ref: str = "HEAD") -> bytes | None:
    "A file's bytes as committed at `ref` (None if it was not)."
    proc = subprocess.run(["git", "show", f"{ref}:{path.relative_to(root).as_posix()}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None

def compare_outputs(root=".", rtol: float = 0.05, ref: str = "HEAD") -> tuple[list[str], int]:
    "Report lines on how figures/ and paper_tables/ differ from `ref`, and how many differences exceed `rtol`."
    root, lines, beyond = Path(root).resolve(), [], 0
    for path in sorted((root / "paper_tables").glob("*.csv")):
        before = committed(path, root, ref)
        changes = ([("(new file)", "", "", False)] if before is None
                   else compare_tables(before.decode(), path.read_text(), rtol))
        lines += [f"{path.name}: {row} | {column}: {change or 'not committed'}" for row, column, change, _ in changes]
        beyond += sum(not ok for *_, ok in changes)
    missing_now = (json.loads((root / "figures" / "missing.json").read_text())
                   if (root / "figures" / "missing.json").is_file() else {})
    missing_then = json.loads(committed(root / "figures" / "missing.json", root, ref) or b"{}")
    for path in sorted((root / "figures").glob("*.png")):
        if path.read_bytes() != committed(path, root, ref): lines.append(f"{path.name}: redrawn (pixels differ)")
        if missing_now.get(path.stem) != missing_then.get(path.stem):
            lines.append(f"{path.name}: missing notes {missing_then.get(path.stem)} -> {missing_now.get(path.stem)}")
            beyond += 1
    return lines, beyond


# %%
import tempfile

with tempfile.TemporaryDirectory() as _repo:
    _repo = Path(_repo)
    (_repo / "paper_tables").mkdir(); (_repo / "figures").mkdir()
    (_repo / "paper_tables" / "p1_table2_loss_paloma.csv").write_text("model,step,paloma\ndemo-maml,120,2704\n")
    (_repo / "figures" / "missing.json").write_text('{"p1_fig1_loss_paloma": []}')
    _git = lambda *a: subprocess.run(["git", *a], cwd=_repo, check=True, capture_output=True)
    _git("init", "-q"); _git("add", "."); _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outputs")
    assert compare_outputs(_repo) == ([], 0)
    (_repo / "paper_tables" / "p1_table2_loss_paloma.csv").write_text("model,step,paloma\ndemo-maml,120,2730\n")
    (_repo / "figures" / "missing.json").write_text('{"p1_fig1_loss_paloma": ["missing: demo-vanilla"]}')
    (_repo / "figures" / "p1_fig1_loss_paloma.png").write_bytes(b"png")
    _lines, _beyond = compare_outputs(_repo)
    assert _lines[0] == "p1_table2_loss_paloma.csv: demo-maml 120 | paloma: '2704' -> '2730' (0.96 %, within tolerance)"
    assert _beyond == 1 and "missing notes [] -> ['missing: demo-vanilla']" in _lines[-1]


# %%
#| export
def main(argv=None) -> int:
    "`python -m picomaml.devtools readme` regenerates README.md; `compare [--rtol R]` reports output changes."
    p = argparse.ArgumentParser(prog="python -m picomaml.devtools")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("readme", help="regenerate README.md from nbs/index.ipynb")
    c = commands.add_parser("compare",
                            help="how figures/ and paper_tables/ differ from the committed ones (reruns nothing)")
    c.add_argument("--rtol", type=float, default=0.05,
                   help="relative change of a number without an interval that still counts as reproduced")
    c.add_argument("--ref", default="HEAD", help="the git revision to compare with")
    args = p.parse_args(argv)
    if args.command == "readme":
        print(f"wrote {write_readme()}")
        return 0
    lines, beyond = compare_outputs(Path(__file__).resolve().parent.parent, args.rtol, args.ref)
    print("\n".join(lines) or f"figures/ and paper_tables/ are as committed at {args.ref}")
    print(f"{beyond} difference(s) not reproduced (by interval, by absolute F1 on a near-zero base, "
          f"else beyond {100 * args.rtol:g} %)")
    return 1 if beyond else 0

if __name__ == "__main__" and "__file__" in globals(): sys.exit(main())
