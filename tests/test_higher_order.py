"""IFT at every order: forward mode, Hessians, double backward, against an unrolled float64 oracle.

The oracle is the map itself iterated 150 times by Picard from zeros (contraction ≤ 0.7,
so 0.7¹⁵⁰ ≈ 5e-24: converged to rounding) and differentiated by plain autograd /
torch.func through the iterations: it shares no code with the implicit derivatives.
Every comparison is relative, ≤ 1e-7 (what we see is ~1e-13).
"""

import pytest
import torch
import torch.func as tf
from helpers import SOLVER_CLASSES, tanh_f, tanh_params, tuple_f, tuple_params

import deq_functional as dq

B, N, M = 3, 5, 3
TOL = 1e-7
ORACLE_STEPS = 150  # Picard steps of the oracle: contraction ≤ 0.7, 0.7¹⁵⁰ ≈ 5e-24


def rel_err(got, want) -> float:
    """Largest ``|got − want| / max|want|`` over the leaves of two pytrees."""
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want) and got
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-300)) for g, w in zip(got, want, strict=True))


class Case:
    """A problem: ``f``, params, input and initial state; ``solve`` runs ``fixed_point``,
    ``oracle`` the unrolled iteration."""

    def __init__(self, kind: str):
        g = torch.Generator().manual_seed(7)
        if kind == "tensor":
            self.f, self.p = tanh_f, tanh_params(N, M)
            self.x = torch.randn(B, M, dtype=torch.float64, generator=g)
            self.z0 = lambda x: torch.zeros(x.shape[:-1] + (N,), dtype=x.dtype)
        else:  # a two-resolution tuple state
            self.f, self.p = tuple_f, tuple_params(4)
            self.x = torch.randn(B, 4, dtype=torch.float64, generator=g)
            self.z0 = lambda x: (torch.zeros(x.shape[:-1] + (4,), dtype=x.dtype), torch.zeros(x.shape[:-1] + (2,), dtype=x.dtype))
        self.w = torch.randn(64, dtype=torch.float64, generator=g)

    def solve(self, p, x, *, solver, per_sample=False, mode="ift", **kw):
        return dq.fixed_point(self.f, p, x, z0=self.z0(x), solver=solver, grad_mode=mode, per_sample=per_sample, **kw)[0]

    def oracle(self, p, x, **_):
        z = self.z0(x)
        for _ in range(ORACLE_STEPS):
            z = self.f(p, z, x)
        return z

    def loss(self, z) -> torch.Tensor:
        """A non-quadratic scalar of the state, so Hessians see its curvature and f's."""
        flat = torch.cat([t.reshape(-1) for t in torch.utils._pytree.tree_leaves(z)])
        return (self.w[: flat.numel()] * torch.sin(flat)).sum() + 0.5 * flat.square().sum()


def _tangent(t, seed):
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed))


# Each transform: (case, solve) -> pytree of tensors, where solve(p, x) -> z*.
TRANSFORMS = {
    "jvp_x": lambda c, s: tf.jvp(lambda x: s(c.p, x), (c.x,), (_tangent(c.x, 1),))[1],
    "jvp_params": lambda c, s: tf.jvp(lambda p: s(p, c.x), (c.p,), ({k: _tangent(v, 2) for k, v in c.p.items()},))[1],
    "jacfwd_x": lambda c, s: tf.jacfwd(lambda x: s(c.p, x))(c.x),
    "jacfwd_params": lambda c, s: tf.jacfwd(lambda p: s(p, c.x))(c.p),
    "jacrev_x": lambda c, s: tf.jacrev(lambda x: s(c.p, x))(c.x),
    "hessian_x": lambda c, s: tf.hessian(lambda x: c.loss(s(c.p, x)))(c.x),
    "hessian_params": lambda c, s: tf.hessian(lambda p: c.loss(s(p, c.x)))(c.p),
    "jacrev_jacrev_x": lambda c, s: tf.jacrev(tf.jacrev(lambda x: c.loss(s(c.p, x))))(c.x),
    "jacfwd_jacfwd_x": lambda c, s: tf.jacfwd(tf.jacfwd(lambda x: c.loss(s(c.p, x))))(c.x),
    "grad_of_grad": lambda c, s: tf.grad(
        lambda p: tf.grad(lambda x: c.loss(s(p, x)))(c.x).square().sum()
    )(c.p),
}


def double_backward(c: Case, s):
    """``torch.autograd.grad(..., create_graph=True)``, then a second ``backward`` of a function
    of those gradients (a gradient penalty)."""
    p = {k: v.clone().requires_grad_() for k, v in c.p.items()}
    x = c.x.clone().requires_grad_()
    grads = torch.autograd.grad(c.loss(s(p, x)), [*p.values(), x], create_graph=True)
    penalty = sum((g**2).sum() for g in grads) + (grads[-1] ** 3).sum()
    penalty.backward()
    return [t.grad for t in [*p.values(), x]]


TRANSFORMS["double_backward"] = double_backward


def _solver(name):
    return SOLVER_CLASSES[name](max_iter=400, tol=1e-13)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_ift_matches_the_unrolled_oracle_for_every_transform(transform, kind):
    case = Case(kind)
    solve = lambda p, x: case.solve(p, x, solver=dq.Anderson(max_iter=200, tol=1e-13))  # noqa: E731
    assert rel_err(TRANSFORMS[transform](case, solve), TRANSFORMS[transform](case, case.oracle)) <= TOL


@pytest.mark.parametrize("transform", ["jvp_params", "hessian_x", "double_backward"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("solver", SOLVER_CLASSES)
def test_every_solver_and_per_sample_setting(transform, per_sample, solver):
    case = Case("tuple" if per_sample else "tensor")
    solve = lambda p, x: case.solve(p, x, solver=_solver(solver), per_sample=per_sample)  # noqa: E731
    assert rel_err(TRANSFORMS[transform](case, solve), TRANSFORMS[transform](case, case.oracle)) <= TOL


def test_the_adjoint_solver_of_ift_serves_every_order():
    case = Case("tensor")
    mode = dq.IFT(solver=dq.Broyden(max_iter=200, tol=1e-13))
    solve = lambda p, x: case.solve(p, x, solver=dq.Picard(max_iter=400, tol=1e-13), mode=mode)  # noqa: E731
    for name in ("jvp_x", "hessian_x", "double_backward"):
        assert rel_err(TRANSFORMS[name](case, solve), TRANSFORMS[name](case, case.oracle)) <= TOL, name


@pytest.mark.parametrize(
    "third",
    [
        lambda c, s: tf.jacfwd(tf.hessian(lambda x: c.loss(s(c.p, x))))(c.x),
        lambda c, s: tf.jacrev(tf.jacfwd(tf.jacrev(lambda x: c.loss(s(c.p, x)))))(c.x),
        lambda c, s: tf.grad(tf.grad(tf.grad(lambda a: c.loss(s({**c.p, "b": c.p["b"] * a}, c.x)))))(
            torch.tensor(1.0, dtype=torch.float64)
        ),
    ],
    ids=["jacfwd(hessian)", "jacrev(jacfwd(jacrev))", "grad(grad(grad))"],
)
def test_third_order(third):
    case = Case("tensor")
    solve = lambda p, x: case.solve(p, x, solver=dq.Anderson(max_iter=200, tol=1e-13))  # noqa: E731
    assert rel_err(third(case, solve), third(case, case.oracle)) <= TOL


# vmap: each mapped row is one problem (x_i of shape (M,), z of shape (N,)).
VMAPPED = {
    "vmap(jvp)": lambda c, s: tf.vmap(lambda xi, ti: tf.jvp(lambda v: s(c.p, v), (xi,), (ti,))[1])(c.x, _tangent(c.x, 3)),
    "vmap(jacfwd)": lambda c, s: tf.vmap(tf.jacfwd(lambda xi: s(c.p, xi)))(c.x),
    "vmap(hessian)": lambda c, s: tf.vmap(tf.hessian(lambda xi: c.loss(s(c.p, xi))))(c.x),
    "vmap(grad(grad))": lambda c, s: tf.vmap(
        tf.grad(lambda xi: tf.grad(lambda v: c.loss(s(c.p, v)))(xi).square().sum())
    )(c.x),
    "vmap(grad) per-sample params": lambda c, s: tf.vmap(tf.grad(lambda p, xi: c.loss(s(p, xi))), in_dims=(None, 0))(c.p, c.x),
    "jacrev(vmap)": lambda c, s: tf.jacrev(lambda W: tf.vmap(lambda xi: s({**c.p, "W": W}, xi))(c.x))(c.p["W"]),
    "jacfwd(vmap(jacfwd))": lambda c, s: tf.jacfwd(
        lambda W: tf.vmap(tf.jacfwd(lambda xi: c.loss(s({**c.p, "W": W}, xi))))(c.x)
    )(c.p["W"]),
}


@pytest.mark.parametrize("transform", VMAPPED)
def test_under_vmap(transform):
    case = Case("tensor")
    solve = lambda p, x: case.solve(p, x, solver=dq.Anderson(max_iter=200, tol=1e-13))  # noqa: E731
    assert rel_err(VMAPPED[transform](case, solve), VMAPPED[transform](case, case.oracle)) <= TOL


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        p = tanh_params(N, M)
        self.W, self.U, self.b = (torch.nn.Parameter(p[k]) for k in ("W", "U", "b"))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def test_through_the_deq_module():
    cell, case = Cell(), Case("tensor")
    deq = dq.DEQ(cell, dq.Anderson(max_iter=200, tol=1e-13), "ift")
    params = dict(cell.named_parameters())

    def via_module(p, x):
        return tf.functional_call(deq, {f"cell.{k}": v for k, v in p.items()}, (x, case.z0(x)))[0]

    case.p = {k: v.detach() for k, v in params.items()}
    for name in ("jvp_x", "jacfwd_params", "hessian_x", "grad_of_grad"):
        assert rel_err(TRANSFORMS[name](case, via_module), TRANSFORMS[name](case, case.oracle)) <= TOL, name
    # a gradient penalty trained with create_graph=True lands in the cell's .grad fields
    x = case.x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(case.loss(deq(x, case.z0(x))[0]), x, create_graph=True)
    gx.square().sum().backward()
    want = double_backward_penalty_oracle(case, x.detach())
    assert rel_err([cell.W.grad, cell.U.grad, cell.b.grad], want) <= TOL


def double_backward_penalty_oracle(case: Case, x: torch.Tensor) -> list:
    p = {k: v.clone().requires_grad_() for k, v in case.p.items()}
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(case.loss(case.oracle(p, x)), x, create_graph=True)
    return list(torch.autograd.grad(gx.square().sum(), [p["W"], p["U"], p["b"]]))


def test_plain_backward_takes_the_no_graph_path(monkeypatch):
    """First order keeps its fast path: a plain backward linearises f once on detached leaves
    (``Linearization._graph_grads``) and its gradients carry no graph; with ``create_graph=True``
    the differentiable path runs instead (torch.func products) and the gradients carry one."""
    from deq_functional._linearize import Linearization

    calls = []
    original = Linearization._graph_grads
    monkeypatch.setattr(Linearization, "_graph_grads", lambda self, u, z: calls.append(z) or original(self, u, z))
    case = Case("tensor")
    p = {k: v.clone().requires_grad_() for k, v in case.p.items()}
    z = case.solve(p, case.x, solver=dq.Anderson(max_iter=200, tol=1e-13))
    (gW,) = torch.autograd.grad(case.loss(z), p["W"])
    assert gW.grad_fn is None and calls.count(True) > 3 and calls.count(False) == 1  # adjoint steps, then weights
    calls.clear()
    z = case.solve(p, case.x, solver=dq.Anderson(max_iter=200, tol=1e-13))
    (gW,) = torch.autograd.grad(case.loss(z), p["W"], create_graph=True)
    assert gW.grad_fn is not None and not calls
