import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import scripted_envs  # noqa: E402,F401  (registers the fastrl-test/* envs before workers fork)

# A shell without job control starts a background command (`pytest &` in a script) with
# Ctrl-C ignored, and fastrl rightly leaves an ignored signal ignored (tested), so the
# Ctrl-C tests would fail or wait forever. They are about a process that takes Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
