"""Few-shot backbones: Conv4 (MAML), ResNet-12 and ResNet-18, split into features and head.

Every model here:

* takes images in **[0, 1] pixel space**; an optional ``normalize=(mean, std)`` is applied
  *inside* the model, so attacks and ε are expressed in pixels;
* has a body ``.features`` and a linear head ``.classifier`` (``nn.Linear``), with
  ``forward_features(x) -> (B, D)`` and ``forward_head(f) -> logits`` (timm convention),
  and ``forward(x) == forward_head(forward_features(x))``;
* is a plain ``nn.Module`` that runs under `torch.func.functional_call` (hence under
  `robust_meta.adapt`), with second-order gradients through batch norm;
* uses batch statistics in train mode (the MAML convention) and, with
  ``track_running_stats=True`` (default), running statistics in eval mode.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "Conv4", "Normalize", "ResNet12", "ResNet18", "build_model"]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)



class GlobalAvgPool(nn.Module):
    """``(B, C, H, W) -> (B, C)``: the mean over the spatial positions.

    Written as ``x.mean((2, 3))`` rather than ``AdaptiveAvgPool2d(1)`` + ``Flatten``: the same
    numbers (up to float summation order), but a deterministic CUDA backward, so ResNets run
    under ``torch.use_deterministic_algorithms(True)``. No parameters or buffers: checkpoints
    are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))

class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a layer (so attacks see [0, 1] pixels).

    Args:
        mean: one value per channel (or a single value for all channels).
        std: one positive value per channel (or a single value).
        channels: the number of input channels, to validate the lengths.

    Raises:
        ValueError: a length that is neither 1 nor ``channels``, or a std ``<= 0``.

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float, *, channels: int):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std_t = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        for name, t in (("mean", mean_t), ("std", std_t)):
            if t.numel() not in (1, channels):
                raise ValueError(
                    f"normalize {name} must have 1 or in_channels={channels} values, got {t.numel()}"
                )
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"normalize {name} must be finite, got {t.tolist()}")
        if bool((std_t <= 0).any()):
            raise ValueError(f"normalize std must be > 0, got {std_t.tolist()}")
        # Not persistent: configuration, not state; still moved by .to(device/dtype).
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _normalizer(normalize: tuple | None, channels: int) -> nn.Module:
    if normalize is None:
        return nn.Identity()
    if isinstance(normalize, Normalize):
        return normalize
    if not isinstance(normalize, (tuple, list)) or len(normalize) != 2:
        raise TypeError(f"normalize must be None or a (mean, std) pair, got {normalize!r}")
    return Normalize(normalize[0], normalize[1], channels=channels)


class _MaybePool(nn.Module):
    """2×2 max pooling, skipped once the feature map is 1 pixel wide (tiny inputs, e.g. 8×8)."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size)
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.kernel_size:
            return x
        return self.pool(x)


def _pooled(size: int, kernel: int = 2) -> int:
    return size if size < kernel else size // kernel


class _Backbone(nn.Module):
    """Shared forward_features / forward_head / forward of the models below."""

    normalize: nn.Module
    features: nn.Module
    classifier: nn.Linear

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} was built with in_channels={self.in_channels}, "
                f"got images with {x.shape[1]} channels"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """The representation before the classifier.

        Shape:
            ``(B, C, H, W)`` in [0, 1] -> ``(B, feature_dim)``.
        """
        self._check_input(x)
        return self.features(self.normalize(x))

    def forward_head(self, feats: Tensor) -> Tensor:
        """Logits from a representation.

        Shape:
            ``(B, feature_dim)`` -> ``(B, n_classes)``.
        """
        if feats.shape[-1] != self.classifier.in_features:
            raise ValueError(
                f"{type(self).__name__} has feature_dim={self.classifier.in_features}, got features "
                f"of shape {tuple(feats.shape)} (was the model built for this image_size?)"
            )
        return self.classifier(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of images in [0, 1].

        Shape:
            ``(B, C, H, W)`` -> ``(B, n_classes)``.
        """
        return self.forward_head(self.forward_features(x))


class Conv4(_Backbone):
    """The 4-block convolutional network of MAML (Finn et al. 2017), used by the paper.

    Each block is conv3×3 (padding 1) → BatchNorm → ReLU → 2×2 max-pool; the representation
    is the flattened output of the last block, so its size depends on ``image_size``
    (84 → 64·5·5 = 1600 with ``hidden=64``; 28 → 64; 32 → 256; 8 → 64). Pooling is skipped
    once the map is 1 pixel wide, so 8×8 digits work.

    Args:
        in_channels: image channels (3 for MiniImageNet/CIFAR-FS, 1 for Omniglot/digits).
        n_classes: ways N (outputs of the classifier).
        hidden: channels of every conv block.
        image_size: height = width of the inputs the model is built for.
        normalize: ``(mean, std)`` per channel applied inside the model, or ``None``.
        track_running_stats: batch norm keeps running statistics (used in eval mode). With
            ``False`` it always uses batch statistics (the authors' transductive setting).

    Raises:
        TypeError, ValueError: non-positive or non-integer sizes, bad ``normalize``.

    Shape:
        ``(B, in_channels, image_size, image_size)`` → ``(B, n_classes)``;
        ``forward_features``: → ``(B, feature_dim)``.

    Example:
        >>> model = Conv4(in_channels=1, n_classes=3, hidden=16, image_size=8)
        >>> model(torch.rand(6, 1, 8, 8)).shape
        torch.Size([6, 3])
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 5,
        hidden: int = 64,
        *,
        image_size: int = 84,
        normalize: tuple | None = None,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        n_classes = _positive_int(n_classes, "n_classes")
        hidden = _positive_int(hidden, "hidden")
        self.image_size = _positive_int(image_size, "image_size")
        self.normalize = _normalizer(normalize, self.in_channels)
        blocks: list[nn.Module] = []
        channels, size = self.in_channels, self.image_size
        for _ in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden, 3, padding=1),
                    nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                    nn.ReLU(inplace=False),
                    _MaybePool(2),
                )
            )
            channels, size = hidden, _pooled(size)
        blocks.append(nn.Flatten(1))
        self.features = nn.Sequential(*blocks)
        self.feature_dim = hidden * size * size
        self.classifier = nn.Linear(self.feature_dim, n_classes)


# --- ResNet-12 (Oreshkin et al. 2018 / Lee et al. 2019) ----------------------------------------


class _ResBlock12(nn.Module):
    """Three conv3×3-BN(-LeakyReLU) layers with a 1×1 conv-BN shortcut, then 2×2 max-pool."""

    def __init__(self, cin: int, cout: int, *, track_running_stats: bool, slope: float = 0.1):
        super().__init__()
        t = track_running_stats
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, track_running_stats=t)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=t)
        self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, track_running_stats=t)
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, track_running_stats=t)
        )
        self.act = nn.LeakyReLU(slope)
        self.pool = _MaybePool(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(_Backbone):
    """ResNet-12 for few-shot learning: 4 residual blocks of 3 conv layers, then global pooling.

    Each block: (conv3×3 → BN → LeakyReLU(0.1)) ×3 with a 1×1 conv + BN shortcut, then a
    2×2 max-pool (skipped once the map is 1 pixel wide). The representation is the global
    average of the last block, of size ``widths[-1]`` whatever the image size.

    Args:
        in_channels: image channels.
        n_classes: ways N.
        widths: channels of the 4 blocks (MetaOptNet: ``(64, 160, 320, 640)``; keep it small
            on a CPU).
        image_size: nominal input size (recorded; any size ≥ 1 works).
        normalize: ``(mean, std)`` applied inside the model, or ``None``.
        track_running_stats: see `Conv4`.

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, n_classes)``; features ``(B, widths[-1])``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 5,
        *,
        widths: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        normalize: tuple | None = None,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        n_classes = _positive_int(n_classes, "n_classes")
        self.image_size = _positive_int(image_size, "image_size")
        widths = tuple(widths)
        if len(widths) != 4:
            raise ValueError(f"widths must hold 4 channel counts, got {widths}")
        widths = tuple(_positive_int(w, "widths[i]") for w in widths)
        self.normalize = _normalizer(normalize, self.in_channels)
        layers: list[nn.Module] = []
        cin = self.in_channels
        for w in widths:
            layers.append(_ResBlock12(cin, w, track_running_stats=track_running_stats))
            cin = w
        layers += [GlobalAvgPool()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = widths[-1]
        self.classifier = nn.Linear(self.feature_dim, n_classes)


# --- ResNet-18 (He et al. 2016), as used in the paper's Table S1 ------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, track_running_stats: bool):
        super().__init__()
        t = track_running_stats
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, track_running_stats=t)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, track_running_stats=t)
        self.relu = nn.ReLU(inplace=False)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, track_running_stats=t),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(_Backbone):
    """ResNet-18: a stem, 4 stages of 2 basic blocks, global average pooling.

    The stem is the ImageNet one (conv7×7/2 → BN → ReLU → maxpool3×3/2) for inputs of 64
    pixels or more and a single conv3×3 → BN → ReLU (CIFAR style) for smaller ones, unless
    ``small_input`` says otherwise.

    Args:
        in_channels: image channels.
        n_classes: ways N.
        width: channels of the first stage; stages have ``width·(1, 2, 4, 8)`` (64: the
            standard ResNet-18, 11M parameters).
        image_size: input size, used to choose the stem.
        normalize: ``(mean, std)`` applied inside the model, or ``None``.
        track_running_stats: see `Conv4`.
        small_input: force the CIFAR stem (True) or the ImageNet stem (False).

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, n_classes)``; features ``(B, 8·width)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 5,
        *,
        width: int = 64,
        image_size: int = 84,
        normalize: tuple | None = None,
        track_running_stats: bool = True,
        small_input: bool | None = None,
    ):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        n_classes = _positive_int(n_classes, "n_classes")
        width = _positive_int(width, "width")
        self.image_size = _positive_int(image_size, "image_size")
        self.normalize = _normalizer(normalize, self.in_channels)
        t = track_running_stats
        small = self.image_size < 64 if small_input is None else bool(small_input)
        if small:
            stem: list[nn.Module] = [
                nn.Conv2d(self.in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, track_running_stats=t),
                nn.ReLU(inplace=False),
            ]
        else:
            stem = [
                nn.Conv2d(self.in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width, track_running_stats=t),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        layers = list(stem)
        cin = width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(
                    _BasicBlock(cin, cout, stride, track_running_stats=t),
                    _BasicBlock(cout, cout, 1, track_running_stats=t),
                )
            )
            cin = cout
        layers += [GlobalAvgPool()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self.classifier = nn.Linear(self.feature_dim, n_classes)


MODELS: dict[str, type[_Backbone]] = {"conv4": Conv4, "resnet12": ResNet12, "resnet18": ResNet18}


def build_model(
    name: str | type[nn.Module],
    *,
    in_channels: int = 3,
    n_classes: int = 5,
    image_size: int = 84,
    **kwargs: object,
) -> nn.Module:
    """A backbone by name: ``"conv4"``, ``"resnet12"`` or ``"resnet18"`` (case-insensitive).

    Args:
        name: a name from `MODELS`, or an ``nn.Module`` subclass taking the same
            keyword arguments.
        in_channels: image channels.
        n_classes: ways N.
        image_size: input height = width.
        **kwargs: passed on (``hidden=`` for Conv4, ``widths=`` for ResNet12, ``width=`` for
            ResNet18, ``normalize=``, ``track_running_stats=``).

    Returns:
        The model (in train mode, float32 on the CPU: move it with ``.to(x)``).

    Raises:
        ValueError: an unknown name (the message lists the choices).
        TypeError: ``name`` is neither a string nor an ``nn.Module`` subclass.

    Example:
        >>> model = build_model("conv4", in_channels=1, n_classes=3, image_size=28, hidden=32)
    """
    if isinstance(name, type) and issubclass(name, nn.Module):
        cls: type[nn.Module] = name
    elif isinstance(name, str):
        key = name.strip().lower().replace("-", "").replace("_", "")
        if key not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        cls = MODELS[key]
    else:
        raise TypeError(f"model name must be a string or an nn.Module class, got {type(name).__name__}")
    return cls(in_channels=in_channels, n_classes=n_classes, image_size=image_size, **kwargs)
