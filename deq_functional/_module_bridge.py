"""Bridge from ``nn.Module`` to the pure ``(params, f)`` form, and back.

Buffers (batch norm's running statistics, counters) are state the module may write to
in place during ``forward``. A pure ``f`` must not: ``fixed_point`` applies f many times
per solve, and under ``torch.func`` transforms (IFT's adjoint vjps) an in-place write to a
captured tensor is an error. So `module_call` hands ``functional_call`` a fresh copy
of every buffer at each call: the module's writes land in the copy and are dropped.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def with_buffer_copies(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus a copy of each of ``module``'s buffers (the value in ``state`` if named there).

    Cost: one copy of the buffers (for batch norm, ``2C + 1`` numbers per layer).
    """
    out = dict(state)
    for name, buffer in module.named_buffers():
        out[name] = out.get(name, buffer).clone()
    return out


def module_call(module: nn.Module, state: dict[str, torch.Tensor], z: Any, x: Any) -> Any:
    """``module.forward(z, x)`` on the tensors of ``state`` (params, optionally buffers), buffers copied.

    The module is never written to: see the module docstring.
    """
    return torch.func.functional_call(module, with_buffer_copies(module, state), (z, x))


def from_module(module: nn.Module) -> tuple[dict[str, torch.Tensor], Callable[[Any, Any, Any], Any]]:
    """Split ``module`` (whose ``forward(z, x)`` returns the next z) into params and a pure f.

    Buffers: ``f`` reads the module's buffers at each call (so ``load_state_dict`` or
    ``.eval()`` on the module show through) but never writes them: each call works on a
    copy of every buffer (one copy of the buffers per application of f). ``params`` may
    also name buffers, which then replace the module's. For batch norm this means:

    - train mode: every application of f normalises with the batch statistics of its own
      input (z's batch: samples are coupled, so ``per_sample=True`` is wrong for it) and
      the running statistics stay as they are, however many iterations the solver runs;
      IFT, JFB and the other modes differentiate through the batch statistics. To update
      the running statistics once per step, as one ordinary forward would, call
      ``torch.func.functional_call(module, params, (z_star.detach(), x))`` under
      ``torch.no_grad()`` after the solve (``dq.DEQ`` does this for you);
    - eval mode: f normalises with the running statistics and leaves them unchanged.

    Returns:
        ``(params, f)``: ``params`` maps each parameter's dotted name to a detached
        copy (``requires_grad`` kept); ``f(params, z, x)`` runs ``module.forward(z, x)``
        with those tensors via ``torch.func.functional_call``. The module itself is never
        modified.

    Raises:
        ValueError: ``module`` is not an ``nn.Module``.

    Examples:
        >>> import torch, deq_functional as dq
        >>> params, f = dq.from_module(torch.nn.Bilinear(3, 3, 3))
        >>> sorted(params)
        ['bias', 'weight']

    Supports: backward / grad / vmap / compile (vmap: not with train-mode batch norm,
    whose running-statistics update torch.func cannot batch).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"from_module: expected an nn.Module, got {type(module).__name__}")
    params = {
        name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in module.named_parameters()
    }

    def f(params: Any, z: Any, x: Any) -> Any:
        return module_call(module, params, z, x)

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
