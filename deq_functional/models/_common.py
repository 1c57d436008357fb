"""Pieces the reference models share: parameter initialisers and the full N(d) = S(z*) pass.

Every reference model is a module with four pure functions on a nested dict of
tensors (``params["embed" | "latent" | "readout"]``):

* ``init(generator, ...) -> params``
* ``embed(params, d) -> x``          the input map  Q (paper: Q(d))
* ``apply(params, z, x) -> z_next``  the latent map R (paper: R(z, Q(d))), the ``f`` of ``fixed_point``
* ``readout(params, z) -> logits``   the readout    S (paper: S(z*))

``x`` always has the structure and shapes of the latent state ``z`` (a tensor,
or a tuple of feature maps), so ``fixed_point(..., z0=None)`` starts from zeros.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch

from .._fixed_point import fixed_point
from .._tree import flatten

NEGATIVE_SLOPE = 0.1  # leaky ReLU slope used by the JFB paper's networks


def check_generator(generator: Any, fn: str) -> torch.Generator:
    """``generator`` itself, or a fresh one seeded with it when it is an int."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise ValueError(f"{fn}: generator must be a torch.Generator or an int seed, got {type(generator).__name__}")


def uniform(shape: tuple, fan_in: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: torch's default ``nn.Linear`` / ``nn.Conv2d`` scale."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2.0 - 1.0) * bound


def linear(out_features: int, in_features: int, generator, dtype, *, bias: bool = True) -> dict:
    """``{"weight": (out, in), "bias": (out,)}`` with the default ``nn.Linear`` init."""
    p = {"weight": uniform((out_features, in_features), in_features, generator, dtype)}
    if bias:
        p["bias"] = uniform((out_features,), in_features, generator, dtype)
    return p


def conv(out_channels: int, in_channels: int, kernel: int, generator, dtype, *, bias: bool = True) -> dict:
    """``{"weight": (out, in, k, k), "bias": (out,)}`` with the default ``nn.Conv2d`` init."""
    fan_in = in_channels * kernel * kernel
    p = {"weight": uniform((out_channels, in_channels, kernel, kernel), fan_in, generator, dtype)}
    if bias:
        p["bias"] = uniform((out_channels,), fan_in, generator, dtype)
    return p


def group_norm(channels: int, dtype) -> dict:
    """Affine parameters of a group norm: ``{"weight": ones, "bias": zeros}``, shape ``(C,)``."""
    return {"weight": torch.ones(channels, dtype=dtype), "bias": torch.zeros(channels, dtype=dtype)}


def count_params(params: Any) -> int:
    """Number of scalars in a pytree (nested dict / list / tuple) of tensors; other leaves count 0."""
    return sum(t.numel() for t in flatten(params)[0] if isinstance(t, torch.Tensor))


def predict(model: ModuleType, params: Any, d: torch.Tensor, **fixed_point_kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The whole implicit network ``N(d) = S(z*)``, ``z* = R(z*, Q(d))``.

    Args:
        model: one of ``deq_functional.models.mlp | conv | multiscale`` (anything with
            ``embed``, ``apply``, ``readout``).
        params: that model's params.
        d: a batch of inputs, e.g. images ``(B, C, H, W)``.
        **fixed_point_kwargs: passed to `deq_functional.fixed_point`
            (``solver``, ``grad_mode``, ``per_sample``, ``trace``, ...).

    Returns:
        ``(logits (B, num_classes), info)``.

    Examples:
        >>> import torch
        >>> from deq_functional.models import mlp, predict
        >>> p = mlp.init(0, in_features=4, hidden=8, num_classes=3)
        >>> logits, info = predict(mlp, p, torch.randn(2, 4), grad_mode="jfb")
        >>> logits.shape
        torch.Size([2, 3])
    """
    x = model.embed(params, d)
    z, info = fixed_point(model.apply, params, x, **fixed_point_kwargs)
    return model.readout(params, z), info
