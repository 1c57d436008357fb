"""``compact_below``: an eager per-sample solve continues on its running problems alone, with
results equal to the masked loop's (nstep and status bitwise, z_star and gradients to rounding)."""

import pytest
import torch
from helpers import SOLVER_CLASSES

import deq_functional as dq

B, N = 12, 16
F64 = torch.float64
G = torch.Generator().manual_seed(0)
W = 0.95 * torch.linalg.qr(torch.randn(N, N, dtype=F64, generator=G))[0]
# inputs of very different sizes: saturated tanh rows contract fast, small ones at ‖W‖ = 0.95
X = torch.randn(B, N, dtype=F64, generator=G) * torch.logspace(-2, 1, B, dtype=F64)[:, None]


def layer(p, z, x):
    return torch.tanh(z @ p["W"].T + x)


def solve(solver, mode="ift", f=layer, x=X, **kw):
    """``(z_star, info, ∂L/∂W, ∂L/∂x, batch sizes f saw)`` for ``L = Σ sin z*``."""
    sizes = []

    def counted(p, z, x):
        sizes.append(z.shape[0])
        return f(p, z, x)

    Wg, xg = W.clone().requires_grad_(), torch.utils._pytree.tree_map(lambda t: t.clone().requires_grad_(), x)
    z0 = torch.zeros(B, N, dtype=F64)
    z, info = dq.fixed_point(counted, {"W": Wg}, xg, solver=solver, grad_mode=mode, per_sample=True, z0=z0, **kw)
    torch.sin(z).sum().backward()
    return z.detach(), info, Wg.grad, torch.utils._pytree.tree_leaves(xg)[0].grad, sizes


@pytest.mark.parametrize("mode", ["ift", "jfb"])
@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_compacted_equals_masked(name, mode):
    masked = solve(SOLVER_CLASSES[name](max_iter=300, tol=1e-11), mode)
    compact = solve(SOLVER_CLASSES[name](max_iter=300, tol=1e-11, compact_below=0.5), mode)
    assert len(set(masked[1].nstep.tolist())) > 3  # problems stop at different steps
    assert torch.equal(compact[1].nstep, masked[1].nstep) and torch.equal(compact[1].status, masked[1].status)
    for got, want in zip(compact[:1] + compact[2:4], masked[:1] + masked[2:4], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert min(compact[4]) < B and min(masked[4]) == B  # f ran on a subset, and only when asked to
    assert sum(compact[4]) < 0.8 * sum(masked[4])  # the tail cost less


def test_with_trace_best_and_sparse_reads():
    kw = dict(trace=True)
    solver = dq.Anderson(max_iter=300, tol=1e-11, return_best=True, check_every=3)
    masked = solve(solver, **kw)
    compact = solve(dq.Anderson(max_iter=300, tol=1e-11, return_best=True, check_every=3, compact_below=0.75), **kw)
    assert min(compact[4]) < B
    for field in ("nstep", "status", "best_step"):
        assert torch.equal(getattr(compact[1], field), getattr(masked[1], field)), field
    torch.testing.assert_close(compact[1].trace, masked[1].trace, rtol=1e-12, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(compact[0], masked[0], rtol=1e-12, atol=1e-14)


def test_failing_problems_keep_their_verdicts():
    """Rows that run away freeze like converged ones while the others go on; NaN still raises."""
    x = X.clone()
    x[[0, 5], 0] = 100.0

    def f(p, z, x):  # the rows flagged by x run away (Picard on 3z + 1): DIVERGED
        return torch.where(x[:, :1] > 50, 3 * z + 1, layer(p, z, x))

    masked = solve(dq.Picard(max_iter=300, tol=1e-11), "jfb", f=f, x=x)
    compact = solve(dq.Picard(max_iter=300, tol=1e-11, compact_below=0.5), "jfb", f=f, x=x)
    assert (masked[1].status == int(dq.Status.DIVERGED)).sum() == 2 and min(compact[4]) < B
    assert torch.equal(compact[1].status, masked[1].status) and torch.equal(compact[1].nstep, masked[1].nstep)
    x[3] = float("nan")
    with pytest.raises(dq.FixedPointError, match="non-finite"):
        solve(dq.Picard(max_iter=300, tol=1e-11, compact_below=0.5), "jfb", f=f, x=x)


def test_shared_inputs_are_not_gathered():
    """An x leaf whose leading dim is not the batch is shared by every row (kept whole)."""
    shared = torch.randn(3, N, dtype=F64, generator=torch.Generator().manual_seed(1))

    def f(p, z, x):
        per_sample, bias = x
        return torch.tanh(z @ p["W"].T + per_sample + bias.sum(0))

    masked = solve(dq.Picard(max_iter=300, tol=1e-11), "jfb", f=f, x=(X, shared))
    compact = solve(dq.Picard(max_iter=300, tol=1e-11, compact_below=0.5), "jfb", f=f, x=(X, shared))
    assert min(compact[4]) < B and torch.equal(compact[1].nstep, masked[1].nstep)
    torch.testing.assert_close(compact[0], masked[0], rtol=1e-12, atol=1e-14)


def test_the_option_is_validated_and_ignored_where_it_cannot_apply():
    with pytest.raises(ValueError, match="Picard: compact_below must be a real number in \\[0, 1\\], got 1.5"):
        dq.Picard(compact_below=1.5)
    solver = dq.Picard(max_iter=300, tol=1e-11, compact_below=0.5)
    assert min(solve(solver, "unrolled")[4]) == B  # a graph through the iterations: masked
    z = torch.func.vmap(lambda x: dq.fixed_point(layer, {"W": W}, x, solver=solver)[0])(X)  # vmap: masked
    torch.testing.assert_close(z, solve(dq.Picard(max_iter=300, tol=1e-11))[0], rtol=1e-12, atol=1e-14)
