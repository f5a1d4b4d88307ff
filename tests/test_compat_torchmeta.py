"""torchmeta 1.8.0 on torch 2.x through robust_meta.compat.torchmeta, end to end.

(a) ``adapt`` == torchmeta's ``gradient_update_parameters`` on a MetaModule conv net;
(b) the three-line wrap of a torchmeta MAML loop with ``RobustMetaUpdate``;
(c) torchmeta's real data pipeline on fabricated on-disk datasets;
(d) clear errors for missing data / missing torchmeta; the patches themselves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("torchmeta") is None:  # CI installs it (see INSTALL_HINT)
    pytest.skip("torchmeta is not installed: pip install --no-deps torchmeta==1.8.0 ordered-set h5py",
                allow_module_level=True)

import robust_meta.compat.torchmeta as compat  # noqa: E402  (patches before torchmeta imports)
from robust_meta import RobustMetaUpdate, adapt  # noqa: E402
from robust_meta.data import (  # noqa: E402
    Task,
    TaskSampler,
    digits_splits,
    iter_tasks,
    load_digits,
    torchmeta_loader,
    torchmeta_tasks,
)

sys.path.insert(0, os.path.dirname(__file__))
from _torchmeta_fixtures import write_cifar100, write_miniimagenet, write_omniglot  # noqa: E402
from torchmeta.modules import (  # noqa: E402
    MetaBatchNorm2d,
    MetaConv2d,
    MetaLinear,
    MetaModule,
    MetaMultiheadAttention,
    MetaSequential,
)
from torchmeta.utils.gradient_based import gradient_update_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def meta_convnet(in_channels=1, n_classes=3, hidden=4, size=8) -> MetaModule:
    """conv3x3 → BN (batch statistics) → ReLU → maxpool → linear, all torchmeta layers."""
    return MetaSequential(
        MetaConv2d(in_channels, hidden, 3, padding=1),
        MetaBatchNorm2d(hidden, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        MetaLinear(hidden * (size // 2) ** 2, n_classes),
    )


def torchmeta_inner_loop(model, x, y, *, steps, step_size, first_order):
    params = None
    for _ in range(steps):
        loss = F.cross_entropy(model(x, params=params), y)
        model.zero_grad()
        params = gradient_update_parameters(model, loss, params=params, step_size=step_size,
                                            first_order=first_order)
    return params


@pytest.fixture(scope="module")
def digit_tasks():
    images, labels = load_digits()
    sampler = TaskSampler(images, labels, ways=3, shots=2, queries=4, classes=digits_splits().train, seed=0)
    return sampler.sample(4)


# --------------------------------------------------------------------------- (a) adapt == torchmeta


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_equals_gradient_update_parameters(steps, first_order):
    torch.manual_seed(0)
    model = meta_convnet().double()
    sx, sy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    qx, qy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3

    ref = torchmeta_inner_loop(model, sx, sy, steps=steps, step_size=0.4, first_order=first_order)
    ours = adapt(model, sx, sy, steps=steps, step_size=0.4, first_order=first_order)
    assert list(ours) == list(ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=1e-13)
    assert any(not torch.equal(ref[n], p) for n, p in model.meta_named_parameters())

    # and the meta-gradients through them
    theta = list(model.parameters())
    g_ref = torch.autograd.grad(F.cross_entropy(model(qx, params=ref), qy), theta)
    g_ours = torch.autograd.grad(F.cross_entropy(model(qx, params=ours), qy), theta)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_first_and_second_order_meta_gradients_differ():
    torch.manual_seed(0)
    model = meta_convnet().double()
    sx, sy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    qx, qy = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.arange(6) % 3
    grads = []
    for fo in (False, True):
        fast = adapt(model, sx, sy, steps=2, step_size=0.4, first_order=fo)
        grads.append(torch.autograd.grad(F.cross_entropy(model(qx, params=fast), qy), list(model.parameters())))
    assert any((a - b).abs().max() > 1e-8 for a, b in zip(*grads))


# --------------------------------------------------------------------------- (b) the 3-line wrap


def maml_outer_loss(model, tasks, robust: RobustMetaUpdate | None, *, attack_seed=0):
    """A torchmeta-style MAML step (tutorial code); ``robust`` replaces its cross-entropy line."""
    outer_loss = torch.tensor(0.0)
    for i, task in enumerate(tasks):
        train_input, train_target, test_input, test_target = (
            task.support_x, task.support_y, task.query_x, task.query_y)
        train_logit = model(train_input)
        inner_loss = F.cross_entropy(train_logit, train_target)
        model.zero_grad()
        params = gradient_update_parameters(model, inner_loss, step_size=0.4, first_order=False)
        torch.manual_seed(attack_seed + i)  # same random start for every variant compared
        if robust is None:
            outer_loss += F.cross_entropy(model(test_input, params=params), test_target)
        else:
            outer_loss += robust(test_input, test_target, params=params)
    return outer_loss / len(tasks)


def test_wrapped_loop_trains(digit_tasks):
    torch.manual_seed(0)
    model = meta_convnet()
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=2 / 255, gamma_out=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = maml_outer_loss(model, digit_tasks, robust)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses
    assert robust.last is not None and robust.last.as_dict()["robust_loss"] > 0


def test_gamma_zero_is_exactly_plain_maml(digit_tasks):
    torch.manual_seed(0)
    model = meta_convnet()
    plain = maml_outer_loss(model, digit_tasks, None)
    g_plain = torch.autograd.grad(plain, list(model.parameters()))
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=2 / 255, gamma_out=0.0)
    wrapped = maml_outer_loss(model, digit_tasks, robust)
    g_wrapped = torch.autograd.grad(wrapped, list(model.parameters()))
    assert torch.equal(plain, wrapped)
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_wrapped))


def _fgsm_by_hand(model, params, x, y, eps):
    """FGSM from a uniform random start (Wong et al.), at detached adapted weights."""
    detached = OrderedDict((k, v.detach()) for k, v in params.items())
    start = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1).requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(start, params=detached), y), start)[0]
    delta = torch.clamp(start.detach() + 1.25 * eps * grad.sign() - x, -eps, eps)
    return torch.clamp(x + delta, 0, 1)


def test_gamma_inf_is_the_adversarial_loss_by_hand(digit_tasks):
    torch.manual_seed(0)
    model = meta_convnet()
    eps = 8 / 255
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=eps, gamma_out=float("inf"))
    wrapped = maml_outer_loss(model, digit_tasks, robust)

    by_hand = torch.tensor(0.0)
    for i, task in enumerate(digit_tasks):
        model.zero_grad()
        params = gradient_update_parameters(
            model, F.cross_entropy(model(task.support_x), task.support_y), step_size=0.4)
        torch.manual_seed(i)
        x_adv = _fgsm_by_hand(model, params, task.query_x, task.query_y, eps)
        assert (x_adv - task.query_x).abs().max() <= eps + 1e-7
        by_hand += F.cross_entropy(model(x_adv, params=params), task.query_y)
    by_hand = by_hand / len(digit_tasks)
    torch.testing.assert_close(wrapped, by_hand, rtol=1e-6, atol=1e-7)
    g_w = torch.autograd.grad(wrapped, list(model.parameters()))
    g_h = torch.autograd.grad(by_hand, list(model.parameters()))
    for a, b in zip(g_w, g_h):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    clean = maml_outer_loss(model, digit_tasks, None)
    assert float(wrapped.detach()) > float(clean.detach())  # the attack does raise the loss


def test_positive_gamma_changes_the_meta_gradient(digit_tasks):
    torch.manual_seed(0)
    model = meta_convnet()
    g_plain = torch.autograd.grad(maml_outer_loss(model, digit_tasks, None), list(model.parameters()))
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="fgsm", eps=8 / 255, gamma_out=0.2)
    g_rob = torch.autograd.grad(maml_outer_loss(model, digit_tasks, robust), list(model.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(g_plain, g_rob)) > 1e-4


# --------------------------------------------------------------------------- (c) real data path


@pytest.fixture(scope="module")
def tm_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchmeta_data")
    write_omniglot(root, n_classes=5, n_images=5, size=105)
    write_miniimagenet(root, n_classes=6, n_images=5, size=84)
    write_cifar100(root, n_classes=6, n_images=5)
    return root


@pytest.mark.parametrize(
    "name, helper, channels, size",
    [("omniglot", "omniglot", 1, 28), ("miniimagenet", "miniimagenet", 3, 84), ("cifar-fs", "cifar_fs", 3, 32),
     ("fc100", "fc100", 3, 32)],
)
def test_torchmeta_helpers_and_loader_on_disk(tm_root, name, helper, channels, size):
    """torchmeta's own helper + ClassSplitter + BatchMetaDataLoader, then robust_meta on a batch."""
    from torchmeta.datasets import helpers
    from torchmeta.utils.data import BatchMetaDataLoader

    dataset = getattr(helpers, helper)(str(tm_root), shots=1, ways=3, test_shots=2, meta_train=True,
                                       download=False, seed=0)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=2, num_workers=0)))
    x, y = batch["train"]
    assert x.shape == (2, 3, channels, size, size) and y.shape == (2, 3)
    assert batch["test"][0].shape == (2, 6, channels, size, size)
    assert 0 <= float(x.min()) and float(x.max()) <= 1

    tasks = list(iter_tasks(batch))
    assert len(tasks) == 2 and all(isinstance(t, Task) for t in tasks)
    torch.manual_seed(0)
    model = meta_convnet(channels, 3, 2, size)
    robust = RobustMetaUpdate(F.cross_entropy, model, attack="pgd", eps=2 / 255, gamma_out=0.2, attack_steps=2)
    outer = 0.0
    for t in tasks:
        fast = adapt(model, t.support_x, t.support_y, steps=1, step_size=0.1)
        outer = outer + robust(t.query_x, t.query_y, params=fast)
    outer.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_torchmeta_loader_with_workers_and_our_wrapper(tm_root):
    loader = torchmeta_loader("cifar-fs", tm_root, ways=3, shots=1, queries=2, split="val",
                              batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["train"][0].shape == (2, 3, 3, 32, 32)


def test_plain_dataloader_over_a_torchmeta_task_uses_getitems(tm_root):
    """torch's DataLoader fetches batches through SubsetTask.__getitems__ (patched)."""
    from torchmeta.datasets import helpers
    from torchmeta.utils.data.task import SubsetTask

    dataset = helpers.miniimagenet(str(tm_root), shots=2, ways=3, test_shots=1, meta_val=True, seed=0)
    task = dataset[(0, 2, 4)]["train"]
    assert isinstance(task, SubsetTask)
    xs, ys = next(iter(torch.utils.data.DataLoader(task, batch_size=len(task))))
    assert torch.equal(xs, torch.stack([task[i][0] for i in range(len(task))]))
    assert ys.tolist() == [task[i][1] for i in range(len(task))]  # target transform applied
    assert sorted(set(ys.tolist())) == [0, 1, 2]


def test_torchmeta_tasks_are_reproducible_and_name_their_real_classes(tm_root):
    import h5py

    kw = dict(ways=3, shots=1, queries=2, split="test", n_tasks=3, seed=5)
    state = torch.get_rng_state()
    a = torchmeta_tasks("miniimagenet", tm_root, **kw)
    b = torchmeta_tasks("miniimagenet", tm_root, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    for s, t in zip(a, b):
        assert torch.equal(s.support_x, t.support_x) and torch.equal(s.query_y, t.query_y)
        assert torch.equal(s.classes, t.classes)
    assert len({tuple(t.classes.tolist()) for t in a}) > 1
    # every image of label i is one of the raw images of class classes[i] (read straight from hdf5)
    folder = Path(tm_root) / "miniimagenet"
    names = json.loads((folder / "test_labels.json").read_text())
    with h5py.File(folder / "test_data.hdf5", "r") as f:
        raw = {i: torch.as_tensor(f["datasets"][n][()]).permute(0, 3, 1, 2).float() / 255 for i, n in enumerate(names)}
    for task in a:
        assert task.support_x.shape == (3, 3, 84, 84) and task.query_x.shape == (6, 3, 84, 84)
        for x, y in zip(torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])):
            pool = raw[int(task.classes[y])]
            assert ((pool - x).abs().amax(dim=(1, 2, 3)) < 1e-6).any()


def test_evaluate_on_torchmeta_tasks(tm_root):
    evaluate_mod = pytest.importorskip("robust_meta.evaluation")
    from robust_meta.models import Conv4

    tasks = torchmeta_tasks("omniglot", tm_root, ways=3, shots=1, queries=2, split="val", n_tasks=2, seed=0)
    model = Conv4(1, 3, 4, image_size=28)
    result = evaluate_mod.evaluate(model, tasks, eps=2 / 255, steps=1, step_size=0.1, attack_steps=2,
                                   progress=False)
    for key in ("sa", "ra"):
        m = result.metrics[key]
        assert 0.0 <= m.mean <= 1.0 and m.ci95 >= 0


# --------------------------------------------------------------------------- (d) errors


def test_missing_data_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        torchmeta_tasks("miniimagenet", tmp_path / "nowhere", ways=5, shots=1, queries=15, n_tasks=1)
    msg = str(err.value)
    assert "does not exist" in msg and "download=True" in msg and "pip install --no-deps torchmeta" in msg
    (tmp_path / "omniglot").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks .*omniglot/data\.hdf5.*github\.com/brendenlake"):
        torchmeta_loader("omniglot", tmp_path, ways=5, shots=1, queries=1, split="val")
    with pytest.raises(ValueError, match="unknown torchmeta dataset 'imagenet'; choose from omniglot"):
        torchmeta_tasks("imagenet", tmp_path, ways=5, shots=1, queries=1, n_tasks=1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        torchmeta_tasks("omniglot", tmp_path, ways=5, shots=1, queries=1, n_tasks=1, split="dev")


def test_ways_larger_than_split_is_refused(tm_root):
    with pytest.raises(ValueError, match="ways=7 is more than the 6 classes"):
        torchmeta_tasks("cifar-fs", tm_root, ways=7, shots=1, queries=1, n_tasks=1)


def test_missing_torchmeta_gives_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchmeta" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps torchmeta==1\.8\.0 ordered-set h5py"):
        compat.patch_torchmeta()


def test_import_time_behaviour_in_a_fresh_interpreter():
    code = textwrap.dedent(
        """
        import sys, importlib, importlib.util
        import robust_meta, robust_meta.data, robust_meta.models, robust_meta.compat
        assert "torchmeta" not in sys.modules, "robust_meta must not import torchmeta"
        try:
            import torchmeta  # unpatched: fails on this stack
        except ImportError:
            pass
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda n, *a: None if n == "torchmeta" else real(n, *a)
        try:
            import robust_meta.compat.torchmeta
        except ImportError as err:
            assert "pip install --no-deps torchmeta==1.8.0 ordered-set h5py" in str(err), err
        else:
            raise AssertionError("no ImportError without torchmeta")
        importlib.util.find_spec = real
        sys.modules.pop("robust_meta.compat.torchmeta", None)
        import robust_meta.compat.torchmeta as c
        import torchmeta.datasets.helpers, torchmeta.modules
        print(len(c.patches_applied()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 3


def test_patch_is_idempotent():
    from torchmeta.utils.data.task import SubsetTask

    before = compat.patches_applied()
    getitems = SubsetTask.__getitems__
    assert compat.patch_torchmeta() is sys.modules["torchmeta"]
    compat.patch_torchmeta()
    assert compat.patches_applied() == before
    assert SubsetTask.__getitems__ is getitems


@pytest.mark.parametrize("batch_first", [False, True])
def test_meta_multihead_attention_matches_torch(batch_first):
    torch.manual_seed(0)
    ours = MetaMultiheadAttention(4, 2, batch_first=batch_first)
    ref = nn.MultiheadAttention(4, 2, batch_first=batch_first)
    ref.load_state_dict(ours.state_dict())
    q = torch.randn(3, 5, 4)
    expected, w_ref = ref(q, q, q)
    got, w = ours(q, q, q)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(w, w_ref)
    params = OrderedDict((k, v * 2) for k, v in ours.meta_named_parameters())
    ref2 = nn.MultiheadAttention(4, 2, batch_first=batch_first)
    ref2.load_state_dict({k: v * 2 for k, v in ours.state_dict().items()})
    torch.testing.assert_close(ours(q, q, q, params=params)[0], ref2(q, q, q)[0])


def test_numpy2_aliases_only_for_the_legacy_modules():
    import numpy as np
    from torchmeta.datasets import bach, tcga

    if hasattr(np, "int"):
        pytest.skip("numpy < 1.24 still has np.int")
    assert tcga.np.int is int and bach.np.float is float
    assert tcga.np.ceil is np.ceil
    assert not hasattr(np, "int")  # numpy's own namespace untouched


@pytest.mark.slow
def test_torchmeta_own_test_suite_passes_under_the_patch(tmp_path):
    """torchmeta's bundled tests (modules, transforms, samplers, dataset helpers on fabricated data)."""
    data = tmp_path / "data"
    write_omniglot(data, n_classes=6, n_images=20, size=105)
    write_miniimagenet(data, n_classes=6, n_images=20)
    write_cifar100(data, n_classes=6, n_images=20)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # torchmeta's test_matching imports `flaky` (a retry decorator): a no-op stand-in
    (stubs / "flaky.py").write_text("def flaky(*a, **k):\n    return a[0] if a and callable(a[0]) else (lambda f: f)\n")
    env = dict(os.environ, TORCHMETA_DATA_FOLDER=str(data),
               PYTHONPATH=os.pathsep.join([str(stubs), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # datasets we did not fabricate (tieredimagenet, cub, double/triple MNIST, tabular) are deselected
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "torchmeta.tests", "-p", "robust_meta.compat.torchmeta",
           "-q", "-p", "no:cacheprovider", "-x", "-k",
           "not tabular and not tieredimagenet and not cub and not doublemnist and not triplemnist"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout
