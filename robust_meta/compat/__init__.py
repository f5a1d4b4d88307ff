"""Compatibility layers for third-party meta-learning code on a modern PyTorch stack.

Nothing here is imported by ``import robust_meta``. Import the submodule you need:

>>> import robust_meta.compat.torchmeta  # noqa: F401  (then ``import torchmeta`` works)
"""

__all__: list[str] = []
