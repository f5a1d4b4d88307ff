#!/usr/bin/env bash
# Fresh machine -> the full test suite (CPU, no network), then the docs site build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VPY="${VENV:-.venv}/bin/python"
"$VPY" -m pytest -q -n 2 "$@"
