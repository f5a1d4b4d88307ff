"""Every bad input gives a clear error naming the problem."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_meta import ATRegularizer, RobustMetaUpdate, adapt, perturb


@pytest.fixture
def model():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


@pytest.fixture
def data():
    return torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])


def test_mismatched_batch_sizes(model, data):
    x, y = data
    with pytest.raises(ValueError, match="same batch size"):
        adapt(model, x, y[:4], steps=1, step_size=0.1)
    r = RobustMetaUpdate(F.cross_entropy, model, eps=0.1, gamma_out=0.2)
    with pytest.raises(ValueError, match="same batch size"):
        r(x[:5], y)


def test_labels_out_of_range(model, data):
    x, _ = data
    bad = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        adapt(model, x, bad, steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="labels must lie"):
        RobustMetaUpdate(F.cross_entropy, model, eps=0.1, gamma_out=0.2)(x, bad - 1)


@pytest.mark.parametrize("eps", [-0.1, 1.5, 8, math.nan])
def test_eps_outside_unit_interval(model, eps):
    with pytest.raises(ValueError, match=r"eps must lie in \[0, 1\]"):
        RobustMetaUpdate(F.cross_entropy, model, eps=eps, gamma_out=0.2)
    with pytest.raises(ValueError, match="eps"):
        ATRegularizer("pgd", eps=eps)


def test_eps_hint_for_255_units(model):
    with pytest.raises(ValueError, match="8/255"):
        RobustMetaUpdate(F.cross_entropy, model, eps=8, gamma_out=0.2)


def test_pixels_outside_unit_box(model, data):
    x, y = data
    r = RobustMetaUpdate(F.cross_entropy, model, eps=0.1, gamma_out=0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(x * 2 - 0.5, y)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perturb("pgd", model, x + 1, y, eps=0.1)


def test_nan_inputs(model, data):
    x, y = data
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapt(model, x, y, steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="NaN"):
        RobustMetaUpdate(F.cross_entropy, model, eps=0.1, gamma_out=0.2)(x, y)


def test_unknown_attack_name(model):
    with pytest.raises(ValueError, match="unknown attack 'pgdd'; choose from pgd, fgsm"):
        RobustMetaUpdate(F.cross_entropy, model, attack="pgdd", eps=0.1, gamma_out=0.2)
    with pytest.raises(TypeError, match="attack must be"):
        perturb(42, model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), eps=0.1)


def test_model_without_parameters():
    with pytest.raises(ValueError, match="no parameters"):
        RobustMetaUpdate(F.cross_entropy, nn.ReLU(), eps=0.1, gamma_out=0.2)
    with pytest.raises(ValueError, match="no parameters"):
        adapt(nn.ReLU(), torch.rand(2, 3), torch.tensor([0, 1]), steps=1, step_size=0.1)


def test_negative_steps_and_bad_step_size(model, data):
    x, y = data
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adapt(model, x, y, steps=-1, step_size=0.1)
    with pytest.raises(TypeError, match="steps must be an int"):
        adapt(model, x, y, steps=2.5, step_size=0.1)
    with pytest.raises(ValueError, match="step size"):
        adapt(model, x, y, steps=1, step_size=-0.1)
    with pytest.raises(ValueError, match="unknown parameters"):
        adapt(model, x, y, steps=1, step_size={"nope": 0.1})


def test_missing_eps_and_bad_gamma(model):
    with pytest.raises(ValueError, match="eps is required"):
        RobustMetaUpdate(F.cross_entropy, model, gamma_out=0.2)
    with pytest.raises(ValueError, match="gamma_out"):
        RobustMetaUpdate(F.cross_entropy, model, eps=0.1, gamma_out=-1)
    with pytest.raises(TypeError, match="model must be"):
        RobustMetaUpdate(F.cross_entropy, "model", eps=0.1, gamma_out=1)


def test_non_tensor_inputs(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        adapt(model, [[0.0]], torch.tensor([0]), steps=1, step_size=0.1)
