"""deq_functional.models: shapes, contraction options, pytree states, from_module round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deq_functional as dq
from deq_functional._tree import flatten, tree_map
from deq_functional.models import conv, count_params, mlp, multiscale, predict


def _leaves(tree):
    return flatten(tree)[0]


def _trainable(params):
    """A copy of params whose leaves require grad."""
    return tree_map(lambda t: t.detach().clone().requires_grad_(True), params)


# ----------------------------------------------------------------------------- mlp
def test_mlp_shapes_and_init_contraction():
    p = mlp.init(0, in_features=64, hidden=32, num_classes=10, contraction=0.5)
    assert p["embed"]["weight"].shape == (32, 64) and p["latent"]["weight"].shape == (32, 32)
    assert p["readout"]["weight"].shape == (10, 32)
    assert mlp.lipschitz_bound(p) <= 0.5 + 1e-6
    d = torch.randn(5, 1, 8, 8)  # any trailing shape with 64 features
    logits, info = predict(mlp, p, d, solver=dq.Anderson(tol=1e-6), grad_mode="jfb")
    assert logits.shape == (5, 10) and bool(info.converged)
    # A contraction with bound 0.5 has a unique fixed point: check it is one.
    x = mlp.embed(p, d)
    z, _ = dq.fixed_point(mlp.apply, p, x, solver=dq.Anderson(tol=1e-8, max_iter=100), grad_mode="jfb")
    torch.testing.assert_close(mlp.apply(p, z, x), z, atol=1e-5, rtol=0)


def test_mlp_init_is_deterministic_and_contraction_none_keeps_default_scale():
    a = mlp.init(3, 10, 20, 4, contraction=None)
    b = mlp.init(torch.Generator().manual_seed(3), 10, 20, 4, contraction=None)
    assert all(torch.equal(u, v) for u, v in zip(_leaves(a), _leaves(b), strict=True))
    assert a["latent"]["weight"].abs().max() <= 1 / 20**0.5


def test_mlp_rescale_bounds_spectral_norm_and_is_pure():
    p = mlp.init(0, 16, 24, 3, contraction=None)
    p["latent"]["weight"] = 3.0 * p["latent"]["weight"] / mlp.lipschitz_bound(p)
    before = p["latent"]["weight"].clone()
    q, state = mlp.rescale(p, bound=0.8, n_iter=50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p["latent"]["weight"], before)  # input untouched
    assert abs(float(mlp.lipschitz_bound(q)) - 0.8) < 1e-3
    assert q["embed"] is p["embed"] and q["readout"] is p["readout"]
    r, _ = mlp.rescale(q, bound=0.9, n_iter=5, state=state)  # already below: unchanged
    torch.testing.assert_close(r["latent"]["weight"], q["latent"]["weight"])


def test_mlp_gradient_reaches_every_param():
    p = _trainable(mlp.init(1, 12, 16, 5))
    logits, _ = predict(mlp, p, torch.randn(4, 12), grad_mode="ift")
    logits.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in _leaves(p))


def test_mlp_bad_input():
    p = mlp.init(0, 12, 16, 5)
    msg = r"^mlp\.embed: expected inputs with 12 features per sample, got shape \(4, 13\)$"
    with pytest.raises(ValueError, match=msg):
        mlp.embed(p, torch.randn(4, 13))
    with pytest.raises(ValueError, match=r"^mlp\.init: hidden must be an integer >= 1, got 0$"):
        mlp.init(0, 12, 0, 5)
    with pytest.raises(ValueError, match=r"^mlp\.init: in_features must be an integer >= 1, got True$"):
        mlp.init(0, True, 16, 5)
    with pytest.raises(ValueError, match=r"^mlp\.init: generator must be a torch\.Generator or an int seed, got str$"):
        mlp.init("seed", 12, 16, 5)
    with pytest.raises(ValueError, match=r"^mlp\.init: contraction must be a real number in \(0, inf\), got -1\.0$"):
        mlp.init(0, 12, 16, 5, contraction=-1.0)


# ----------------------------------------------------------------------------- conv
@pytest.mark.parametrize("in_shape, latent", [((1, 28, 28), (32, 9, 9)), ((3, 32, 32), (32, 8, 8))])
def test_conv_shapes(in_shape, latent):
    p = conv.init(0, in_shape, channels=32, latent_blocks=1)
    d = torch.randn(3, *in_shape)
    x = conv.embed(p, d)
    assert x.shape == (3, *latent) and conv.latent_shape(p) == latent
    assert conv.apply(p, x, x).shape == x.shape
    logits, info = predict(conv, p, d, grad_mode="jfb", per_sample=True)
    assert logits.shape == (3, 10) and info.nstep.shape == (3,)


def test_conv_paper_size():
    # The JFB paper's MNIST network had ~54K parameters (2 latent blocks of two 3×3 convs, 32 channels).
    assert count_params(conv.init(0, (1, 28, 28), latent_blocks=2)) == 54352
    assert count_params(conv.init(0, (1, 28, 28), latent_blocks=1)) == 35856


def test_conv_rescale_makes_R_a_contraction():
    p = conv.init(0, (1, 28, 28), latent_blocks=2)
    p["latent"] = tree_map(lambda t: 3 * t if t.dim() == 4 else t, p["latent"])  # triple every latent kernel
    g = torch.Generator().manual_seed(0)
    z1, z2, x = (torch.randn(8, 32, 9, 9, generator=g) for _ in range(3))

    def ratio(q):
        return torch.linalg.vector_norm(conv.apply(q, z1, x) - conv.apply(q, z2, x)) / torch.linalg.vector_norm(z1 - z2)

    assert conv.lipschitz_bound(p) > 2.0
    q, state = conv.rescale(p, lipschitz=0.8, n_iter=100, generator=g)
    assert float(conv.lipschitz_bound(q)) <= 0.8 * 1.01
    assert float(ratio(q)) <= 0.8
    # Only the latent kernels change, and they only shrink.
    assert q["embed"] is p["embed"] and q["readout"] is p["readout"]
    for key in conv.latent_keys(p):
        b, c = key.split(".")[1:3]
        s = q["latent"][b][c]["weight"] / p["latent"][b][c]["weight"]
        assert torch.allclose(s, s.flatten()[0].expand_as(s)) and float(s.flatten()[0]) < 1
    # Picard converges on the rescaled map (Banach), at least as fast as 0.8^k.
    xq = conv.embed(q, torch.randn(4, 1, 28, 28))
    z, info = dq.fixed_point(conv.apply, q, xq, solver=dq.Picard(max_iter=200, tol=1e-5), grad_mode="jfb")
    assert bool(info.converged) and int(info.nstep) <= 60


def test_conv_rescale_warm_state_and_errors():
    p = conv.init(0, (1, 28, 28), latent_blocks=1)
    _, state = conv.rescale(p, n_iter=5)
    assert set(state) == set(conv.latent_keys(p)) and state["latent.block0.conv1.weight"].shape == (32, 9, 9)
    conv.rescale(p, n_iter=1, state=state)
    msg = r"^conv\.rescale: lipschitz must exceed gamma=0\.5 \(R = γ·\(u \+ res\(u\)\)\), got 0\.4$"
    with pytest.raises(ValueError, match=msg):
        conv.rescale(p, lipschitz=0.4)
    msg = r"^conv\.embed: expected images \(B, 1, H, H\) with H in \[28, 32\], got shape \(2, 1, 30, 30\)$"
    with pytest.raises(ValueError, match=msg):
        conv.embed(p, torch.randn(2, 1, 30, 30))
    msg = r"^conv\.init: in_shape must be \(c_in, H, W\) with H = W in \[28, 32\], got \(1, 30, 30\)$"
    with pytest.raises(ValueError, match=msg):
        conv.init(0, (1, 30, 30))
    with pytest.raises(ValueError, match=r"^conv\.init: channels must be a multiple of 4 \(group norm\), got 30$"):
        conv.init(0, channels=30)
    with pytest.raises(ValueError, match=r"^conv\.init: latent_blocks must be an integer >= 1, got 0$"):
        conv.init(0, latent_blocks=0)


def test_conv_gradients_ift_close_to_unrolled_in_float64():
    p = _trainable(conv.init(0, (1, 28, 28), channels=8, latent_blocks=1, dtype=torch.float64))
    d = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    grads = {}
    for mode, solver in (("ift", dq.Anderson(max_iter=100, tol=1e-12)), ("unrolled", dq.Picard(max_iter=150, tol=0.0))):
        for t in _leaves(p):
            t.grad = None
        logits, _ = predict(conv, p, d, solver=solver, grad_mode=mode)
        logits.square().sum().backward()
        grads[mode] = torch.cat([t.grad.flatten() for t in _leaves(p)])
    torch.testing.assert_close(grads["ift"], grads["unrolled"], rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- multiscale
def test_multiscale_tuple_state():
    p = _trainable(multiscale.init(0, in_channels=1, channels=8))
    d = torch.randn(3, 1, 28, 28)
    x = multiscale.embed(p, d)
    assert isinstance(x, tuple) and [t.shape for t in x] == [(3, 8, 14, 14), (3, 16, 7, 7)]
    z, info = dq.fixed_point(multiscale.apply, p, x, solver=dq.Anderson(max_iter=60, tol=1e-4), grad_mode="ift")
    assert isinstance(z, tuple) and [t.shape for t in z] == [t.shape for t in x]
    assert bool(info.converged)
    multiscale.readout(p, z).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in _leaves(p))
    msg = r"^multiscale\.embed: expected images \(B, 1, H, W\) with H, W multiples of 4, got shape \(1, 1, 30, 30\)$"
    with pytest.raises(ValueError, match=msg):
        multiscale.embed(p, torch.randn(1, 1, 30, 30))


def test_multiscale_on_32x32x3():
    p = multiscale.init(0, in_channels=3, channels=4)
    logits, info = predict(multiscale, p, torch.randn(2, 3, 32, 32), grad_mode="jfb")
    assert logits.shape == (2, 10)


# ----------------------------------------------------------------------------- from_module / to_module
class TanhDEQ(nn.Module):
    """The mlp model's latent map as an nn.Module: ``forward(z, x) = tanh(W z + x)``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.W = nn.Linear(hidden, hidden, bias=False)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + x)


def test_from_module_round_trip_matches_mlp_model():
    torch.manual_seed(0)
    module = TanhDEQ(16)
    params, f = dq.from_module(module)
    assert sorted(params) == ["W.weight"]
    x = torch.randn(4, 16)
    z, info = dq.fixed_point(f, params, x, grad_mode="jfb", solver=dq.Anderson(tol=1e-8))
    # Same fixed point as the functional mlp model with the same weight.
    ref = {"latent": {"weight": params["W.weight"].detach()}}
    z_ref, _ = dq.fixed_point(mlp.apply, ref, x, grad_mode="jfb", solver=dq.Anderson(tol=1e-8))
    torch.testing.assert_close(z, z_ref)
    # "Train" the params functionally, put them back, and the module computes with them.
    new = {"W.weight": 0.5 * params["W.weight"].detach()}
    dq.to_module(module, new)
    torch.testing.assert_close(module.W.weight, new["W.weight"])
    torch.testing.assert_close(module(z, x), mlp.apply({"latent": {"weight": new["W.weight"]}}, z, x))
    with pytest.raises(ValueError, match=r"to_module: \['V\.weight'\] are not parameters of TanhDEQ"):
        dq.to_module(module, {"V.weight": torch.zeros(16, 16)})


def test_the_reference_models_are_reachable_from_the_package():
    import deq_functional as dq

    assert dq.models.mlp is mlp and dq.models.conv is conv and dq.models.multiscale is multiscale
    assert "models" in dq.__all__
