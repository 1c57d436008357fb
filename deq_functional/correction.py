"""Fixed-point correction loss (DEQ-Flow): a weighted loss over intermediate solver states."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ._checks import check_int, check_real

__all__ = ["correction_loss", "correction_weights"]

_SCHEDULES = ("exp", "linear", "const")


def correction_weights(
    n: int,
    weights: str | Sequence[float] | torch.Tensor = "exp",
    gamma: float = 0.8,
    normalize: bool = True,
) -> torch.Tensor:
    r"""The weights ``w_1..w_n`` that `correction_loss` applies to states ``1..n`` (oldest first).

    Schedules, for states ordered from the earliest (``i = 1``) to the one
    closest to the fixed point (``i = n``), before normalisation:

    * ``"exp"``:    ``w_i = γ^(n−i)``  (the last state gets 1, each earlier one γ times less;
      DEQ-Flow's and RAFT's schedule, ``γ = 0.8`` there);
    * ``"linear"``: ``w_i = 1 − γ(n−i)/n``  (grows linearly from ``1 − γ(n−1)/n`` to 1;
      torchdeq's ``fp_correction`` schedule, whose default there is ``γ = 0.9``;
      ``γ = 1`` gives ``w_i ∝ i``);
    * ``"const"``:  ``w_i = 1``;
    * a list/tuple of ``n`` non-negative numbers: used as given (a tensor is read
      with ``.tolist()``, a host sync; pass Python numbers inside ``torch.compile``).

    With ``normalize=True`` (default) the weights are divided by their sum, so
    they sum to 1 and the loss stays on the scale of ``loss_fn`` whatever ``n``
    is. ``normalize=False`` gives the unnormalised sums of DEQ-Flow / torchdeq
    (e.g. ``Σ_i γ^(n−i) L(z_i)``) exactly.

    Returns:
        float64 tensor of shape ``(n,)`` on the CPU.

    Raises:
        ValueError: ``n < 1``, unknown schedule, ``gamma`` outside ``(0, 1]`` for
            ``"exp"`` / ``"linear"``, or explicit weights of the wrong length, negative or all zero.
    """
    return torch.tensor(_weight_list(n, weights, gamma, normalize, "correction_weights"), dtype=torch.float64)


def _weight_list(n: int, weights: Any, gamma: float, normalize: bool, fn: str) -> list[float]:
    """Plain Python floats, so a compiled caller sees constants (no tensor-to-host read)."""
    check_int(fn, "n", n, 1)
    if isinstance(weights, str):
        if weights not in _SCHEDULES:
            raise ValueError(
                f"{fn}: unknown weights schedule {weights!r}; use one of {_SCHEDULES} or a list of n numbers"
            )
        if weights != "const":
            check_real(fn, "gamma", gamma, 0.0, 1.0, open_low=True)
        if weights == "exp":
            w = [float(gamma) ** (n - i) for i in range(1, n + 1)]
        elif weights == "linear":
            w = [1.0 - float(gamma) * (n - i) / n for i in range(1, n + 1)]
        else:
            w = [1.0] * n
    else:
        w = weights.tolist() if isinstance(weights, torch.Tensor) else weights
        if not isinstance(w, (list, tuple)) or len(w) != n or not all(isinstance(v, (int, float)) for v in w):
            raise ValueError(f"{fn}: explicit weights must be {n} numbers, one per state, got {weights!r}")
        w = [float(v) for v in w]
        if not all(math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
            raise ValueError(f"{fn}: explicit weights must be finite, non-negative and not all zero, got {w}")
    total = sum(w)
    return [v / total for v in w] if normalize else w


def correction_loss(
    loss_fn: Callable[[Any], torch.Tensor],
    states: Sequence[Any],
    weights: str | Sequence[float] | torch.Tensor = "exp",
    gamma: float = 0.8,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Fixed-point correction loss ``Σ_i w_i · loss_fn(z_i)`` over intermediate states.

    DEQ-Flow supervises several states on the way to the fixed point (with
    cheap, JFB-style gradients through each) instead of only ``z*``; this gives
    denser training signal and corrects the bias of the inexact gradient. Get
    the states from ``fixed_point(..., return_trajectory=k)`` as ``info.trajectory``
    (oldest first, last = closest to the fixed point), or pass any sequence
    of states. The weights ``w_i`` are those of `correction_weights`:
    ``"exp"`` ``∝ γ^(n−i)``, ``"linear"`` ``∝ 1 − γ(n−i)/n``, ``"const"`` ``∝ 1``, normalised to
    sum to 1 unless ``normalize=False``.

    Cost: ``n`` calls of ``loss_fn``; the gradient is the weighted sum of theirs.

    Args:
        loss_fn: ``state -> tensor`` (a scalar, or any shape shared by all states,
            e.g. a per-sample ``(B,)`` loss).
        states: non-empty sequence of states (tensors or pytrees), oldest first.
        weights: ``"exp"`` | ``"linear"`` | ``"const"`` or ``n`` explicit weights.
        gamma: in ``(0, 1]``, the decay of ``"exp"`` (DEQ-Flow uses 0.8) or the slope of
            ``"linear"``; ignored for ``"const"`` and explicit weights.
        normalize: divide the weights by their sum (default True).

    Returns:
        ``Σ_i w_i · loss_fn(states[i])`` in the dtype of the losses (the shape of one loss).

    Raises:
        ValueError: empty or non-sequence ``states``, unknown schedule, bad ``gamma``
            or explicit weights, or losses of different shapes.

    References:
        Bai, Geng, Kolter, Koltun. "Deep Equilibrium Optical Flow Estimation",
        CVPR 2022 (fixed-point correction). Teed & Deng, "RAFT", ECCV 2020 (γ^(n−i)
        weighting). Geng & Kolter, "TorchDEQ", 2023 (``fp_correction``'s schedules).

    Supports: backward / torch.func.grad / vmap / torch.compile (weights are built from Python numbers).

    Examples:
        >>> import torch, deq_functional as dq
        >>> states = [torch.tensor(4.0), torch.tensor(2.0), torch.tensor(1.0)]
        >>> round(dq.correction_loss(lambda z: z ** 2, states, "const").item(), 6)   # (16 + 4 + 1) / 3
        7.0
        >>> dq.correction_loss(lambda z: z ** 2, states, "exp", gamma=0.5, normalize=False)  # 16/4 + 4/2 + 1
        tensor(7.)
    """
    if isinstance(states, (str, bytes)) or not isinstance(states, (list, tuple)) or not states:
        raise ValueError(
            "correction_loss: states must be a non-empty list/tuple of states (e.g. info.trajectory), "
            f"got {type(states).__name__}"
        )
    w = _weight_list(len(states), weights, gamma, normalize, "correction_loss")
    losses = [loss_fn(s) for s in states]
    shapes = {tuple(torch.as_tensor(loss).shape) for loss in losses}
    if len(shapes) != 1:
        raise ValueError(f"correction_loss: loss_fn returned different shapes for different states: {sorted(shapes)}")
    total = w[0] * losses[0]
    for wi, loss in zip(w[1:], losses[1:], strict=True):
        total = total + wi * loss
    return total
