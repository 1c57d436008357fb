"""Limited-memory ("good") Broyden on ``F(z) = g(z) − z``, batched, on fixed-shape pair stacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_int
from .._flat import combine, first_slots, project, row_dots, select, used_slots, work_dtype, write_slot
from ._base import Solver


def low_rank_inverse(us: torch.Tensor, vs: torch.Tensor, pairs: Any, w: torch.Tensor) -> torch.Tensor:
    """``Ĵ⁻¹ w = −w + Σᵢ uᵢ (vᵢ · w)`` over the pairs in use; ``Ĵ⁻ᵀ w`` is ``low_rank_inverse(vs, us, ...)``.

    Args:
        us, vs: ``(B, M, D)`` pair stacks.
        pairs: the pairs in use, from `first_slots`: an int ``n`` (the first n, sliced)
            or an ``(M,)`` bool mask.
        w: ``(B, D)``.

    Cost: two passes over the used pairs, ``O(B n D)``, and one over ``w``.
    """
    if isinstance(pairs, int):
        if pairs == 0:
            return -w
        us, vs = used_slots(us, pairs), used_slots(vs, pairs)
    coef = project(vs, w)  # (B, n): vᵢ · w
    if not isinstance(pairs, int):
        coef = coef * pairs
    return combine(coef, us) - w


@dataclass(frozen=True)
class Broyden(Solver):
    r"""Limited-memory Broyden's "good" method (Broyden 1965) on ``F(z) = g(z) − z``.

    Keeps ``Ĵ⁻¹ ≈ (∂F/∂z)⁻¹ = −I + Σᵢ uᵢ vᵢᵀ`` (starting at ``−I``, so the first step is
    Picard) and steps ``z_{k+1} = z_k − Ĵ⁻¹ F(z_k)``. Each iteration first adds the pair
    from the last step, with ``Δz = z_k − z_{k−1}`` and ``ΔF = F(z_k) − F(z_{k−1})``
    (Sherman–Morrison form): ``v = Ĵ⁻ᵀ Δz``, ``u = (Δz − Ĵ⁻¹ ΔF) / (vᵀ ΔF)``, which is
    ``−Ĵ⁻¹F(z_k) / (vᵀ ΔF)`` because the last step was ``Δz = −Ĵ⁻¹F(z_{k−1})`` with the same ``Ĵ``.
    Restarted Broyden: the pairs fill the ``memory`` slots of a ring; when it is full the
    approximation restarts from ``−I`` and the new pair is computed against ``−I`` itself
    (pairing it with the discarded estimate made ``memory=1`` blow up). A pair with
    ``|vᵀΔF| ≈ 0`` (a frozen, converged problem; the first iteration) is stored with ``u = 0``,
    which acts as nothing in ``Ĵ⁻¹`` and ``Ĵ⁻ᵀ``.
    Half-precision states keep the pairs in float32. Under ``Unrolled`` the pairs are held
    constant (``StepOptions.constant_mixing``), like Anderson's α.
    Cost per iteration: one ``g`` call plus two passes over the pairs, ``O(B · memory · D)``;
    memory ``2 · memory · B D``.

    Attributes:
        max_iter: iteration budget (see ``Solver`` for the keyword options).
        tol: relative tolerance.
        memory: number of rank-one pairs kept, ``>= 1``.

    Examples:
        >>> import torch, deq_functional as dq
        >>> z, info = dq.Broyden(tol=1e-6)(lambda z: 0.5 * torch.tanh(z) + 1.0, torch.zeros(4))
        >>> bool(info.converged)
        True

    Supports: backward / grad / vmap / compile.
    """

    memory: int = 10
    history: ClassVar[tuple[int, ...]] = (0, 1)  # the pair stacks us, vs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Broyden", "memory", self.memory, 1)

    def init(self, z, gz):
        """Pair stacks ``us, vs (B, memory, D)`` (zeros), and the previous iterate and ``F``."""
        batch, dim = z.shape
        dtype = work_dtype(z.dtype)
        us = z.new_zeros((batch, self.memory, dim), dtype=dtype)
        return us, us.clone(), z.to(dtype), (gz - z).to(dtype)

    def step(self, state, z, gz, r, k, opts):
        us, vs, z_prev, F_prev = state
        dtype = us.dtype
        zw, F = z.to(dtype), r.to(dtype)
        dz, dF = zw - z_prev, F - F_prev
        slot = k % self.memory
        restart = slot == 0  # the ring is full (or empty): start again from Ĵ⁻¹ = −I
        pairs = first_slots(slot, self.memory, z.device)  # this cycle's pairs, before this one
        inv_F = low_rank_inverse(us, vs, pairs, F)
        v = low_rank_inverse(vs, us, pairs, dz)  # Ĵ⁻ᵀ Δz
        den = row_dots(v, dF)  # vᵀΔF, (B, 1)
        scale = torch.linalg.vector_norm(v, dim=1, keepdim=True) * torch.linalg.vector_norm(dF, dim=1, keepdim=True)
        safe = den.abs() > torch.finfo(dtype).eps * scale
        inv_den = safe / torch.where(safe, den, 1.0)  # 1/(vᵀΔF), or 0 (no NaN in its gradient either)
        # u = (Δz − Ĵ⁻¹ΔF)/(vᵀΔF) with Ĵ⁻¹ΔF = Ĵ⁻¹F − Ĵ⁻¹F_prev: the last step made Ĵ⁻¹F_prev = −Δz,
        # so the numerator is −Ĵ⁻¹F; after a restart Ĵ⁻¹ = −I and it is Δz + ΔF.
        u = select(restart, lambda: (dz + dF) * inv_den, lambda: inv_F * -inv_den)
        if opts.constant_mixing:
            # Unrolled: differentiate through F(z_k), with the inverse-Jacobian estimate held
            # constant (its derivative multiplies F, which vanishes at the fixed point; past
            # convergence the secant pairs are rounding noise whose derivative is huge).
            u, v = u.detach(), v.detach()
        us = write_slot(us, 1, slot, u, opts.inplace)
        vs = write_slot(vs, 1, slot, v, opts.inplace)
        # z − Ĵ⁻¹F with the new pair's term u (vᵀF) added to Ĵ⁻¹F
        z_next = torch.addcmul(zw - inv_F, u, row_dots(v, F), value=-1)
        return z_next.to(z.dtype), (us, vs, zw, F)
