"""The artifact's own consistency: pins, notebook pairs, README, nbdev settings."""
import configparser
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbdev.clean import clean_nb

from picomaml.devtools import README_BANNER, environment_pins, notebook_markdown, requirement_pins

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


def test_nbdev_clean_keeps_the_papermill_parameters_tag():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    keep = cfg["DEFAULT"]["allowed_cell_metadata_keys"].split()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.cells[0].metadata = {"tags": ["parameters"], "scrolled": True}
    nb = nbformat.from_dict(nb)
    clean_nb(nb, allowed_cell_metadata_keys=keep)
    assert nb.cells[0].metadata == {"tags": ["parameters"]}
