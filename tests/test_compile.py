"""torch.compile(fullgraph=True): no graph break, same numbers as eager, backward compiled too.

Inductor compiles cost ~30-60 s each on 2 cores, so the full solver × grad-mode
matrix runs on the ``aot_eager`` backend (Dynamo capture with fullgraph and
AOTAutograd's compiled backward, without code generation) and inductor runs the
two pairings the issue names plus one whole train step.
"""

import pytest
import torch

import deq_functional as dq
from helpers import SOLVER_CLASSES

pytestmark = pytest.mark.compile

N, B = 8, 4


def _problem():
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(N, N, generator=g) / N**0.5
    return W, torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)


def f(p, z, x):
    return torch.tanh(z @ p["W"].T + x)


def _loss_fn(solver, mode):
    def loss_fn(W, x, y):
        z, info = dq.fixed_point(f, {"W": W}, x, solver=solver, grad_mode=mode)
        return ((z - y) ** 2).sum(), info

    return loss_fn


def _check_compiled_matches_eager(solver, mode, backend):
    torch._dynamo.reset()
    W, x, y = _problem()
    loss_fn = _loss_fn(solver, mode)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, loss_fn):
        Wg = W.clone().requires_grad_()
        loss, info = fn(Wg, x, y)
        loss.backward()  # outside the compiled region: AOTAutograd's backward
        results.append((loss.detach(), Wg.grad, info))
    (lc, gc, ic), (le, ge, ie) = results
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert int(ic.nstep) == int(ie.nstep)  # masked full budget counts the same iterations
    assert bool(ic.converged) == bool(ie.converged)
    # a second call with new data reuses the graph and still matches eager
    x2 = x + 0.1
    torch.testing.assert_close(compiled(W, x2, y)[0], loss_fn(W, x2, y)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["jfb", "ift"])
def test_inductor_anderson(mode):
    _check_compiled_matches_eager(dq.Anderson(max_iter=10, tol=1e-4), mode, "inductor")


@pytest.mark.parametrize("mode", ["ift", "jfb", "neumann", "unrolled"])
@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_every_solver_and_grad_mode_compiles_fullgraph(name, mode):
    _check_compiled_matches_eager(SOLVER_CLASSES[name](max_iter=8, tol=1e-4), mode, "aot_eager")


def test_whole_train_step_with_autograd_grad_inside(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "trace_autograd_ops", True)
    torch._dynamo.reset()
    W, x, y = _problem()
    loss_fn = _loss_fn(dq.Anderson(max_iter=8, tol=1e-4), "ift")

    def train_step(W, x, y):
        W = W.detach().requires_grad_()
        loss, _ = loss_fn(W, x, y)
        (grad,) = torch.autograd.grad(loss, [W])
        return W.detach() - 0.1 * grad, loss.detach()

    compiled = torch.compile(train_step, fullgraph=True)
    Wc, Wc_loss = W, []
    We, We_loss = W, []
    for _ in range(2):
        Wc, lc = compiled(Wc, x, y)
        We, le = train_step(We, x, y)
        Wc_loss.append(lc)
        We_loss.append(le)
    torch.testing.assert_close(Wc, We, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(Wc_loss), torch.stack(We_loss), rtol=1e-5, atol=1e-6)
    assert We_loss[1] < We_loss[0]


def test_tuple_state_compiles_and_non_finite_is_flagged_in_info():
    torch._dynamo.reset()
    W, x, _ = _problem()

    def two_scale(p, z, x):
        a, b = z
        return torch.tanh(a @ p["W"].T + x + b.repeat_interleave(2, dim=1)), 0.5 * (a[:, ::2] + a[:, 1::2]) * p["s"]

    def run(s):
        z0 = (torch.zeros(B, N), torch.zeros(B, N // 2))
        z, info = dq.fixed_point(two_scale, {"W": W, "s": s}, x, z0=z0, solver=dq.Anderson(max_iter=8, tol=1e-4), grad_mode="ift")
        return z, info

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    zc, ic = compiled(torch.tensor(0.3))
    ze, ie = run(torch.tensor(0.3))
    for a, b in zip(zc, ze):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, bad = compiled(torch.tensor(float("nan")))  # no exception can be raised inside the graph
    assert not bool(bad.converged) and not bool(torch.isfinite(bad.residual))
    with pytest.raises(dq.FixedPointError, match="non-finite"):
        run(torch.tensor(float("nan")))  # eager raises
