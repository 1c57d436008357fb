"""Bad input gets a clear error naming what is wrong; non-convergence is reported, not hidden."""

import dataclasses
import math

import pytest
import torch
from helpers import contractive_matrix, linear_f

import deq_functional as dq


def _x():
    return torch.ones(2, 3, dtype=torch.float64)


def test_wrong_output_shape_names_both():
    f = lambda p, z, x: torch.cat([z, z], dim=1)  # noqa: E731
    with pytest.raises(ValueError, match=r"shape=\(2, 6\).*shape=\(2, 3\)"):
        dq.fixed_point(f, {}, _x(), z0=torch.zeros(2, 3, dtype=torch.float64))


def test_wrong_output_structure():
    f = lambda p, z, x: (z, z)  # noqa: E731
    with pytest.raises(ValueError, match="structure"):
        dq.fixed_point(f, {}, _x(), z0=torch.zeros(2, 3, dtype=torch.float64))


def test_wrong_output_dtype():
    f = lambda p, z, x: (z + x).float()  # noqa: E731
    with pytest.raises(ValueError, match="dtype float32 where z has float64"):
        dq.fixed_point(f, {}, _x(), z0=torch.zeros(2, 3, dtype=torch.float64))


def test_missing_z0_when_f_output_differs_from_x_says_pass_z0():
    W = torch.randn(5, 3, dtype=torch.float64)
    f = lambda p, z, x: torch.tanh(x @ p["W"].T)  # noqa: E731  (z has 5 features, x has 3)
    with pytest.raises(ValueError, match=r"pass z0=") as err:
        dq.fixed_point(f, {"W": W}, _x())
    assert "shape=(2, 5)" in str(err.value) and "shape=(2, 3)" in str(err.value)


def test_missing_z0_with_a_pytree_output_names_both_structures():
    f = lambda p, z, x: {"a": x, "b": x}  # noqa: E731
    with pytest.raises(ValueError, match=r"'a'.*pass z0="):
        dq.fixed_point(f, {}, _x())


@pytest.mark.parametrize("solver", [dq.Picard(max_iter=50), dq.Anderson(max_iter=50), dq.Broyden(max_iter=50)], ids=repr)
def test_non_finite_iterate_raises_naming_step_and_residual(solver):
    f = lambda p, z, x: 3.0 * torch.sqrt(3.0 - z) + x  # noqa: E731  (the first step leaves its domain)
    with pytest.raises(dq.FixedPointError, match=r"non-finite iterate at step 1: residual \[nan\]"):
        dq.fixed_point(f, {}, _x(), solver=solver)


def test_runaway_picard_is_diverged_long_before_it_overflows():
    f = lambda p, z, x: z**2 + 1.0 + x  # noqa: E731  (no real fixed point: z grows doubly exponentially)
    _, info = dq.fixed_point(f, {}, _x(), solver=dq.Picard(max_iter=50))
    # residuals 2, 4, 24, 651, 4.6e5: the first above 1e4 x the smallest (2) stops it, at step 4
    assert int(info.status) == dq.Status.DIVERGED and int(info.nstep) == 4
    assert bool(torch.isfinite(info.residual)) and not bool(info.converged)
    with pytest.raises(dq.FixedPointError, match=r"1 DIVERGED.*damp the iteration"):
        dq.fixed_point(f, {}, _x(), solver=dq.Picard(max_iter=50), on_nonconvergence="raise")


def test_nan_from_f_raises():
    f = lambda p, z, x: z * math.nan  # noqa: E731
    with pytest.raises(dq.FixedPointError, match="step 0"):
        dq.fixed_point(f, {}, _x())


def test_non_finite_and_runaway_under_vmap_are_flagged_in_info():
    runaway = lambda p, z, x: 10.0 * z**3 + x  # noqa: E731
    _, info = torch.func.vmap(
        lambda x: dq.fixed_point(runaway, {}, x, solver=dq.Picard(max_iter=20), z0=torch.ones_like(x))
    )(_x())
    assert not bool(info.converged.any()) and bool((info.status == dq.Status.DIVERGED).all())
    nan_f = lambda p, z, x: z * math.nan + x  # noqa: E731
    _, info = torch.func.vmap(lambda x: dq.fixed_point(nan_f, {}, x, solver=dq.Picard(max_iter=20)))(_x())
    assert bool((info.status == dq.Status.NONFINITE).all()) and not bool(torch.isfinite(info.residual).any())
    assert info.nstep.tolist() == [0, 0]


def test_non_convergence_is_reported_and_optionally_warned_or_raised():
    A = contractive_matrix(3, 0.99)
    solver = dq.Picard(max_iter=3, tol=1e-10)
    _, info = dq.fixed_point(linear_f, {"A": A}, _x(), solver=solver)
    assert not bool(info.converged)
    with pytest.warns(dq.FixedPointWarning, match="did not converge"):
        dq.fixed_point(linear_f, {"A": A}, _x(), solver=solver, on_nonconvergence="warn")
    with pytest.raises(dq.FixedPointError, match=r"rel_residual .* > tol 1e-10 after 3 iterations"):
        dq.fixed_point(linear_f, {"A": A}, _x(), solver=solver, on_nonconvergence="raise")
    with pytest.raises(dq.FixedPointError, match="1 of 2"):
        dq.fixed_point(
            linear_f, {"A": torch.diag(torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64))}, torch.stack([_x()[0] * 0, _x()[0]]),
            solver=solver, per_sample=True, on_nonconvergence="raise",
        )


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: dq.Picard(max_iter=0), "max_iter"),
        (lambda: dq.Picard(max_iter=2.5), "max_iter"),
        (lambda: dq.Anderson(tol=-1e-3), "tol"),
        (lambda: dq.Anderson(tol=math.nan), "tol"),
        (lambda: dq.Picard(damping=0.0), "damping"),
        (lambda: dq.Picard(damping=1.5), "damping"),
        (lambda: dq.Anderson(m=0), "m"),
        (lambda: dq.Anderson(beta=0.0), "beta"),
        (lambda: dq.Anderson(lam=-1.0), "lam"),
        (lambda: dq.Broyden(memory=0), "memory"),
        (lambda: dq.Broyden(return_best="yes"), "return_best"),
        (lambda: dq.Neumann(k=-1), "k"),
        (lambda: dq.Phantom(k=0), "k"),
        (lambda: dq.Phantom(damping=2.0), "damping"),
        (lambda: dq.IFT(solver="newton"), "solver"),
    ],
)
def test_invalid_options_fail_at_construction_naming_the_option(make, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        make()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"solver": "newton"}, "solver"),
        ({"grad_mode": "magic"}, "grad_mode"),
        ({"on_nonconvergence": "explode"}, "on_nonconvergence"),
        ({"return_trajectory": -1}, "return_trajectory"),
        ({"solver": 3}, "solver"),
    ],
)
def test_unknown_names_in_fixed_point(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        dq.fixed_point(linear_f, {"A": torch.eye(3, dtype=torch.float64) * 0.5}, _x(), **kwargs)


def test_solvers_and_grad_modes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'm'"):
        dq.Anderson().m = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'k'"):
        dq.Neumann().k = 3  # type: ignore[misc]


def test_per_sample_needs_a_common_batch_dim():
    z0 = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    f = lambda p, z, x: z  # noqa: E731
    with pytest.raises(ValueError, match="same leading"):
        dq.fixed_point(f, {}, _x(), z0=z0, per_sample=True)


def test_integer_state_is_refused():
    f = lambda p, z, x: z  # noqa: E731
    with pytest.raises(ValueError, match="floating point"):
        dq.fixed_point(f, {}, torch.ones(3, dtype=torch.long))


def test_standalone_solver_checks_the_map_output():
    with pytest.raises(ValueError, match=r"Anderson: g\(z\) must return .*shape=\(4,\).*shape=\(3,\)"):
        dq.Anderson()(lambda z: torch.cat([z, z[:1]]), torch.zeros(3))
