"""The example notebooks: stored clean, and executed end to end in their small setting.

Execution uses nbclient with the ``python3`` kernel of the current interpreter (ipykernel in
the same virtual environment; the interpreter's folder is put first on ``PATH`` so that the
kernelspec's ``python`` is this one, also when the venv is not activated, as in
``scripts/test.sh``). Each notebook honours ``ROBUST_META_SMALL=1``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
EXPECTED = {"quickstart.ipynb", "torchmeta_loop.ipynb", "interpretability.ipynb"}
TIME_LIMIT_S = 120  # per notebook in CI's small setting (target: < 40 s)


def _nbformat():
    if importlib.util.find_spec("nbformat") is None:
        pytest.skip('nbformat not installed: pip install -e ".[test]"')
    import nbformat

    return nbformat


def test_expected_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path: Path):
    """nbformat v4, valid, kernel python3, no outputs or execution counts, a small-setting switch."""
    nbformat = _nbformat()
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: stored with outputs"
    # The first code cell holds the parameters, including the CI switch.
    assert "ROBUST_META_SMALL" in code[0].source


def _kernel_ready() -> str | None:
    """Why the python3 kernel cannot run here, or None."""
    for mod in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(mod) is None:
            return f'{mod} not installed: pip install -e ".[test]"'
    return None


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path, monkeypatch):
    reason = _kernel_ready()
    if reason:
        pytest.skip(reason)
    if "torchmeta" in path.read_text(encoding="utf-8") and importlib.util.find_spec("torchmeta") is None:
        pytest.skip("torchmeta is not installed (pip install --no-deps torchmeta==1.8.0)")
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("ROBUST_META_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is one more process on a shared CPU
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0] if os.path.isabs(spec.argv[0]) else shutil.which(spec.argv[0])
    # The kernel must be this interpreter (same venv), not some other python on PATH.
    assert exe is not None and Path(exe).parent == Path(sys.executable).parent or \
        Path(exe or "").resolve() == Path(sys.executable).resolve(), (spec.argv, exe, sys.executable)

    work = tmp_path / path.name
    shutil.copy(path, work)  # files the notebook writes (plots) land in tmp_path
    nb = nbformat.read(work, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=TIME_LIMIT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    print(f"{path.name}: executed in {elapsed:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert elapsed < TIME_LIMIT_S, f"{path.name} took {elapsed:.0f} s in the small setting"
    # The notebook left its figures where it ran.
    if path.name == "quickstart.ipynb":
        assert (tmp_path / "ra_vs_eps.png").stat().st_size > 0
    if path.name == "interpretability.ipynb":
        assert (tmp_path / "iam.png").stat().st_size > 0
