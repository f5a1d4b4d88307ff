#!/usr/bin/env bash
# Create ./.venv (or $VENV) with robust-meta and what the demo, tests and docs need.
# Idempotent: a second run only checks what is there.
#   EXTRAS=demo DOCS=0 TORCHATTACKS=0 bash scripts/setup.sh   # what scripts/demo.sh uses
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# torch/torchvision: a pair that works together (torchmeta needs torchvision).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS:-"demo,test,torchmeta,omniglot"}
DOCS=${DOCS:-1}
# 1: also install the optional torchattacks bridge (see install_torchattacks below).
TORCHATTACKS=${TORCHATTACKS:-0}
# 1: also install learn2learn 0.2.0 (rebuilt for Python >= 3.11: scripts/install_learn2learn.sh).
LEARN2LEARN=${LEARN2LEARN:-0}

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
if [[ ",$EXTRAS," == *",torchmeta,"* ]] && ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('torchmeta')" 2>/dev/null; then
  echo "[setup] installing torchmeta 1.8.0 (--no-deps)"
  pip_ --no-deps torchmeta==1.8.0
fi
if [ "$DOCS" = 1 ]; then EXTRAS="$EXTRAS,docs"; fi
echo "[setup] installing robust-meta[$EXTRAS]"
pip_ -e ".[$EXTRAS]"
if [ "$TORCHATTACKS" = 1 ]; then
  # torchattacks declares requests~=2.25.1 but never imports requests: installing it without
  # its pins (plus what it does import) keeps this environment's current, patched requests.
  echo "[setup] installing torchattacks (--no-deps, keeping requests $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("requests"))' 2>/dev/null || echo 'absent'))"
  pip_ --no-deps "torchattacks>=3.5"
  pip_ scipy
fi
if [ "$LEARN2LEARN" = 1 ]; then
  VENV="$VENV" bash scripts/install_learn2learn.sh
fi
echo "[setup] done: $("$VENV/bin/python" -c 'import robust_meta, torch; print("robust-meta", robust_meta.__version__, "torch", torch.__version__)')"
