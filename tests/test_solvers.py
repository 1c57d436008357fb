"""Solvers: convergence, the counting contract, stopping, masks, pytrees, options."""

import pytest
import torch
from helpers import SOLVER_CLASSES, contractive_matrix, hard_sample_f, linear_f, linear_solution, tuple_f, tuple_params

import deq_functional as dq


@pytest.mark.parametrize("name", SOLVER_CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_solver_reaches_the_linear_fixed_point(name, dtype):
    A = contractive_matrix(8, 0.8, dtype=dtype)
    x = torch.randn(4, 8, dtype=dtype, generator=torch.Generator().manual_seed(3))
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=SOLVER_CLASSES[name](max_iter=400, tol=tol))
    assert z.dtype == dtype
    assert bool(info.converged)
    torch.testing.assert_close(z, linear_solution(A, x), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_standalone_solver_on_a_pytree(name):
    target = (torch.tensor([1.0, 2.0], dtype=torch.float64), {"b": torch.tensor(3.0, dtype=torch.float64)})

    def g(z):
        a, d = z
        return 0.5 * a + 0.5 * target[0], {"b": 0.5 * d["b"] + 0.5 * target[1]["b"]}

    z0 = (torch.zeros(2, dtype=torch.float64), {"b": torch.zeros((), dtype=torch.float64)})
    z, info = SOLVER_CLASSES[name](max_iter=200, tol=1e-12)(g, z0)
    assert isinstance(z, tuple) and set(z[1]) == {"b"}
    torch.testing.assert_close(z[0], target[0])
    torch.testing.assert_close(z[1]["b"], target[1]["b"])
    assert info.nstep.shape == () and info.converged.dtype == torch.bool


def test_picard_counting_returns_f_to_the_k_plus_one():
    f = lambda p, z, x: 0.5 * z + x  # noqa: E731
    x = torch.tensor([1.0], dtype=torch.float64)
    z, info = dq.fixed_point(f, {}, x, solver=dq.Picard(max_iter=3, tol=0.0))
    # z0=0, f(z) = z/2 + 1: f^4(0) = 1 + 1/2 + 1/4 + 1/8 = 1.875; residual |f(z_3) − z_3| = 1/8
    assert int(info.nstep) == 3
    torch.testing.assert_close(z, torch.tensor([1.875], dtype=torch.float64))
    torch.testing.assert_close(info.residual, torch.tensor(0.125, dtype=torch.float64))
    torch.testing.assert_close(info.rel_residual, torch.tensor(0.125 / 1.875, dtype=torch.float64))


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_tol_zero_runs_max_iter_even_from_an_exact_fixed_point(name):
    f = lambda p, z, x: 0.5 * z + x  # noqa: E731
    x = torch.ones(3, dtype=torch.float64)
    z, info = dq.fixed_point(f, {}, x, solver=SOLVER_CLASSES[name](max_iter=7, tol=0.0), z0=2 * x)
    assert int(info.nstep) == 7
    assert torch.isfinite(z).all() and float(info.residual) == 0.0
    torch.testing.assert_close(z, 2 * x)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_eager_exits_early_and_agrees_with_the_full_masked_budget(name):
    A = contractive_matrix(6, 0.7)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = SOLVER_CLASSES[name](max_iter=200, tol=1e-8)
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=solver, per_sample=True)
    assert bool((0 < info.nstep).all()) and bool((info.nstep < 200).all())
    torch.testing.assert_close(z, linear_solution(A, x), atol=1e-7, rtol=1e-7)
    # under vmap no value can be read: the full budget runs with each converged problem frozen
    zv, infov = torch.func.vmap(lambda xx: dq.fixed_point(linear_f, {"A": A}, xx[None], solver=solver))(x)
    assert torch.equal(infov.nstep, info.nstep) and torch.equal(infov.status, info.status)
    torch.testing.assert_close(zv[:, 0], z, atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_per_sample_freezes_converged_samples_and_reports_per_sample(name):
    a = torch.tensor([[0.1], [0.1], [0.99]], dtype=torch.float64)
    x = torch.full((3, 1), 0.01, dtype=torch.float64)
    solver = SOLVER_CLASSES[name](max_iter=2000, tol=1e-10)
    z, info = dq.fixed_point(hard_sample_f, {"a": a}, x, solver=solver, per_sample=True)
    assert info.nstep.shape == info.residual.shape == info.converged.shape == (3,)
    assert bool(info.converged.all())
    assert int(info.nstep[0]) < int(info.nstep[2])  # easy samples stopped counting early
    torch.testing.assert_close(z, hard_sample_f({"a": a}, z, x), atol=1e-8, rtol=1e-8)
    _, whole = dq.fixed_point(hard_sample_f, {"a": a}, x, solver=solver)
    assert whole.nstep.shape == ()


def test_anderson_and_broyden_beat_picard_on_a_slowly_contracting_map():
    A = contractive_matrix(50, 0.95, symmetric=True, seed=4)  # spectral radius 0.95
    x = torch.randn(1, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    steps = {}
    for name, cls in SOLVER_CLASSES.items():
        z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=cls(max_iter=2000, tol=1e-8))
        assert bool(info.converged), name
        steps[name] = int(info.nstep)
    assert steps["anderson"] < steps["picard"] / 3
    assert steps["broyden"] < steps["picard"] / 3


def test_broyden_keeps_converging_when_its_memory_fills():
    A = contractive_matrix(30, 0.9, seed=2)
    x = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Broyden(max_iter=300, tol=1e-10, memory=2))
    assert bool(info.converged) and int(info.nstep) > 2
    torch.testing.assert_close(z, linear_solution(A, x), atol=1e-8, rtol=1e-8)


def test_damped_picard_and_anderson_beta_converge_on_an_oscillating_map():
    f = lambda p, z, x: -1.0 * z + x  # noqa: E731  (nonexpansive: plain Picard oscillates forever)
    x = torch.ones(2, dtype=torch.float64)
    _, plain = dq.fixed_point(f, {}, x, solver=dq.Picard(max_iter=100, tol=1e-8))
    assert not bool(plain.converged)
    z, damped = dq.fixed_point(f, {}, x, solver=dq.Picard(max_iter=100, tol=1e-8, damping=0.5))
    assert bool(damped.converged)
    torch.testing.assert_close(z, x / 2)
    z, info = dq.fixed_point(f, {}, x, solver=dq.Anderson(max_iter=100, tol=1e-8, beta=0.5))
    assert bool(info.converged)
    torch.testing.assert_close(z, x / 2)


def test_tuple_state_of_different_shapes():
    p = tuple_params(8)
    x = torch.randn(3, 8, dtype=torch.float64)
    z0 = (torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64))
    for per_sample in (False, True):
        z, info = dq.fixed_point(tuple_f, p, x, z0=z0, solver=dq.Anderson(tol=1e-12, max_iter=200), per_sample=per_sample)
        assert [t.shape for t in z] == [(3, 8), (3, 4)]
        assert bool(info.converged.all())
        for a, b in zip(z, tuple_f(p, z, x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_trace_records_every_residual():
    A = contractive_matrix(5, 0.5)
    x = torch.ones(1, 5, dtype=torch.float64)
    z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=6, tol=0.0), trace=True)
    assert info.trace.shape == (7,)
    torch.testing.assert_close(info.trace[-1], info.residual)
    assert bool((info.trace[1:] < info.trace[:-1]).all())  # a contraction: residuals fall
    _, plain = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Picard(max_iter=6, tol=0.0))
    assert plain._fields == ("nstep", "residual", "rel_residual", "converged", "status")


def test_return_best_keeps_the_lowest_residual_iterate():
    # residual falls for 5 steps, then the map pushes away: z ← z + (k-dependent) kick
    calls = {"n": 0}

    def g(z):
        calls["n"] += 1
        kick = 0.5 if calls["n"] <= 6 else 3.0
        return z + kick * (1.0 - z) if calls["n"] <= 6 else z + kick

    z0 = torch.zeros(1, dtype=torch.float64)
    z_last, last = dq.Picard(max_iter=10, tol=0.0)(g, z0)
    calls["n"] = 0
    z_best, best = dq.Picard(max_iter=10, tol=0.0, return_best=True)(g, z0)
    assert float(best.residual) < float(last.residual)
    assert int(best.best_step) == 5 and int(best.nstep) == 10
    torch.testing.assert_close(best.residual, torch.tensor(2 ** -6, dtype=torch.float64))


def test_solvers_by_name_and_by_position():
    A = contractive_matrix(4, 0.5)
    x = torch.ones(2, 4, dtype=torch.float64)
    for name in ("picard", "Anderson", "BROYDEN"):
        z, info = dq.fixed_point(linear_f, {"A": A}, x, solver=name)
        assert bool(info.converged)
        torch.testing.assert_close(z, linear_solution(A, x), atol=1e-4, rtol=1e-4)
    p, a, b = dq.Picard(100, 1e-6, 0.5), dq.Anderson(100, 1e-6, 3, 0.9, 1e-3), dq.Broyden(100, 1e-6, 5)
    assert (p.max_iter, p.tol, p.damping) == (100, 1e-6, 0.5)
    assert (a.max_iter, a.tol, a.m, a.beta, a.lam) == (100, 1e-6, 3, 0.9, 1e-3)
    assert (b.max_iter, b.tol, b.memory) == (100, 1e-6, 5)


def test_one_damped_picard_step_and_one_damped_anderson_step_follow_their_formulas():
    # iteration 0 of both is z1 = (1 − β) z0 + β g(z0); the solver returns g(z1)
    g = lambda z: torch.tanh(z) + 1.0  # noqa: E731
    z0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    z1 = 0.7 * z0 + 0.3 * g(z0)
    for solver in (dq.Picard(max_iter=1, tol=0.0, damping=0.3), dq.Anderson(max_iter=1, tol=0.0, beta=0.3)):
        z, info = solver(g, z0)
        assert int(info.nstep) == 1
        torch.testing.assert_close(z, g(z1), atol=1e-15, rtol=0)


def test_anderson_ridge_is_relative_so_the_iterations_do_not_depend_on_the_scale():
    A = contractive_matrix(6, 0.9, seed=4)
    counts = []
    for scale in (1e-6, 1.0, 1e6):
        x = scale * torch.ones(1, 6, dtype=torch.float64)
        _, info = dq.fixed_point(linear_f, {"A": A}, x, solver=dq.Anderson(max_iter=200, tol=1e-10, lam=1e-2))
        assert bool(info.converged)
        counts.append(int(info.nstep))
    assert counts[0] == counts[1] == counts[2], counts
