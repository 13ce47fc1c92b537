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

.PHONY: venv export sync check test demo data help
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
# regenerated files in place, so `git diff` shows what was stale).
check: venv ## notebooks clean, package and README in sync with the notebooks
	@snapshot() { find nbs picomaml README.md -type f -not -path '*/__pycache__/*' -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha256sum; }; \
	before=$$(snapshot); \
	$(BIN)/nbdev_clean; $(BIN)/nbdev_export; $(BIN)/python -m picomaml.devtools readme >/dev/null; \
	after=$$(snapshot); \
	if [ "$$before" != "$$after" ]; then \
	  echo "ERROR: notebooks were not clean, or picomaml/ or README.md were stale:"; \
	  diff <(echo "$$before") <(echo "$$after") | grep '^>' | awk '{print "  " $$3}'; \
	  echo "They have been regenerated in place: review with git diff and commit."; exit 1; fi; \
	echo "notebooks clean; picomaml/ and README.md in sync"

test: check ## the whole test suite (what CI runs)
	HF_HUB_OFFLINE=1 $(BIN)/nbdev_test --n_workers $(NPROC)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

data: export ## pretokenize the local corpus into data/pretokenized/{train,eval}
	@test -n "$${PICOMAML_DATA:-}" || { echo "PICOMAML_DATA is not set and ../shared/data is missing: set it to a directory with corpus/ and tokenizer/ (see README), or point data.train_path at Hub shards"; exit 1; }
	@test -f data/pretokenized/train/manifest.json || $(BIN)/python -m picomaml.data prepare --src $$PICOMAML_DATA/corpus/train --out data/pretokenized/train --seq-len 128
	@test -f data/pretokenized/eval/manifest.json || $(BIN)/python -m picomaml.data prepare --src $$PICOMAML_DATA/corpus/eval --out data/pretokenized/eval --seq-len 128

demo: data ## prepare data and run the CPU demo
	$(BIN)/python -m picomaml.launch --config configs/demo.yaml
