#!/usr/bin/env bash
# The wheel is what users get: build sdist + wheel, `twine check` them, install the wheel into a
# fresh venv that already holds a patched requests (>= 2.33), check that nothing downgraded it
# and that `pip check` is clean, then smoke-test the installed package from outside the source
# tree: the three-line wrap with PGD and FGSM, `robust-meta --help`, `robust-meta demo --quick`.
#   bash scripts/check_wheel.sh            (WORK=dir to keep the venvs; WHEEL_TORCH=spec)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
# The CPU build of torch is enough for the smoke test (and small); any torch>=2.1 works.
WHEEL_TORCH=${WHEEL_TORCH:-torch==2.13.0}
pip_() { "$1/bin/python" -m pip install --disable-pip-version-check -q "${@:2}"; }

echo "[wheel] building sdist and wheel in $WORK"
"$PY" -m venv "$WORK/build-venv"
pip_ "$WORK/build-venv" build twine
rm -rf "$WORK/dist"
"$WORK/build-venv/bin/python" -m build --sdist --wheel --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log"; exit 1; }
"$WORK/build-venv/bin/python" -m twine check --strict "$WORK"/dist/*
WHEEL=$(ls "$WORK"/dist/robust_meta-*.whl)
# The wheel ships the package and nothing else (no tests, benchmarks, docs).
"$WORK/build-venv/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if not (n.startswith("robust_meta/") or ".dist-info/" in n)]
assert not bad, f"unexpected files in the wheel: {bad[:10]}"
assert "robust_meta/py.typed" in names, "py.typed missing"
print(f"[wheel] {len(names)} files, robust_meta/ and dist-info only")
PY

echo "[wheel] fresh venv with requests>=2.33, then the wheel"
V="$WORK/user-venv"
rm -rf "$V"
"$PY" -m venv "$V"
pip_ "$V" "requests>=2.33" $WHEEL_TORCH
BEFORE=$("$V/bin/python" -c 'import importlib.metadata as m; print(m.version("requests"))')
pip_ "$V" "$WHEEL"
"$V/bin/python" -m pip check
pip_ "$V" "$WHEEL[demo,omniglot,docs]"
AFTER=$("$V/bin/python" -c 'import importlib.metadata as m; print(m.version("requests"))')
echo "[wheel] requests before: $BEFORE, after installing robust-meta[demo,omniglot,docs]: $AFTER"
[ "$BEFORE" = "$AFTER" ] || { echo "[wheel] FAIL: installing robust-meta changed requests"; exit 1; }
"$V/bin/python" -m pip check

echo "[wheel] smoke test from outside the source tree"
cd "$WORK"
"$V/bin/python" - <<'PY'
import sys
import torch, torch.nn.functional as F
from torch import nn
import robust_meta
from robust_meta import RobustMetaUpdate, adapt

assert robust_meta.__file__.startswith(sys.prefix), robust_meta.__file__  # the installed wheel
for mod in ("torchattacks", "scipy", "matplotlib", "sklearn", "torchmeta"):
    assert mod not in sys.modules, f"import robust_meta loaded {mod}"
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
opt = torch.optim.Adam(model.parameters(), 1e-3)
for attack in ("pgd", "fgsm"):
    robust_loss = RobustMetaUpdate(F.cross_entropy, model, attack=attack, eps=2 / 255, gamma_out=0.2)
    outer = 0.0
    for _ in range(2):
        sx, sy = torch.rand(3, 1, 8, 8), torch.arange(3)
        qx, qy = torch.rand(6, 1, 8, 8), torch.arange(3).repeat(2)
        params = adapt(model, sx, sy, steps=2, step_size=0.1)
        outer += robust_loss(qx, qy, params=params)
    (outer / 2).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step(); opt.zero_grad()
    print(f"[wheel] three-line wrap with {attack}: outer loss {float(outer) / 2:.4f}, {robust_loss.last.as_dict()}")
try:
    robust_meta.perturb("apgd", model, torch.rand(2, 1, 8, 8), torch.arange(2), eps=0.1)
except ImportError as err:
    assert "robust-meta[torchattacks]" in str(err), err
    print("[wheel] 'apgd' without the extra: ImportError naming robust-meta[torchattacks]")
else:
    raise AssertionError("'apgd' ran without torchattacks installed")
PY
"$V/bin/robust-meta" --help > /dev/null
echo "[wheel] robust-meta --help: ok"
"$V/bin/robust-meta" demo --quick --out "$WORK/demo" > "$WORK/demo.log" 2>&1 || { cat "$WORK/demo.log"; exit 1; }
test -s "$WORK/demo/results.json" && test -s "$WORK/demo/ra_vs_eps.png"
tail -n 6 "$WORK/demo.log"
echo "[wheel] ok: wheel installs, requests stays $AFTER, pip check clean, smoke test passed"
