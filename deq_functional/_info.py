"""What a solve reports: ``Status`` codes, the ``Info`` NamedTuple, and the library's exceptions."""

from __future__ import annotations

import enum
from collections import namedtuple
from typing import Any, NamedTuple

import torch


class FixedPointError(RuntimeError):
    """A fixed-point (or adjoint) solve failed: a non-finite iterate, or, on request, no convergence."""


class FixedPointWarning(RuntimeWarning):
    """A solve stopped before reaching its tolerance, or was set up so that it cannot reach it."""


class Status(enum.IntEnum):
    """How a solve ended, per problem (``info.status`` holds these codes as integers).

    Attributes:
        CONVERGED: ``residual <= atol + tol · ‖f(z)‖`` at the returned iterate (and, after
            ``z0``, a residual at most half of ``z0``'s).
        MAX_ITER: the ``max_iter`` budget ran out first.
        DIVERGED: the iterates ran away: the residual grew to more than
            ``divergence_ratio`` times the smallest residual seen so far; the problem was
            frozen there.
        NONFINITE: an iterate, its image or a norm of them became NaN or Inf; the problem
            was frozen there.
    """

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    NONFINITE = 3

    @property
    def advice(self) -> str:
        """What to try when a problem ends with this status."""
        return _ADVICE[self]


_ADVICE = {
    Status.CONVERGED: "nothing to do",
    Status.MAX_ITER: "try a larger max_iter, a looser tol (or an atol), another solver, or a more contractive f",
    Status.DIVERGED: (
        "f is not contractive where the solver went: damp the iteration (Picard(damping<1), "
        "Anderson(beta<1)), rescale the weights (dq.spectral_normalize), or start from a better z0"
    ),
    Status.NONFINITE: (
        "f produced NaN/Inf or overflowed: damp the iteration (Picard(damping<1), Anderson(beta<1)), "
        "keep z inside f's domain, or rescale the weights so f is contractive"
    ),
}


class Info(NamedTuple):
    """Solver report. Every field is a tensor (no host sync to build it) with no autograd history.

    Shapes are ``()`` for one problem and ``(B,)`` with ``per_sample=True``.

    Attributes:
        nstep: iterations taken (int64); a problem stops counting once it stops.
        residual: ``‖f(z_K) − z_K‖₂`` at the returned iterate ``z_K``.
        rel_residual: ``residual / (‖f(z_K)‖₂ + tiny)``.
        converged: ``status == Status.CONVERGED`` (bool).
        status: ``Status`` code per problem (int64).

    Extras are present only when asked for (``info`` is then a subclass of ``Info``, with
    these fields appended):

    - ``trace``: ``(max_iter+1,)`` or ``(max_iter+1, B)`` residuals ``‖f(z_k) − z_k‖`` for
      ``k = 0..max_iter``; NaN after a problem stopped (``trace=True``);
    - ``best_step``: iteration the returned iterate came from (``return_best=True``);
    - ``trajectory``: tuple of intermediate states for the correction loss, the one field
      that is differentiable on purpose (``return_trajectory=k``).
    """

    nstep: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor


_INFO_TYPES: dict[tuple[str, ...], type] = {}


def _info_type(extra: tuple[str, ...]) -> type:
    """A subclass of ``Info`` with ``extra`` fields appended (one class per set of extras; a plain
    dict cache, which Dynamo traces, where it would warn about ``functools.lru_cache``)."""
    if extra not in _INFO_TYPES:
        fields = namedtuple("Info", Info._fields + extra)
        _INFO_TYPES[extra] = type("Info", (fields, Info), {"__slots__": (), "__doc__": Info.__doc__})
    return _INFO_TYPES[extra]


def make_info(nstep, residual, rel_residual, status, **extra: Any) -> Info:
    """Build an ``Info`` (with ``converged`` derived from ``status``); extras set to None are left out."""
    extra = {k: v for k, v in extra.items() if v is not None}
    base = (nstep, residual, rel_residual, status == int(Status.CONVERGED), status)
    if not extra:
        return Info(*base)
    return _info_type(tuple(extra))(*base, *extra.values())


def with_fields(info: Info, **extra: Any) -> Info:
    """``info`` with more extra fields appended."""
    present = dict(zip(info._fields[len(Info._fields) :], info[len(Info._fields) :], strict=True))
    return make_info(info.nstep, info.residual, info.rel_residual, info.status, **present, **extra)
