"""jacobian_frobenius and spectral_radius against exact Jacobians (torch.func.jacrev)."""

import math

import pytest
import torch

import deq_functional as dq
from deq_functional.regularizers import jacobian_frobenius, spectral_radius

D64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def f_tanh(p, z, x):
    return torch.tanh(z @ p["W"].T + x) * p["s"]


def _problem(seed=0, batch=2, dim=3):
    g = _gen(seed)
    params = {"W": 0.6 * torch.randn(dim, dim, dtype=D64, generator=g), "s": torch.tensor(0.9, dtype=D64)}
    z = torch.randn(batch, dim, dtype=D64, generator=g)
    x = torch.randn(batch, dim, dtype=D64, generator=g)
    return params, z, x


def _dense_J(f, params, z, x):
    J = torch.func.jacrev(lambda z: f(params, z, x))(z)
    return J.reshape(z.numel(), z.numel())


# ---------------------------------------------------------------- jacobian_frobenius


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_matches_exact_within_sampling_error(probe):
    params, z, x = _problem(1)
    J = _dense_J(f_tanh, params, z, x)
    d = z.numel()
    exact = (J**2).sum() / d
    n = 4000
    est = jacobian_frobenius(f_tanh, params, z, x, n_samples=n, generator=_gen(2), probe=probe)
    JJt = J @ J.T
    var = 2 * ((JJt**2).sum() - (probe == "rademacher") * (JJt.diagonal() ** 2).sum()) / n / d**2
    assert abs(est - exact) <= 4 * var.sqrt()
    assert abs(est - exact) / exact < 0.05


def test_hutchinson_gradient_matches_finite_differences_and_exact_gradient():
    params, z, x = _problem(3)

    def est(W, n, seed):
        return jacobian_frobenius(f_tanh, {"W": W, "s": params["s"]}, z, x, n_samples=n, generator=_gen(seed))

    W = params["W"]
    grad = torch.func.grad(lambda W: est(W, 3, 7))(W)
    fd = torch.zeros_like(W)
    h = 1e-6
    for i in range(W.numel()):
        e = torch.zeros(W.numel(), dtype=D64)
        e[i] = h
        e = e.view_as(W)
        fd.view(-1)[i] = (est(W + e, 3, 7) - est(W - e, 3, 7)) / (2 * h)  # same probes both sides
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)

    # many samples: the gradient of the estimate approaches the gradient of the exact value
    def exact(W):
        return (_dense_J(f_tanh, {"W": W, "s": params["s"]}, z, x) ** 2).sum() / z.numel()

    g_exact = torch.func.grad(exact)(W)
    g_many = torch.func.grad(lambda W: est(W, 4000, 8))(W)
    assert (g_many - g_exact).norm() / g_exact.norm() < 0.05


def test_hutchinson_on_pytree_state_and_eager_backward():
    g = _gen(4)
    A = torch.randn(2, 2, dtype=D64, generator=g, requires_grad=True)
    B = torch.randn(3, 2, dtype=D64, generator=g, requires_grad=True)

    def f(p, z, x):
        return {"a": torch.tanh(z["a"] @ p["A"].T + x), "b": 0.5 * z["b"] + torch.sin(z["a"] @ p["B"].T)}

    params = {"A": A, "B": B}
    z = {"a": torch.randn(2, dtype=D64, generator=g), "b": torch.randn(3, dtype=D64, generator=g)}
    x = torch.randn(2, dtype=D64, generator=g)
    flat = lambda t: torch.cat([t["a"], t["b"]])  # noqa: E731
    unflat = lambda v: {"a": v[:2], "b": v[2:]}  # noqa: E731
    J = torch.func.jacrev(lambda v: flat(f(params, unflat(v), x)))(flat(z))
    exact = (J**2).sum() / 5
    est = jacobian_frobenius(f, params, z, x, n_samples=3000, generator=_gen(5), probe="rademacher")
    assert abs(est - exact) / exact < 0.05
    est.backward()
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0


def test_per_sample_mean_equals_batch_value_and_blocks_match():
    params, z, x = _problem(6, batch=4)
    full = jacobian_frobenius(f_tanh, params, z, x, n_samples=5, generator=_gen(9))
    per = jacobian_frobenius(f_tanh, params, z, x, n_samples=5, generator=_gen(9), per_sample=True)
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), full)
    per_many = jacobian_frobenius(f_tanh, params, z, x, n_samples=3000, generator=_gen(9), per_sample=True)
    for b in range(4):
        Jb = _dense_J(f_tanh, params, z[b : b + 1], x[b : b + 1])
        assert abs(per_many[b] - (Jb**2).sum() / 3) / ((Jb**2).sum() / 3) < 0.06


def test_jacobian_frobenius_under_vmap():
    params, z, x = _problem(10, batch=5)

    def one(z, x):
        return jacobian_frobenius(f_tanh, params, z, x, n_samples=2000, probe="rademacher")

    torch.manual_seed(0)
    out = torch.func.vmap(one, randomness="different")(z, x)
    assert out.shape == (5,)
    for b in range(5):
        exact = (_dense_J(f_tanh, params, z[b], x[b]) ** 2).sum() / 3
        assert abs(out[b] - exact) / exact < 0.06
    # without randomness= vmap refuses random probes, with torch's own message
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(one)(z, x)


def test_jacobian_penalty_on_fixed_point_trains():
    params, _, x = _problem(11)
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    z_star, _ = dq.fixed_point(f_tanh, params, x, solver=dq.Picard(max_iter=200, tol=1e-10))
    loss = z_star.pow(2).sum() + 0.1 * jacobian_frobenius(f_tanh, params, z_star, x, generator=_gen(1))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params.values())


# ---------------------------------------------------------------- spectral_radius


def f_lin(p, z, x):
    return z @ p["A"].T + x


def test_spectral_radius_is_largest_abs_eigenvalue_not_the_norm():
    # non-normal J with a negative dominant eigenvalue: ρ = 0.8 while ‖J‖₂ ≈ 2.4
    A = torch.tensor([[0.5, 2.0, 0.0], [0.0, -0.8, 1.0], [0.0, 0.0, 0.3]], dtype=D64)
    z, x = torch.zeros(3, dtype=D64), torch.zeros(3, dtype=D64)
    rho = spectral_radius(f_lin, {"A": A}, z, x, n_iter=300, generator=_gen())
    exact = torch.linalg.eigvals(A).abs().max()
    torch.testing.assert_close(rho, exact, rtol=1e-8, atol=0)
    assert torch.linalg.matrix_norm(A, ord=2) > 2 * rho


def test_spectral_radius_nonlinear_matches_exact_jacobian_and_symmetric_equals_norm():
    g = _gen(12)
    Q = torch.linalg.qr(torch.randn(6, 6, dtype=D64, generator=g))[0]
    S = torch.diag(torch.tensor([-0.9, 0.45, 0.4, -0.3, 0.2, 0.1], dtype=D64))
    params = {"W": Q @ S @ Q.T + 0.1 * torch.randn(6, 6, dtype=D64, generator=g), "s": torch.tensor(1.0, dtype=D64)}
    z, x = 0.2 * torch.randn(6, dtype=D64, generator=g), 0.2 * torch.randn(6, dtype=D64, generator=g)
    J = _dense_J(f_tanh, params, z, x)
    ev = torch.linalg.eigvals(J)
    mods = ev.abs().sort(descending=True).values
    assert mods[1] / mods[0] < 0.9 and ev[ev.abs().argmax()].imag.abs() < 1e-12  # precondition: separated, real
    rho = spectral_radius(f_tanh, params, z, x, n_iter=400, generator=_gen(1))
    torch.testing.assert_close(rho, mods[0], rtol=1e-6, atol=0)
    # symmetric Jacobian: radius == spectral norm
    Sym = {"A": Q @ S @ Q.T}
    rho_s = spectral_radius(f_lin, Sym, z, x, n_iter=400, generator=_gen(2))
    torch.testing.assert_close(rho_s, torch.linalg.matrix_norm(Sym["A"], ord=2), rtol=1e-8, atol=0)


def test_spectral_radius_per_sample_and_detached():
    g = _gen(13)
    A = torch.diag(torch.tensor([0.7, -0.2, 0.1], dtype=D64)).requires_grad_()

    def f(p, z, x):  # sample b scaled by (b+1)/4, so per-sample radii differ
        scale = torch.arange(1, z.shape[0] + 1, dtype=D64)[:, None] / 4
        return scale * (z @ p["A"].T) + x

    z = torch.randn(4, 3, dtype=D64, generator=g)
    rho = spectral_radius(f, {"A": A}, z, z, n_iter=200, generator=g, per_sample=True)
    torch.testing.assert_close(rho, 0.7 * torch.arange(1, 5, dtype=D64) / 4, rtol=1e-8, atol=0)
    assert not rho.requires_grad


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem():
    params, z, x = _problem(0)
    with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
        jacobian_frobenius(f_tanh, params, z, x, n_samples=0)
    with pytest.raises(ValueError, match="probe must be one of"):
        jacobian_frobenius(f_tanh, params, z, x, probe="uniform")
    with pytest.raises(ValueError, match="n_iter must be an int >= 1"):
        spectral_radius(f_tanh, params, z, x, n_iter=0)
    with pytest.raises(ValueError, match="same leading"):
        jacobian_frobenius(f_tanh, params, (z, torch.ones(3, dtype=D64)), x, per_sample=True)
    with pytest.raises(ValueError, match="z_star must be a floating tensor"):
        jacobian_frobenius(f_tanh, params, torch.ones(2, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="square Jacobian"):
        spectral_radius(lambda p, z, x: z.sum(-1), params, z, x)
    assert math.isfinite(float(jacobian_frobenius(f_tanh, params, z, x)))
