#!/usr/bin/env bash
# Run benchmarks/gpu.py, the GPU benchmark of robust-meta (issue 13, item 4).
#
#   bash benchmarks/gpu.sh [--device cuda|cpu] [--tiny] [--out PATH] [--budget-s S] [--threads N]
#
# Uses ${VENV:-.venv}/bin/python (relative to the repository root) when it exists, else
# python3. Defaults: --device cuda, --out benchmarks/results-gpu.json (with --tiny:
# /tmp/robust-meta-gpu-tiny.json). The script itself skips what is left once its budget
# (420 s; 100 s with --tiny) is spent; as a last resort this wrapper stops it after
# ${GPU_BENCH_HARD_LIMIT_S:-470} s (the JSON keeps every section finished by then).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

device="cuda"
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --out|--out=*)
            if [[ "$1" == --out ]]; then out="$2"; shift 2; else out="${1#*=}"; shift; fi
            [[ "$out" == /* ]] || out="$PWD/$out"  # relative to where the wrapper was called
            args+=(--out "$out") ;;
        *) args+=("$1"); shift ;;
    esac
done

cd "$repo"
venv="${VENV:-.venv}"
if [[ -x "$venv/bin/python" ]]; then
    py="$venv/bin/python"
else
    py="python3"
fi

cmd=("$py" benchmarks/gpu.py --device "$device" ${args[@]+"${args[@]}"})
echo "+ ${cmd[*]}" >&2
if command -v timeout >/dev/null 2>&1; then
    exec timeout --kill-after=10 "${GPU_BENCH_HARD_LIMIT_S:-470}" "${cmd[@]}"
fi
exec "${cmd[@]}"
