"""The drivers: host reads per eager solve, and the same answer from every driver and check_every."""

import math

import pytest
import torch
from helpers import SOLVER_CLASSES, hard_sample_f, tuple_f, tuple_params

import deq_functional as dq
from deq_functional import _drivers


class ReadCounter:
    """Test double for the one host read of a solve (``_drivers.read_host``)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = _drivers.read_host

        def counting(t):
            self.count += 1
            return real(t)

        monkeypatch.setattr(_drivers, "read_host", counting)


def _hard_batch():
    """Five samples whose contraction factors spread their iteration counts from ~5 to ~60."""
    a = torch.tensor([[0.05], [0.3], [0.6], [0.8], [0.9]], dtype=torch.float64)
    x = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)[:, None].repeat(1, 3)
    return {"a": a}, x


@pytest.mark.parametrize("name", SOLVER_CLASSES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("every", [2, 3, 7])
def test_check_every_reads_less_and_changes_nothing(monkeypatch, name, per_sample, every):
    params, x = _hard_batch()
    make = SOLVER_CLASSES[name]
    z1, i1 = dq.fixed_point(hard_sample_f, params, x, solver=make(max_iter=300, tol=1e-9), per_sample=per_sample)
    reads = ReadCounter(monkeypatch)
    zc, ic = dq.fixed_point(
        hard_sample_f, params, x, solver=make(max_iter=300, tol=1e-9, check_every=every), per_sample=per_sample
    )
    K = int(ic.nstep.max())
    assert 0 < K < 300
    assert reads.count <= math.ceil(K / every) + 1
    assert torch.equal(zc, z1)  # the masked iterations in between change nothing
    for a, b in zip(ic, i1, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("per_sample", [False, True])
def test_read_every_iteration_by_default(monkeypatch, per_sample):
    params, x = _hard_batch()
    reads = ReadCounter(monkeypatch)
    _, info = dq.fixed_point(hard_sample_f, params, x, solver=dq.Anderson(max_iter=300, tol=1e-9), per_sample=per_sample)
    K = int(info.nstep.max())
    assert reads.count == K + 1  # z0, then after every iteration


def test_budget_end_costs_one_read(monkeypatch):
    params, x = _hard_batch()
    reads = ReadCounter(monkeypatch)
    _, info = dq.fixed_point(hard_sample_f, params, x, solver=dq.Picard(max_iter=10, tol=1e-12, check_every=4), per_sample=True)
    assert bool((info.status == dq.Status.MAX_ITER).any()) and int(info.nstep.max()) == 10
    assert reads.count == math.ceil(10 / 4) + 1  # k = 0, 4, 8, then the final status at k = 10


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_vmap_masked_budget_equals_eager_per_problem(name):
    """vmap runs the whole budget with stopped problems masked: same z, nstep, status as eager."""
    params, x = _hard_batch()
    solver = SOLVER_CLASSES[name](max_iter=200, tol=1e-9)
    z_eager, i_eager = dq.fixed_point(hard_sample_f, params, x, solver=solver, per_sample=True)

    def one(a, xi):
        return dq.fixed_point(hard_sample_f, {"a": a[None]}, xi[None], solver=solver)

    z_map, i_map = torch.func.vmap(one)(params["a"], x)
    torch.testing.assert_close(z_map[:, 0], z_eager, atol=1e-12, rtol=0)
    assert torch.equal(i_map.nstep, i_eager.nstep)
    assert torch.equal(i_map.status, i_eager.status)
    for xi, ai, zi in zip(x, params["a"], z_eager, strict=True):  # and each problem alone, eagerly
        z1, i1 = dq.fixed_point(hard_sample_f, {"a": ai[None]}, xi[None], solver=solver)
        torch.testing.assert_close(z1[0], zi, atol=1e-12, rtol=0)


def test_tuple_state_under_check_every():
    p = tuple_params(8)
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z0 = (torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))
    runs = [
        dq.fixed_point(tuple_f, p, x, z0=z0, solver=dq.Broyden(max_iter=100, tol=1e-10, check_every=c), per_sample=True)
        for c in (1, 5)
    ]
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][1].nstep, runs[1][1].nstep)


def test_check_every_is_validated():
    with pytest.raises(ValueError, match="check_every must be an integer >= 1, got 0"):
        dq.Anderson(check_every=0)
