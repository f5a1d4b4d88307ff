"""Packaging contracts: the CLI's help renders, the dependency policy of pyproject.toml holds.

(scripts/check_wheel.sh, run by CI, builds and installs the real wheel.)
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["eval"], ["plot"], ["presets"], ["reproduce"]])
def test_every_help_page_renders(command):
    run = subprocess.run([sys.executable, "-m", "robust_meta", *command, "--help"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "usage: robust-meta" in run.stdout
    assert "%%" not in run.stdout  # argparse formats help= strings, not description=


def _name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower()


def test_core_dependencies_are_small_and_torchattacks_is_an_extra():
    core = {_name(d) for d in PYPROJECT["dependencies"]}
    assert core == {"torch", "tqdm", "numpy", "tomli"}
    extras = PYPROJECT["optional-dependencies"]
    assert {_name(d) for d in extras["torchattacks"]} == {"torchattacks"}
    assert {"demo", "docs", "omniglot", "test", "torchmeta"} <= set(extras)
    assert not any("torchattacks" in _name(d) for name, deps in extras.items() if name != "torchattacks" for d in deps)


def test_no_upper_pins():
    specs = list(PYPROJECT["dependencies"]) + [d for deps in PYPROJECT["optional-dependencies"].values() for d in deps]
    for spec in specs:
        version = spec.split(";")[0]
        assert not re.search(r"<|~=|==", version), f"upper pin in {spec!r}"
