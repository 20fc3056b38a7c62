#!/usr/bin/env bash
# Compile every Triton launch of fastgrad for the GPU targets (python -m fastgrad.kernels.aot) with
# each Triton version the project supports: the one installed for the tests (the newest allowed by
# pyproject.toml) and 3.6, the Triton of the GPU machines this work may be lent (no network there).
# With 3.6 also check, under its interpreter, that tl.randint is the contract's Philox stream.
# Triton 3.6 lives in its own venv (it sees the system site-packages: torch, fastgrad), cached
# outside the clone so that a second run on the same machine reuses it. Exits nonzero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

old_triton=3.6.0
venv=${FASTGRAD_TRITON_VENV:-$HOME/.cache/fastgrad-ci/triton-$old_triton}
results=${FASTGRAD_COMPILE_RESULTS:-$(mktemp -d)}

SECONDS=0
python -m fastgrad.kernels.aot --csv "$results/kernels-compile-ci.csv"
echo "== compiled with the CI Triton in ${SECONDS}s"

if ! "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$old_triton')" 2>/dev/null; then
  rm -rf "$venv"
  python -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install --quiet "triton==$old_triton"
fi
SECONDS=0
"$venv/bin/python" -m fastgrad.kernels.aot --csv "$results/kernels-compile-$old_triton.csv"
TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q tests/test_random_stream.py
echo "== compiled with Triton $old_triton in ${SECONDS}s; results in $results"
