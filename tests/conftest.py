"""Test-session settings: one intra-op thread.

The tests use small tensors, where a second thread buys nothing and, on a busy
2-core machine, oversubscription slowed some tests ten-fold. Process-level
parallel tests (DDP) start their own processes.
"""

import torch

torch.set_num_threads(1)
