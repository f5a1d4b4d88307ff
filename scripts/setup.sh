#!/usr/bin/env bash
# Create ./.venv (or $VENV) with robust-meta and everything the demo, tests and docs need.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# torch/torchvision: a pair that works together (torchattacks and torchmeta need torchvision).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-"demo,test,torchmeta"}
DOCS=${DOCS:-1}

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
# torchmeta 1.8.0's metadata pins torch<1.10, so it is installed without its pins;
# robust_meta.compat.torchmeta makes it import and run on a modern stack.
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torchmeta')" 2>/dev/null; then
  echo "[setup] installing torchmeta 1.8.0 (--no-deps)"
  pip_ --no-deps torchmeta==1.8.0
fi
echo "[setup] installing robust-meta[$EXTRAS]"
pip_ -e ".[$EXTRAS]"
if [ "$DOCS" = 1 ]; then
  # mkdocs-material needs requests>=2.26 while torchattacks pins requests~=2.25.1, so one
  # resolver run cannot hold both. torchattacks never imports requests: install the docs
  # tools on their own and let pip warn about the pin (see README, "Install").
  echo "[setup] installing the docs tools (pip will warn about torchattacks' requests pin)"
  pip_ "mkdocs-material>=9" "mkdocstrings[python]>=0.24"
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import robust_meta, torch; print("robust-meta", robust_meta.__version__, "torch", torch.__version__)')"
