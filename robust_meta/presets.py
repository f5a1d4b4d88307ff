"""Named presets: the paper's methods and dataset settings, as plain data.

A *method preset* says which knobs of the one objective (paper eq. 3 and 4) a named method
turns: the robustness regularizer and its weights γ_out / γ_in, head-only fine-tuning
(ANIL), the contrastive weight γ_CL, unlabeled images. A *dataset preset* gives the
paper's settings for a benchmark (image size, ε, shots, ...). `robust_meta.train.TrainConfig`
fills every option left unset from these two tables.

Example:
    >>> from robust_meta.presets import METHOD_PRESETS, DATASET_PRESETS
    >>> METHOD_PRESETS["aq"].gamma_out
    inf
    >>> DATASET_PRESETS["miniimagenet"].eps * 255
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "DATASET_PRESETS",
    "DatasetPreset",
    "METHOD_PRESETS",
    "MethodPreset",
    "dataset_preset",
    "method_preset",
]


@dataclass(frozen=True)
class MethodPreset:
    """The knobs of one named method.

    Attributes:
        name: the preset's command-line name (``"rmaml-out"``).
        paper_name: the method's name in the paper.
        regularizer: ``"none"`` (no robust term), ``"at"`` (adversarial training, cross-entropy on
            the adversarial query) or ``"trades"`` (KL between clean and adversarial predictions).
        gamma_out: weight of the robust term in the meta-update; ``inf`` is adversarial querying.
        gamma_in: weight of the robust term in the inner loop (R-MAML_both).
        anil: fine-tune only the classifier head in the inner loop.
        gamma_cl: weight of the contrastive auxiliary loss (R-MAML_out-CL).
        unlabeled: unlabeled images drawn per task for the TRADES term (0: none).
        description: one line for ``--help``.
    """

    name: str
    paper_name: str
    regularizer: str
    gamma_out: float
    gamma_in: float = 0.0
    anil: bool = False
    gamma_cl: float = 0.0
    unlabeled: int = 0
    description: str = ""

    @property
    def robust(self) -> bool:
        """Whether the method trains with adversarial examples at all."""
        return self.regularizer != "none" and (self.gamma_out > 0 or self.gamma_in > 0)


#: The methods of the paper (and AQ), all one objective with different knobs.
#: γ_out defaults are the paper's grid-search values: 0.2 for AT, 5 for TRADES (Sec. 6).
#: The paper gives no γ_in for R-MAML_both; we use γ_in = γ_out = 0.2.
METHOD_PRESETS: dict[str, MethodPreset] = {
    p.name: p
    for p in (
        MethodPreset("maml", "MAML", "none", 0.0, description="standard MAML (γ_in = γ_out = 0)"),
        MethodPreset(
            "rmaml-out", "R-MAML_out", "at", 0.2,
            description="AT in the meta-update only (γ_out = 0.2); --attack fgsm for R-MAML_out-FGSM",
        ),
        MethodPreset(
            "rmaml-out-trades", "R-MAML_out (TRADES)", "trades", 5.0,
            description="TRADES regularizer in the meta-update (γ_out = 5)",
        ),
        MethodPreset(
            "rmaml-both", "R-MAML_both", "at", 0.2, gamma_in=0.2,
            description="AT in the inner loop and in the meta-update (γ_in = γ_out = 0.2)",
        ),
        MethodPreset(
            "aq", "AQ", "at", math.inf,
            description="adversarial querying (Goldblum et al.): adversarial query loss only (γ_out = ∞)",
        ),
        MethodPreset(
            "anil", "R-MAML_out-ANIL", "at", 0.2, anil=True,
            description="R-MAML_out with head-only fine-tuning (ANIL)",
        ),
        MethodPreset(
            "cl", "R-MAML_out-CL", "at", 0.2, gamma_cl=0.1,
            description="R-MAML_out plus a contrastive loss on the adapted representation (γ_CL = 0.1)",
        ),
        MethodPreset(
            "trades-unlabeled", "R-MAML_out-TRADES", "trades", 5.0, unlabeled=25,
            description="TRADES meta-update also applied to unlabeled images of the task's classes",
        ),
    )
}


@dataclass(frozen=True)
class DatasetPreset:
    """The paper's (or our) settings for one dataset.

    Attributes:
        name: command-line name.
        eps: ℓ∞ training and test radius in [0, 1] pixel units.
        in_channels, image_size: input shape of the model.
        ways, shots, queries: task shape at meta-training (queries per class).
        hidden: Conv4 width.
        meta_steps: default number of meta-updates.
        needs_folder: whether the data lives in a folder (``--data-folder``).
        description: one line for ``--help``.
    """

    name: str
    eps: float
    in_channels: int
    image_size: int
    ways: int = 5
    shots: int = 1
    queries: int = 15
    hidden: int = 64
    meta_steps: int = 10000
    needs_folder: bool = True
    description: str = ""


#: Paper settings (Sec. 6 and Appendix): α = 0.01, meta lr 1e-3, 4 tasks a batch,
#: 15 queries a class, K = 5 steps at train time and 10 at test time; ε = 10/255 on Omniglot
#: (1-shot 5/10/15/20-way, paper Appendix 7 / Fig. S3: ``omniglot-<N>way``),
#: 2/255 on MiniImageNet, 8/255 on CIFAR-FS. The paper gives no ε for FC100 (also CIFAR-100
#: images, 32×32): we use CIFAR-FS's 8/255.
#: ``digits`` (scikit-learn's embedded 8×8 UCI digits, values in [0, 1], 10 classes) is ours:
#: 3-way tasks so that train / validation / test use disjoint classes (4 / 3 / 3 classes), and
#: ε = 0.1 (1.6 of the 16 grey levels) because an 8×8 image needs a larger budget than a
#: photograph before an attack is meaningful.
DATASET_PRESETS: dict[str, DatasetPreset] = {
    p.name: p
    for p in (
        DatasetPreset(
            "digits", eps=0.1, in_channels=1, image_size=8, ways=3, shots=1, queries=15,
            hidden=32, meta_steps=600, needs_folder=False,
            description="embedded UCI digits (scikit-learn), 8×8 grey, offline",
        ),
        DatasetPreset("omniglot", eps=10 / 255, in_channels=1, image_size=28,
                      description="Omniglot from the official zips or folders (--data-folder), "
                                  "5-way 1-shot, ε = 10/255"),
        *(
            DatasetPreset(f"omniglot-{n}way", eps=10 / 255, in_channels=1, image_size=28, ways=n,
                          description=f"Omniglot {n}-way 1-shot, ε = 10/255 (paper Fig. S3)")
            for n in (5, 10, 15, 20)
        ),
        DatasetPreset("miniimagenet", eps=2 / 255, in_channels=3, image_size=84,
                      description="MiniImageNet (images/ + CSVs, pickle caches, MetaOptNet pickles "
                                  "or torchmeta layout), ε = 2/255"),
        DatasetPreset("tieredimagenet", eps=2 / 255, in_channels=3, image_size=84,
                      description="tieredImageNet (*_images_png.pkl + *_labels.pkl, or torchmeta "
                                  "layout), ε = 2/255 (not in the paper: MiniImageNet's)"),
        DatasetPreset("cifar-fs", eps=8 / 255, in_channels=3, image_size=32,
                      description="CIFAR-FS (cifar-100-python[.tar.gz], MetaOptNet pickles or "
                                  "torchmeta layout), ε = 8/255"),
        DatasetPreset("fc100", eps=8 / 255, in_channels=3, image_size=32,
                      description="FC100 (cifar-100-python[.tar.gz], MetaOptNet pickles or torchmeta "
                                  "layout), ε = 8/255 (not given in the paper)"),
    )
}


def method_preset(name: str) -> MethodPreset:
    """The preset called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = str(name).lower()
    if key not in METHOD_PRESETS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_PRESETS)}")
    return METHOD_PRESETS[key]


def dataset_preset(name: str) -> DatasetPreset:
    """The preset for dataset ``name``; ``tensor:PATH`` datasets get digits-like defaults
    with the shape read from the file later.

    Raises:
        ValueError: unknown name.
    """
    key = str(name).lower()
    if key.startswith("tensor:"):
        return DatasetPreset(
            "tensor", eps=8 / 255, in_channels=0, image_size=0, hidden=64, meta_steps=1000,
            needs_folder=False, description="images and labels saved with torch.save",
        )
    if key not in DATASET_PRESETS:
        raise ValueError(
            f"unknown dataset {name!r}; choose from {', '.join(DATASET_PRESETS)} or tensor:PATH"
        )
    return DATASET_PRESETS[key]
