"""Test-session settings.

One intra-op thread: the tests use small tensors, where a second thread buys
nothing and, on a busy 2-core machine, oversubscription slowed some tests
ten-fold. Process-level parallel tests (DDP) start their own processes.
"""

import pytest
import torch
from helpers import examples_extra_missing

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``examples`` need the examples extra; without it they are skipped, saying why."""
    missing = examples_extra_missing()
    if missing:
        skip = pytest.mark.skip(reason=f"needs the examples extra ({', '.join(missing)} missing)")
        for item in items:
            if "examples" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_denormals():
    """The example scripts flush denormals (a process-wide CPU flag); tests that run them
    in-process must not leak it: hypothesis refuses to draw floats with denormals off."""
    yield
    torch.set_flush_denormal(False)
