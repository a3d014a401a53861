import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import scripted_envs  # noqa: E402,F401  (registers the fastrl-test/* envs before workers fork)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
