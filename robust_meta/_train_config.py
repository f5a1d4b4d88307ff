"""`TrainConfig`: everything that defines a meta-training run, and its validation.

A config with ``None`` fields is filled from the method and dataset presets by
`TrainConfig.resolved`; the resolved config is what checkpoints store (as a plain dict) and
what ``robust-meta train --config`` files hold. Re-exported by `robust_meta.train`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .attacks import ATTACKS
from .presets import dataset_preset, method_preset

__all__ = ["AUTO_COMPILE_MIN_STEPS", "COMPILE", "RESUMABLE_CHANGES", "SELECT", "TrainConfig", "resolve_device"]

#: Model-selection criteria (``TrainConfig.select``).
SELECT = ("sa+ra", "sa", "ra", "last")
#: Config keys that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = frozenset({"meta_steps", "device", "compile"})
#: Values of ``TrainConfig.compile``.
COMPILE = ("off", "on", "auto")
#: ``compile="auto"`` compiles (on CUDA) when at least this many meta-steps remain to be run,
#: so that the compilation of a step's graphs (tens of seconds) pays for itself.
AUTO_COMPILE_MIN_STEPS = 200


#: Options added after checkpoints were first written, and what the older checkpoints did.
_ADDED_SINCE_0_2: dict[str, Any] = {"learner": "maml"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` fields come from the presets.

    Call `resolved` to fill them from the method preset
    (`robust_meta.presets.METHOD_PRESETS`) and the dataset preset
    (`robust_meta.presets.DATASET_PRESETS`). The resolved config is what checkpoints
    store, as a plain dict.

    Attributes:
        method: ``maml``, ``rmaml-out``, ``rmaml-out-trades``, ``rmaml-both``, ``aq``,
            ``anil``, ``cl`` or ``trades-unlabeled``.
        learner: how a task's support set becomes the query's weights: ``"maml"`` (gradient
            steps, default), ``"protonet"`` (prototypes, `robust_meta.ProtoNetHead`) or
            ``"r2d2"`` (ridge regression, `robust_meta.R2D2Head`). The robust methods apply
            to any of them (``method="rmaml-out", learner="protonet"`` is R-ProtoNet_out).
        dataset: ``digits``, ``omniglot``, ``miniimagenet``, ``cifar-fs``, ``fc100`` or
            ``tensor:PATH`` (a ``torch.save``'d ``(images, labels)``).
        data_folder: root folder of a torchmeta dataset.
        ways, shots, queries: task shape (queries per class).
        meta_batch: tasks per meta-update.
        meta_steps: number of meta-updates.
        inner_steps: K, inner steps at meta-training; test_inner_steps: at validation/test.
        inner_lr: α; meta_lr: Adam learning rate of the meta-update.
        first_order: FOMAML (inner gradients are constants) instead of second order.
        eps: ℓ∞ radius in [0, 1] pixel units (training and validation attack).
        attack: training attack, ``"pgd"`` or ``"fgsm"`` (R-MAML_out-FGSM).
        attack_steps, attack_step_size: training attack iterations and step (defaults:
            10 and 2.5ε/steps for PGD; 1 step of 1.25ε for FGSM).
        eval_attack_steps: PGD steps of the validation attack.
        gamma_out, gamma_in, gamma_cl: weights (see `robust_meta.presets.MethodPreset`).
        unlabeled: unlabeled images per task for TRADES.
        eval_every: meta-steps between validations (the last step is always validated).
        save_every: meta-steps between ``last.pt`` checkpoints (default: ``eval_every``).
        log_every: meta-steps between training log records.
        val_tasks: number of fixed meta-validation tasks.
        select: model-selection criterion (``"sa+ra"``, ``"sa"``, ``"ra"``, ``"last"``).
        seed: the run's seed.
        model: ``"conv4"``, ``"resnet12"`` or ``"resnet18"``; hidden: its width.
        image_size, in_channels: input shape (default from the dataset).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        compile: ``"on"``: run the inner-loop, attack and outer forward passes of first-order
            steps through ``torch.compile`` (`robust_meta.fast_paths`); ``"auto"``: the same
            on CUDA when triton is available and at least `AUTO_COMPILE_MIN_STEPS` meta-steps
            remain (never on a CPU, where it was measured slower than eager); ``"off"`` (default): eager. Compiled runs agree with eager ones to
            floating-point tolerance, not bitwise (a resume is bitwise only with the same
            setting).
    """

    method: str = "rmaml-out"
    learner: str = "maml"
    dataset: str = "digits"
    data_folder: str | None = None
    ways: int | None = None
    shots: int | None = None
    queries: int | None = None
    meta_batch: int = 4
    meta_steps: int | None = None
    inner_steps: int = 5
    test_inner_steps: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = False
    eps: float | None = None
    attack: str = "pgd"
    attack_steps: int | None = None
    attack_step_size: float | None = None
    eval_attack_steps: int = 10
    gamma_out: float | None = None
    gamma_in: float | None = None
    gamma_cl: float | None = None
    unlabeled: int | None = None
    eval_every: int = 100
    save_every: int | None = None
    log_every: int = 1
    val_tasks: int = 100
    select: str = "sa+ra"
    seed: int = 0
    model: str = "conv4"
    hidden: int | None = None
    image_size: int | None = None
    in_channels: int | None = None
    device: str = "auto"
    compile: str = "off"

    # -- conversions --------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all options."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from a mapping (e.g. a parsed JSON/TOML file); ``-`` in keys reads as ``_``.

        Raises:
            ValueError: unknown keys (the message names them and lists the valid ones).
            TypeError: ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a config must be a mapping, got {type(data).__name__}")
        norm = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(norm) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {cls.field_names()}")
        return cls(**norm)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of primitive values (safe for JSON and ``weights_only`` loading)."""
        return dataclasses.asdict(self)

    @staticmethod
    def saved_dict(data: Mapping[str, Any]) -> dict[str, Any]:
        """A config dict saved by an older robust-meta, with the options added since filled in
        with the values that reproduce what that version did (``learner="maml"``)."""
        return {**_ADDED_SINCE_0_2, **dict(data)}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some options changed (unknown names raise ``ValueError``)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # -- presets ------------------------------------------------------------------

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` option filled from the presets, validated.

        Raises:
            ValueError: unknown method/dataset/attack/model, out-of-range values,
                incompatible combinations (e.g. ANIL with γ_in > 0).
        """
        m = method_preset(self.method)
        d = dataset_preset(self.dataset)
        c = dataclasses.replace(self, method=m.name)
        fill = {
            "ways": d.ways, "shots": d.shots, "queries": d.queries, "meta_steps": d.meta_steps,
            "eps": d.eps, "gamma_out": m.gamma_out, "gamma_in": m.gamma_in,
            "gamma_cl": m.gamma_cl, "unlabeled": m.unlabeled, "hidden": d.hidden,
            "save_every": self.eval_every,
        }
        if d.image_size:
            fill["image_size"] = d.image_size
        if d.in_channels:
            fill["in_channels"] = d.in_channels
        for k, v in fill.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if not c.dataset.lower().startswith("tensor:"):
            c.dataset = c.dataset.lower()
        c.attack = str(c.attack).lower()
        c.learner = str(c.learner).lower()
        c.model = str(c.model).lower()
        c.select = str(c.select).lower()
        c.validate()
        return c

    def validate(self) -> None:
        """Check types and ranges of the set options.

        Raises:
            ValueError: an option out of range (the message names the option and value).
            TypeError: an option of the wrong type.
        """
        method_preset(self.method)
        dataset_preset(self.dataset)
        ints = {
            "ways": 2, "shots": 1, "queries": 1, "meta_batch": 1, "meta_steps": 0, "inner_steps": 0,
            "test_inner_steps": 0, "eval_attack_steps": 1, "eval_every": 1, "save_every": 1,
            "log_every": 1, "val_tasks": 1, "unlabeled": 0, "hidden": 1, "image_size": 1,
            "in_channels": 1, "attack_steps": 1,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        for name in ("inner_lr", "meta_lr", "eps", "attack_step_size", "gamma_out", "gamma_in", "gamma_cl"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if math.isnan(v) or v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
            if math.isinf(v) and name != "gamma_out":
                raise ValueError(f"{name} must be finite, got {v}")
        if self.eps is not None and self.eps > 1:
            hint = f" (did you mean {self.eps:g}/255?)" if self.eps <= 255 else ""
            raise ValueError(f"eps must lie in [0, 1] pixel units, got {self.eps:g}{hint}")
        if self.attack not in ("pgd", "fgsm"):
            choices = ", ".join(a for a in ATTACKS if a in ("pgd", "fgsm"))
            raise ValueError(f"unknown training attack {self.attack!r}; choose from {choices}")
        if self.compile not in COMPILE:
            raise ValueError(f"unknown compile setting {self.compile!r}; choose from {', '.join(COMPILE)}")
        if self.select not in SELECT:
            raise ValueError(f"unknown selection criterion {self.select!r}; choose from {', '.join(SELECT)}")
        if self.model not in ("conv4", "resnet12", "resnet18"):
            raise ValueError(f"unknown model {self.model!r}; choose from conv4, resnet12, resnet18")
        from .metric import LEARNERS

        if self.learner not in LEARNERS:
            raise ValueError(f"unknown learner {self.learner!r}; choose from {', '.join(LEARNERS)}")
        m = method_preset(self.method)
        if self.learner != "maml" and (m.anil or self.gamma_in):
            raise ValueError(
                f"learner {self.learner!r} computes its head in closed form: it has no inner steps, "
                "so neither method 'anil' nor gamma_in > 0 applies to it"
            )
        if m.anil and self.gamma_in:
            raise ValueError("method 'anil' fine-tunes the head only; gamma_in > 0 is not supported with it")
        if self.gamma_in and m.regularizer == "none":
            raise ValueError(f"gamma_in > 0 needs a robust method; {self.method!r} has no regularizer")
        if self.gamma_out is not None and math.isinf(self.gamma_out) and m.regularizer == "trades":
            raise ValueError("gamma_out=inf (adversarial querying) needs the AT regularizer, not TRADES")
        if self.unlabeled and m.regularizer != "trades":
            raise ValueError(f"unlabeled images are used by the TRADES methods only, not {self.method!r}")

    @property
    def one_step_attack(self) -> bool:
        """Whether a robust method trains with a one-step attack (catastrophic overfitting is watched)."""
        return method_preset(self.method).robust and (self.attack == "fgsm" or self.attack_steps == 1)


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` of a config's ``device`` option (``"auto"``: CUDA when available).

    Raises:
        ValueError: an unknown device name, or CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"device {name!r} requested but this process sees {n} CUDA device"
                         f"{'s' if n != 1 else ''} (cuda:0{f'..cuda:{n - 1}' if n > 1 else ''}; "
                         "CUDA_VISIBLE_DEVICES decides which)")
    return dev
