#!/usr/bin/env bash
# GPU check of issue 11 (the docstring of benchmarks/gpu_check.py says what it measures): every Pico size
# on one GPU in bf16, eager and with torch.compile, at most 8 minutes; writes benchmarks/results-gpu.md.
# Arguments go to gpu_check.py: `bash benchmarks/gpu_check.sh --dry --out /tmp/check.md` runs the same
# code on CPU with tiny shapes (benchmarks/test_gpu_check.py does).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# picomaml.data imports picomaml.tokenizer, which needs fastcore; a bare GPU image may lack it: install
# the wheels carried in .whl/ (pip download --no-deps fastcore==1.14.5 -d .whl, on a machine with network).
if ! "$PY" -c "import fastcore" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
  else
    echo "error: the Python package fastcore is missing: carry its wheel in .whl/ (pip download --no-deps fastcore==1.14.5 -d .whl)" >&2
    exit 2
  fi
fi
# --budget: no run starts after 450 s and each is stopped by then; timeout: a hard stop at 8 minutes.
exec timeout 480 "$PY" benchmarks/gpu_check.py --budget 450 "$@"
