"""The artifact's own consistency: pins, notebook pairs, README, nbdev settings."""
import ast
import configparser
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest
from nbdev.clean import clean_nb

from picomaml.devtools import README_BANNER, environment_pins, notebook_markdown, requirement_pins
from picomaml.pipeline import scorecard_line

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_pins_equal_requirements():
    req = requirement_pins((ROOT / "requirements.txt").read_text().splitlines())
    assert environment_pins(ROOT / "environment.yml") == req
    assert req["torch"] == "2.13.0", "torch must stay pinned: an unpinned lightning pulls a CUDA build"


@pytest.mark.parametrize("py", sorted((ROOT / "nbs").glob("*.py")), ids=lambda p: p.name)
def test_notebook_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py.name} has no notebook: run `make sync`"
    src = [(c.cell_type, c.source) for c in jupytext.read(py).cells]
    nb = [(c.cell_type, c.source) for c in nbformat.read(ipynb, as_version=4).cells]
    assert src == nb, f"{py.name} and {ipynb.name} differ: run `make sync` (the .py is the one you edit)"


def test_readme_is_generated_from_index():
    expected = README_BANNER + notebook_markdown(ROOT / "nbs" / "index.ipynb")
    assert (ROOT / "README.md").read_text() == expected, "README.md is stale: run `make sync`"


def test_index_table_names_every_notebook():
    "The index's table of notebooks has a row for each notebook (its first cell names it in backquotes)."
    rows = [line for line in (ROOT / "nbs" / "index.py").read_text().splitlines() if line.startswith("# | `")]
    listed = {name for row in rows for name in row.split("|")[1].strip().strip("`").split("`, `")}
    assert listed == {p.stem for p in (ROOT / "nbs").glob("*.py")} - {"index"}


def test_nbdev_clean_keeps_the_papermill_parameters_tag():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    keep = cfg["DEFAULT"]["allowed_cell_metadata_keys"].split()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.cells[0].metadata = {"tags": ["parameters"], "scrolled": True}
    nb = nbformat.from_dict(nb)
    clean_nb(nb, allowed_cell_metadata_keys=keep)
    assert nb.cells[0].metadata == {"tags": ["parameters"]}


README_CELLS = [  # (a number the README quotes in backticks, the committed table, its row, its column)
    ("7.49", "p1_table2_loss_paloma", "demo-vanilla", "train loss: next-token CE (language modelling)"),
    ("7.79", "p1_table2_loss_paloma", "demo-maml", "train loss: next-token CE (language modelling)"),
    ("6.06", "p1_table2_loss_paloma", "demo-maml", "train loss: logged objective (the paper's)"),
    ("13125.83", "p1_table2_loss_paloma", "demo-maml", "Paloma ppl: per-document mean (the paper's)"),
    ("7296.94", "p1_table2_loss_paloma", "demo-vanilla", "Paloma ppl: per-document mean (the paper's)"),
    ("64.00", "p1_text_speedup", "demo", "speed-up on the logged objective (×, the paper's loss)"),
    ("not reached", "p1_text_speedup", "demo", "speed-up on the next-token loss (×, language modelling)"),
    ("0.030", "p1_text_episode_accuracy", "demo", "query accuracy of φ_T (the paper's)"),
    ("0.034", "p1_text_episode_accuracy", "demo", "query accuracy of φ_0"),
    ("0.032", "p1_text_episode_accuracy", "demo", "support accuracy of φ_T"),
    ("0.032", "p1_text_episode_accuracy", "demo", "support accuracy of φ_0"),
    ("0.000 [0.000, 0.000]", "p1_table7_head_only_f1", "vanilla_demo", "en_ewt"),
    ("0.000 [0.000, 0.000]", "p1_table7_head_only_f1", "maml_demo", "en_ewt"),
    ("-20.9 [-42.3, +4.6] (F1 0.072 vs 0.091)", "p1_table3_relative_f1_by_group", "demo (%)", "seen full"),
    ("+15.0 [-34.6, +85.0] (F1 0.058 vs 0.050)", "p1_table3_relative_f1_by_group", "demo (%)", "other full"),
]


def test_readme_quotes_the_committed_outputs():
    ("Every number the README quotes from a table is that table's committed cell, "
     "and its scorecard line is the committed one.")
    readme = (ROOT / "README.md").read_text()
    for quoted, table, row, column in README_CELLS:
        cells = pd.read_csv(ROOT / "paper_tables" / f"{table}.csv", dtype=str, keep_default_na=False)
        cell = cells.set_index(cells.columns[0]).loc[row, column]
        assert cell == quoted, (f"README quotes {quoted!r} for {table} [{row}, {column}], "
                                f"the committed table says {cell!r}")
        assert f"`{quoted}`" in readme, f"README no longer quotes `{quoted}` ({table}): update README_CELLS with it"
    oov = pd.read_csv(ROOT / "paper_tables" / "p2_table5_particles_oov.csv",
                      dtype=str).set_index("language")["OOV token rate"]
    assert f"gives {oov['Tagalog']} and {oov['Cebuano']} against" in readme
    assert f"> {scorecard_line(ROOT / 'paper_tables')}\n" in readme, \
        "README's scorecard line is not the committed scorecard's"


def test_no_function_takes_more_than_six_positional_parameters():
    "Issue 20: past six, a call reads as a row of unnamed values; the rest are keyword-only (`*`)."
    crowded = []
    for path in sorted((ROOT / "picomaml").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(names) > 6: crowded.append(f"{path.name}: {node.name}({', '.join(names)})")
    assert not crowded, crowded
