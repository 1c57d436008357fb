"""What forward mode and second derivatives mean for JFB, Neumann, Phantom and Unrolled, each
against its own definition; and the derivative solves' status policy.

JFB, Neumann and Phantom hold the solver's last iterate ``z_K`` constant: their derivatives of
every order are those of an explicit expression at that point (JFB: one application of f;
Phantom: its damped chain; Neumann: the series ``D = Σ_{i≤k} J^i ∂f/∂x``, J and ∂f/∂x
functions of x at the fixed point). Oracles are built from ``z*`` of a converged float64
solve (``z_K = z*`` to 1e-13) with dense Jacobians or plain autograd.
"""

import warnings

import pytest
import torch
import torch.func as tf
from helpers import tanh_f, tanh_params

import deq_functional as dq

B, N, M = 2, 4, 3
SOLVER = dq.Anderson(max_iter=200, tol=1e-13)
P = tanh_params(N, M, seed=3)
X = torch.randn(B, M, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
W = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
TX = torch.randn(B, M, dtype=torch.float64, generator=torch.Generator().manual_seed(6))


def loss(z):
    return (W * torch.sin(z)).sum() + 0.5 * z.square().sum()


def solve(x, mode, p=P, solver=SOLVER, **kw):
    z0 = torch.zeros(x.shape[:-1] + (N,), dtype=x.dtype)
    return dq.fixed_point(tanh_f, p, x, z0=z0, solver=solver, grad_mode=mode, **kw)[0]


def z_star():
    with torch.no_grad():
        return solve(X, "jfb")


def close(got, want, tol=1e-8):
    assert float((got - want).abs().max() / want.abs().max()) <= tol


def hessian_and_double_backward(s):
    """``hessian`` (forward over reverse) and a create_graph double backward of ``loss ∘ s``."""
    h = tf.hessian(lambda x: loss(s(x)))(X)
    x = X.clone().requires_grad_()
    (gx,) = torch.autograd.grad(loss(s(x)), x, create_graph=True)
    (ggx,) = torch.autograd.grad((gx**3).sum(), x)
    return h, ggx


def test_jfb_is_one_application_of_f_at_z_star_held_constant_at_every_order():
    zs = z_star()
    explicit = lambda x: tanh_f(P, zs, x)  # noqa: E731
    mode = lambda x: solve(x, "jfb")  # noqa: E731
    close(tf.jvp(mode, (X,), (TX,))[1], tf.jvp(explicit, (X,), (TX,))[1])
    for got, want in zip(hessian_and_double_backward(mode), hessian_and_double_backward(explicit), strict=True):
        close(got, want)


@pytest.mark.parametrize("k, damping", [(1, 1.0), (3, 0.7)])
def test_phantom_is_its_damped_chain_at_every_order(k, damping):
    zs = z_star()

    def chain(x):
        z = zs
        for _ in range(k):
            z = z + damping * (tanh_f(P, z, x) - z)
        return zs + (z - z.detach())  # the value of f(z_K) = z*, the derivatives of the chain

    mode = lambda x: solve(x, dq.Phantom(k, damping))  # noqa: E731
    close(tf.jvp(mode, (X,), (TX,))[1], tf.jvp(chain, (X,), (TX,))[1])
    for got, want in zip(hessian_and_double_backward(mode), hessian_and_double_backward(chain), strict=True):
        close(got, want)


def _neumann_operator(x, zs, k):
    """Dense ``D(x) = Σ_{i≤k} J^i A`` with ``J = ∂f/∂z``, ``A = ∂f/∂x`` at ``(zs, x)`` (reverse mode)."""
    J = tf.jacrev(lambda z: tanh_f(P, z, x))(zs).reshape(B * N, B * N)
    A = tf.jacrev(lambda v: tanh_f(P, zs, v))(x).reshape(B * N, B * M)
    D, term = A, A
    for _ in range(k):
        term = J @ term
        D = D + term
    return D


@pytest.mark.parametrize("k", [0, 2, 6])
def test_neumann_tangent_is_the_series(k):
    zs = z_star()
    want = (_neumann_operator(X, zs, k) @ TX.reshape(-1)).reshape(B, N)
    close(tf.jvp(lambda x: solve(x, dq.Neumann(k)), (X,), (TX,))[1], want)
    # forward and reverse mode give the same (transposed) operator
    close(tf.jacfwd(lambda x: solve(x, dq.Neumann(k)))(X), tf.jacrev(lambda x: solve(x, dq.Neumann(k)))(X))


@pytest.mark.parametrize("k", [2, 6])
def test_neumann_second_derivatives_differentiate_the_series_with_z_k_held_constant(k):
    """The Hessian of ``loss ∘ Neumann(k)`` is the Jacobian of its gradient ``x ↦ D(x)ᵀ ∇loss(z)``,
    where z moves with x along D: ``∂_x[D(x)ᵀ] ∇loss(z*) + D(x₀)ᵀ ∇²loss D(x₀)``."""
    zs = z_star()
    D0 = _neumann_operator(X, zs, k)

    def gradient(x):  # D(x)ᵀ ∇loss(z(x)), z(x) = z* + D(x₀)(x − x₀)
        z = zs + (D0 @ (x - X).reshape(-1)).reshape(B, N)
        grad_z = tf.grad(loss)(z)
        return (_neumann_operator(x, zs, k).T @ grad_z.reshape(-1)).reshape(B, M)

    want = tf.jacrev(gradient)(X)
    h, _ = hessian_and_double_backward(lambda x: solve(x, dq.Neumann(k)))
    close(h, want)
    # reverse over reverse agrees with forward over reverse
    close(tf.jacrev(tf.jacrev(lambda x: loss(solve(x, dq.Neumann(k)))))(X), want)


def test_neumann_zero_equals_jfb_at_every_order():
    for got, want in zip(
        hessian_and_double_backward(lambda x: solve(x, dq.Neumann(0))),
        hessian_and_double_backward(lambda x: solve(x, "jfb")),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_unrolled_differentiates_its_iterations_to_any_order():
    """Picard with tol=0 runs exactly K iterations and returns f^(K+1)(z0): the same function
    as iterating by hand, at every order (third order included)."""
    K = 12

    def by_hand(x):
        z = torch.zeros(x.shape[:-1] + (N,), dtype=x.dtype)
        for _ in range(K + 1):
            z = tanh_f(P, z, x)
        return z

    mode = lambda x: solve(x, "unrolled", solver=dq.Picard(max_iter=K, tol=0.0))  # noqa: E731
    close(tf.jvp(mode, (X,), (TX,))[1], tf.jvp(by_hand, (X,), (TX,))[1], 1e-12)
    for got, want in zip(hessian_and_double_backward(mode), hessian_and_double_backward(by_hand), strict=True):
        close(got, want, 1e-12)
    third = lambda s: tf.jacfwd(tf.hessian(lambda x: loss(s(x))))(X)  # noqa: E731
    close(third(mode), third(by_hand), 1e-12)


# ------------------------------------------------------------------ status of the derivative solves

STARVED = dq.IFT(solver=dq.Picard(max_iter=2, tol=1e-12))  # the derivative solves cannot converge


def test_a_tangent_solve_that_fails_warns_or_raises_like_the_adjoint():
    with pytest.warns(dq.FixedPointWarning, match="IFT tangent \\(forward-mode\\) solve did not converge"):
        tf.jvp(lambda x: solve(x, STARVED, on_nonconvergence="warn"), (X,), (TX,))
    with pytest.raises(dq.FixedPointError, match="IFT tangent \\(forward-mode\\) solve did not converge"):
        tf.jvp(lambda x: solve(x, STARVED, on_nonconvergence="raise"), (X,), (TX,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf.jvp(lambda x: solve(x, STARVED), (X,), (TX,))  # "ignore": the last iterate, silently


def test_the_differentiable_adjoint_and_its_own_derivative_solves_report():
    x = X.clone().requires_grad_()
    with pytest.warns(dq.FixedPointWarning, match="IFT adjoint \\(backward\\) solve did not converge"):
        (gx,) = torch.autograd.grad(loss(solve(x, STARVED, on_nonconvergence="warn")), x, create_graph=True)
    with pytest.warns(dq.FixedPointWarning, match="of a derivative of order 2"):
        gx.square().sum().backward()
    x = X.clone().requires_grad_()
    with pytest.raises(dq.FixedPointError, match="IFT adjoint \\(backward\\) solve did not converge"):
        torch.autograd.grad(loss(solve(x, STARVED, on_nonconvergence="raise")), x, create_graph=True)


def test_under_vmap_the_derivative_solves_raise_nothing():
    one = lambda xi: solve(xi, STARVED, on_nonconvergence="raise")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jac = tf.vmap(tf.jacfwd(one))(X)
        hess = tf.vmap(tf.hessian(lambda xi: loss(one(xi))))(X)
    assert torch.isfinite(jac).all() and torch.isfinite(hess).all()
