r"""The JFB paper's ResNet-style convolutional implicit network (Fung et al., AAAI-22, §5).

For 28×28×1 images (MNIST, digits) and 32×32×3 images (SVHN, CIFAR-10). With
``σ`` the leaky ReLU (slope 0.1), ``∗`` a 3×3 convolution with 'same' padding,
``GN`` a per-sample group norm (4 groups) and ``C`` latent channels:

* ``Q(d)`` (``embed``): ``σ(GN(conv1 ∗ d))`` → max-pool → ``σ(GN(conv2 ∗ ·))`` → max-pool,
  ``(B, c_in, H, W) -> (B, C, h, w)`` with ``h = w = 9`` for 28×28 (pools 3, 1)
  and ``8`` for 32×32 (pools 2, 2);
* ``R(z, x)`` (``apply``): ``u_0 = z + x``; for each latent block ``ℓ = 1..L``
  ``u_ℓ = u_{ℓ-1} + σ(W_ℓ2 ∗ σ(W_ℓ1 ∗ u_{ℓ-1} + b_ℓ1) + b_ℓ2)``; ``R = γ · u_L``;
  shapes ``(B, C, h, w) -> (B, C, h, w)``;
* ``S(z)`` (``readout``): ``σ(conv_y ∗ z)`` (3×3, no padding, 16 channels) → flatten →
  ``fc`` (no bias): ``(B, C, h, w) -> (B, num_classes)``.

Lipschitz constant in ``z``: ``σ`` is 1-Lipschitz, so
``Lip_z(R) ≤ γ · Π_ℓ (1 + ‖W_ℓ1‖·‖W_ℓ2‖)`` (operator norms of the convolutions on
``(C, h, w)``). `rescale` makes every latent convolution ``b``-Lipschitz with
``b = sqrt((λ/γ)^{1/L} − 1)`` so that ``Lip_z(R) ≤ λ``; this is the paper's Lipschitz
rescaling, done per convolution by power iteration
(`deq_functional.normalization.conv_lipschitz_rescale`) instead of a random
difference quotient. The paper's latent batch norm and dropout are left out so that
``R`` is a pure function of ``(params, z, x)`` (no running statistics, no randomness).

With ``channels=32`` and two latent blocks on 28×28×1 this has 54,352 parameters
(the paper's MNIST network had ~54K); with one block, 35,856.

Params:

    {"embed":   {"conv1": {"weight", "bias"}, "norm1": {"weight", "bias"},
                 "conv2": {"weight", "bias"}, "norm2": {"weight", "bias"}},
     "latent":  {"block0": {"conv1": {"weight", "bias"}, "conv2": {"weight", "bias"}}, ...},
     "readout": {"conv": {"weight", "bias"}, "fc": {"weight": (num_classes, 16·(h−2)²)}}}

Examples:
    >>> import torch, deq_functional as dq
    >>> from deq_functional.models import conv
    >>> p = conv.init(0, in_shape=(1, 28, 28))
    >>> x = conv.embed(p, torch.randn(2, 1, 28, 28))
    >>> z, info = dq.fixed_point(conv.apply, p, x, grad_mode="jfb")
    >>> x.shape, conv.readout(p, z).shape
    (torch.Size([2, 32, 9, 9]), torch.Size([2, 10]))

Supports: backward / grad / vmap / compile (plain tensor ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from .._checks import check_int
from ..normalization import conv_lipschitz_rescale, conv_operator_norm
from ._common import NEGATIVE_SLOPE, check_generator, conv, group_norm, linear

__all__ = ["init", "embed", "apply", "readout", "rescale", "latent_shape", "GAMMA", "POOLS"]

GAMMA = 0.5  # γ, the paper's "contraction_factor" multiplying the latent ResNet output
POOLS = {28: (3, 1), 32: (2, 2)}  # image size -> max-pool sizes after conv1 and conv2 of Q
EMBED_CHANNELS = 16  # channels after Q's first convolution
READOUT_CHANNELS = 16  # channels of S's convolution
GROUPS = 4  # group-norm groups in Q


def _latent_size(image_size: int) -> int:
    p1, p2 = POOLS[image_size]
    return image_size // p1 // p2


def init(
    generator: torch.Generator | int,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    *,
    channels: int = 32,
    latent_blocks: int = 2,
    num_classes: int = 10,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Fresh parameters (torch's default conv/linear initialisation).

    Args:
        generator: ``torch.Generator`` (or an int seed) for every random draw.
        in_shape: ``(c_in, H, W)``; ``H = W`` must be 28 or 32 (see ``POOLS``).
        channels: latent channels ``C`` (a multiple of 4, the group-norm groups).
        latent_blocks: number ``L`` of residual blocks in ``R``.
        num_classes: number of logits.
        dtype: floating dtype of every tensor.

    Raises:
        ValueError: an unsupported ``in_shape`` or a bad size.
    """
    fn = "conv.init"
    g = check_generator(generator, fn)
    if len(tuple(in_shape)) != 3 or in_shape[1] != in_shape[2] or in_shape[1] not in POOLS:
        raise ValueError(f"{fn}: in_shape must be (c_in, H, W) with H = W in {sorted(POOLS)}, got {in_shape!r}")
    c_in = check_int(fn, "in_shape[0]", in_shape[0], 1)
    check_int(fn, "channels", channels, 1)
    check_int(fn, "latent_blocks", latent_blocks, 1)
    check_int(fn, "num_classes", num_classes, 1)
    if channels % GROUPS:
        raise ValueError(f"{fn}: channels must be a multiple of {GROUPS} (group norm), got {channels}")
    h = _latent_size(in_shape[1])
    return {
        "embed": {
            "conv1": conv(EMBED_CHANNELS, c_in, 3, g, dtype),
            "norm1": group_norm(EMBED_CHANNELS, dtype),
            "conv2": conv(channels, EMBED_CHANNELS, 3, g, dtype),
            "norm2": group_norm(channels, dtype),
        },
        "latent": {
            f"block{i}": {
                "conv1": conv(channels, channels, 3, g, dtype),
                "conv2": conv(channels, channels, 3, g, dtype),
            }
            for i in range(latent_blocks)
        },
        "readout": {
            "conv": conv(READOUT_CHANNELS, channels, 3, g, dtype),
            "fc": linear(num_classes, READOUT_CHANNELS * (h - 2) ** 2, g, dtype, bias=False),
        },
    }


def _act(t: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(t, NEGATIVE_SLOPE)


def _conv(t: torch.Tensor, p: dict, padding: int = 1) -> torch.Tensor:
    return F.conv2d(t, p["weight"], p.get("bias"), padding=padding)


def embed(params: dict, d: torch.Tensor) -> torch.Tensor:
    """``Q(d)``: ``(B, c_in, H, W) -> (B, C, h, w)`` (``h = 9`` for 28×28, ``8`` for 32×32).

    Raises:
        ValueError: ``d`` is not a batch of images of the shape these params expect.
    """
    p = params["embed"]
    c_in = p["conv1"]["weight"].shape[1]
    if d.dim() != 4 or d.shape[1] != c_in or d.shape[2] != d.shape[3] or d.shape[2] not in POOLS:
        raise ValueError(
            f"conv.embed: expected images (B, {c_in}, H, H) with H in {sorted(POOLS)}, got shape {tuple(d.shape)}"
        )
    pool1, pool2 = POOLS[d.shape[2]]
    t = _act(F.group_norm(_conv(d, p["conv1"]), GROUPS, p["norm1"]["weight"], p["norm1"]["bias"]))
    t = F.max_pool2d(t, pool1) if pool1 > 1 else t
    t = _act(F.group_norm(_conv(t, p["conv2"]), GROUPS, p["norm2"]["weight"], p["norm2"]["bias"]))
    return F.max_pool2d(t, pool2) if pool2 > 1 else t


def apply(params: dict, z: torch.Tensor, x: torch.Tensor, *, gamma: float = GAMMA) -> torch.Tensor:
    """``R(z, x) = γ · u_L``, ``u_0 = z + x``, ``u_ℓ = u_{ℓ-1} + σ(W_ℓ2 ∗ σ(W_ℓ1 ∗ u_{ℓ-1}))``.

    Shapes: ``z, x (B, C, h, w) -> (B, C, h, w)``. The ``f`` of ``fixed_point``.
    """
    u = z + x
    for name in sorted(params["latent"]):
        block = params["latent"][name]
        u = u + _act(_conv(_act(_conv(u, block["conv1"])), block["conv2"]))
    return gamma * u


def readout(params: dict, z: torch.Tensor) -> torch.Tensor:
    """``S(z) = fc(flatten(σ(conv_y ∗ z)))``: ``(B, C, h, w) -> (B, num_classes)``."""
    p = params["readout"]
    t = _act(_conv(z, p["conv"], padding=0))
    return rearrange(t, "b c h w -> b (c h w)") @ p["fc"]["weight"].T


def latent_shape(params: dict) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latent state, read off the parameter shapes."""
    channels = params["latent"]["block0"]["conv1"]["weight"].shape[0]
    side = math.isqrt(params["readout"]["fc"]["weight"].shape[1] // READOUT_CHANNELS) + 2
    return channels, side, side


def latent_keys(params: dict) -> list[str]:
    """Dotted paths of the latent convolution kernels, e.g. ``"latent.block0.conv1.weight"``."""
    return [f"latent.{b}.{c}.weight" for b in sorted(params["latent"]) for c in ("conv1", "conv2")]


def conv_bound(lipschitz: float, gamma: float, blocks: int) -> float:
    """Per-convolution bound ``b = sqrt((λ/γ)^{1/L} − 1)`` giving ``γ Π (1 + b²) = λ``."""
    if not lipschitz > gamma:
        raise ValueError(f"conv.rescale: lipschitz must exceed gamma={gamma} (R = γ·(u + res(u))), got {lipschitz!r}")
    return math.sqrt((lipschitz / gamma) ** (1.0 / blocks) - 1.0)


def rescale(
    params: dict,
    lipschitz: float = 0.9,
    *,
    gamma: float = GAMMA,
    n_iter: int = 20,
    state: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict, dict]:
    """The paper's Lipschitz rescaling as a pure function: make ``Lip_z(R) ≤ lipschitz``.

    Each latent kernel is shrunk (never grown) so its convolution on ``latent_shape(params)``
    has operator norm ``≤ b = sqrt((λ/γ)^{1/L} − 1)`` (see the module docstring), by
    `deq_functional.normalization.conv_lipschitz_rescale`. Pass the returned
    ``state`` back to warm-start the power iteration (then ``n_iter=1..2`` per step suffices).

    Args:
        params: this model's params (not modified).
        lipschitz: target bound ``λ`` on ``Lip_z(R)``, ``> gamma``.
        gamma: the ``γ`` that ``apply`` is called with.
        n_iter: power-iteration steps (see ``conv_lipschitz_rescale``).
        state: the power-iteration state a previous call returned, or None.
        generator: seeds the start vector when ``state`` is None.

    Returns:
        ``(new_params, state)``; gradients flow to the raw kernels (reparametrisation).
        Assign the result under ``torch.no_grad()`` to project the stored weights instead.
    """
    keys = latent_keys(params)
    bound = conv_bound(lipschitz, gamma, len(params["latent"]))
    return conv_lipschitz_rescale(
        params, keys, latent_shape(params), bound=bound, n_iter=n_iter, state=state, generator=generator
    )


def lipschitz_bound(params: dict, *, gamma: float = GAMMA, n_iter: int = 100) -> torch.Tensor:
    """Upper bound ``γ Π_ℓ (1 + ‖W_ℓ1‖‖W_ℓ2‖)`` on ``Lip_z(R)``, a detached scalar.

    Each operator norm on ``latent_shape(params)`` is estimated by ``n_iter`` power iterations
    (`deq_functional.normalization.conv_operator_norm`, from a fixed seed-0 start), so the
    product is an estimate of the bound, approached from below. Cost: ``2·(2·n_iter + 1)``
    convolutions of one latent-sized input per block.
    """
    shape = latent_shape(params)
    total = torch.ones((), dtype=params["latent"]["block0"]["conv1"]["weight"].dtype)
    for b in sorted(params["latent"]):
        norms = []
        for c in ("conv1", "conv2"):
            W = params["latent"][b][c]["weight"].detach()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=W.dtype).to(W.device)
            norms.append(conv_operator_norm(W, x, n_iter)[1])
        total = total * (1 + norms[0] * norms[1])
    return gamma * total
