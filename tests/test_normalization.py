"""spectral_normalize and conv_lipschitz_rescale against exact operator norms."""

import pytest
import torch
import torch.nn.functional as F

from deq_functional.normalization import conv_lipschitz_rescale, spectral_normalize


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _exact_conv_norm(W, input_shape):
    """Operator norm of x ↦ conv2d(x, W, padding=k//2) from the dense Jacobian (jacrev)."""
    pad = (W.shape[2] // 2, W.shape[3] // 2)
    x = torch.zeros(input_shape, dtype=W.dtype)
    J = torch.func.jacrev(lambda x: F.conv2d(x[None], W, padding=pad)[0])(x)
    return torch.linalg.matrix_norm(J.reshape(-1, x.numel()), ord=2)


# ---------------------------------------------------------------- spectral_normalize


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (8, 3, 3, 3)])
def test_spectral_normalize_bounds_norm_within_1pct(shape):
    g = _gen(1)
    W = torch.randn(shape, generator=g)
    params = {"latent": {"W": W, "b": torch.zeros(3)}, "other": torch.ones(2)}
    new, state = spectral_normalize(params, ["latent.W"], bound=0.9, n_iter=100, generator=g)
    Wn = new["latent"]["W"]
    norm = torch.linalg.matrix_norm(Wn.reshape(shape[0], -1), ord=2)
    assert abs(norm.item() - 0.9) <= 0.009
    # untouched leaves are shared, the input is not modified
    assert new["other"] is params["other"] and new["latent"]["b"] is params["latent"]["b"]
    assert params["latent"]["W"] is W and not torch.equal(Wn, W)
    assert state["latent.W"].shape == (shape[0],)


def test_spectral_normalize_state_warm_start_converges_one_iter_per_call():
    g = _gen(2)
    W = torch.randn(16, 24, generator=g)
    exact = torch.linalg.matrix_norm(W, ord=2)
    state = None
    sig = []
    for _ in range(60):
        new, state = spectral_normalize({"W": W}, "W", bound=0.1, n_iter=1, state=state, generator=g)
        sig.append((W.norm() / new["W"].norm() * 0.1).item())  # σ̂ recovered from the scale
    assert sig[-1] <= exact.item() * (1 + 1e-6)  # power iteration never overestimates
    assert abs(sig[-1] - exact.item()) / exact.item() < 1e-3
    assert abs(sig[0] - exact.item()) > abs(sig[-1] - exact.item())


def test_spectral_normalize_leaves_small_weights_unchanged_and_lists_work():
    W = 0.1 * torch.eye(5)
    params = [{"W": W}, (torch.ones(1), 4.0 * torch.eye(3))]
    new, state = spectral_normalize(params, ["0.W", "1.1"], bound=1.0, n_iter=5, generator=_gen())
    assert torch.equal(new[0]["W"], W)
    assert isinstance(new[1], tuple) and torch.allclose(new[1][1], torch.eye(3))
    assert set(state) == {"0.W", "1.1"}


def test_spectral_normalize_gradient_matches_exact_normalization_fd():
    # Converged power iteration: gradient of W·bound/σ(W) must equal that of the exact map.
    g = _gen(3)
    W = torch.randn(6, 5, dtype=torch.float64, generator=g)
    C = torch.randn(6, 5, dtype=torch.float64, generator=g)
    _, state = spectral_normalize({"W": W}, "W", bound=0.5, n_iter=500, generator=g)

    def ours(W):
        return (spectral_normalize({"W": W}, "W", bound=0.5, n_iter=50, state=state)[0]["W"] * C).sum()

    def exact(W):
        return (W * 0.5 / torch.linalg.matrix_norm(W, ord=2) * C).sum()

    grad = torch.func.grad(ours)(W)
    fd = torch.zeros_like(W)
    h = 1e-6
    for i in range(W.numel()):
        e = torch.zeros_like(W).view(-1)
        e[i] = h
        e = e.view_as(W)
        fd.view(-1)[i] = (exact(W + e) - exact(W - e)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, torch.func.grad(exact)(W), rtol=1e-8, atol=1e-10)


@pytest.mark.compile
def test_spectral_normalize_compiles_fullgraph_same_numbers():
    g = _gen(4)
    W = torch.randn(12, 10, generator=g, requires_grad=True)
    _, state = spectral_normalize({"W": W}, "W", n_iter=1, generator=g)

    def step(params, state):
        p, state = spectral_normalize(params, "W", bound=0.7, n_iter=2, state=state)
        return (p["W"] ** 2).sum(), state

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, st_c = compiled({"W": W}, state)
    (gc,) = torch.autograd.grad(loss_c, W)
    loss_e, st_e = step({"W": W}, state)
    (ge,) = torch.autograd.grad(loss_e, W)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gc, ge)
    torch.testing.assert_close(st_c["W"], st_e["W"])


# ---------------------------------------------------------------- conv_lipschitz_rescale


@pytest.mark.parametrize(
    "kernel,input_shape", [((4, 3, 3, 3), (3, 6, 5)), ((3, 3, 2, 2), (3, 5, 5)), ((2, 2, 5, 5), (2, 7, 7))]
)
def test_conv_rescale_bounds_exact_operator_norm(kernel, input_shape):
    g = _gen(5)
    W = torch.randn(kernel, dtype=torch.float64, generator=g)
    before = _exact_conv_norm(W, input_shape)
    assert before > 0.8
    new, state = conv_lipschitz_rescale({"conv": W}, "conv", input_shape, bound=0.8, n_iter=300, generator=g)
    after = _exact_conv_norm(new["conv"], input_shape)
    assert after <= 0.8 * 1.01 and after >= 0.8 * 0.99
    assert state["conv"].shape == input_shape
    torch.testing.assert_close(state["conv"].norm(), torch.tensor(1.0, dtype=torch.float64))


def test_conv_rescale_uses_the_operator_norm_not_a_flattened_bound_and_only_shrinks():
    g = _gen(6)
    shape = (4, 6, 6)
    W = torch.randn(4, 4, 3, 3, dtype=torch.float64, generator=g)
    op = float(_exact_conv_norm(W, shape))
    flat = float(torch.linalg.matrix_norm(W.reshape(4, -1), ord=2))
    # Precondition: ‖W_flat‖ < ‖A‖₂ < sqrt(kh·kw)·‖W_flat‖, so the three rules below disagree.
    assert flat < op < 3 * flat
    # A bound above ‖A‖₂ but below the sqrt(kh·kw)·‖W_flat‖ bound: the kernel is left exactly as it was.
    new, _ = conv_lipschitz_rescale({"conv": W}, "conv", shape, bound=(op + 3 * flat) / 2, n_iter=50, generator=g)
    assert torch.equal(new["conv"], W)
    # A bound between ‖W_flat‖ and ‖A‖₂: shrunk to exactly the bound (dense-Jacobian oracle), while the
    # flattened-matrix rule of spectral_normalize sees nothing to shrink.
    bound = (flat + op) / 2
    new, _ = conv_lipschitz_rescale({"conv": W}, "conv", shape, bound=bound, n_iter=300, generator=g)
    after = float(_exact_conv_norm(new["conv"], shape))
    assert bound <= after <= bound * (1 + 1e-3)  # σ̂ ≤ ‖A‖₂: never shrinks past the bound
    assert torch.equal(spectral_normalize({"W": W}, "W", bound=bound, generator=g)[0]["W"], W)


def test_conv_rescale_warm_state_and_gradient_matches_exact_rescaling():
    g = _gen(7)
    shape = (2, 4, 4)
    W = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    C = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    _, state = conv_lipschitz_rescale({"c": W}, "c", shape, n_iter=500, generator=g)
    # warm state: one more iteration per call is already converged
    new, _ = conv_lipschitz_rescale({"c": W}, "c", shape, bound=0.5, n_iter=1, state=state)
    exact_after = _exact_conv_norm(new["c"], shape)
    torch.testing.assert_close(exact_after, torch.tensor(0.5, dtype=torch.float64), rtol=1e-8, atol=0)

    def ours(W):
        return (conv_lipschitz_rescale({"c": W}, "c", shape, bound=0.5, n_iter=1, state=state)[0]["c"] * C).sum()

    def exact(W):  # W · 0.5 / ‖A(W)‖₂ with the norm from the dense Jacobian (differentiable SVD)
        return (W * 0.5 / _exact_conv_norm(W, shape) * C).sum()

    grad = torch.func.grad(ours)(W)
    torch.testing.assert_close(grad, torch.func.grad(exact)(W), rtol=1e-6, atol=1e-9)
    assert (grad - 0.5 / _exact_conv_norm(W, shape) * C).norm() > 1e-3  # σ's own gradient term is present


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem():
    params = {"latent": {"W": torch.randn(3, 3)}, "b": torch.zeros(3), "lst": [torch.eye(2)]}
    with pytest.raises(ValueError, match="unknown key path 'latent.V'"):
        spectral_normalize(params, ["latent.V"])
    with pytest.raises(ValueError, match="unknown key path 'lst.3'"):
        spectral_normalize(params, "lst.3")
    with pytest.raises(ValueError, match="'b' must be a floating weight of shape"):
        spectral_normalize(params, "b")
    with pytest.raises(ValueError, match="leads to a dict"):
        spectral_normalize(params, "latent")
    with pytest.raises(ValueError, match=r"^spectral_normalize: n_iter must be an integer >= 1, got 0$"):
        spectral_normalize(params, "latent.W", n_iter=0)
    with pytest.raises(ValueError, match=r"^spectral_normalize: bound must be a real number in \(0, inf\), got 0\.0$"):
        spectral_normalize(params, "latent.W", bound=0.0)
    with pytest.raises(ValueError, match=r"^conv_lipschitz_rescale: bound must be finite, got inf$"):
        conv_lipschitz_rescale(params, "latent.W", (3, 4, 4), bound=float("inf"))
    with pytest.raises(ValueError, match="no vector for 'latent.W'"):
        spectral_normalize(params, "latent.W", state={})
    with pytest.raises(ValueError, match=r"state\['latent.W'\] has shape \(2,\)"):
        spectral_normalize(params, "latent.W", state={"latent.W": torch.ones(2)})
    with pytest.raises(ValueError, match="must be a floating conv kernel"):
        conv_lipschitz_rescale(params, "latent.W", (3, 4, 4))
    conv = {"c": torch.randn(2, 3, 3, 3)}
    with pytest.raises(ValueError, match="takes 3 input channels"):
        conv_lipschitz_rescale(conv, "c", (2, 4, 4))
    with pytest.raises(ValueError, match="input_shape must be"):
        conv_lipschitz_rescale(conv, "c", (3, 4))


def test_one_state_dict_serves_both_functions():
    g = _gen(8)
    params = {"lin": torch.randn(5, 4, generator=g), "conv": torch.randn(2, 2, 3, 3, generator=g)}
    p, state = spectral_normalize(params, "lin", generator=g)
    p, state = conv_lipschitz_rescale(p, "conv", (2, 4, 4), state=None, generator=g)
    assert set(state) == {"conv"}
    p, st1 = spectral_normalize(params, "lin", generator=g)
    p, st2 = conv_lipschitz_rescale(p, "conv", (2, 4, 4), state={**st1, "conv": state["conv"]})
    assert set(st2) == {"lin", "conv"} and st2["lin"] is st1["lin"]
    p, st3 = spectral_normalize(p, "lin", state=st2)
    assert set(st3) == {"lin", "conv"}
