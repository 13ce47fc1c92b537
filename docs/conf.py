# Sphinx configuration of the documentation site (`make docs`; docs/build.py assembles the sources).
# The sources are the executed notebooks (MyST-NB renders them, outputs included; it never executes
# them itself), an API page per module (autodoc, from the docstrings) and the Markdown pages of docs/.
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_settings = configparser.ConfigParser()
_settings.read(ROOT / "settings.ini")
_meta = _settings["DEFAULT"]

project = _meta["title"]
author = _meta["author"]
copyright = _meta["copyright"]
release = version = _meta["version"]

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx-mathjax-offline"]  # math without a CDN
exclude_patterns = ["_outputs", "**.ipynb_checkpoints", "jupyter_execute"]

# notebooks arrive executed (execnb with nbdev_test's flags, papermill for 21-24): never run them here
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "remove"  # progress bars and warnings on stderr are not documentation
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

autodoc_member_order = "bysource"  # the order of the notebook
autodoc_default_options = {"members": True, "undoc-members": True, "no-value": True}
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # torch.autograd.Function.forward's docstring is not ours

html_theme = "furo"
html_title = f"{project} {version}"
html_static_path = []
html_show_sourcelink = False
html_copy_source = False
