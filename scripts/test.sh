#!/usr/bin/env bash
# Fresh machine -> the full test suite (CPU, no network but the package registries): once
# without the optional torchattacks extra (every core path must work without it), then the
# torchattacks tests with it installed. learn2learn 0.2.0 is installed for real (rebuilt for
# Python >= 3.11, scripts/install_learn2learn.sh) so that its tests run. Extra pytest
# arguments apply to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY="${VENV:-.venv}/bin/python"
TORCHATTACKS=0 LEARN2LEARN=1 bash scripts/setup.sh
if "$VPY" -c "import torchattacks" 2>/dev/null; then
  echo "[test] removing torchattacks for the run without it"
  "$VPY" -m pip uninstall -q -y torchattacks
fi
echo "[test] 1/2: the whole suite without torchattacks"
"$VPY" -m pytest -q -n 2 "$@"
TORCHATTACKS=1 LEARN2LEARN=1 EXTRAS="${EXTRAS:-demo,test,torchmeta,omniglot}" bash scripts/setup.sh
echo "[test] 2/2: the torchattacks bridge (tests marked 'torchattacks')"
"$VPY" -m pytest -q -n 2 -m torchattacks "$@"
