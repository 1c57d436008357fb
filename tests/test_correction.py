"""correction_loss: weight schedules, gradients on a toy problem, trajectory from fixed_point, errors."""

import pytest
import torch

import deq_functional as dq
from deq_functional.correction import correction_loss, correction_weights

D64 = torch.float64


def test_weight_schedules_exact_values():
    torch.testing.assert_close(
        correction_weights(3, "exp", 0.5, normalize=False), torch.tensor([0.25, 0.5, 1.0], dtype=D64)
    )
    torch.testing.assert_close(correction_weights(3, "exp", 0.5), torch.tensor([1.0, 2.0, 4.0], dtype=D64) / 7)
    # torchdeq's linear: 1 - γ(n-i)/n
    torch.testing.assert_close(
        correction_weights(4, "linear", 0.8, normalize=False), torch.tensor([1 - 0.6, 1 - 0.4, 1 - 0.2, 1.0], dtype=D64)
    )
    torch.testing.assert_close(correction_weights(4, "linear", 1.0), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D64) / 10)
    torch.testing.assert_close(correction_weights(5, "const"), torch.full((5,), 0.2, dtype=D64))
    torch.testing.assert_close(correction_weights(2, [1, 3]), torch.tensor([0.25, 0.75], dtype=D64))
    torch.testing.assert_close(correction_weights(1, "exp"), torch.ones(1, dtype=D64))
    for sched in ("exp", "linear", "const"):
        w = correction_weights(6, sched, 0.8)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=D64))
        assert (w[1:] >= w[:-1]).all()  # never weights an earlier state more


def test_loss_value_and_gradients_on_toy_problem():
    # states z_i = a^i · θ (a contraction's iterates), loss L(z) = ‖z − y‖²
    theta = torch.tensor([1.0, -2.0], dtype=D64, requires_grad=True)
    y = torch.tensor([0.3, 0.1], dtype=D64)
    a = 0.6
    states = [a**i * theta for i in range(1, 5)]
    loss = correction_loss(lambda z: ((z - y) ** 2).sum(), states, "exp", gamma=0.8)
    w = [0.8 ** (4 - i) for i in range(1, 5)]
    w = [v / sum(w) for v in w]
    th = theta.detach()
    expected = sum(wi * ((a**i * th - y) ** 2).sum() for wi, i in zip(w, range(1, 5), strict=True))
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, theta)
    expected_grad = sum(wi * 2 * a**i * (a**i * th - y) for wi, i in zip(w, range(1, 5), strict=True))
    torch.testing.assert_close(grad, expected_grad)
    # and against finite differences of the whole loss
    h = 1e-6
    for k in range(2):
        e = torch.zeros(2, dtype=D64)
        e[k] = h
        lp = correction_loss(lambda z: ((z - y) ** 2).sum(), [a**i * (th + e) for i in range(1, 5)], "exp", gamma=0.8)
        lm = correction_loss(lambda z: ((z - y) ** 2).sum(), [a**i * (th - e) for i in range(1, 5)], "exp", gamma=0.8)
        torch.testing.assert_close((lp - lm) / (2 * h), grad[k], rtol=1e-6, atol=1e-9)


def test_pytree_states_per_sample_losses_and_func_grad():
    def loss_fn(s):  # per-sample loss over a dict state
        return (s["a"] ** 2).sum(-1) + s["b"].abs().sum(-1)

    def total(t):
        states = [{"a": t * c, "b": t[:, :1] * c} for c in (1.0, 0.5)]
        return correction_loss(loss_fn, states, "const")

    t = torch.randn(3, 2, dtype=D64)
    out = total(t)
    assert out.shape == (3,)
    g = torch.func.grad(lambda t: total(t).sum())(t)
    sign = torch.zeros_like(t)
    sign[:, 0] = t[:, 0].sign()
    torch.testing.assert_close(g, 0.5 * (2 * t + sign) + 0.5 * 0.5 * (2 * 0.5 * t + sign))


def test_with_fixed_point_trajectory():
    g = torch.Generator().manual_seed(0)
    W = (0.3 * torch.randn(4, 4, dtype=D64, generator=g)).requires_grad_()
    x = torch.randn(2, 4, dtype=D64, generator=g)

    def f(p, z, x):
        return torch.tanh(z @ p["W"].T + x)

    z_star, info = dq.fixed_point(f, {"W": W}, x, solver=dq.Picard(max_iter=30, tol=1e-12), return_trajectory=4)
    states = info.trajectory
    assert len(states) == 4
    loss = correction_loss(lambda z: z.pow(2).sum(), list(states), "exp")
    (grad,) = torch.autograd.grad(loss, W, retain_graph=True)
    # Oracle: Σ_i w_i ∂L(z_i)/∂W, each state's gradient taken on its own, w_i ∝ 0.8^(4−i).
    w = torch.tensor([0.8**3, 0.8**2, 0.8, 1.0], dtype=D64) / (0.8**3 + 0.8**2 + 0.8 + 1.0)
    per_state = [torch.autograd.grad(s.pow(2).sum(), W, retain_graph=True)[0] for s in states]
    assert all(g.abs().sum() > 0 for g in per_state)
    torch.testing.assert_close(grad, sum(wi * g for wi, g in zip(w, per_state, strict=True)))
    # the last state is (numerically) the fixed point: a one-state loss equals the plain loss
    torch.testing.assert_close(correction_loss(lambda z: z.pow(2).sum(), [states[-1]]), z_star.pow(2).sum())


def test_errors_name_the_problem():
    z = [torch.ones(2), torch.ones(2)]
    with pytest.raises(ValueError, match="unknown weights schedule 'cosine'"):
        correction_loss(lambda s: s.sum(), z, "cosine")
    with pytest.raises(ValueError, match="non-empty list/tuple"):
        correction_loss(lambda s: s.sum(), [])
    with pytest.raises(ValueError, match="non-empty list/tuple"):
        correction_loss(lambda s: s.sum(), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"^correction_loss: gamma must be a real number in \(0, 1\], got 1\.5$"):
        correction_loss(lambda s: s.sum(), z, "exp", gamma=1.5)
    with pytest.raises(ValueError, match=r"^correction_loss: gamma must be a real number in \(0, 1\], got 0\.0$"):
        correction_loss(lambda s: s.sum(), z, "linear", gamma=0.0)
    with pytest.raises(ValueError, match=r"^correction_weights: n must be an integer >= 1, got 0$"):
        correction_weights(0)
    with pytest.raises(ValueError, match="explicit weights must be 2 numbers"):
        correction_loss(lambda s: s.sum(), z, [1.0])
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        correction_loss(lambda s: s.sum(), z, [0.0, 0.0])
    with pytest.raises(ValueError, match="different shapes"):
        correction_loss(lambda s: s, [torch.ones(2), torch.ones(3)])
