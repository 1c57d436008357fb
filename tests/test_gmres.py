"""GMRES for affine fixed points, IFT's adjoint by GMRES where fixed-point iteration fails, and
``IFT(fallback="jfb")``: against dense float64 solves."""

import warnings

import pytest
import torch
import torch.func as tf

import deq_functional as dq

F64 = torch.float64


def nonsymmetric(n, rho, seed=0):
    """A random nonsymmetric ``(n, n)`` matrix with spectral radius ``rho``."""
    A = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return rho * A / torch.linalg.eigvals(A).abs().max()


def true_rel_residual(g, u):
    gu = g(u)
    return float((gu - u).norm() / gu.norm())


@pytest.mark.parametrize("rho", [0.5, 1.5, 4.0])
def test_full_gmres_solves_a_20_dimensional_linear_map_in_at_most_21_iterations(rho):
    A, b = nonsymmetric(20, rho), torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(1))
    g = lambda u: A @ u + b  # noqa: E731
    u, info = dq.GMRES(max_iter=100, tol=1e-14, restart=20)(g, torch.zeros(20, dtype=F64))
    assert int(info.nstep) <= 21
    assert true_rel_residual(g, u) <= 1e-10 and float(info.rel_residual) <= 1e-10
    torch.testing.assert_close(u, torch.linalg.solve(torch.eye(20, dtype=F64) - A, b), rtol=1e-9, atol=1e-9)


def test_restarted_gmres_converges_and_a_restart_costs_one_evaluation():
    A, b = nonsymmetric(30, 0.9, seed=2), torch.randn(30, dtype=F64, generator=torch.Generator().manual_seed(3))
    g = lambda u: A @ u + b  # noqa: E731
    u, info = dq.GMRES(max_iter=400, tol=1e-12, restart=5)(g, torch.zeros(30, dtype=F64))
    assert info.converged and true_rel_residual(g, u) <= 1e-11
    # the Krylov residual it reports is the true one after restarts too
    assert float(info.rel_residual) == pytest.approx(true_rel_residual(g, u), rel=1e-3)
    calls = []
    dq.GMRES(max_iter=13, tol=0.0, restart=5)(lambda u: calls.append(1) or g(u), torch.zeros(30, dtype=F64))
    assert len(calls) == 1 + 13 + 1  # g(z0), one per iteration (5 + (1 + 5) + (1 + 1)), one to confirm the last


def test_a_stagnating_residual_ends_max_iter_never_diverged():
    """(I − A) a cyclic shift and b = e₁: restarted GMRES(m < n) makes no progress at all."""
    n = 8
    shift = torch.roll(torch.eye(n, dtype=F64), 1, dims=0)
    A, b = torch.eye(n, dtype=F64) - shift, torch.eye(n, dtype=F64)[0]
    for ratio in (float("inf"), 2.0):
        solver = dq.GMRES(max_iter=60, tol=1e-10, restart=3, divergence_ratio=ratio)
        u, info = solver(lambda u: A @ u + b, torch.zeros(n, dtype=F64))
        assert dq.Status(int(info.status)) is dq.Status.MAX_ITER and int(info.nstep) == 60
        assert float(info.residual) == pytest.approx(1.0)


@pytest.mark.parametrize("restart", [1, 3, 8])
def test_no_nan_from_an_exact_start_a_breakdown_or_tol_zero(restart):
    """A zero residual (β = 0), an exact solution found early (the Krylov space invariant: a zero
    Hessenberg column follows) and tol=0 running past it: never NaN (DESIGN: a zero residual
    must not produce NaN)."""
    g = lambda u: 0.5 * u + 1.0  # noqa: E731  (I − A) = I/2: GMRES is exact after one step
    u, info = dq.GMRES(max_iter=12, tol=0.0, restart=restart)(g, torch.zeros(3, dtype=F64))
    assert torch.isfinite(u).all() and int(info.status) == int(dq.Status.CONVERGED) and int(info.nstep) == 12
    torch.testing.assert_close(u, torch.full((3,), 2.0, dtype=F64))
    u, info = dq.GMRES(max_iter=5, tol=0.0, restart=restart)(g, torch.full((3,), 2.0, dtype=F64))  # z0 exact
    assert torch.isfinite(u).all() and float(info.residual) == 0.0


def test_a_singular_system_ends_max_iter_not_nan():
    """g(u) = u + 1: I − A = 0, no fixed point: every Arnoldi column is zero."""
    u, info = dq.GMRES(max_iter=10, tol=1e-8)(lambda u: u + 1.0, torch.zeros(4, dtype=F64))
    assert torch.isfinite(u).all() and dq.Status(int(info.status)) is dq.Status.MAX_ITER


def test_converged_means_the_true_residual_passes():
    """float32 and I − A symmetric with condition 1e4: the Krylov residual falls below what float32
    arithmetic reaches; the verdict is checked against g itself, once, at the last iterate."""
    n = 30
    q = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(8)))[0]
    A = (torch.eye(n, dtype=F64) - q @ torch.diag(torch.logspace(-4, 0, n, dtype=F64)) @ q.T).float()  # ‖A‖ < 1
    b = torch.randn(n, generator=torch.Generator().manual_seed(9))
    g = lambda u: A @ u + b  # noqa: E731
    u, info = dq.GMRES(max_iter=200, tol=1e-4, restart=40)(g, torch.zeros(n))
    assert bool(info.converged)  # u = g(z_K): one more step of g, whose residual ‖A r‖ ≤ ‖r‖
    assert float((g(u) - u).norm()) <= 1e-4 * float(g(u).norm())
    _, info = dq.GMRES(max_iter=200, tol=1e-9, restart=40)(g, torch.zeros(n))  # below float32's reach
    assert dq.Status(int(info.status)) is dq.Status.MAX_ITER and float(info.rel_residual) > 1e-9


def test_per_problem_with_different_steps_and_equal_under_vmap_and_compile():
    n = 12
    A = nonsymmetric(n, 0.8, seed=4)
    evals, evecs = torch.linalg.eig(A)
    easy = evecs[:, evals.imag.abs().argmin()].real  # a real eigenvector: one Krylov step
    b = torch.stack([easy, torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(5)), 3 * easy])

    def solve(b):
        return dq.GMRES(max_iter=50, tol=1e-12)(lambda u: u @ A.T + b, torch.zeros_like(b), per_sample=True)

    u, info = solve(b)
    assert info.nstep.tolist()[0] <= 2 and info.nstep.tolist()[1] >= n - 1 and bool(info.converged.all())
    exact = torch.linalg.solve(torch.eye(n, dtype=F64) - A, b.T).T
    torch.testing.assert_close(u, exact, rtol=1e-9, atol=1e-10)
    uv, iv = tf.vmap(lambda bi: dq.GMRES(max_iter=50, tol=1e-12)(lambda u: A @ u + bi, torch.zeros_like(bi)))(b)
    torch.testing.assert_close(uv, exact, rtol=1e-9, atol=1e-10)
    assert iv.nstep.tolist() == info.nstep.tolist()
    uc, ic = torch.compile(solve, fullgraph=True, backend="aot_eager")(b)
    torch.testing.assert_close(uc, u, rtol=0, atol=1e-13)
    assert torch.equal(ic.nstep, info.nstep) and torch.equal(ic.status, info.status)


def test_nonfinite_raises_eagerly_and_is_reported_under_vmap():
    g = lambda u: u * float("nan") + 1.0  # noqa: E731
    with pytest.raises(dq.FixedPointError, match="GMRES: non-finite iterate"):
        dq.GMRES()(g, torch.zeros(3, dtype=F64))
    _, info = tf.vmap(lambda z: dq.GMRES()(g, z))(torch.zeros(2, 3, dtype=F64))
    assert (info.status == int(dq.Status.NONFINITE)).all()


def test_half_precision_states_solve_in_float32():
    A, b = nonsymmetric(6, 0.7, seed=6), torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(7))
    u, info = dq.GMRES(tol=1e-2)(lambda u: (A.to(u.dtype) @ u) + b.to(u.dtype), torch.zeros(6, dtype=torch.bfloat16))
    assert u.dtype == torch.bfloat16 and info.converged
    torch.testing.assert_close(u.double(), torch.linalg.solve(torch.eye(6, dtype=F64) - A, b), rtol=0.05, atol=0.05)


def test_bad_options_and_misuse_are_named():
    with pytest.raises(ValueError, match="GMRES: restart must be an integer >= 1, got 0"):
        dq.GMRES(restart=0)
    with pytest.raises(ValueError, match="GMRES: max_iter must be an integer >= 1"):
        dq.GMRES(max_iter=0)
    with pytest.raises(ValueError, match="IFT: fallback must be one of"):
        dq.IFT(fallback="newton")
    f = lambda p, z, x: 0.5 * z + x  # noqa: E731
    x = torch.ones(2, 3, dtype=F64)
    for solver in (dq.GMRES(), "gmres", "GMRES"):
        with pytest.raises(ValueError, match="fixed_point: GMRES solves affine fixed points .* IFT"):
            dq.fixed_point(f, {}, x, solver=solver)
    with pytest.raises(ValueError, match="DEQ: GMRES solves affine fixed points"):
        dq.DEQ(torch.nn.Linear(3, 3), solver=dq.GMRES())
    assert isinstance(dq.IFT(solver="gmres").solver, dq.GMRES)


# ---------------------------------------------------------------- IFT with a GMRES adjoint

N, B = 8, 4
W = 1.3 * torch.linalg.qr(torch.randn(N, N, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
X = 0.05 * torch.randn(B, N, dtype=F64, generator=torch.Generator().manual_seed(1))
BROYDEN = dq.Broyden(max_iter=200, tol=1e-12, memory=20)


def tanh_layer(p, z, x):
    return torch.tanh(z @ p["W"].T + x)


def ift_grads(mode, on_nonconvergence="ignore"):
    Wg, xg = W.clone().requires_grad_(), X.clone().requires_grad_()
    z, info = dq.fixed_point(tanh_layer, {"W": Wg}, xg, solver=BROYDEN, grad_mode=mode, on_nonconvergence=on_nonconvergence)
    torch.sin(z).sum().backward()
    return z.detach(), info, Wg.grad, xg.grad


def dense_ift(z):
    """∂L/∂W and ∂L/∂x from the dense implicit function theorem at z (L = Σ sin z)."""
    d = 1 - z.square()
    J = torch.block_diag(*[d[i][:, None] * W for i in range(B)])
    u = torch.linalg.solve((torch.eye(B * N, dtype=F64) - J).T, torch.cos(z).reshape(-1)).reshape(B, N)
    return J, (u * d).T @ z, u * d


def test_gmres_gives_the_exact_gradient_where_a_picard_adjoint_diverges():
    z, info, gW, gx = ift_grads(dq.IFT(solver=dq.GMRES(max_iter=100, tol=1e-12)))
    assert info.converged  # the forward converged (Broyden) ...
    J, eW, ex = dense_ift(z)
    assert float(torch.linalg.eigvals(J).abs().max()) > 1.1  # ... where f is not contractive
    torch.testing.assert_close(gW, eW, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gx, ex, rtol=1e-8, atol=1e-10)
    with pytest.raises(dq.FixedPointError, match="IFT adjoint \\(backward\\) solve did not converge.*1 DIVERGED"):
        ift_grads(dq.IFT(solver=dq.Picard(max_iter=200, tol=1e-12)), on_nonconvergence="raise")


def test_a_gmres_adjoint_serves_every_order():
    f = lambda x: dq.fixed_point(tanh_layer, {"W": W}, x, solver=BROYDEN, grad_mode=dq.IFT(solver="gmres"))[0]  # noqa: E731
    got = tf.hessian(lambda x: torch.sin(f(x)).sum())(X[:1])
    jac = tf.jacfwd(f)(X[:1])  # (1, N, 1, N): dz*/dx = (I − J)⁻¹ (∂f/∂x)
    z = f(X[:1])
    d = (1 - z.square())[0]
    dz_dx = torch.linalg.solve(torch.eye(N, dtype=F64) - d[:, None] * W, torch.diag(d))
    torch.testing.assert_close(jac[0, :, 0], dz_dx, rtol=1e-8, atol=1e-10)
    want = tf.hessian(lambda x: torch.sin(_newton_solution(x)).sum())(X[:1])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def _newton_solution(x):
    """z* of the tanh layer by Newton's method, differentiated through its iterations (a second
    oracle that needs no contraction: 30 Newton steps from the Broyden solution)."""
    with torch.no_grad():
        z = dq.fixed_point(tanh_layer, {"W": W}, x, solver=BROYDEN, grad_mode="jfb")[0]
    for _ in range(30):
        r = tanh_layer({"W": W}, z, x) - z
        d = 1 - tanh_layer({"W": W}, z, x).square()
        jac = d[0][:, None] * W - torch.eye(N, dtype=F64)
        z = z - torch.linalg.solve(jac, r[0])[None]
    return z


# ---------------------------------------------------------------- fallback="jfb"

A_PER_SAMPLE = torch.tensor([[0.5], [1.6], [0.8], [2.2]], dtype=F64)  # > 1: the Picard adjoint diverges


def scalar_layer(p, z, x):
    return p["a"] * torch.tanh(z) + x


def fallback_grads(fallback, on_nonconvergence="ignore", compiled=False):
    a = A_PER_SAMPLE.clone().requires_grad_()
    x = (0.1 * torch.arange(12, dtype=F64).reshape(4, 3) - 0.5).requires_grad_()

    def loss(a, x):
        z, info = dq.fixed_point(
            scalar_layer, {"a": a}, x, solver=dq.Broyden(max_iter=100, tol=1e-13), per_sample=True,
            grad_mode=dq.IFT(solver=dq.Picard(max_iter=200, tol=1e-12), fallback=fallback),
            on_nonconvergence=on_nonconvergence,
        )
        return torch.sin(z).sum(), z, info

    loss_fn = torch.compile(loss, fullgraph=True, backend="aot_eager") if compiled else loss
    value, z, info = loss_fn(a, x)
    value.backward()
    return z.detach(), info, a.grad, x.grad


def test_fallback_gives_jfb_to_the_failing_problems_and_ift_to_the_rest():
    z, info, ga, gx = fallback_grads("jfb")
    assert bool(info.converged.all())
    jac = A_PER_SAMPLE * (1 - torch.tanh(z).square())  # ∂f/∂z, diagonal per sample
    failing = (jac.abs() > 1).any(dim=1)
    assert failing.tolist() == [False, True, False, True]
    gbar = torch.cos(z)
    u = torch.where(failing[:, None], gbar, gbar / (1 - jac))  # JFB: u = ḡ; IFT: (1 − J)⁻¹ ḡ
    torch.testing.assert_close(gx, u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, (u * torch.tanh(z)).sum(dim=1, keepdim=True), rtol=1e-9, atol=1e-12)
    # the JFB rows are JFB's gradient (IFT takes ∂f/∂a at z* = f(z_K), JFB at z_K: they differ by
    # the solve's residual, 1e-13 here)
    a, x = A_PER_SAMPLE.clone().requires_grad_(), (0.1 * torch.arange(12, dtype=F64).reshape(4, 3) - 0.5).requires_grad_()
    solver = dq.Broyden(max_iter=100, tol=1e-13)
    zj, _ = dq.fixed_point(scalar_layer, {"a": a}, x, solver=solver, per_sample=True, grad_mode="jfb")
    torch.sin(zj).sum().backward()
    torch.testing.assert_close(gx[failing], x.grad[failing], rtol=1e-12, atol=0)
    torch.testing.assert_close(ga[failing], a.grad[failing], rtol=1e-12, atol=0)


def test_fallback_is_counted_in_the_warning_and_equal_under_compile():
    with pytest.warns(dq.FixedPointWarning, match="2 of 4 problem\\(s\\) stopped \\(2 DIVERGED\\).*JFB's gradient instead"):
        fallback_grads("jfb", on_nonconvergence="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, ga, gx = fallback_grads("jfb")
    _, _, ga_c, gx_c = fallback_grads("jfb", compiled=True)
    torch.testing.assert_close(gx_c, gx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ga_c, ga, rtol=1e-12, atol=1e-14)


def test_without_fallback_the_failing_rows_are_not_jfb():
    _, _, _, gx_plain = fallback_grads(None)
    _, _, _, gx_jfb = fallback_grads("jfb")
    assert torch.equal(gx_plain[[0, 2]], gx_jfb[[0, 2]]) and not torch.allclose(gx_plain[[1, 3]], gx_jfb[[1, 3]])


def test_fallback_per_problem_under_jacrev_of_vmap():
    """The derivative solves of a vmapped call keep one problem per mapped row even when an
    outer transform (jacrev's vmap over the cotangent basis) maps the rule again: only the
    failing rows fall back."""
    x = 0.1 * torch.arange(12, dtype=F64).reshape(4, 3) - 0.5

    def rows(x):
        def one(ai, xi):
            return dq.fixed_point(
                scalar_layer, {"a": ai}, xi, solver=dq.Broyden(max_iter=100, tol=1e-13),
                grad_mode=dq.IFT(solver=dq.Picard(max_iter=200, tol=1e-12), fallback="jfb"),
            )[0]

        return torch.sin(tf.vmap(one)(A_PER_SAMPLE, x)).sum(dim=1)  # (4,): one value per row

    # a cotangent on every row at once (jacrev of a 1-element output: one basis vector, still a vmap)
    jac = tf.jacrev(lambda x: rows(x).sum().reshape(1))(x)[0]  # (4, 3)
    _, _, _, want = fallback_grads("jfb")  # each row: IFT's or JFB's gradient, per row
    torch.testing.assert_close(jac, want, rtol=1e-9, atol=1e-12)


def test_fallback_per_problem_under_vmap():
    a = A_PER_SAMPLE
    x = 0.1 * torch.arange(12, dtype=F64).reshape(4, 3) - 0.5

    def one(ai, xi):
        z, _ = dq.fixed_point(
            scalar_layer, {"a": ai}, xi, solver=dq.Broyden(max_iter=100, tol=1e-13),
            grad_mode=dq.IFT(solver=dq.Picard(max_iter=200, tol=1e-12), fallback="jfb"),
        )
        return torch.sin(z).sum()

    gx = tf.vmap(tf.grad(one, argnums=1))(a, x)
    _, _, _, want = fallback_grads("jfb")
    torch.testing.assert_close(gx, want, rtol=1e-9, atol=1e-12)


def test_a_gmres_adjoint_in_a_compiled_training_step_equals_eager():
    """The adjoint runs in the compiled backward's torch.while_loop (aot_eager: Dynamo's capture and
    AOTAutograd's compiled backward, without inductor's code generation)."""

    def loss(W, x):
        z, info = dq.fixed_point(tanh_layer, {"W": W}, x, solver=BROYDEN, grad_mode=dq.IFT(solver=dq.GMRES(tol=1e-12)))
        return torch.sin(z).sum(), info

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        Wg = W.clone().requires_grad_()
        value, info = fn(Wg, X)
        value.backward()
        grads.append(Wg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    _, eW, _ = dense_ift(dq.fixed_point(tanh_layer, {"W": W}, X, solver=BROYDEN)[0])
    torch.testing.assert_close(grads[1], eW, rtol=1e-8, atol=1e-10)
