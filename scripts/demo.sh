#!/usr/bin/env bash
# Fresh machine -> trained and evaluated MAML vs R-MAML_out on the embedded digits dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo needs neither the test nor the docs tools.
EXTRAS=${EXTRAS:-demo} DOCS=${DOCS:-0} bash scripts/setup.sh
exec "${VENV:-.venv}/bin/robust-meta" demo --out "${OUT:-runs/demo}" "$@"
