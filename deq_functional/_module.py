"""Bridge from ``nn.Module`` to the pure ``(params, f)`` form, and back."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def from_module(module: nn.Module) -> tuple[dict[str, torch.Tensor], Callable[[Any, Any, Any], Any]]:
    """Split ``module`` (whose ``forward(z, x)`` returns the next z) into params and a pure f.

    Returns:
        ``(params, f)``: ``params`` maps each parameter's dotted name to a detached
        copy (``requires_grad`` kept); ``f(params, z, x)`` runs ``module.forward(z, x)``
        with those tensors via ``torch.func.functional_call`` (buffers stay the module's).
        The module itself is never modified.

    Example:
        >>> import torch, deq_functional as dq
        >>> params, f = dq.from_module(torch.nn.Bilinear(3, 3, 3))
        >>> sorted(params)
        ['bias', 'weight']
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"from_module: expected an nn.Module, got {type(module).__name__}")
    params = {
        name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in module.named_parameters()
    }

    def f(params: Any, z: Any, x: Any) -> Any:
        return torch.func.functional_call(module, params, (z, x))

    return params, f


def to_module(module: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """Copy ``params`` (e.g. trained ones) into ``module``'s parameters in place; returns ``module``.

    Raises:
        ValueError: a name in ``params`` is not a parameter of ``module``, or a shape differs.
    """
    own = dict(module.named_parameters())
    unknown = sorted(set(params) - set(own))
    if unknown:
        raise ValueError(f"to_module: {unknown} are not parameters of {type(module).__name__}; it has {sorted(own)}")
    with torch.no_grad():
        for name, value in params.items():
            if own[name].shape != value.shape:
                raise ValueError(f"to_module: {name} has shape {tuple(own[name].shape)}, got {tuple(value.shape)}")
            own[name].copy_(value)
    return module
