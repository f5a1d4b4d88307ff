"""mkdocs hook: bundle MathJax with the site, so that formulas render offline.

The docs used to load MathJax from a CDN, so a site opened without internet showed raw
LaTeX. This hook copies the MathJax 2.7 files that the ``jupyter-server-mathjax`` package
ships (part of the ``[docs]`` extra) into ``<site>/assets/mathjax/`` after every build;
``mkdocs.yml`` loads ``assets/mathjax/MathJax.js`` and ``docs/javascripts/mathjax.js``
configures it for ``pymdownx.arithmatex`` (``\\( ... \\)`` inline, ``\\[ ... \\]`` display,
in the pages and in the docstrings mkdocstrings renders).
"""

from __future__ import annotations

import shutil
from pathlib import Path


def _mathjax_static() -> Path:
    try:
        import jupyter_server_mathjax
    except ImportError as err:  # pragma: no cover - the [docs] extra installs it
        raise RuntimeError(
            'the docs bundle MathJax from the jupyter-server-mathjax package: pip install -e ".[docs]"'
        ) from err
    return Path(jupyter_server_mathjax.__file__).parent / "static"


def on_post_build(config, **_kwargs) -> None:
    """Copy MathJax into the built site (``assets/mathjax/``)."""
    dest = Path(config["site_dir"]) / "assets" / "mathjax"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(_mathjax_static(), dest, ignore=shutil.ignore_patterns("*.md", "LICENSE*", "unpacked"))
    shutil.copy2(_mathjax_static() / "LICENSE", dest / "LICENSE")
