"""Gradient modes against closed forms, finite differences and unrolled backprop (float64)."""

import pytest
import torch
from helpers import (
    SOLVER_CLASSES,
    contractive_matrix,
    linear_f,
    linear_solution,
    loss_weights,
    quintic_f,
    tanh_f,
    tanh_params,
)
from torch.autograd.gradcheck import GradcheckError

import deq_functional as dq

N, B = 6, 3


def _linear_case(seed=0):
    A = contractive_matrix(N, 0.7, seed=seed)
    x = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    return A, x, loss_weights((B, N))


def _grads(mode, solver, A, x, c):
    A, x = A.clone().requires_grad_(), x.clone().requires_grad_()
    z, _ = dq.fixed_point(linear_f, {"A": A}, x, solver=solver, grad_mode=mode)
    (z * c).sum().backward()
    return A.grad, x.grad


def _closed_form(A, x, c):
    A, x = A.clone().requires_grad_(), x.clone().requires_grad_()
    (linear_solution(A, x) * c).sum().backward()
    return A.grad, x.grad


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_ift_matches_the_closed_form_on_the_linear_map(name):
    A, x, c = _linear_case()
    solver = SOLVER_CLASSES[name](max_iter=500, tol=1e-12)
    gA, gx = _grads(dq.IFT(), solver, A, x, c)
    eA, ex = _closed_form(A, x, c)
    torch.testing.assert_close(gA, eA, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gx, ex, atol=1e-9, rtol=1e-9)


def test_ift_adjoint_solver_can_differ_from_the_forward_solver():
    A, x, c = _linear_case(seed=1)
    gA, gx = _grads(dq.IFT(solver=dq.Broyden(max_iter=200, tol=1e-12)), dq.Picard(max_iter=500, tol=1e-12), A, x, c)
    eA, ex = _closed_form(A, x, c)
    torch.testing.assert_close(gA, eA, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gx, ex, atol=1e-9, rtol=1e-9)


def test_jfb_is_the_one_step_gradient():
    A, x, c = _linear_case()
    gA, gx = _grads(dq.JFB(), dq.Anderson(max_iter=200, tol=1e-12), A, x, c)
    z_star = linear_solution(A, x)
    # d/dA of c·(z* Aᵀ + x) with z* held fixed: cᵀ z*;  d/dx: c
    torch.testing.assert_close(gA, c.T @ z_star, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(gx, c)


def test_neumann_zero_is_jfb_and_large_k_approaches_ift():
    A, x, c = _linear_case()
    solver = dq.Anderson(max_iter=200, tol=1e-12)
    jfb = _grads(dq.JFB(), solver, A, x, c)
    n0 = _grads(dq.Neumann(0), solver, A, x, c)
    torch.testing.assert_close(n0[0], jfb[0], atol=0, rtol=0)
    torch.testing.assert_close(n0[1], jfb[1], atol=0, rtol=0)
    exact = _closed_form(A, x, c)
    errors = [(_grads(dq.Neumann(k), solver, A, x, c)[0] - exact[0]).norm() for k in (1, 5, 20, 120)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    # ρ(A) = 0.7: the tail after 121 terms is ~0.7^121 ≈ 2e-19 of the sum, so only round-off is left
    assert errors[-1] < 1e-6 * exact[0].norm()


def test_neumann_series_is_the_truncated_sum():
    A, x, c = _linear_case()
    gA, gx = _grads(dq.Neumann(2), dq.Anderson(max_iter=200, tol=1e-12), A, x, c)
    u = c + c @ A + c @ A @ A  # Σ_{i≤2} (Jᵀ)^i ḡ, rows: J = A, so Jᵀ acts as u ↦ u A
    torch.testing.assert_close(gx, u, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gA, u.T @ linear_solution(A, x), atol=1e-9, rtol=1e-9)


def test_unrolled_with_many_steps_approaches_ift():
    A, x, c = _linear_case()
    exact = _closed_form(A, x, c)
    errs = []
    for k in (5, 20, 80):
        g = _grads(dq.Unrolled(), dq.Picard(max_iter=k, tol=0.0), A, x, c)
        errs.append(float((g[0] - exact[0]).norm()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-9


def test_unrolled_is_exact_backprop_through_the_iterations():
    A, x, c = _linear_case()
    A_, x_ = A.clone().requires_grad_(), x.clone().requires_grad_()
    z = torch.zeros_like(x)
    for _ in range(4):  # Picard with 3 iterations returns f^4(z0)
        z = linear_f({"A": A_}, z, x_)
    (z * c).sum().backward()
    gA, gx = _grads(dq.Unrolled(), dq.Picard(max_iter=3, tol=0.0), A, x, c)
    torch.testing.assert_close(gA, A_.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, x_.grad, atol=1e-12, rtol=1e-12)


def test_phantom_one_step_is_jfb_and_many_steps_approach_ift():
    A, x, c = _linear_case()
    solver = dq.Anderson(max_iter=200, tol=1e-12)
    jfb = _grads(dq.JFB(), solver, A, x, c)
    ph1 = _grads(dq.Phantom(k=1, damping=1.0), solver, A, x, c)
    torch.testing.assert_close(ph1[0], jfb[0], atol=0, rtol=0)
    exact = _closed_form(A, x, c)
    ph = _grads(dq.Phantom(k=150, damping=0.9), solver, A, x, c)
    torch.testing.assert_close(ph[0], exact[0], atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("d", [-0.4, -0.1, 0.0, 0.25, 0.4])
def test_paper_toy_quintic_ift_derivative(d):
    d = torch.tensor(d, dtype=torch.float64, requires_grad=True)
    y, info = dq.fixed_point(quintic_f, {}, d, solver=dq.Anderson(max_iter=200, tol=1e-14))
    assert bool(info.converged)
    (dy,) = torch.autograd.grad(y, d)
    y = y.detach()
    torch.testing.assert_close(y, d.detach() + y**5, atol=1e-13, rtol=0)
    torch.testing.assert_close(dy, 1 / (1 - 5 * y**4), atol=1e-10, rtol=1e-10)


def test_tanh_deq_ift_gradient_passes_gradcheck():
    p = tanh_params(5, 4)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    solver = dq.Anderson(max_iter=300, tol=1e-13)

    def fn(W, U, b, x):
        z0 = torch.zeros(2, 5, dtype=torch.float64)
        z, _ = dq.fixed_point(tanh_f, {"W": W, "U": U, "b": b}, x, solver=solver, grad_mode="ift", z0=z0)
        return z

    inputs = [t.clone().requires_grad_() for t in (p["W"], p["U"], p["b"], x)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ift_adjoint_nonconvergence_warns_or_raises_from_backward():
    _, x, c = _linear_case()
    A = contractive_matrix(N, 0.99, seed=3)  # slow: 3 adjoint Picard steps cannot reach 1e-10
    for setting, expect in (
        ("warn", pytest.warns(dq.FixedPointWarning, match="adjoint")),
        ("raise", pytest.raises(dq.FixedPointError, match="adjoint")),
    ):
        A_ = A.clone().requires_grad_()
        mode = dq.IFT(solver=dq.Picard(max_iter=3, tol=1e-10))
        z, _ = dq.fixed_point(
            linear_f, {"A": A_}, x, solver=dq.Anderson(max_iter=300, tol=1e-12), grad_mode=mode, on_nonconvergence=setting
        )
        with expect:
            (z * c).sum().backward()


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_unrolled_through_many_accelerated_iterations_stays_near_ift(name):
    # 100 iterations, far past convergence: backprop through the accelerated updates must
    # not amplify round-off (on the bench's conv net, differentiating Anderson's α did)
    A, x, c = _linear_case(seed=2)
    exact = _closed_form(A, x, c)
    g = _grads(dq.Unrolled(), SOLVER_CLASSES[name](max_iter=100, tol=0.0), A, x, c)
    torch.testing.assert_close(g[0], exact[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_unrolled_differentiating_the_mixing_is_the_exact_derivative_of_the_iterations(name):
    # differentiate_mixing=True: autograd through K accelerated steps, Anderson's α and
    # Broyden's pairs included, must be the derivative of the map θ -> z_K (finite differences);
    # the default holds them constant, which is a different (approximate) derivative there.
    p = tanh_params(5, 4)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    solver = SOLVER_CLASSES[name](max_iter=6, tol=0.0)

    def unrolled(mode):
        def fn(W, b):
            z0 = torch.zeros(2, 5, dtype=torch.float64)
            z, _ = dq.fixed_point(tanh_f, {"W": W, "U": p["U"], "b": b}, x, solver=solver, grad_mode=mode, z0=z0)
            return z

        return fn

    inputs = [t.clone().requires_grad_() for t in (p["W"], p["b"])]
    assert torch.autograd.gradcheck(unrolled(dq.Unrolled(differentiate_mixing=True)), inputs, eps=1e-6, atol=1e-8,
                                    rtol=1e-6)
    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        torch.autograd.gradcheck(unrolled(dq.Unrolled()), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mode", ["ift", "jfb", "neumann", "unrolled", dq.Phantom(3, 0.5), dq.Phantom(2, 1.0)], ids=str)
def test_every_mode_returns_one_more_application_of_f_after_the_last_iterate(mode):
    # the counting rule: Picard with K = 3 iterations returns f^4(z0), whatever the gradient mode
    A, x, _ = _linear_case()
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=3, tol=0.0), grad_mode=mode)
    expected = torch.zeros_like(x)
    for _ in range(4):
        expected = linear_f({"A": A}, expected, x)
    assert int(info.nstep) == 3
    torch.testing.assert_close(z, expected, atol=0, rtol=0)


def test_phantom_differentiates_its_damped_steps_from_the_last_iterate():
    A, x, c = _linear_case()
    solver = dq.Picard(max_iter=3, tol=0.0)
    A_, x_ = A.clone().requires_grad_(), x.clone().requires_grad_()
    z_K = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=2, tol=0.0), grad_mode="jfb")[0].detach()
    z = z_K  # Picard(max_iter=3) iterates z_0..z_3 = f^3(0); jfb with 2 iterations returns f^3(0)
    for _ in range(3):
        z = z + 0.5 * (linear_f({"A": A_}, z, x_) - z)
    (z * c).sum().backward()
    gA, gx = _grads(dq.Phantom(3, 0.5), solver, A, x, c)
    torch.testing.assert_close(gA, A_.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, x_.grad, atol=1e-12, rtol=1e-12)


def test_unrolled_from_an_exact_fixed_point_still_has_the_one_step_gradient():
    # z0 = z* passes the tolerance at step 0 (nstep 0): z_star = f(params, z0, x) keeps a graph,
    # so Unrolled returns the gradient of that one application: JFB's, not zero
    A, x, c = _linear_case()
    z0 = linear_solution(A, x)
    grads = {}
    for mode in ("unrolled", "jfb"):
        A_ = A.clone().requires_grad_()
        z, info = dq.fixed_point(linear_f, {"A": A_}, x, z0=z0, solver=dq.Anderson(tol=1e-8), grad_mode=mode)
        assert int(info.nstep) == 0
        (z * c).sum().backward()
        grads[mode] = A_.grad
    assert float(grads["unrolled"].abs().max()) > 1e-3
    torch.testing.assert_close(grads["unrolled"], grads["jfb"], atol=1e-12, rtol=1e-12)
