"""Status codes you can trust: converged means converged; run-away, non-finite and spent budgets say so."""

import math
import warnings

import pytest
import torch
from helpers import SOLVER_CLASSES, contractive_matrix, linear_f, linear_solution

import deq_functional as dq

S = dq.Status


def affine(p, z, x):
    """``z ← a ⊙ z + x`` with a per-sample factor ``a`` (B, 1): fixed point ``x / (1 − a)``."""
    return p["a"] * z + x


def test_status_codes_are_a_documented_int_enum():
    assert [(s.name, int(s)) for s in S] == [("CONVERGED", 0), ("MAX_ITER", 1), ("DIVERGED", 2), ("NONFINITE", 3)]
    assert all(isinstance(s.advice, str) and len(s.advice) > 10 for s in S)


def test_each_problem_of_a_batch_gets_its_own_status():
    a = torch.tensor([[0.5], [0.999], [2.0]], dtype=torch.float64)  # converges, too slow, runs away
    x = torch.ones(3, 2, dtype=torch.float64)
    z, info = dq.fixed_point(affine, {"a": a}, x, solver=dq.Picard(max_iter=40, tol=1e-8), per_sample=True)
    assert info.status.dtype == torch.int64 and info.status.shape == (3,)
    assert info.status.tolist() == [S.CONVERGED, S.MAX_ITER, S.DIVERGED]
    assert info.nstep.tolist()[1:] == [40, 14]
    torch.testing.assert_close(info.converged, info.status == int(S.CONVERGED))
    torch.testing.assert_close(z[0], x[0] / 0.5, atol=1e-7, rtol=0)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_a_per_sample_batch_reports_what_each_problem_alone_does(name):
    """Freezing stopped problems makes a per-sample solve the same as separate solves."""
    a = torch.tensor([[0.5], [0.95], [0.99], [1.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0], [1.0, 1.0], [0.2, 0.1]], dtype=torch.float64)
    f = lambda p, z, x: p["a"] * torch.tanh(z) + x  # noqa: E731  (the last one is not contractive)
    solver = SOLVER_CLASSES[name](max_iter=25, tol=1e-9)
    z, info = dq.fixed_point(f, {"a": a}, x, solver=solver, per_sample=True)
    for i in range(4):
        zi, ii = dq.fixed_point(f, {"a": a[i : i + 1]}, x[i : i + 1], solver=solver)
        assert int(ii.status) == int(info.status[i]) and int(ii.nstep) == int(info.nstep[i])
        torch.testing.assert_close(zi[0], z[i], atol=1e-12, rtol=0)
    assert set(info.status.tolist()) >= {int(S.CONVERGED)}
    torch.testing.assert_close(info.converged, info.status == int(S.CONVERGED))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_sample", [False, True])
def test_a_geometrically_growing_picard_is_diverged_long_before_overflow(dtype, per_sample):
    x = torch.randn(4, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    z, info = dq.fixed_point(lambda p, z, x: 2 * z + x, {}, x, solver=dq.Picard(max_iter=200, tol=1e-5), per_sample=per_sample)
    # the residual doubles each step: the first one above 1e4 x the smallest stops it, at step 14
    assert bool((info.status == S.DIVERGED).all()) and bool((info.nstep == 14).all())
    assert not bool(info.converged.any()) and bool(torch.isfinite(z).all())
    assert float(z.abs().max()) < 1e6


@pytest.mark.parametrize("name", SOLVER_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_map_without_a_fixed_point_is_never_converged(name, dtype):
    x = torch.zeros(2, 3, dtype=dtype)
    for max_iter in (1, 7, 500):
        _, info = dq.fixed_point(lambda p, z, x: z + 1, {}, x, solver=SOLVER_CLASSES[name](max_iter=max_iter))
        assert int(info.status) in (S.MAX_ITER, S.DIVERGED)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_z_plus_one_stays_unconverged_when_the_iterates_grow_past_r_over_tol(name, dtype):
    # the relative residual 1/|z| drops below tol=1e-2 once |z| > 100 (Picard: step 99), but the
    # residual itself never shrinks: never CONVERGED, eagerly, per sample (masked) or under vmap
    x = torch.zeros(2, 3, dtype=dtype)
    solver = SOLVER_CLASSES[name](max_iter=400, tol=1e-2)
    f = lambda p, z, x: z + 1  # noqa: E731
    _, eager = dq.fixed_point(f, {}, x, solver=solver)
    _, masked = dq.fixed_point(f, {}, x, solver=solver, per_sample=True)
    _, mapped = torch.func.vmap(lambda xi: dq.fixed_point(f, {}, xi, solver=solver))(x)
    for info in (eager, masked, mapped):
        assert not bool(info.converged.any()) and set(info.status.reshape(-1).tolist()) <= {S.MAX_ITER, S.DIVERGED}
        assert bool((info.rel_residual < 1e-2).all())  # the relative test alone would have passed


def test_a_z0_within_the_tolerance_is_converged_at_step_0_and_a_warm_start_after_progress():
    A = contractive_matrix(5, 0.9)
    x = torch.ones(1, 5, dtype=torch.float64)
    z_star, _ = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=2000, tol=1e-13))
    _, at_start = dq.fixed_point(linear_f, {"A": A}, x, z0=z_star, solver=dq.Picard(tol=1e-6))
    assert int(at_start.nstep) == 0 and int(at_start.status) == S.CONVERGED
    # a warm start 3× outside the tolerance: converged once the residual has halved and rel <= tol
    z0 = z_star + 3e-6 * torch.linalg.vector_norm(z_star) / 5**0.5
    _, warm = dq.fixed_point(linear_f, {"A": A}, x, z0=z0, solver=dq.Picard(max_iter=500, tol=1e-6), trace=True)
    k = int(warm.nstep)
    assert int(warm.status) == S.CONVERGED and 0 < k < 500
    assert float(warm.trace[k]) <= 0.5 * float(warm.trace[0]) and float(warm.rel_residual) <= 1e-6


def test_overflow_is_never_converged():
    # finite iterates whose float32 norm overflows: f(z) = z is exact, but ‖f(z)‖ = inf
    x = torch.full((2, 4), 1e20)
    with pytest.raises(dq.FixedPointError, match="non-finite iterate at step 0"):
        dq.fixed_point(lambda p, z, x: z, {}, x, z0=x.clone())
    _, info = torch.func.vmap(lambda xx: dq.fixed_point(lambda p, z, x: z, {}, xx, z0=xx.clone()))(x)
    assert bool((info.status == S.NONFINITE).all()) and not bool(info.converged.any())


def test_atol_stops_at_the_absolute_tolerance():
    A = contractive_matrix(5, 0.5)
    x = torch.ones(1, 5, dtype=torch.float64)
    _, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=100, tol=0.0, atol=1e-3), trace=True)
    k = int(info.nstep)
    assert info.status == S.CONVERGED and float(info.residual) <= 1e-3 < float(info.trace[k - 1])
    # with both: converged once residual <= atol + tol·‖f(z)‖, the looser of the two here
    _, both = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=100, tol=1e-2, atol=1e-3), trace=True)
    scale = float(both.residual / both.rel_residual)
    assert float(both.residual) <= 1e-3 + 1e-2 * scale and int(both.nstep) <= k


def test_tol_and_atol_zero_run_the_whole_budget_and_report_max_iter():
    A = contractive_matrix(5, 0.5)
    x = torch.ones(1, 5, dtype=torch.float64)
    _, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Anderson(max_iter=9, tol=0.0))
    assert int(info.nstep) == 9 and int(info.status) == S.MAX_ITER  # a tiny residual, but not zero


def test_divergence_ratio_inf_turns_the_rule_off():
    x = torch.ones(2, 2)
    _, info = dq.fixed_point(lambda p, z, x: 2 * z + x, {}, x, solver=dq.Picard(max_iter=30, divergence_ratio=math.inf))
    assert int(info.status) == S.MAX_ITER and int(info.nstep) == 30


@pytest.mark.parametrize(
    "field,value", [("atol", -1.0), ("atol", math.nan), ("divergence_ratio", 1.0), ("divergence_ratio", "x")]
)
def test_stopping_options_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"Picard: {field} must be"):
        dq.Picard(**{field: value})


def test_on_nonconvergence_acts_on_max_iter_and_diverged_but_nonfinite_always_raises():
    x = torch.ones(2, 2, dtype=torch.float64)
    runaway = lambda p, z, x: 3 * z + x  # noqa: E731
    with pytest.warns(dq.FixedPointWarning, match=r"1 DIVERGED"):
        dq.fixed_point(runaway, {}, x, solver=dq.Picard(), on_nonconvergence="warn")
    with pytest.raises(dq.FixedPointError, match=r"1 MAX_ITER"):
        dq.fixed_point(runaway, {}, x, solver=dq.Picard(max_iter=3), on_nonconvergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignore" is silent
        dq.fixed_point(runaway, {}, x, solver=dq.Picard(), on_nonconvergence="ignore")
    with pytest.raises(dq.FixedPointError, match="non-finite iterate at step 0"):
        dq.fixed_point(lambda p, z, x: z * math.nan, {}, x, on_nonconvergence="ignore")


def _adjoint_loss(adjoint_solver, on_nonconvergence, scale=0.9):
    A = contractive_matrix(6, scale, symmetric=True, seed=3).requires_grad_()
    x = torch.ones(2, 6, dtype=torch.float64)
    z, _ = dq.fixed_point(
        linear_f, {"A": A}, x, solver=dq.Anderson(max_iter=200, tol=1e-10),
        grad_mode=dq.IFT(solver=adjoint_solver), on_nonconvergence=on_nonconvergence,
    )
    z.sum().backward()
    return A.grad


def test_the_adjoint_solve_reports_through_on_nonconvergence():
    with pytest.warns(dq.FixedPointWarning, match=r"IFT adjoint \(backward\) solve did not converge: .*MAX_ITER"):
        _adjoint_loss(dq.Picard(max_iter=3, tol=1e-10), "warn")
    with pytest.raises(dq.FixedPointError, match=r"IFT adjoint \(backward\) solve did not converge"):
        _adjoint_loss(dq.Picard(max_iter=3, tol=1e-10), "raise")
    assert torch.isfinite(_adjoint_loss(dq.Picard(max_iter=3, tol=1e-10), "ignore")).all()  # a truncated series


def test_empty_per_sample_batch_gives_an_empty_result():
    for name, cls in SOLVER_CLASSES.items():
        x = torch.zeros(0, 3)
        for mode in ("ift", "jfb", "unrolled"):
            W = torch.eye(3).mul(0.5).requires_grad_()
            z, info = dq.fixed_point(
                lambda p, z, x: torch.tanh(z @ p["W"] + x), {"W": W}, x, solver=cls(), grad_mode=mode, per_sample=True
            )
            assert z.shape == (0, 3), name
            assert all(t.shape == (0,) for t in info)
            z.sum().backward()
            assert W.grad is None or float(W.grad.abs().sum()) == 0.0


def test_info_is_detached_and_an_info_even_with_extras():
    A = contractive_matrix(4, 0.5).requires_grad_()
    x = torch.ones(2, 4, dtype=torch.float64, requires_grad=True)
    for solver in (dq.Anderson(tol=1e-8), dq.Broyden(tol=1e-8, return_best=True)):
        z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=solver, grad_mode="unrolled", trace=True, return_trajectory=2)
        assert z.requires_grad
        assert isinstance(info, dq.Info) and isinstance(info, tuple)
        assert {"trace", "trajectory"} <= set(info._fields)
        reports = [getattr(info, f) for f in info._fields if f != "trajectory"]
        assert not any(t.requires_grad for t in reports)
        float(info.residual)  # no warning about converting a tensor that requires grad
    _, plain = dq.fixed_point(linear_f, {"A": A}, x)
    assert type(plain) is dq.Info and plain._fields == ("nstep", "residual", "rel_residual", "converged", "status")


@pytest.mark.parametrize("name", ["anderson", "broyden", "picard"])
def test_vmap_with_an_unbatched_z0(name):
    """z0 without the mapped dim while x has it: the solver's buffers must batch (was a crash)."""
    A = contractive_matrix(4, 0.6)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solver = SOLVER_CLASSES[name](max_iter=200, tol=1e-12)
    z0 = torch.zeros(4, dtype=torch.float64)
    f = lambda p, z, x: z @ p["A"].T + x  # noqa: E731
    z, info = torch.func.vmap(lambda xi: dq.fixed_point(f, {"A": A}, xi, z0=z0, solver=solver))(x)
    torch.testing.assert_close(z, linear_solution(A, x), atol=1e-10, rtol=1e-10)
    assert bool((info.status == S.CONVERGED).all())

    def loss(A, xi):
        return dq.fixed_point(f, {"A": A}, xi, z0=z0, solver=solver)[0].sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(A, x)  # per-sample gradients
    for i in range(3):
        _, pullback = torch.func.vjp(lambda A, i=i: linear_solution(A, x[i : i + 1]), A)
        torch.testing.assert_close(grads[i], pullback(torch.ones(1, 4, dtype=torch.float64))[0], atol=1e-9, rtol=1e-9)
    Ag = A.clone().requires_grad_()
    torch.func.vmap(lambda xi: dq.fixed_point(f, {"A": Ag}, xi, z0=z0, solver=solver)[0])(x).sum().backward()
    torch.testing.assert_close(Ag.grad, grads.sum(0), atol=1e-9, rtol=1e-9)


def test_broyden_with_memory_one_converges_where_picard_does():
    A = contractive_matrix(50, 0.95, symmetric=True, seed=4)
    x = torch.randn(1, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, picard = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=2000, tol=1e-8))
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Broyden(max_iter=2000, tol=1e-8, memory=1))
    assert picard.status == S.CONVERGED and info.status == S.CONVERGED
    torch.testing.assert_close(z, linear_solution(A, x), atol=1e-6, rtol=1e-6)


def test_an_adjoint_that_goes_non_finite_raises_from_backward_whatever_the_setting():
    A = contractive_matrix(5, 0.5)
    x = torch.ones(2, 5, dtype=torch.float64)
    for setting in ("ignore", "warn", "raise"):
        A_ = A.clone().requires_grad_()
        z, _ = dq.fixed_point(linear_f, {"A": A_}, x, grad_mode="ift", on_nonconvergence=setting)
        with pytest.raises(dq.FixedPointError, match="adjoint.*non-finite"):
            (z * torch.nan).sum().backward()


def test_raise_has_nothing_to_raise_under_vmap_and_the_status_reports_it():
    x = torch.zeros(3, 2, dtype=torch.float64)
    solver = dq.Picard(max_iter=5)
    _, info = torch.func.vmap(
        lambda xi: dq.fixed_point(lambda p, z, x: z + 1, {}, xi, solver=solver, on_nonconvergence="raise")
    )(x)
    assert info.status.tolist() == [S.MAX_ITER] * 3
