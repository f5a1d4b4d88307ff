"""Generic task machinery: the `Task` record, converters, class splits, a sampler, pools.

Everything here is independent of where the images come from; the data sources live in the
sibling modules (`robust_meta.datasets.digits`, `.tensors`, `.torchmeta`, `.omniglot`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ClassSplits",
    "Task",
    "TaskSampler",
    "UnlabeledPool",
    "as_task",
    "iter_tasks",
    "split_classes",
]


@dataclass
class Task:
    """One few-shot task.

    Attributes:
        support_x, support_y: the fine-tuning set D (``(N·K, C, H, W)``, ``(N·K,)``).
        query_x, query_y: the validation set D' (``(N·Q, C, H, W)``, ``(N·Q,)``).
        unlabeled: optional extra unlabeled images of this task's classes ``(U, C, H, W)``.
        classes: optional real class ids behind the relative labels ``0..N-1``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    unlabeled: Tensor | None = None
    classes: Tensor | None = None

    @property
    def ways(self) -> int:
        return int(self.support_y.max()) + 1

    def to(self, device) -> Task:
        """The task on ``device``. Copies from the CPU to a GPU are asynchronous (the GPU
        stream orders them before any use); copies to the CPU are synchronous, so that CPU
        code never reads a tensor whose copy has not finished."""
        dev = torch.device(device)

        def mv(t):
            if t is None:
                return None
            return t.to(dev, non_blocking=dev.type == "cuda" and t.device.type == "cpu")

        return Task(mv(self.support_x), mv(self.support_y), mv(self.query_x), mv(self.query_y),
                    mv(self.unlabeled), self.classes)



def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Where a draw from ``generator`` happens: its own device (never the default device).

    Under ``torch.set_default_device("cuda")`` a ``randperm`` with a CPU generator and no
    ``device=`` would run on CUDA and raise; the draws here always name the device.
    """
    return torch.device("cpu") if generator is None else generator.device


def as_task(obj: object) -> Task:
    """A `Task` from a Task, a ``(sx, sy, qx, qy[, unlabeled])`` tuple or a dict."""
    if isinstance(obj, Task):
        return obj
    if isinstance(obj, Mapping):
        if "train" in obj and "test" in obj:
            (sx, sy), (qx, qy) = obj["train"], obj["test"]
            if sx.dim() == 5:
                raise ValueError("a torchmeta batch holds several tasks: use iter_tasks(batch)")
            return Task(sx, sy, qx, qy, obj.get("unlabeled"))
        return Task(**obj)
    if isinstance(obj, (tuple, list)) and len(obj) in (4, 5):
        return Task(*obj)
    raise TypeError(
        "a task must be a robust_meta.Task, a (support_x, support_y, query_x, query_y) tuple, "
        f"or a torchmeta batch dict; got {type(obj).__name__}"
    )


def iter_tasks(source: Iterable | Mapping) -> Iterator[Task]:
    """Tasks one by one from a task iterable, or a torchmeta batch ``{"train", "test"}``.

    A torchmeta ``BatchMetaDataLoader`` batch holds ``(B, N·K, C, H, W)`` tensors; it is
    split into its ``B`` tasks.
    """
    if isinstance(source, Mapping) and "train" in source and "test" in source:
        (sx, sy), (qx, qy) = source["train"], source["test"]
        if sx.dim() == 5:
            for i in range(sx.shape[0]):
                yield Task(sx[i], sy[i], qx[i], qy[i])
            return
        yield as_task(source)
        return
    for item in source:
        if isinstance(item, Mapping) and "train" in item and "test" in item:
            yield from iter_tasks(item)
        else:
            yield as_task(item)


_SPLIT_NAMES = ("train", "val", "test")


class ClassSplits(NamedTuple):
    """Disjoint meta-train / meta-val / meta-test class lists (real class ids, sorted).

    A named tuple: unpack it (``train, val, test = splits``), read ``splits.val``, or get a
    dict with ``splits._asdict()``.
    """

    train: list[int]
    val: list[int]
    test: list[int]


def _int_arg(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _labels_tensor(labels: object, name: str = "labels") -> Tensor:
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels, device="cpu")  # a Python list: never the default device
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D tensor of integer class ids, got {type(labels).__name__}") from err
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    return labels.long()


def split_classes(
    labels: Tensor | Sequence[int],
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    counts: Sequence[int] | None = None,
    seed: int = 0,
) -> ClassSplits:
    """Split the classes present in ``labels`` into disjoint train / val / test class lists.

    Meta-learning splits *classes*, not examples: test tasks are made of classes never seen
    in meta-training. The classes are shuffled with ``seed`` and cut in that order.

    Args:
        labels: class id of every example (or simply the list of class ids).
        fractions: shares of the classes for train / val / test (3 positive numbers summing
            to 1); rounded by largest remainder so that the counts sum to the number of
            classes. Ignored when ``counts`` is given.
        counts: exact numbers of classes per split (e.g. ``(64, 16, 20)`` for MiniImageNet);
            their sum may be less than the number of classes (the rest is unused).
        seed: seed of the shuffle (same seed, same split).

    Returns:
        `ClassSplits` ``(train, val, test)`` of sorted Python ints.

    Raises:
        ValueError: bad fractions/counts, or a split that would get no class.
        TypeError: labels that are not integer class ids.

    Example:
        >>> split_classes(torch.arange(10), counts=(4, 3, 3), seed=0).train
        [1, 4, 5, 7]
    """
    classes = torch.unique(_labels_tensor(labels)).tolist()
    n = len(classes)
    if counts is not None:
        counts = [_int_arg(c, "counts[i]", minimum=1) for c in counts]
        if len(counts) != 3:
            raise ValueError(f"counts must give 3 numbers (train, val, test), got {counts}")
        if sum(counts) > n:
            raise ValueError(f"counts {counts} ask for {sum(counts)} classes but labels hold only {n}")
    else:
        fr = [float(f) for f in fractions]
        if len(fr) != 3 or any(not f > 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {tuple(fractions)}")
        raw = [f * n for f in fr]
        counts = [int(r) for r in raw]
        by_remainder = sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        if min(counts) < 1:
            raise ValueError(
                f"{n} classes are too few for fractions {tuple(fractions)} (split sizes {counts}); "
                "pass counts=(n_train, n_val, n_test)"
            )
    g = torch.Generator().manual_seed(int(seed))
    order = [classes[i] for i in torch.randperm(n, generator=g, device=g.device).tolist()]
    a, b, c = counts
    return ClassSplits(sorted(order[:a]), sorted(order[a : a + b]), sorted(order[a + b : a + b + c]))


def _check_images(images: object, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() < 2:
        raise ValueError(f"{name} must be (N, C, H, W) (or (N, D)), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if images.numel():
        lo, hi = torch.aminmax(images)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contain NaN or infinite values")
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} must lie in [0, 1] (pixel space; normalisation belongs inside the model), "
                f"got values in [{lo:.4g}, {hi:.4g}]"
            )
    return images


def _as_class_list(classes: object, name: str = "classes") -> list[int]:
    if isinstance(classes, Tensor):
        return _labels_tensor(classes.flatten(), name).tolist()
    if isinstance(classes, numbers.Integral) and not isinstance(classes, bool):
        return [int(classes)]
    try:
        items = list(classes)  # type: ignore[call-overload]
    except TypeError as err:
        raise TypeError(f"{name} must be a sequence of class ids, got {type(classes).__name__}") from err
    return _labels_tensor(items, name).tolist() if items else []


class UnlabeledPool:
    """Extra unlabeled images for TRADES / semi-supervised training, drawn per task.

    With ``keys`` (the **real** class id of each image, e.g. pseudo-labels of mined
    STL-10 images), `draw` takes images of the task's own classes — ``Task.classes``,
    never the relative labels ``0..N-1`` (the authors' code indexed its pools by relative
    labels, so only N of its 64 pools were ever used). Without keys, images are drawn at
    random from the whole pool.

    Args:
        images: the pool, in [0, 1].
        keys: real class id per image, or ``None``.

    Raises:
        ValueError, TypeError: images outside [0, 1] or not floating point, keys of the wrong
            length or type.

    Shape:
        images: ``(M, C, H, W)``; keys: ``(M,)``.

    Example:
        >>> pool = UnlabeledPool(extra_images, keys=extra_labels)
        >>> sampler = TaskSampler(x, y, ways=5, shots=1, queries=15, unlabeled=10, unlabeled_pool=pool)
    """

    def __init__(self, images: Tensor, keys: Tensor | Sequence[int] | None = None):
        self.images = _check_images(images, "pool images")
        if len(images) == 0:
            raise ValueError("the unlabeled pool is empty")
        self.keys = None if keys is None else _labels_tensor(keys, "keys").to(images.device)
        if self.keys is not None and len(self.keys) != len(images):
            raise ValueError(f"keys must have one entry per image: {len(self.keys)} keys for {len(images)} images")
        self._by_key: dict[int, Tensor] = {}
        if self.keys is not None:
            for k in torch.unique(self.keys).tolist():
                self._by_key[k] = (self.keys == k).nonzero().flatten()

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        keyed = f"{len(self._by_key)} keyed classes" if self.keys is not None else "no keys"
        return f"UnlabeledPool({len(self)} images, {keyed})"

    def draw(
        self,
        n: int,
        *,
        classes: Tensor | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` images without replacement.

        Args:
            n: how many images.
            classes: real class ids of the task (``Task.classes``). With keys, the draw is
                spread evenly over these classes (the first ``n % len(classes)`` classes, in
                the given order, get one more); without keys it is ignored.
            generator: a CPU ``torch.Generator`` for reproducible draws.

        Returns:
            The images, on the pool's device.

        Raises:
            ValueError: ``n`` larger than the images available (per class with keys), or a
                class the pool has no image of (the message reminds that keys are real class
                ids, not relative labels).

        Shape:
            ``(n, C, H, W)``.
        """
        n = _int_arg(n, "n", minimum=0)
        if self.keys is None or classes is None:
            # no keys, or no classes asked: uniform over the whole pool
            if n > len(self.images):
                raise ValueError(f"cannot draw {n} images from a pool of {len(self.images)}")
            pick = torch.randperm(len(self.images), generator=generator, device=_draw_device(generator))[:n]
            return self.images[pick.to(self.images.device)]
        wanted = _as_class_list(classes)
        if not wanted:
            raise ValueError("classes is empty")
        missing = [c for c in wanted if c not in self._by_key]
        if missing:
            raise ValueError(
                f"the unlabeled pool has no image keyed by class {missing[:5]} (keys are real class ids, "
                f"not the task's relative labels 0..N-1; the pool has keys {sorted(self._by_key)[:10]})"
            )
        base, extra = divmod(n, len(wanted))
        picks = []
        for i, c in enumerate(wanted):
            k = base + (1 if i < extra else 0)
            idx = self._by_key[c]
            if k > len(idx):
                raise ValueError(f"class {c} has {len(idx)} unlabeled images in the pool, {k} were asked for")
            picks.append(idx[torch.randperm(len(idx), generator=generator, device=_draw_device(generator))[:k].to(idx.device)])
        return self.images[torch.cat(picks)]


class TaskSampler:
    """Seeded N-way K-shot episodes from an image tensor, with a random label permutation.

    Every task picks ``ways`` distinct classes from ``classes`` at random; relative label
    ``i`` is the ``i``-th picked class, so the mapping real class → label changes from task
    to task (``Task.classes[i]`` holds the real id behind label ``i``). Support and query
    images of a class are disjoint; with ``unlabeled > 0`` each task also gets unlabeled
    images of **its own real classes**: from ``unlabeled_pool`` if given, otherwise further
    images of the same classes that are in neither the support nor the query set.

    Args:
        images: all images, floating point in [0, 1], or uint8 (0–255, e.g. a
            `robust_meta.datasets.BenchmarkSplit`'s memory-mapped images): those stay uint8
            and each task's images become float32 / 255 when it is drawn, so a split never
            exists as float in memory.
        labels: their real class ids.
        ways: classes per task N.
        shots: support images per class K.
        queries: query images per class.
        classes: the classes to draw from (one split of `split_classes`); default all.
        unlabeled: unlabeled images per task (spread evenly over its classes).
        unlabeled_pool: an `UnlabeledPool` to draw them from.
        seed: seed of the sampler's private generator; the same seed gives the same tasks.
            The global RNG is neither used nor advanced.

    Raises:
        ValueError: ``ways`` larger than the number of classes, a class with fewer than
            ``shots + queries (+ unlabeled share)`` images (the message lists them), classes
            absent from ``labels``, images outside [0, 1], mismatched lengths.
        TypeError: wrong argument types.

    Shape:
        images: ``(M, C, H, W)``; labels: ``(M,)``. Each task: support ``(N·K, C, H, W)``,
        query ``(N·Q, C, H, W)``, unlabeled ``(U, C, H, W)``, labels grouped by class.

    Example:
        >>> images, labels = load_digits()
        >>> splits = digits_splits()
        >>> sampler = TaskSampler(images, labels, ways=3, shots=1, queries=5, classes=splits.train)
        >>> tasks = sampler.sample(4)
        >>> batches = sampler.batches(4)   # endless: next(batches) -> list of 4 tasks
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | Sequence[int],
        *,
        ways: int,
        shots: int,
        queries: int,
        classes: Tensor | Sequence[int] | None = None,
        unlabeled: int = 0,
        unlabeled_pool: UnlabeledPool | None = None,
        seed: int = 0,
    ):
        if isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() >= 2:
            self.images = images  # in range by construction; converted per task in `_take`
        else:
            self.images = _check_images(images)
        labels = _labels_tensor(labels)
        if len(labels) != len(images):
            raise ValueError(f"images and labels differ in length: {len(images)} and {len(labels)}")
        self.labels = labels
        self.ways = _int_arg(ways, "ways", minimum=1)
        self.shots = _int_arg(shots, "shots", minimum=1)
        self.queries = _int_arg(queries, "queries", minimum=1)
        self.unlabeled = _int_arg(unlabeled, "unlabeled", minimum=0)
        if unlabeled_pool is not None and not isinstance(unlabeled_pool, UnlabeledPool):
            raise TypeError(f"unlabeled_pool must be an UnlabeledPool, got {type(unlabeled_pool).__name__}")
        self.unlabeled_pool = unlabeled_pool
        present = torch.unique(labels).tolist()
        self.classes = present if classes is None else sorted(set(_as_class_list(classes)))
        absent = sorted(set(self.classes) - set(present))
        if absent:
            raise ValueError(f"classes {absent[:10]} have no image in labels")
        if self.ways > len(self.classes):
            raise ValueError(
                f"ways={self.ways} is more than the {len(self.classes)} classes available "
                f"({self.classes[:10]}{'...' if len(self.classes) > 10 else ''})"
            )
        per_class_unl = 0
        if self.unlabeled and unlabeled_pool is None:
            per_class_unl = -(-self.unlabeled // self.ways)  # ceil
        need = self.shots + self.queries + per_class_unl
        self._by_class = {c: (labels == c).nonzero().flatten() for c in self.classes}
        short = {c: len(i) for c, i in self._by_class.items() if len(i) < need}
        if short:
            if per_class_unl:
                what = f"shots + queries + unlabeled per class = {self.shots} + {self.queries} + {per_class_unl}"
            else:
                what = f"shots + queries = {self.shots} + {self.queries}"
            raise ValueError(
                f"{len(short)} class(es) have fewer images than {what} = {need}: "
                + ", ".join(f"class {c}: {k}" for c, k in list(short.items())[:8])
            )
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (
            f"TaskSampler({self.ways}-way {self.shots}-shot, {self.queries} queries, "
            f"{len(self.classes)} classes, unlabeled={self.unlabeled}, seed={self.seed})"
        )

    def reset(self) -> None:
        """Restart the task stream from the seed."""
        self.generator.manual_seed(self.seed)

    def _take(self, index: Tensor) -> Tensor:
        x = self.images[index]
        return x.float().div_(255) if x.dtype == torch.uint8 else x

    def _one(self) -> Task:
        g = self.generator
        device = self.images.device
        order = torch.randperm(len(self.classes), generator=g, device=g.device)[: self.ways].tolist()
        chosen = [self.classes[i] for i in order]
        k = self.shots + self.queries
        sup, qry, unl = [], [], []
        base, extra = divmod(self.unlabeled, self.ways)
        for rank, c in enumerate(chosen):
            idx = self._by_class[c]
            perm = idx[torch.randperm(len(idx), generator=g, device=g.device).to(idx.device)]
            sup.append(perm[: self.shots])
            qry.append(perm[self.shots : k])
            if self.unlabeled and self.unlabeled_pool is None:
                unl.append(perm[k : k + base + (1 if rank < extra else 0)])
        rel = torch.arange(self.ways, device=device)
        task = Task(
            self._take(torch.cat(sup).to(device)),
            rel.repeat_interleave(self.shots),
            self._take(torch.cat(qry).to(device)),
            rel.repeat_interleave(self.queries),
            classes=torch.tensor(chosen, dtype=torch.long, device="cpu"),
        )
        if self.unlabeled:
            if self.unlabeled_pool is not None:
                task.unlabeled = self.unlabeled_pool.draw(self.unlabeled, classes=task.classes, generator=g)
            else:
                task.unlabeled = self._take(torch.cat(unl).to(device))
        return task

    def sample(self, n_tasks: int) -> list[Task]:
        """The next ``n_tasks`` tasks of the seeded stream."""
        n_tasks = _int_arg(n_tasks, "n_tasks", minimum=0)
        return [self._one() for _ in range(n_tasks)]

    def batches(self, batch_size: int) -> Iterator[list[Task]]:
        """An endless iterator of meta-batches (lists of ``batch_size`` tasks)."""
        batch_size = _int_arg(batch_size, "batch_size", minimum=1)
        while True:
            yield self.sample(batch_size)

    def __iter__(self) -> Iterator[Task]:
        """Tasks one by one, endlessly."""
        while True:
            yield self._one()
