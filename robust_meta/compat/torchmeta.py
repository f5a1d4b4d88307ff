"""Run torchmeta 1.8.0 code on a modern stack (torch 2.x, torchvision ≥ 0.17, numpy 2).

torchmeta is unmaintained since 2021 and no longer imports on current PyTorch. Importing this
module patches the known breaks **before** torchmeta is imported, then imports it, so the
user's existing torchmeta code runs unchanged::

    import robust_meta.compat.torchmeta  # noqa: F401  (must come before `import torchmeta`)
    import torchmeta                     # now works

or, explicitly, ``robust_meta.compat.torchmeta.patch_torchmeta()`` (idempotent).

Install torchmeta itself without its obsolete pins::

    pip install --no-deps torchmeta==1.8.0 ordered-set h5py

Breaks patched (each found by running torchmeta code paths end to end):

1. ``torchmeta.datasets.utils`` imports ``_get_confirm_token`` and ``_save_response_content``
   from ``torchvision.datasets.utils``; torchvision removed both. They are provided again
   (the torchvision 0.8 implementations, used only by Google-Drive downloads).
2. ``torchmeta.utils.data.SubsetTask`` subclasses ``torch.utils.data.Subset`` and overrides
   ``__getitem__`` but not ``__getitems__``; torch ≥ 2.10 refuses such a subclass at
   construction, which breaks ``ClassSplitter`` and therefore every few-shot helper
   (``omniglot``, ``miniimagenet``, ``cifar_fs``, ``fc100``, ...). A ``__getitems__`` that
   goes through ``__getitem__`` (so target transforms still apply) is added.
3. ``torchmeta.modules.MetaMultiheadAttention`` with ``batch_first=True`` transposed the
   output but not the inputs, so it returned wrong values (or a shape error) on every torch
   that has ``batch_first``; its ``forward`` is replaced by one that transposes the inputs
   like ``nn.MultiheadAttention`` does and accepts the newer keyword arguments.
4. numpy 2 removed ``np.int`` / ``np.float``, used by the TCGA and BACH tabular datasets'
   preprocessing. Those two modules get a numpy view with the old aliases (numpy's own
   namespace is not touched). Not patched: BACH preprocessing also passes
   ``OneHotEncoder(sparse=False)``, which scikit-learn ≥ 1.4 rejects.

Checked and found working without a patch: ``torchmeta.modules`` (MetaConv1d/2d/3d,
MetaBatchNorm1d/2d/3d, MetaLinear, MetaBilinear, MetaLayerNorm, MetaEmbedding(Bag),
MetaSequential, DataParallel on CPU), ``gradient_update_parameters``, ``ClassSplitter``,
``Categorical``, class augmentations (``Rotation``, flips), ``BatchMetaDataLoader`` /
``MetaDataLoader`` with 0 and several workers, the Omniglot, MiniImageNet, CIFAR-FS and FC100
loaders on data in their on-disk format, the toy sinusoid/harmonic datasets and
``torchmeta.utils.prototype`` / ``matching`` / ``r2d2``.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from typing import Any

__all__ = ["INSTALL_HINT", "patch_torchmeta", "patches_applied"]

INSTALL_HINT = "pip install --no-deps torchmeta==1.8.0 ordered-set h5py"

_APPLIED: list[str] = []


def patches_applied() -> tuple[str, ...]:
    """Names of the patches installed so far by `patch_torchmeta` (for diagnostics)."""
    return tuple(_APPLIED)


# --- 1. torchvision helpers removed after 0.8 -------------------------------------------------


def _get_confirm_token(response: Any) -> str | None:
    """The Google-Drive "download anyway" token of a ``requests`` response (torchvision 0.8)."""
    for key, value in response.cookies.items():
        if key.startswith("download_warning"):
            return value
    return None


def _save_response_content(response: Any, destination: str, chunk_size: int = 32768) -> None:
    """Stream a ``requests`` response to ``destination`` (torchvision 0.8 signature)."""
    with open(destination, "wb") as f:
        for chunk in response.iter_content(chunk_size):
            if chunk:  # filter out keep-alive chunks
                f.write(chunk)


def _patch_torchvision() -> None:
    import torchvision.datasets.utils as tv_utils

    # Only where missing: a torchvision that still has them is left alone.
    for name, fn in (("_get_confirm_token", _get_confirm_token),
                     ("_save_response_content", _save_response_content)):
        if not hasattr(tv_utils, name):
            setattr(tv_utils, name, fn)
            _APPLIED.append(f"torchvision.datasets.utils.{name}")


def _patch_download_helpers() -> None:
    # torchvision >= 0.12 kept a `_save_response_content(content_iterator, destination, *,
    # length)` with another signature; torchmeta passes a requests.Response. Give torchmeta's
    # module the implementations it was written against.
    from torchmeta.datasets import utils as tm_utils

    if tm_utils._save_response_content is not _save_response_content:
        tm_utils._get_confirm_token = _get_confirm_token
        tm_utils._save_response_content = _save_response_content
        _APPLIED.append("torchmeta.datasets.utils download helpers")


def _subset_task_getitems(self: Any, indices: list[int]) -> list[Any]:
    # Through __getitem__ (not the parent dataset's __getitems__) so that the task's target
    # transform and class augmentation apply exactly as for single-item access.
    return [self[i] for i in indices]


# --- 3. MetaMultiheadAttention(batch_first=True) ----------------------------------------------


def _mha_forward(
    self: Any,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    params: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, Any]:
    import torch.nn.functional as F

    if params is None:
        params = OrderedDict(self.named_parameters())
    if self.batch_first:
        query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    kwargs: dict[str, Any] = dict(
        training=self.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    if not self._qkv_same_embed_dim:
        kwargs.update(
            use_separate_proj_weight=True,
            q_proj_weight=params["q_proj_weight"],
            k_proj_weight=params["k_proj_weight"],
            v_proj_weight=params["v_proj_weight"],
        )
    out, weights = F.multi_head_attention_forward(
        query, key, value, self.embed_dim, self.num_heads,
        params.get("in_proj_weight", None), params.get("in_proj_bias", None),
        params.get("bias_k", None), params.get("bias_v", None), self.add_zero_attn,
        self.dropout, params["out_proj.weight"], params.get("out_proj.bias", None),
        **kwargs,
    )
    if self.batch_first:
        out = out.transpose(1, 0)
    return out, weights


# --- 4. numpy 2 / scikit-learn 1.4 in the tabular datasets ------------------------------------


def _patch_tabular() -> None:
    import numpy as np

    if hasattr(np, "int") and hasattr(np, "float"):  # numpy < 1.24: nothing to do
        return
    for name in ("tcga", "bach"):
        try:
            module = importlib.import_module(f"torchmeta.datasets.{name}")
        except ImportError:  # pragma: no cover - optional third-party deps of that module
            continue
        if not isinstance(module.np, _NumpyIntShim):
            module.np = _NumpyIntShim(np)
            _APPLIED.append(f"torchmeta.datasets.{name}.np (np.int/np.float)")


class _NumpyIntShim:
    """numpy as seen by one legacy module: ``np.int``/``np.float`` map to the builtins."""

    _aliases = {"int": int, "float": float, "bool": bool, "object": object}

    def __init__(self, np_module: Any):
        self._np = np_module

    def __getattr__(self, name: str) -> Any:
        if name in self._aliases and not hasattr(self._np, name):
            return self._aliases[name]
        return getattr(self._np, name)


# --- entry point ------------------------------------------------------------------------------


def patch_torchmeta() -> Any:
    """Make ``import torchmeta`` (1.8.0) and its data/model code work on this stack.

    Idempotent: a second call changes nothing. Also works after a plain ``import torchmeta``
    has already failed (Python drops the failed modules, so they are imported again here).

    Returns:
        The imported ``torchmeta`` package.

    Raises:
        ImportError: torchmeta (or torchvision) is not installed; the message gives the
            install command ``pip install --no-deps torchmeta==1.8.0 ordered-set h5py``.

    Example:
        >>> from robust_meta.compat.torchmeta import patch_torchmeta
        >>> torchmeta = patch_torchmeta()
        >>> from torchmeta.datasets.helpers import omniglot  # works on torch 2.x
    """
    if importlib.util.find_spec("torchmeta") is None:
        raise ImportError(
            "torchmeta is not installed. Install it without its obsolete torch<1.10 pin: "
            f"`{INSTALL_HINT}` (it also needs Pillow, requests and torchvision)"
        )
    try:
        _patch_torchvision()
    except ImportError as err:
        raise ImportError(
            f"torchmeta needs torchvision: pip install torchvision (then `{INSTALL_HINT}`)"
        ) from err

    import torchmeta
    from torchmeta.utils.data import task as tm_task

    if "__getitems__" not in vars(tm_task.SubsetTask):
        tm_task.SubsetTask.__getitems__ = _subset_task_getitems
        _APPLIED.append("torchmeta.utils.data.SubsetTask.__getitems__")

    from torchmeta.modules import activation as tm_activation

    mha = tm_activation.MetaMultiheadAttention
    if mha.forward is not _mha_forward:
        mha.forward = _mha_forward
        _APPLIED.append("torchmeta.modules.MetaMultiheadAttention.forward (batch_first)")

    _patch_download_helpers()
    _patch_tabular()
    return torchmeta


patch_torchmeta()
