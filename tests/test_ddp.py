"""examples/train.py --ddp: 2 CPU processes (torchrun, gloo) end with identical params, equal to one process.

Both runs see the same global batches (DistributedSampler with the same seed:
rank r of 2 takes every other index of the single-process order), and the solver
runs a fixed number of iterations (``--tol 0``) so that no stopping decision can
differ between a batch of 32 and two half-batches of 16 by floating-point noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--dataset", "synthetic", "--limit", "96", "--batch-size", "32", "--width", "8", "--blocks", "1",
        "--solver", "anderson", "--max-iter", "12", "--tol", "0", "--epochs", "2", "--quiet"]


def _leaves(tree, prefix=""):
    out = []
    for k in sorted(tree):
        v = tree[k]
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_two_process_ddp_matches_single_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "examples/train.py", "--ddp", *ARGS, "--out", str(ddp)])
    _run([sys.executable, "examples/train.py", *ARGS, "--out", str(single)])

    rank0 = _leaves(torch.load(ddp / "params.rank0.pt", weights_only=True))
    rank1 = _leaves(torch.load(ddp / "params.rank1.pt", weights_only=True))
    reference = _leaves(torch.load(single / "params.pt", weights_only=True))
    assert [n for n, _ in rank0] == [n for n, _ in reference]
    for (name, a), (_, b) in zip(rank0, rank1):
        assert torch.equal(a, b), f"replicas differ at {name}"
    for (name, a), (_, b) in zip(rank0, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    # Not vacuous: training moved the params far beyond that tolerance.
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    config = train.parse_args(ARGS)
    initial = _leaves(train.build_model(config, train.datasets.load("synthetic"), torch.device("cpu"))[1])
    assert max(float((a - b.detach()).abs().max()) for (_, a), (_, b) in zip(reference, initial)) > 1e-2

    log = json.loads((single / "log.json").read_text())
    ddp_log = json.loads((ddp / "log.json").read_text())
    assert ddp_log["world_size"] == 2 and len(ddp_log["epochs"]) == 2
    assert abs(ddp_log["epochs"][-1]["train_loss"] - log["epochs"][-1]["train_loss"]) < 1e-4
