"""Test-session settings.

One intra-op thread: the tests use small tensors, where a second thread buys
nothing and, on a busy 2-core machine, oversubscription slowed some tests
ten-fold. Process-level parallel tests (DDP) start their own processes.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_denormals():
    """The example scripts flush denormals (a process-wide CPU flag); tests that run them
    in-process must not leak it: hypothesis refuses to draw floats with denormals off."""
    yield
    torch.set_flush_denormal(False)
