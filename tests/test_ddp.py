"""Two CPU processes (torchrun, gloo) equal one process on the same global batch.

- examples/train.py --ddp (a params pytree, gradients all-reduced by hand) ends with
  identical params on both ranks, equal to a single-process run;
- a model written with ``nn.Module`` around a ``dq.DEQ`` and wrapped in
  ``DistributedDataParallel`` (this file is also its torchrun worker) gets, after one
  optimiser step, the gradients and params of a single-process step on the global batch.

train.py: both runs see the same global batches (DistributedSampler with the same seed:
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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deq_functional as dq

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


@pytest.mark.examples
def test_two_process_ddp_matches_single_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "examples/train.py", "--ddp", *ARGS, "--out", str(ddp)])
    _run([sys.executable, "examples/train.py", *ARGS, "--out", str(single)])

    rank0 = _leaves(torch.load(ddp / "params.rank0.pt", weights_only=True))
    rank1 = _leaves(torch.load(ddp / "params.rank1.pt", weights_only=True))
    reference = _leaves(torch.load(single / "params.pt", weights_only=True))
    assert [n for n, _ in rank0] == [n for n, _ in reference]
    for (name, a), (_, b) in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b), f"replicas differ at {name}"
    for (name, a), (_, b) in zip(rank0, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)
    # Not vacuous: training moved the params far beyond that tolerance.
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    config = train.parse_args(ARGS)
    initial = _leaves(train.build_model(config, train.datasets.load("synthetic"), torch.device("cpu"))[1])
    assert max(float((a - b.detach()).abs().max()) for (_, a), (_, b) in zip(reference, initial, strict=True)) > 1e-2

    log = json.loads((single / "log.json").read_text())
    ddp_log = json.loads((ddp / "log.json").read_text())
    assert ddp_log["world_size"] == 2 and len(ddp_log["epochs"]) == 2
    assert abs(ddp_log["epochs"][-1]["train_loss"] - log["epochs"][-1]["train_loss"]) < 1e-4


# ----------------------------------------------------------------------------- dq.DEQ under DistributedDataParallel
# float64, per-sample problems with a fixed iteration budget (tol 0): a sample's fixed
# point and its IFT adjoint do not depend on the rest of its batch, so two half-batches
# reproduce the global batch up to rounding.
GLOBAL_BATCH, LR = 8, 0.5


class _Cell(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class _DEQClassifier(nn.Module):
    def __init__(self, n_in: int = 6, width: int = 8, n_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.deq = dq.DEQ(_Cell(width), dq.Anderson(max_iter=15, tol=0.0), "ift", per_sample=True)
        self.out = nn.Linear(width, n_out)

    def forward(self, d):
        z, info = self.deq(self.inp(d))
        return self.out(z), info


def _deq_setup():
    """The model (seeded, float64, contractive cell) and the global batch ``(d, y)``."""
    torch.manual_seed(0)
    model = _DEQClassifier().double()
    with torch.no_grad():
        model.deq.cell.lin.weight.mul_(0.5)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), torch.arange(GLOBAL_BATCH) % 3


def _deq_step(model, d, y):
    """One SGD step of ``model`` (maybe DDP-wrapped) on ``(d, y)``; returns ``{name: grad}``."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    logits, info = model(d)
    assert info.status.shape == (d.shape[0],)
    F.cross_entropy(logits, y).backward()
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return grads


def _ddp_worker(out: Path) -> None:
    """torchrun worker: DDP over the gloo group, this rank's half of the global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model, d, y = _deq_setup()
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        ddp = DistributedDataParallel(model)
        grads = _deq_step(ddp, d[shard], y[shard])
        torch.save({"grads": grads, "params": model.state_dict()}, out / f"deq.rank{rank}.pt")
        # Let both ranks finish, and DDP's reducer go, before the group does: tearing gloo down
        # under a live reducer aborted a rank now and then ("terminate called without an active exception").
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_deq_module_under_ddp_matches_single_process(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(Path(__file__).resolve()), "--ddp-worker", str(tmp_path)])
    model, d, y = _deq_setup()
    start = {n: t.clone() for n, t in model.state_dict().items()}
    grads = _deq_step(model, d, y)
    half_grads = _deq_step(_deq_setup()[0], d[: GLOBAL_BATCH // 2], y[: GLOBAL_BATCH // 2])
    ranks = [torch.load(tmp_path / f"deq.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert any(n.startswith("deq.cell.") for n in grads)
    for r, result in enumerate(ranks):
        assert result["grads"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-10, atol=1e-12, msg=f"rank {r} grad {name}")
        for name, p in model.state_dict().items():
            torch.testing.assert_close(result["params"][name], p, rtol=1e-10, atol=1e-12, msg=f"rank {r} param {name}")
    # Not vacuous: the step moved every param, and one rank's half batch alone gives other gradients.
    assert all((model.state_dict()[n] - start[n]).abs().max() > 1e-4 for n in start)
    assert max(float((half_grads[n] - g).abs().max()) for n, g in grads.items()) > 1e-3


if __name__ == "__main__":
    if sys.argv[1:2] != ["--ddp-worker"]:
        raise SystemExit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} --ddp-worker OUT_DIR")
    _ddp_worker(Path(sys.argv[2]))
