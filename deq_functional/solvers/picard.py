"""Damped Picard (Krasnosel'skii–Mann) iteration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_real
from ._base import Solver


@dataclass(frozen=True)
class Picard(Solver):
    r"""Damped fixed-point iteration ``z_{k+1} = (1 − β) z_k + β g(z_k)``.

    Converges linearly at rate ``1 − β(1 − L)`` when ``g`` is ``L``-Lipschitz with
    ``L < 1``; damping ``β < 1`` also converges for nonexpansive ``g``
    (Krasnosel'skii–Mann). Cost per iteration: one ``g`` call, no memory beyond ``z``.

    Attributes:
        max_iter: iteration budget (see ``Solver`` for ``atol``, ``divergence_ratio``,
            ``check_every``, ``return_best``).
        tol: relative tolerance.
        damping: ``β ∈ (0, 1]``; 1 is the plain iteration ``z ← g(z)``.

    Examples:
        >>> import torch, deq_functional as dq
        >>> z, info = dq.Picard(max_iter=100, tol=1e-8)(lambda z: 0.5 * z + 1.0, torch.zeros(3))
        >>> torch.allclose(z, torch.full((3,), 2.0))
        True

    Supports: backward / grad / vmap / compile.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real("Picard", "damping", self.damping, 0.0, 1.0, open_low=True)

    def init(self, z, gz):
        return ()

    def step(self, state, z, gz, r, k, opts):
        if self.damping == 1.0:
            return gz, state
        return torch.add(z, r, alpha=self.damping), state
