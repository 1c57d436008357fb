"""What a solve reports: the ``Info`` NamedTuple and ``FixedPointError``."""

from __future__ import annotations

import functools
from collections import namedtuple
from typing import NamedTuple

import torch


class FixedPointError(RuntimeError):
    """A fixed-point (or adjoint) solve failed: non-finite iterate or, on request, no convergence."""


class Info(NamedTuple):
    """Solver report; every field is a tensor, so reading it forces no host sync.

    Shapes are ``()`` for one problem and ``(B,)`` with ``per_sample=True``.

    Attributes:
        nstep: iterations taken (int64); converged samples stop counting.
        residual: ``‖f(z_K) − z_K‖₂`` at the returned iterate.
        rel_residual: ``residual / (‖f(z_K)‖₂ + tiny)``.
        converged: ``rel_residual <= tol`` (bool); False for a non-finite iterate.

    Extra fields appear only when asked for (same order, appended):
        trace: ``(K+1,)`` or ``(K+1, B)`` residuals ``‖f(z_k) − z_k‖`` for k = 0..K (``trace=True``).
        best_step: iteration the returned iterate came from (``return_best=True``).
        trajectory: tuple of intermediate states, each differentiable (``return_trajectory=k``).
    """

    nstep: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor


_BASE = Info._fields


@functools.lru_cache(maxsize=None)
def _info_type(extra: tuple[str, ...]) -> type:
    return namedtuple("Info", _BASE + extra)


def make_info(nstep, residual, rel_residual, converged, **extra) -> tuple:
    """Build ``Info``; with extras, a NamedTuple named ``Info`` that also carries them."""
    extra = {k: v for k, v in extra.items() if v is not None}
    if not extra:
        return Info(nstep, residual, rel_residual, converged)
    return _info_type(tuple(extra))(nstep, residual, rel_residual, converged, *extra.values())


def add_fields(info: tuple, **extra) -> tuple:
    """``info`` with more extra fields appended."""
    return make_info(*info[:4], **dict(zip(info._fields[4:], info[4:])), **extra)
