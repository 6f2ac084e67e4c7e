#!/usr/bin/env bash
# Create (or refresh) the project virtualenv in .venv and install nanoseek into it, editable, with
# the test extras. Safe to run again: an existing .venv is reused and satisfied packages are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install --quiet --upgrade pip

# Install torch first and explicitly, so that `pip install -e .` below finds it satisfied and never
# pulls a multi-GB CUDA build onto a machine that has no NVIDIA GPU.
if .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing torch (CUDA build)"
    "${PIP[@]}" install --quiet "torch>=2.5"
else
    # CPU-only machine. On this project's machines the CPU wheel of torch 2.13.0 lies on disk and
    # pip's configured find-links picks it up. Elsewhere, point pip at PyTorch's CPU index first:
    #   export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
    echo "setup: no NVIDIA GPU, installing the CPU build of torch"
    "${PIP[@]}" install --quiet "torch==2.13.0"
fi

echo "setup: installing nanoseek (editable) with test extras"
"${PIP[@]}" install --quiet -e ".[test]"
echo "setup: done -> .venv/bin/nanoseek"
