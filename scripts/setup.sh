#!/usr/bin/env bash
# Create .venv and install psc into it. torch is installed first and pinned, so that
# pip never resolves a newer torch (which would pull several GB of CUDA wheels on a
# CPU machine); PSC_TORCH overrides the pin (e.g. a CUDA build on a GPU server).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PSC_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test]"
