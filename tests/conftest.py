import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic, CPU-first: every test starts from the same seeds."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
