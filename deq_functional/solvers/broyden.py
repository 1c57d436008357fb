"""Limited-memory ("good") Broyden on ``F(z) = g(z) − z``, batched over independent problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Solver, check_int


def apply_inverse(us: torch.Tensor | None, vs: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``Ĵ⁻¹ w = −w + Σᵢ uᵢ (vᵢ · w)`` for ``w (B, D)`` with stacked pairs ``us, vs (B, n, D)``."""
    if us is None:
        return -w
    coef = vs @ w[:, :, None]  # (B, n, 1)
    return (coef.transpose(1, 2) @ us)[:, 0] - w


def apply_inverse_transposed(us: torch.Tensor | None, vs: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``Ĵ⁻ᵀ w = −w + Σᵢ vᵢ (uᵢ · w)`` for ``(B, D)`` vectors."""
    return apply_inverse(vs, us, w)


def _append(stack: torch.Tensor | None, item: torch.Tensor) -> torch.Tensor:
    return item[:, None] if stack is None else torch.cat([stack, item[:, None]], dim=1)


@dataclass(frozen=True)
class Broyden(Solver):
    r"""Limited-memory Broyden's "good" method (Broyden 1965) on ``F(z) = g(z) − z``.

    Keeps ``Ĵ⁻¹ ≈ (∂F/∂z)⁻¹ = −I + Σᵢ uᵢ vᵢᵀ`` (starting at ``−I``, so the first step is
    Picard) and steps ``z_{k+1} = z_k − Ĵ⁻¹ F(z_k)``. After each step, with
    ``Δz = z_{k+1} − z_k`` and ``ΔF = F(z_{k+1}) − F(z_k)`` (Sherman–Morrison form):
    ``v = Ĵ⁻ᵀ Δz``, ``u = (Δz − Ĵ⁻¹ ΔF) / (vᵀ ΔF)``. When the memory is full the
    approximation restarts from ``−I`` (restarted Broyden): dropping only the oldest
    pair was seen to diverge on slowly contracting symmetric maps, restarting kept
    converging (tests/test_solvers.py). A pair
    with ``|vᵀΔF| ≈ 0`` (e.g. a frozen, converged sample) is skipped.
    Cost per iteration: one ``g`` call plus ``O(B · memory · D)``; memory ``2 · memory · B D``.

    Attributes:
        max_iter: iteration budget.
        tol: relative-residual tolerance (``0.0``: run all ``max_iter``).
        memory: number of rank-one pairs kept, ``>= 1``.

    Example:
        >>> import torch, deq_functional as dq
        >>> z, info = dq.Broyden(tol=1e-10)(lambda z: 0.5 * torch.tanh(z) + 1.0, torch.zeros(4))
        >>> bool(info.converged)
        True

    Supports: backward / grad / vmap / compile.
    """

    memory: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Broyden", "memory", self.memory, 1)

    def init(self, z, gz):
        return None, None, None, None  # us (B,n,D), vs (B,n,D), previous z and F

    def step(self, state, z, gz, k):
        us, vs, z_prev, F_prev = state
        F = gz - z
        if z_prev is not None:
            dz, dF = z - z_prev, F - F_prev
            v = apply_inverse_transposed(us, vs, dz)
            den = (v * dF).sum(dim=1, keepdim=True)
            safe = den.abs() > torch.finfo(den.dtype).eps * (
                torch.linalg.vector_norm(v, dim=1, keepdim=True) * torch.linalg.vector_norm(dF, dim=1, keepdim=True)
            )
            u = torch.where(safe, (dz - apply_inverse(us, vs, dF)) / torch.where(safe, den, torch.ones_like(den)), 0.0)
            if us is not None and us.shape[1] == self.memory:  # memory full: restart from Ĵ⁻¹ = −I
                us, vs = None, None
            us, vs = _append(us, u), _append(vs, v)
        return z - apply_inverse(us, vs, F), (us, vs, z, F)
