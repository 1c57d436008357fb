"""jacobian_frobenius and spectral_radius against exact Jacobians (torch.func.jacrev)."""

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


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_one_probe_gives_the_squared_norm_of_eps_transpose_J(probe):
    # Oracle: ‖εᵀJ‖²/d from the dense Jacobian and the same probe ε. J is not symmetric, so ‖Jε‖ differs
    # and a vjp/jvp mix-up would show.
    params, z, x = _problem(14)
    J = _dense_J(f_tanh, params, z, x)
    g = _gen(3)
    if probe == "gaussian":
        eps = torch.randn(z.shape, generator=g, dtype=D64).reshape(-1)
    else:
        eps = (2 * torch.randint(0, 2, z.shape, generator=g) - 1).to(D64).reshape(-1)
    expected = (eps @ J).pow(2).sum() / z.numel()
    assert not torch.allclose(expected, (J @ eps).pow(2).sum() / z.numel())
    est = jacobian_frobenius(f_tanh, params, z, x, generator=_gen(3), probe=probe)
    torch.testing.assert_close(est, expected, rtol=1e-12, atol=0)


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
    solver = dq.Picard(max_iter=500, tol=1e-13)
    z_star, _ = dq.fixed_point(f_tanh, params, x, solver=solver)
    loss = z_star.pow(2).sum() + 0.1 * jacobian_frobenius(f_tanh, params, z_star, x, generator=_gen(1))
    loss.backward()

    # Oracle: central differences of the same loss, z* re-solved at each shifted point but held at
    # the unshifted z* inside the penalty (jacobian_frobenius treats z_star as a constant), same probe.
    z_fixed = z_star.detach()

    def loss_at(p):
        z, _ = dq.fixed_point(f_tanh, p, x, solver=solver)
        return z.pow(2).sum() + 0.1 * jacobian_frobenius(f_tanh, p, z_fixed, x, generator=_gen(1))

    h = 1e-6
    for name, leaf in params.items():
        fd = torch.zeros(leaf.numel(), dtype=D64)
        for i in range(leaf.numel()):
            shifted = []
            for sign in (1, -1):
                p = {k: v.detach().clone() for k, v in params.items()}
                p[name].view(-1)[i] += sign * h
                shifted.append(loss_at(p))
            fd[i] = (shifted[0] - shifted[1]) / (2 * h)
        assert fd.abs().sum() > 0
        torch.testing.assert_close(leaf.grad.reshape(-1), fd, rtol=1e-6, atol=1e-9, msg=name)


# ---------------------------------------------------------------- spectral_radius


def f_lin(p, z, x):
    return z @ p["A"].T + x


def test_spectral_radius_is_largest_abs_eigenvalue_not_the_norm():
    # non-normal J with a negative dominant eigenvalue: ρ = 0.8 while ‖J‖₂ ≈ 2.4
    A = torch.tensor([[0.5, 2.0, 0.0], [0.0, -0.8, 1.0], [0.0, 0.0, 0.3]], dtype=D64)
    exact = torch.linalg.eigvals(A).abs().max()
    assert torch.linalg.matrix_norm(A, ord=2) > 2 * exact  # precondition: a norm estimate would be far off
    z, x = torch.zeros(3, dtype=D64), torch.zeros(3, dtype=D64)
    rho = spectral_radius(f_lin, {"A": A}, z, x, n_iter=300, generator=_gen())
    torch.testing.assert_close(rho, exact, rtol=1e-8, atol=0)


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
    with pytest.raises(ValueError, match=r"^jacobian_frobenius: n_samples must be an integer >= 1, got 0$"):
        jacobian_frobenius(f_tanh, params, z, x, n_samples=0)
    msg = r"^jacobian_frobenius: probe must be one of \('gaussian', 'rademacher'\), got 'uniform'$"
    with pytest.raises(ValueError, match=msg):
        jacobian_frobenius(f_tanh, params, z, x, probe="uniform")
    with pytest.raises(ValueError, match=r"^spectral_radius: n_iter must be an integer >= 1, got 0$"):
        spectral_radius(f_tanh, params, z, x, n_iter=0)
    with pytest.raises(ValueError, match="same leading"):
        jacobian_frobenius(f_tanh, params, (z, torch.ones(3, dtype=D64)), x, per_sample=True)
    with pytest.raises(ValueError, match="z_star must be a floating tensor"):
        jacobian_frobenius(f_tanh, params, torch.ones(2, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="square Jacobian"):
        spectral_radius(lambda p, z, x: z.sum(-1), params, z, x)
