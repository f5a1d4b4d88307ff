"""Feature inversion (IAM) and figures: image grids, RA-vs-ε curves.

matplotlib is optional: it is imported when a figure is drawn (``pip install matplotlib``,
or the ``demo`` extra). Figures are rendered with the Agg canvas directly, so the global
matplotlib backend (e.g. of a notebook) is never changed.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._checks import check_pixels, check_steps
from .attacks import _batch_dependent
from .params import FeatureSpec, call_features, named_params, preserved_buffers, preserved_modes

if TYPE_CHECKING:  # pragma: no cover
    from .evaluation import EvalResult

__all__ = ["feature_inversion", "plot_ra_vs_eps", "save_image_grid"]


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "robust_meta.visualize needs matplotlib: pip install matplotlib "
            "(or pip install 'robust-meta[demo]')"
        ) from err
    return Figure, FigureCanvasAgg


def feature_inversion(
    model: nn.Module,
    seed_images: Tensor,
    *,
    neuron: int | Sequence[int],
    params: Mapping[str, Tensor] | None = None,
    steps: int = 200,
    step_size: float = 0.5,
    features: FeatureSpec = None,
    head: str | None = None,
    mode: str = "eval",
    training: bool | None = None,
) -> Tensor:
    r"""Inverted input attribution maps (IAM): inputs that maximise one representation coordinate.

    Solves paper eq. (S1), \(\max_\delta r_i(x + \delta)\) subject to
    \(x + \delta \in [0, 1]\) (Engstrom et al. 2019), by normalised gradient ascent in
    ℓ2 (each step moves every image by ``step_size`` in ℓ2 along its gradient, then clips to
    [0, 1]).

    **Mode and guarantee.** The activation is measured the way the images are returned, and
    no returned image has a smaller activation than its seed image:

    - ``mode="eval"`` (default): batch norm uses its running statistics (and dropout is
      off), so each image's activation depends on that image alone. For each image the
      iterate with the largest activation is returned.
    - ``mode="train"``: batch norm normalises with the statistics of the batch, so an
      image's activation depends on the whole batch. The batch is optimised jointly and the
      returned batch is one iterate of it, the one with the largest total activation among
      those where every image's activation, measured on that batch, is at least its seed's
      activation measured on the seed batch (the seed batch itself qualifies).
    - ``mode="model"``: the model's current mode (``model.training``), with the rule above.

    Models from `robust_meta.train.model_from_checkpoint` are in train mode (the MAML
    convention); the default ``"eval"`` uses the running statistics that meta-training
    accumulated.

    ``r`` is `robust_meta.call_features` of ``model`` at ``params``: pass the
    fine-tuned (fast) weights for the "after fine-tuning" maps, ``None`` for the meta-model.
    The weights are used detached; the model's parameters, buffers and mode are untouched.

    Args:
        model: plain ``nn.Module`` or torchmeta ``MetaModule``.
        seed_images: starting images in [0, 1].
        neuron: index of the coordinate to maximise, one for all images, or one per image.
        params: weights to run the model at (default: its own).
        steps: ascent steps (0 returns the seeds).
        step_size: ℓ2 length of one step in [0, 1] pixel units.
        features, head: where the representation is (see `robust_meta.call_features`).
        mode: ``"eval"``, ``"train"`` or ``"model"`` (see above).
        training: deprecated (``True`` is ``mode="train"``, ``False`` is ``mode="eval"``).

    Returns:
        Images in [0, 1], detached, same shape and dtype as ``seed_images``.

    Raises:
        ValueError: images outside [0, 1], a neuron index out of range, a neuron list whose
            length is not the batch size, ``steps < 0``, ``step_size < 0``, an unknown ``mode``.
        TypeError: ``neuron`` is not an int or a sequence of ints.

    Shape:
        seed_images: ``(B, C, H, W)`` -> ``(B, C, H, W)``.

    Example:
        >>> before = feature_inversion(model, x, neuron=7)
        >>> fast = adapt(model, sx, sy, steps=10, step_size=0.01)
        >>> after = feature_inversion(model, x, neuron=7, params=fast)
        >>> save_image_grid({"seed": x, "before": before, "after": after}, "iam.png")
    """
    check_pixels(seed_images, "seed_images")
    steps = check_steps(steps)
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not step_size >= 0:
        raise ValueError(f"step_size must be a number >= 0, got {step_size!r}")
    if training is not None:
        warnings.warn("feature_inversion(training=...) is deprecated; pass mode='train' or mode='eval'",
                      DeprecationWarning, stacklevel=2)
        mode = "train" if training else "eval"
    if mode not in ("eval", "train", "model"):
        raise ValueError(f"mode must be 'eval', 'train' or 'model', got {mode!r}")
    b = seed_images.shape[0]
    if isinstance(neuron, numbers.Integral) and not isinstance(neuron, bool):
        idx = torch.full((b,), int(neuron), dtype=torch.long, device=seed_images.device)
    elif isinstance(neuron, (Sequence, Tensor)) and not isinstance(neuron, str):
        vals = neuron.tolist() if isinstance(neuron, Tensor) else list(neuron)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in vals):
            raise TypeError(f"neuron must hold ints, got {vals[:5]}")
        if len(vals) != b:
            raise ValueError(f"neuron lists {len(vals)} indices for {b} seed images; give one per image")
        idx = torch.tensor([int(v) for v in vals], dtype=torch.long, device=seed_images.device)
    else:
        raise TypeError(f"neuron must be an int or a sequence of ints, got {type(neuron).__name__}")
    # Detached weights: the gradient is taken w.r.t. the input only.
    src = named_params(model) if params is None else params
    fixed = {k: v.detach() for k, v in src.items()}
    rows = torch.arange(b, device=seed_images.device)
    batch_stats = _batch_dependent(model, None if mode == "model" else mode == "train")

    def activation(x: Tensor) -> Tensor:
        feats = call_features(model, x, fixed, features=features, head=head).flatten(1)
        if int(idx.max()) >= feats.shape[1] or int(idx.min()) < 0:
            raise ValueError(
                f"neuron index out of range: the representation has {feats.shape[1]} coordinates, "
                f"got indices in [{int(idx.min())}, {int(idx.max())}]"
            )
        return feats[rows, idx]

    x = seed_images.detach().clone()
    # mode="model": every submodule as it is; "train"/"eval": the whole model, for the call.
    forced = None if mode == "model" else mode == "train"
    with preserved_buffers(model), preserved_modes(model, forced), torch.enable_grad():
        best = x.clone()
        with torch.no_grad():
            seed_val = activation(x)
        best_val = seed_val.clone()
        best_total = float(seed_val.sum())

        def keep(x: Tensor, act: Tensor) -> None:
            nonlocal best, best_val, best_total
            if batch_stats:  # the batch is one unit: keep it whole, if no image lost
                total = float(act.sum())
                if bool((act >= seed_val).all()) and total > best_total:
                    best, best_val, best_total = x.clone(), act.clone(), total
            else:  # each image on its own
                better = act > best_val
                best[better] = x[better]
                best_val = torch.where(better, act, best_val)

        for _ in range(steps):
            x.requires_grad_(True)
            act = activation(x)
            (g,) = torch.autograd.grad(act.sum(), x)
            with torch.no_grad():
                keep(x.detach(), act.detach())
                norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
                norm = norm.view(-1, *([1] * (x.dim() - 1)))
                x = (x.detach() + step_size * g / norm).clamp(0, 1)
        if steps:
            with torch.no_grad():
                keep(x, activation(x))
    return best.detach()


def _to_hwc(img: Tensor) -> Any:
    """``(C, H, W)`` in [0, 1] -> numpy ``(H, W)`` or ``(H, W, 3)`` for imshow."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.dim() == 2:
        return img.numpy()
    if img.dim() != 3:
        raise ValueError(f"images must be (C, H, W), got shape {tuple(img.shape)}")
    if img.shape[0] == 1:
        return img[0].numpy()
    if img.shape[0] == 3:
        return img.permute(1, 2, 0).numpy()
    raise ValueError(f"images must have 1 or 3 channels, got {img.shape[0]}")


def save_image_grid(
    rows: Mapping[str, Tensor] | Sequence[Tensor],
    path: str | Path,
    *,
    cell_size: float = 1.2,
    dpi: int = 100,
) -> Path:
    """Write a PNG grid of images: one row per entry (seeds, IAMs of models or neurons).

    Args:
        rows: ``label -> images`` (labels are written on the left) or a list of image
            batches; each batch ``(N, C, H, W)`` in [0, 1] with 1 or 3 channels. Rows may have
            different lengths.
        path: output file (``.png`` is added when there is no suffix).
        cell_size: size of one image in inches.
        dpi: resolution.

    Returns:
        The path written.

    Raises:
        ValueError: no rows, an empty row, images of the wrong shape.
        ImportError: matplotlib is not installed.

    Example:
        >>> save_image_grid({"seed": x, "MAML": iam_maml, "R-MAML": iam_robust}, "iam.png")
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else [(None, r) for r in rows]
    if not items:
        raise ValueError("rows is empty: nothing to draw")
    for label, r in items:
        if not isinstance(r, Tensor):
            raise TypeError(f"row {label!r} must be a tensor, got {type(r).__name__}")
        if r.dim() == 3:
            continue
        if r.dim() != 4 or r.shape[0] == 0:
            raise ValueError(f"row {label!r} must be a non-empty (N, C, H, W) batch, got {tuple(r.shape)}")
    batches = [(label, r.unsqueeze(0) if r.dim() == 3 else r) for label, r in items]
    n_cols = max(r.shape[0] for _, r in batches)
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(cell_size * n_cols + (1.2 if isinstance(rows, Mapping) else 0), cell_size * len(batches)), dpi=dpi)
    Canvas(fig)
    axes = fig.subplots(len(batches), n_cols, squeeze=False)
    for i, (label, r) in enumerate(batches):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < r.shape[0]:
                img = _to_hwc(r[j])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                          interpolation="nearest")
            if j == 0 and label is not None:
                ax.set_ylabel(str(label), rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    fig.savefig(path, format="png")
    return path


def _curve_of(res: Any, attack: str | None) -> tuple[list[float], list[float], list[float]]:
    if hasattr(res, "curve"):
        return res.curve(attack)
    if isinstance(res, (tuple, list)) and len(res) == 3:
        eps, mean, ci = ([float(v) for v in seq] for seq in res)
        if not (len(eps) == len(mean) == len(ci)) or not eps:
            raise ValueError("an (eps, means, ci95s) curve needs three non-empty lists of one length")
        order = sorted(range(len(eps)), key=eps.__getitem__)
        return [eps[i] for i in order], [mean[i] for i in order], [ci[i] for i in order]
    raise TypeError(
        f"results values must be EvalResult or (eps, means, ci95s) tuples, got {type(res).__name__}"
    )


def plot_ra_vs_eps(
    results: Mapping[str, EvalResult | tuple[Sequence[float], Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    attack: str | None = None,
    title: str | None = None,
) -> list[Path]:
    """RA-vs-ε curves of several models in one figure, with 95% CI bands (paper Fig. 1, 3, S2).

    ε is drawn in units of 1/255, accuracy in percent; ε = 0 is SA.

    Args:
        results: ``model name -> EvalResult`` (its `EvalResult.curve`) or
            ``model name -> (eps, means, ci95s)`` with ε in [0, 1] units and accuracies in
            [0, 1]. A ``nan`` CI (one task) draws no band.
        path: output stem (``"fig/ra"`` writes ``fig/ra.png`` and ``fig/ra.svg``), or a
            ``.png``/``.svg`` path (both files are written next to each other).
        attack: attack label for ``EvalResult`` inputs (default: the first evaluated).
        title: figure title.

    Returns:
        The paths written, PNG first.

    Raises:
        ValueError: no results, malformed curves.
        ImportError: matplotlib is not installed.

    Example:
        >>> plot_ra_vs_eps({"MAML": res_maml, "R-MAML_out": res_rout}, "figures/ra_vs_eps")
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict name -> EvalResult or curve")
    curves = {str(name): _curve_of(res, attack) for name, res in results.items()}
    Figure, Canvas = _matplotlib()
    fig = Figure(figsize=(5, 3.6), dpi=120)
    Canvas(fig)
    ax = fig.subplots()
    for name, (eps, mean, ci) in curves.items():
        xs = [e * 255 for e in eps]
        ys = [100 * m for m in mean]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        lo = [100 * (m - c) if math.isfinite(c) else 100 * m for m, c in zip(mean, ci)]
        hi = [100 * (m + c) if math.isfinite(c) else 100 * m for m, c in zip(mean, ci)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("ε (×1/255)")
    ax.set_ylabel("robust accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".svg") else path
    out = [Path(f"{stem}.png"), Path(f"{stem}.svg")]
    fig.savefig(out[0], format="png")
    fig.savefig(out[1], format="svg")
    return out
