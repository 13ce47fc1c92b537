# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

# Local data: ../shared/data beside the clone when present (CI, this machine), else the Hub.
ifeq ($(origin PICOMAML_DATA), undefined)
  ifneq ($(wildcard ../shared/data),)
    export PICOMAML_DATA := $(abspath ../shared/data)
  endif
endif

.PHONY: venv export sync check test demo compare rehearse paper released docs help
help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements.txt setup.py settings.ini
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(VENV)/.installed ## create .venv with the pinned requirements and the package (editable)

export: venv ## nbs/*.ipynb -> picomaml/
	$(BIN)/nbdev_export

sync: venv ## after editing nbs/*.py: update the notebooks, clean them, export, rebuild README.md
	for f in nbs/*.py; do $(BIN)/jupytext --quiet --to ipynb --update "$$f"; done
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(BIN)/python -m picomaml.devtools readme

# Fails when nbdev_clean, nbdev_export or the README generator would change a file (it leaves the
# regenerated files in place, so `git diff` shows what was stale), or when ruff finds unused imports,
# undefined names, imports out of order or code lines over 120 characters, or when an exported module
# imports a name it never uses. `ruff check --fix .` fixes most;
# in a notebook it edits the .ipynb, so then refresh its pair: `jupytext --to py:percent nbs/X.ipynb`.
check: venv ## notebooks clean, package and README in sync with the notebooks, and the linter (ruff.toml) clean
	@snapshot() { find nbs picomaml README.md -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha256sum; }; \
	before=$$(snapshot); \
	$(BIN)/nbdev_clean; $(BIN)/nbdev_export; $(BIN)/python -m picomaml.devtools readme >/dev/null; \
	after=$$(snapshot); \
	if [ "$$before" != "$$after" ]; then \
	  echo "ERROR: notebooks were not clean, or picomaml/ or README.md were stale:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^>' | awk '{print "  " $$3}'; \
	  echo "They have been regenerated in place: review with git diff and commit."; exit 1; fi; \
	echo "notebooks clean; picomaml/ and README.md in sync"
	$(BIN)/ruff check --quiet . && echo "ruff: clean"
	$(BIN)/ruff check --quiet --select F401 picomaml && echo "picomaml/: no unused imports (a name only a test cell needs is imported there)"

# pytest runs on NPROC workers (pytest-xdist, a test file per work unit; tests/conftest.py orders the files)
# and names its slowest tests; the three stages' wall times go to runs/timings-test.json
# (`python benchmarks/run.py --stages-only` copies them and the demo's into benchmarks/results-cpu.md).
test: venv ## the whole test suite (what CI runs)
	start=$$SECONDS; $(MAKE) --no-print-directory check; check=$$((SECONDS - start)); \
	HF_HUB_OFFLINE=1 $(BIN)/nbdev_test --n_workers $(NPROC); notebooks=$$((SECONDS - start - check)); \
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(NPROC) --dist loadfile --no-loadscope-reorder --durations 15 tests benchmarks; \
	mkdir -p runs; printf '{"check": %d, "notebooks (nbdev_test)": %d, "pytest": %d}\n' \
	  $$check $$notebooks $$((SECONDS - start - check - notebooks)) > runs/timings-test.json

demo: export ## the main job: prepare data, pretrain both demo arms (2 CPU processes), NER sweep, every table and figure
	$(BIN)/python -m picomaml.pipeline demo

compare: venv ## how the regenerated figures/ and paper_tables/ differ from the committed ones, cell by cell (reruns nothing)
	$(BIN)/python -m picomaml.devtools compare

rehearse: export ## the paper profile end to end under the rehearsal's shrink transform, on CPU (outputs under runs/rehearse)
	$(BIN)/python -m picomaml.pipeline rehearse

paper: export ## the papers' scale on one node of 4 GPUs (both arms x 4 sizes, the NER grids, the notebooks)
	$(BIN)/python -m picomaml.pipeline paper --nproc 4

released: export ## both papers' NER grids and notebooks over the authors' released checkpoints (Hub), on this machine's GPUs
	$(BIN)/python -m picomaml.pipeline released

# DOCS_PROFILE=smoke shows 21-24 on the smoke runs (python -m picomaml.pipeline smoke) instead of the demo's.
DOCS_PROFILE ?= demo
docs: export ## the documentation site in _docs/: every notebook executed (21-24 on `make demo`'s runs), rendered with the API
	HF_HUB_OFFLINE=1 $(BIN)/python docs/build.py --profile $(DOCS_PROFILE) --jobs $(NPROC)
