"""Half precision: float16/bfloat16 states with every solver, and autocast (state keeps its dtype)."""

import warnings

import pytest
import torch
from helpers import SOLVER_CLASSES, tanh_f, tanh_params

import deq_functional as dq

HALF = [torch.float16, torch.bfloat16]


def _problem(dtype=torch.float64):
    """A tanh DEQ, latent 16, batch 6: ``(params, x)`` in ``dtype``."""
    p = tanh_params(16, 8, rho=0.5)
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return {k: v.to(dtype) for k, v in p.items()}, x.to(dtype)


def solve(p, x, **kwargs):
    z0 = torch.zeros(x.shape[0], 16, dtype=x.dtype)
    return dq.fixed_point(tanh_f, p, x, z0=z0, **kwargs)


def _reference():
    p, x = _problem()
    return solve(p, x, solver=dq.Anderson(max_iter=200, tol=1e-13))[0]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", SOLVER_CLASSES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_half_precision_states_with_every_solver(dtype, name, per_sample):
    p, x = _problem(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tol 2e-2 is above both epsilons: no precision warning
        z, info = solve(p, x, solver=SOLVER_CLASSES[name](max_iter=100, tol=2e-2), per_sample=per_sample)
    assert z.dtype == dtype and info.residual.dtype == torch.float32
    assert bool(info.converged.all())
    torch.testing.assert_close(z.double(), _reference(), atol=4e-2, rtol=0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", ["ift", "jfb"])
def test_half_precision_gradients_follow_the_float64_ones(dtype, mode):
    grads = {}
    for dt in (torch.float64, dtype):
        p, x = _problem(dt)
        W = p["W"].clone().requires_grad_()
        tol = 2e-2 if dt != torch.float64 else 1e-12
        z, _ = solve({**p, "W": W}, x, solver=dq.Anderson(max_iter=100, tol=tol), grad_mode=mode)
        z.float().square().sum().backward()
        grads[dt] = W.grad.double()
    ref = grads[torch.float64]
    assert float((grads[dtype] - ref).norm() / ref.norm()) < 0.1


def test_default_tol_in_half_precision_warns_naming_the_floor():
    p, x = _problem(torch.bfloat16)
    with pytest.warns(dq.FixedPointWarning, match=r"tol=1e-05 is below the resolution .*epsilon 0\.0078.*tol >= 0\.0078"):
        solve(p, x, solver=dq.Anderson(max_iter=5))


def test_autocast_keeps_the_state_dtype_and_lands_near_the_float32_solution():
    p, x = _problem(torch.float32)
    z32, _ = solve(p, x, solver=dq.Anderson(max_iter=100, tol=1e-6), grad_mode="jfb")
    for mode in ("ift", "jfb"):
        W = p["W"].clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, info = solve({**p, "W": W}, x, solver=dq.Anderson(max_iter=60, tol=2e-2), grad_mode=mode)
        assert z.dtype == torch.float32 and info.residual.dtype == torch.float32
        torch.testing.assert_close(z, z32, atol=5e-2, rtol=0)  # bf16 arithmetic: ~3 significant digits
        z.square().sum().backward()
        W32 = p["W"].clone().requires_grad_()
        solve({**p, "W": W32}, x, solver=dq.Anderson(max_iter=100, tol=1e-6), grad_mode=mode)[0].square().sum().backward()
        assert float((W.grad - W32.grad).norm() / W32.grad.norm()) < 0.1


def test_autocast_default_tol_warns_and_float32_does_not():
    p, x = _problem(torch.float32)
    with pytest.warns(dq.FixedPointWarning, match=r"epsilon 0\.0078 in autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            solve(p, x, solver=dq.Anderson(max_iter=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(p, x, solver=dq.Anderson(max_iter=5, tol=1e-9))  # float32: tol is the user's call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_a_doubling_half_precision_iteration_is_diverged_well_before_it_overflows(dtype, scale):
    # float16 overflows at 65504: from |x| = 10 a doubling iterate gets there in ~12 steps, before
    # the default 1e4 growth; capped at 256 for float16 it stops at step 8 with values near 2560
    x = torch.full((4, 3), scale, dtype=dtype)
    z, info = dq.fixed_point(lambda p, z, x: 2 * z + x, {}, x, solver=dq.Picard(max_iter=200, tol=1e-2))
    assert int(info.status) == dq.Status.DIVERGED and bool(torch.isfinite(z).all())
    assert float(z.float().abs().max()) <= torch.finfo(dtype).max / 8  # 3+ doublings of headroom left
