"""Task sources: the Task record, converters from common batch formats, samplers, pools."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Task", "as_task", "iter_tasks"]


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
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Task(mv(self.support_x), mv(self.support_y), mv(self.query_x), mv(self.query_y),
                    mv(self.unlabeled), self.classes)


def as_task(obj: object) -> Task:
    """A :class:`Task` from a Task, a ``(sx, sy, qx, qy[, unlabeled])`` tuple or a dict."""
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
