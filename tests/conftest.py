import os
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
    # Under pytest-xdist every worker is a process: one thread each avoids oversubscription.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
