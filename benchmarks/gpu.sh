#!/usr/bin/env bash
# On a GPU machine: first the GPU test suite (tests/test_gpu.py, `pytest -m gpu`, issue 20),
# then benchmarks/gpu.py, the GPU benchmark of robust-meta (issue 13, item 4).
#
#   bash benchmarks/gpu.sh [--device cuda|cpu] [--tiny] [--out PATH] [--budget-s S] [--threads N]
#
# The tests run only with --device cuda (GPU_TESTS=0 skips them), within
# ${GPU_TESTS_LIMIT_S:-150} s (the benchmark's hard limit shrinks by what they took, so that the
# whole script fits one 600-s device call); their output goes to stderr and to ${GPU_TESTS_OUT:-the JSON's
# folder/gpu-tests.txt}. A failing test does not stop the benchmark (the exit code says it).
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

tests_rc=0
if [[ "$device" == cuda* && "${GPU_TESTS:-1}" == 1 ]]; then
    tests_out="${GPU_TESTS_OUT:-$(dirname "${out:-$repo/benchmarks/results-gpu.json}")/gpu-tests.txt}"
    echo "+ $py -m pytest -q -m gpu tests/test_gpu.py  (-> $tests_out)" >&2
    set +e
    timeout --kill-after=10 "${GPU_TESTS_LIMIT_S:-150}" "$py" -m pytest -q -m gpu tests/test_gpu.py \
        -p no:cacheprovider -rA 2>&1 | tee "$tests_out" >&2
    tests_rc=${PIPESTATUS[0]}
    set -e
    echo "[gpu.sh] GPU tests exit code: $tests_rc" >&2
fi

cmd=("$py" benchmarks/gpu.py --device "$device" ${args[@]+"${args[@]}"})
echo "+ ${cmd[*]}" >&2
bench_rc=0
hard_limit="${GPU_BENCH_HARD_LIMIT_S:-$(( 470 - SECONDS > 120 ? 470 - SECONDS : 120 ))}"
if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=10 "$hard_limit" "${cmd[@]}" || bench_rc=$?
else
    "${cmd[@]}" || bench_rc=$?
fi
if [[ $bench_rc -ne 0 ]]; then exit "$bench_rc"; fi
exit "$tests_rc"
