#!/usr/bin/env bash
# GPU check (the docstring of benchmarks/gpu_check.py says what it runs and measures): the paper path on a GPU node
# against the planner, at most 8 minutes; writes benchmarks/results-gpu.md. Arguments go to gpu_check.py:
# `bash benchmarks/gpu_check.sh --dry --out /tmp/check.md` runs the same code on CPU (benchmarks/test_gpu_check.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Every package the check imports, checked before anything runs: one line naming the missing ones and how to install them.
missing=$("$PY" - <<'PY'
import importlib.util
modules = {"torch": "torch", "lightning": "lightning", "torchcrf": "pytorch-crf", "seqeval": "seqeval", "numpy": "numpy",
           "pandas": "pandas", "datasets": "datasets", "huggingface_hub": "huggingface_hub", "tokenizers": "tokenizers",
           "safetensors": "safetensors", "pyarrow": "pyarrow", "yaml": "PyYAML", "tqdm": "tqdm", "fastcore": "fastcore",
           "papermill": "papermill"}
print(" ".join(package for module, package in modules.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  echo "error: $PY lacks the Python packages: $missing; install the pinned ones with \`$PY -m pip install -r requirements.txt\` (or \`make venv\`, which the check then uses)" >&2
  exit 2
fi
# --budget: no run starts after 450 s; timeout: a hard stop at 8 minutes.
exec timeout 480 "$PY" benchmarks/gpu_check.py --budget 450 "$@"
