#!/usr/bin/env bash
# Create ./.venv (or $VENV) with robust-meta and everything the demo, tests and docs need.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# torch/torchvision: a pair that works together (torchattacks and torchmeta need torchvision).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-"demo,test,docs"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC (large download on a machine without a local copy)"
  # shellcheck disable=SC2086
  pip_ $TORCH_SPEC
fi
echo "[setup] installing robust-meta[$EXTRAS]"
pip_ -e ".[$EXTRAS]"
# torchmeta 1.8.0's metadata pins torch<1.10, so it is installed without its pins;
# robust_meta.compat.torchmeta makes it import and run on a modern stack.
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torchmeta')" 2>/dev/null; then
  echo "[setup] installing torchmeta 1.8.0 (--no-deps) and its runtime needs"
  pip_ --no-deps torchmeta==1.8.0
fi
pip_ -e ".[torchmeta]"
echo "[setup] done: $("$VENV/bin/python" -c 'import robust_meta, torch; print("robust-meta", robust_meta.__version__, "torch", torch.__version__)')"
