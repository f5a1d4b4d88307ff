"""Every ```python block of README.md and docs/*.md runs; the docs site builds with --strict.

Each block is executed on its own, in a fresh namespace pre-filled with the small objects the
prose assumes (``model``, ``dataloader``, ``task_batches``, ``meta_optimizer``, support/query
tensors, ...), like TorchJD's ``tests/doc``. A block opts out only with an explicit marker on
the line right before its fence::

    <!-- no-test: reason -->

used for shell-only or GPU-only snippets. Blocks that mention torchmeta get a torchmeta
``MetaModule`` as ``model`` and torchmeta-style batch dicts as ``dataloader``; the others a
plain ``nn.Module``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")
NO_TEST = re.compile(r"<!--\s*no-test:\s*(?P<reason>[^>]*?)\s*-->")

WAYS, SHOTS, QUERIES, TASKS_PER_BATCH, SIZE = 3, 1, 2, 2, 16


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """All fenced code blocks of a Markdown file, with their opt-out marker if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        lang = info.split()[0].lower().lstrip("{.").rstrip("}") if info else ""
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = NO_TEST.search(lines[prev]) if prev >= 0 else None
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n",
                            marker["reason"] if marker else None))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.exists()]


def python_blocks() -> list[Block]:
    return [b for f in doc_files() for b in extract_blocks(f) if b.lang in ("python", "py", "python3")]


# --------------------------------------------------------------------------- the namespace
class TinyNet(nn.Module):
    """A small conv net with the library's conventions: ``features`` body, ``classifier`` head."""

    def __init__(self, in_channels: int = 1, n_classes: int = WAYS, hidden: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(hidden, n_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, f):
        return self.classifier(f)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def meta_tiny_net(in_channels: int = 1, n_classes: int = WAYS, hidden: int = 8) -> nn.Module:
    """The same net as a torchmeta MetaModule (``features`` + ``classifier``)."""
    from robust_meta.compat.torchmeta import patch_torchmeta

    tm = patch_torchmeta()  # before any torchmeta import
    MetaBatchNorm2d, MetaConv2d, MetaLinear = tm.modules.MetaBatchNorm2d, tm.modules.MetaConv2d, tm.modules.MetaLinear
    MetaModule, MetaSequential = tm.modules.MetaModule, tm.modules.MetaSequential

    class MetaTinyNet(MetaModule):
        def __init__(self):
            super().__init__()
            self.features = MetaSequential(
                MetaConv2d(in_channels, hidden, 3, padding=1), MetaBatchNorm2d(hidden), nn.ReLU(),
                nn.MaxPool2d(2),
                MetaConv2d(hidden, hidden, 3, padding=1), MetaBatchNorm2d(hidden), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.classifier = MetaLinear(hidden, n_classes)

        def forward_features(self, x, params=None):
            return self.features(x, params=self.get_subdict(params, "features"))

        def forward_head(self, f, params=None):
            return self.classifier(f, params=self.get_subdict(params, "classifier"))

        def forward(self, x, params=None):
            return self.forward_head(self.forward_features(x, params), params)

    return MetaTinyNet()


class _StandInMAML(nn.Module):
    """Minimal stand-in for ``learn2learn.algorithms.MAML`` (used only if learn2learn is absent).

    Like learn2learn, ``clone()`` returns a module whose parameters are graph-connected copies
    of the meta-parameters, and ``adapt(loss)`` replaces them in place by ``p - lr * grad``.
    """

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False):
        super().__init__()
        self.module, self.lr, self.first_order = model, lr, first_order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @staticmethod
    def _slots(module: nn.Module):
        for sub in module.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    yield sub, name, p

    def clone(self) -> _StandInMAML:
        import copy

        twin = copy.deepcopy(self.module)
        for (sub, name, _), (_, _, p) in zip(list(self._slots(twin)), list(self._slots(self.module))):
            sub._parameters[name] = p.clone()  # non-leaf: gradients flow back to the original
        return _StandInMAML(twin, self.lr, self.first_order)

    def adapt(self, loss: torch.Tensor) -> None:
        slots = list(self._slots(self.module))
        grads = torch.autograd.grad(loss, [p for _, _, p in slots],
                                    create_graph=not self.first_order, allow_unused=True)
        for (sub, name, p), g in zip(slots, grads):
            if g is not None:
                sub._parameters[name] = p - self.lr * g


def _learn2learn_stand_in():
    import types

    mod = types.ModuleType("learn2learn")
    mod.algorithms = types.SimpleNamespace(MAML=_StandInMAML)
    return mod


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE)


def _labels(per_class: int) -> torch.Tensor:
    return torch.arange(WAYS).repeat_interleave(per_class)


def make_task() -> tuple[torch.Tensor, ...]:
    return _images(WAYS * SHOTS), _labels(SHOTS), _images(WAYS * QUERIES), _labels(QUERIES)


def make_namespace(code: str) -> dict:
    """What the docs' prose promises to exist before a snippet runs."""
    from robust_meta import Task

    uses_torchmeta = "torchmeta" in code
    model = meta_tiny_net() if uses_torchmeta else TinyNet()
    tasks = [make_task() for _ in range(TASKS_PER_BATCH)]
    stack = [torch.stack([t[i] for t in tasks]) for i in range(4)]
    batch = {"train": (stack[0], stack[1]), "test": (stack[2], stack[3])}
    sx, sy, qx, qy = tasks[0]
    return {
        "__name__": "__doc_snippet__",
        "torch": torch,
        "nn": nn,
        "F": F,
        "model": model,
        "meta_optimizer": torch.optim.Adam(model.parameters(), lr=1e-3),
        "dataloader": [batch],  # torchmeta BatchMetaDataLoader: dicts of (B, N*K, C, H, W)
        "task_batches": [tasks],  # lists of (support_x, support_y, query_x, query_y)
        "tasks": [Task(*t) for t in tasks],
        "test_tasks": [Task(*t) for t in tasks],
        "x_support": sx, "y_support": sy, "x_query": qx, "y_query": qy,
        "ways": WAYS,
        "eps": 8 / 255,
    }


BLOCKS = python_blocks()


def test_docs_have_python_blocks():
    """The collector finds the README's and the pages' examples (guards a silent no-op)."""
    files = {b.path.name for b in BLOCKS}
    assert "README.md" in files
    assert len(BLOCKS) >= 10, [b.id for b in BLOCKS]


def test_extract_blocks_sees_markers_and_indentation(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n<!-- no-test: needs a GPU -->\n```python\nimport cuda_thing\n```\n\n"
        "- item\n\n    ```python\n    a = 1\n    b = a + 1\n    ```\n\n```bash\nls\n```\n"
    )
    blocks = extract_blocks(md)
    assert [b.lang for b in blocks] == ["python", "python", "bash"]
    assert blocks[0].skip_reason == "needs a GPU" and blocks[0].line == 4
    assert blocks[1].skip_reason is None and blocks[1].code == "a = 1\nb = a + 1\n"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip_reason:
        pytest.skip(f"marked no-test: {block.skip_reason}")
    if "torchmeta" in block.code and importlib.util.find_spec("torchmeta") is None:
        pytest.skip("torchmeta is not installed (pip install --no-deps torchmeta==1.8.0)")
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if "learn2learn" in block.code and importlib.util.find_spec("learn2learn") is None:
        monkeypatch.setitem(sys.modules, "learn2learn", _learn2learn_stand_in())
    ns = make_namespace(block.code)
    # Pad so that tracebacks give the Markdown file's own line numbers.
    code = "\n" * block.line + block.code
    exec(compile(code, str(block.path), "exec"), ns)  # noqa: S102


# --------------------------------------------------------------------------- the site
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict`` passes (every page, nav entry, link and API docstring)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('mkdocs/mkdocstrings not installed: pip install -e ".[docs]"')
    if importlib.util.find_spec("material") is None:
        pytest.skip('mkdocs-material not installed: pip install -e ".[docs]"')
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    elapsed = time.perf_counter() - t0
    print(f"mkdocs build --strict took {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index.html", "concepts/index.html", "wrap-your-loop/index.html",
                 "evaluating/index.html", "api/meta/index.html", "changelog/index.html"):
        assert (site / page).exists(), page
    # mkdocstrings rendered the real API, and the changelog snippet was included.
    meta = (site / "api/meta/index.html").read_text(encoding="utf-8")
    assert "RobustMetaUpdate" in meta
    # Formulas render offline: MathJax is bundled, no page loads a script from the network,
    # and docstring math is typeset (an arithmatex span), not shown as code (issue 18, item 7).
    assert (site / "assets" / "mathjax" / "MathJax.js").is_file()
    assert (site / "assets" / "mathjax" / "config" / "TeX-AMS-MML_HTMLorMML-full.js").is_file()
    import re

    for page in site.rglob("*.html"):
        remote = re.findall(r'<script[^>]+src="(https?:[^"]+)"', page.read_text(encoding="utf-8"))
        assert not remote, f"{page.relative_to(site)} loads {remote}"
    assert 'class="arithmatex">\\(\\ell(w' in meta
    assert "<code>\\ell(w" not in meta
    assert "Unreleased" in (site / "changelog/index.html").read_text(encoding="utf-8")
    assert elapsed < 240, f"docs build took {elapsed:.0f} s"


def test_every_public_module_has_an_api_page():
    """One API page per public module, each rendered by mkdocstrings from the code."""
    import robust_meta

    pkg = Path(robust_meta.__file__).parent
    modules = sorted(
        ".".join(p.relative_to(pkg).with_suffix("").parts)
        for p in pkg.rglob("*.py")
        if not any(part.startswith("_") for part in p.relative_to(pkg).parts)
    )
    assert "meta" in modules and "compat.torchmeta" in modules
    api = ROOT / "docs" / "api"
    missing = [m for m in modules if not (api / f"{m}.md").exists()]
    assert not missing, f"no docs/api/<module>.md for {missing}"
    for m in modules:
        assert f"::: robust_meta.{m}" in (api / f"{m}.md").read_text(encoding="utf-8"), m


def test_nav_lists_every_page():
    """Every page under docs/ is in mkdocs.yml's nav (mkdocs only warns about the rest)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [p for p in pages if p not in nav]
    assert not missing, missing

