"""Evaluating a training checkpoint on its dataset's test (or val) split: ``robust-meta eval``
and the demo. Internal; the command is `robust_meta.cli`."""

from __future__ import annotations

from collections.abc import Sequence

from ._errors import UsageError

__all__ = ["eval_checkpoint", "eval_setup"]


def eval_setup(path: str, *, tasks: int, split: str = "test", data_folder: str | None = None,
                device: str = "auto", seed: int = 0):
    """The model, its config, the evaluation tasks and the data's identity of one ``eval``.

    Refuses a checkpoint trained on other data than the folder holds now (its split would not
    be the one it was trained with: the test split could hold training classes).
    """
    from .metric import learner_from_checkpoint
    from .train import _device, build_task_sources, data_identity, model_from_checkpoint, step_seed

    if tasks < 1:
        raise UsageError(f"--tasks must be >= 1, got {tasks}")
    dev = _device(device)
    model, config, ckpt = model_from_checkpoint(path, device=dev)
    learner = learner_from_checkpoint(model, config, ckpt)
    if data_folder is not None:
        config = config.replace(data_folder=data_folder)
    sources = build_task_sources(config)
    data_id = data_identity(sources)
    trained_on = ckpt.get("extra", {}).get("data")
    if trained_on is not None and data_id is not None and trained_on != data_id:
        raise UsageError(
            f"{path} was trained on other data than {config.data_folder or config.dataset!r} holds now "
            "(different images or class split, e.g. an archive added to the folder): its "
            f"{split} split could contain classes it was trained on. Evaluate it on the data it "
            "was trained on (--data-folder)"
        )
    task_list = sources[split].sample(tasks, step_seed(seed, f"eval:{split}"))
    return model, config, task_list, data_id, dev, learner


def eval_checkpoint(
    path: str, *, tasks: int, split: str = "test", attacks: Sequence[str] = ("pgd",),
    eps: Sequence[float] | None = None, steps: int | None = None, step_size: float | None = None,
    attack_steps: int = 10, finetune: str = "standard", data_folder: str | None = None,
    device: str = "auto", seed: int = 0, progress: bool = True, mode: str | None = None,
    workers: int = 1, compile: str = "auto", setup: tuple | None = None,
):
    """Evaluate a checkpoint; ``mode`` None: train-mode batch norm for MAML learners (the MAML
    convention), eval mode (running statistics) for metric learners (as their papers do)."""
    from .anil import ANILHead
    from .evaluation import evaluate
    from .presets import method_preset

    if setup is None:
        setup = eval_setup(path, tasks=tasks, split=split, data_folder=data_folder, device=device, seed=seed)
    model, config, task_list, _, _, learner = setup
    if mode is None:
        mode = "train" if learner is None else "eval"
    eps_list = list(eps) if eps else [0.0, config.eps]
    if 0.0 not in eps_list:
        eps_list = [0.0, *eps_list]
    anil = ANILHead(model) if method_preset(config.method).anil else None
    result = evaluate(
        model, task_list, eps=eps_list, steps=config.test_inner_steps if steps is None else steps,
        step_size=config.inner_lr if step_size is None else step_size, finetune=finetune,
        anil=anil, learner=learner, attacks=tuple(attacks), attack_steps=attack_steps, seed=seed,
        progress=progress,
        train_mode=mode == "train", workers=workers,
        compile={"on": True, "off": False}.get(compile, compile),
    )
    result.settings.update({"checkpoint": str(path), "split": split, "method": config.method,
                            "dataset": config.dataset, "train_eps": config.eps,
                            "learner": config.learner, "mode": mode})
    return result, config
