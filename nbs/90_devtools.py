# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Developer tools
#
# > README generation without Quarto, and the checks that keep the artifact's files in step.
#
# nbdev renders `nbs/index.ipynb` into README.md through Quarto, which cannot be installed on the
# machines this project is built on (toolchain.md). The README is plain Markdown anyway, so we render
# it ourselves: markdown cells as they are, code cells as fenced Python, text outputs as fenced text.
# `make test` regenerates it and fails when the committed README differs.

# %%
#| default_exp devtools

# %%
#| export
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import yaml

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
README_BANNER = "<!-- Generated from nbs/index.ipynb by `python -m picomaml.devtools readme`; edit the notebook, not this file. -->\n\n"

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
assert requirement_pins(["torch==2.13.0  # the CPU wheel here", "", "# c", "PyYAML==6.0.3"]) == {"torch": "2.13.0", "pyyaml": "6.0.3"}
try: requirement_pins(["lightning>=2"]); raise AssertionError
except ValueError as e: assert "lightning>=2" in str(e)

# %%
#| export
def main(argv=None):
    "`python -m picomaml.devtools readme` regenerates README.md."
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["readme"]: raise SystemExit("usage: python -m picomaml.devtools readme")
    print(f"wrote {write_readme()}")

if __name__ == "__main__" and "__file__" in globals(): main()
