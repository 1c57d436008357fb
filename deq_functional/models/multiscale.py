r"""A two-resolution implicit network (MDEQ-style): the latent state is a tuple of feature maps.

After Bai, Koltun, Kolter, "Multiscale Deep Equilibrium Models" (NeurIPS 2020),
cut down to two branches. The state is ``z = (z_hi, z_lo)`` with
``z_hi (B, C, h, w)`` and ``z_lo (B, 2C, h/2, w/2)``; the injection ``x = Q(d)`` has the
same structure, so ``fixed_point`` iterates on a pytree. With ``σ`` the leaky ReLU,
``GN`` a per-sample group norm (4 groups), ``∗`` a 3×3 'same' convolution and
``↑`` nearest-neighbour 2× upsampling:

* ``Q(d)`` (``embed``): ``t = σ(GN(conv_in ∗ d))`` at full size then 2×2 max-pool,
  ``x_hi = t`` and ``x_lo = σ(conv_down ∗_{stride 2} t)``;
* ``R(z, x)`` (``apply``), per branch then a fusion:
  ``a_hi = σ(W_hi ∗ z_hi + x_hi)``, ``a_lo = σ(W_lo ∗ z_lo + x_lo)``,
  ``z_hi' = GN(a_hi + ↑(U_lh · a_lo))`` (1×1 conv ``U_lh``),
  ``z_lo' = GN(a_lo + V_hl ∗_{stride 2} a_hi)``;
* ``S(z)`` (``readout``): global average pool of each branch, concatenated, then a linear layer.

The per-sample group norm (as in MDEQ) keeps iterates bounded; unlike the
``conv`` model there is no contraction guarantee, so use Anderson or Broyden.

Params:

    {"embed":   {"conv_in": {...}, "norm_in": {...}, "conv_down": {...}},
     "latent":  {"hi": {...}, "lo": {...}, "lo_to_hi": {...}, "hi_to_lo": {...},
                 "norm_hi": {...}, "norm_lo": {...}},
     "readout": {"weight": (num_classes, 3C), "bias": (num_classes,)}}

Examples:
    >>> import torch, deq_functional as dq
    >>> from deq_functional.models import multiscale
    >>> p = multiscale.init(0, in_channels=1, channels=8)
    >>> x = multiscale.embed(p, torch.randn(2, 1, 28, 28))
    >>> [t.shape for t in x]
    [torch.Size([2, 8, 14, 14]), torch.Size([2, 16, 7, 7])]
    >>> z, info = dq.fixed_point(multiscale.apply, p, x, solver="anderson", grad_mode="jfb")
    >>> multiscale.readout(p, z).shape
    torch.Size([2, 10])

Supports: backward / grad / vmap / compile (plain tensor ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce

from .._checks import check_int
from ._common import NEGATIVE_SLOPE, check_generator, conv, group_norm, linear

__all__ = ["init", "embed", "apply", "readout"]

GROUPS = 4


def init(
    generator: torch.Generator | int,
    in_channels: int = 1,
    *,
    channels: int = 16,
    num_classes: int = 10,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Fresh parameters (torch's default conv/linear initialisation).

    Args:
        generator: ``torch.Generator`` (or an int seed).
        in_channels: image channels ``c_in``.
        channels: ``C``, the high-resolution branch width (the low one has ``2C``);
            a multiple of 4.
        num_classes: number of logits.
        dtype: floating dtype of every tensor.

    Raises:
        ValueError: a bad size or generator.
    """
    fn = "multiscale.init"
    g = check_generator(generator, fn)
    check_int(fn, "in_channels", in_channels, 1)
    check_int(fn, "channels", channels, 1)
    check_int(fn, "num_classes", num_classes, 1)
    if channels % GROUPS:
        raise ValueError(f"{fn}: channels must be a multiple of {GROUPS} (group norm), got {channels}")
    c, c2 = channels, 2 * channels
    return {
        "embed": {
            "conv_in": conv(c, in_channels, 3, g, dtype),
            "norm_in": group_norm(c, dtype),
            "conv_down": conv(c2, c, 3, g, dtype),
        },
        "latent": {
            "hi": conv(c, c, 3, g, dtype),
            "lo": conv(c2, c2, 3, g, dtype),
            "lo_to_hi": conv(c, c2, 1, g, dtype, bias=False),
            "hi_to_lo": conv(c2, c, 3, g, dtype, bias=False),
            "norm_hi": group_norm(c, dtype),
            "norm_lo": group_norm(c2, dtype),
        },
        "readout": linear(num_classes, c + c2, g, dtype),
    }


def _act(t: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(t, NEGATIVE_SLOPE)


def _gn(t: torch.Tensor, p: dict) -> torch.Tensor:
    return F.group_norm(t, GROUPS, p["weight"], p["bias"])


def embed(params: dict, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(d)``: ``(B, c_in, H, W) -> ((B, C, H/2, W/2), (B, 2C, H/4, W/4))``; ``H, W`` divisible by 4.

    Raises:
        ValueError: ``d`` is not ``(B, c_in, H, W)`` with ``H, W`` multiples of 4.
    """
    p = params["embed"]
    c_in = p["conv_in"]["weight"].shape[1]
    if d.dim() != 4 or d.shape[1] != c_in or d.shape[2] % 4 or d.shape[3] % 4:
        raise ValueError(
            f"multiscale.embed: expected images (B, {c_in}, H, W) with H, W multiples of 4, got shape {tuple(d.shape)}"
        )
    t = _act(_gn(F.conv2d(d, p["conv_in"]["weight"], p["conv_in"]["bias"], padding=1), p["norm_in"]))
    t = F.max_pool2d(t, 2)
    low = _act(F.conv2d(t, p["conv_down"]["weight"], p["conv_down"]["bias"], stride=2, padding=1))
    return t, low


def apply(params: dict, z: tuple, x: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``R(z, x)`` on the tuple state ``(z_hi (B, C, h, w), z_lo (B, 2C, h/2, w/2))``; same structure out."""
    p = params["latent"]
    z_hi, z_lo = z
    x_hi, x_lo = x
    a_hi = _act(F.conv2d(z_hi, p["hi"]["weight"], p["hi"]["bias"], padding=1) + x_hi)
    a_lo = _act(F.conv2d(z_lo, p["lo"]["weight"], p["lo"]["bias"], padding=1) + x_lo)
    up = F.interpolate(F.conv2d(a_lo, p["lo_to_hi"]["weight"]), size=a_hi.shape[-2:], mode="nearest")
    down = F.conv2d(a_hi, p["hi_to_lo"]["weight"], stride=2, padding=1)
    return _gn(a_hi + up, p["norm_hi"]), _gn(a_lo + down, p["norm_lo"])


def readout(params: dict, z: tuple) -> torch.Tensor:
    """``S(z)``: average-pool each branch, concatenate ``(B, 3C)``, linear -> ``(B, num_classes)``."""
    pooled = torch.cat([reduce(t, "b c h w -> b c", "mean") for t in z], dim=1)
    return pooled @ params["readout"]["weight"].T + params["readout"]["bias"]
