"""Anderson acceleration (type II), batched over independent problems, on fixed-shape buffers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._checks import check_finite_real, check_int, check_real
from .._flat import combine, first_slots, project, used_slots, work_dtype, write_slot
from ._base import Solver


def mixing_coefficients(gram: torch.Tensor, slots: Any, lam: float) -> torch.Tensor:
    r"""Solve ``min_α ‖Σᵢ αᵢ rᵢ‖²`` s.t. ``Σᵢ αᵢ = 1`` over the history slots in use.

    Args:
        gram: ``(B, m, m)`` Gram matrix ``H = R Rᵀ`` of the residual history ``rᵢ = g(zᵢ) − zᵢ``.
        slots: the slots that hold history, from ``first_slots``: an int ``n`` (the first n,
            sliced: eager) or an ``(m,)`` bool mask (entries of other slots ignored).
        lam: ridge λ relative to ``s = mean(diag H)`` over the slots in use; it stays relative
            as the residuals shrink, so Anderson does not degrade into averaging near convergence.

    Returns:
        ``(B, n)`` (int ``slots``) or ``(B, m)`` (mask, zero on unused slots) coefficients α
        summing to 1, from ``(H/s + (λ+ε)I) w = 1`` on the used block, ``α = w / Σw`` (ε the
        dtype's epsilon keeps an all-zero history finite). With one slot in use this is
        ``α = (1, 0, …)``: damped Picard. Cost ``O(B m³)``: ``solve_ex`` eagerly (it never syncs
        with the host); inside a compiled loop (mask) an unrolled Cholesky factorisation of the
        symmetric positive definite system, which inductor fuses into one kernel (``solve_ex``
        there is an external LU call costing ~50 µs per iteration on a CPU).
    """
    tiny, eps = torch.finfo(gram.dtype).tiny, torch.finfo(gram.dtype).eps
    if isinstance(slots, int):
        gram = gram[:, :slots, :slots]
        scale = gram.diagonal(dim1=1, dim2=2).sum(dim=1, keepdim=True)[:, :, None] / slots + tiny
        system = gram / scale
        system.diagonal(dim1=1, dim2=2).add_(lam + eps)
        rhs = torch.ones_like(system[:, :, :1])
    else:  # masked: unused rows/columns become the identity, with right-hand side 0
        scale = (gram.diagonal(dim1=1, dim2=2) * slots).sum(dim=1) / slots.sum() + tiny
        system = torch.where(slots[:, None] & slots[None, :], gram / scale[:, None, None], 0.0)
        system = system + torch.diag_embed(torch.where(slots, lam + eps, 1.0).to(gram.dtype))
        return _normalized(cholesky_solve_unrolled(system, slots.to(gram.dtype).expand(gram.shape[0], -1)))
    return _normalized(torch.linalg.solve_ex(system, rhs, check_errors=False).result[..., 0])


def _normalized(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(dim=1, keepdim=True)


def cholesky_solve_unrolled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x = a⁻¹ b`` for symmetric positive definite ``a`` ``(B, m, m)`` and ``b`` ``(B, m)``, by a
    Cholesky factorisation written out over the ``m`` columns (a small, static ``m``): elementwise
    ops only, so a compiler fuses them. Cost ``O(B m³)``."""
    m = a.shape[1]
    low: dict[tuple[int, int], torch.Tensor] = {}  # the factor L (a = L Lᵀ), entry by entry, (B,) each
    for j in range(m):
        diag = a[:, j, j] - sum((low[j, k] ** 2 for k in range(j)), torch.zeros_like(a[:, 0, 0]))
        low[j, j] = diag.clamp_min(torch.finfo(a.dtype).tiny).sqrt()
        for i in range(j + 1, m):
            low[i, j] = (a[:, i, j] - sum((low[i, k] * low[j, k] for k in range(j)), torch.zeros_like(diag))) / low[j, j]
    y: dict[int, torch.Tensor] = {}  # L y = b, then Lᵀ x = y
    for i in range(m):
        y[i] = (b[:, i] - sum((low[i, k] * y[k] for k in range(i)), torch.zeros_like(b[:, 0]))) / low[i, i]
    x: dict[int, torch.Tensor] = {}
    for i in reversed(range(m)):
        x[i] = (y[i] - sum((low[k, i] * x[k] for k in range(i + 1, m)), torch.zeros_like(b[:, 0]))) / low[i, i]
    return torch.stack([x[i] for i in range(m)], dim=1)


@dataclass(frozen=True)
class Anderson(Solver):
    r"""Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations").

    With the last ``n = min(k+1, m)`` iterates ``zᵢ``, images ``g(zᵢ)`` and residuals
    ``rᵢ = g(zᵢ) − zᵢ``: ``α = argmin ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1`` (ridge-regularised), then
    ``z_{k+1} = Σ αᵢ g(zᵢ) − (1 − β) Σ αᵢ rᵢ = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``.
    Iteration 0 (one valid slot) is damped Picard; with ``m = 1`` every step is.
    The history lives in ring buffers ``(B, m, D)`` of ``g(zᵢ)`` and ``rᵢ`` with a validity
    mask, so the state has a fixed shape (``torch.while_loop``); half-precision states keep
    their history and the ``m × m`` solve in float32.
    Cost per iteration: one ``g`` call, ``O(B m D)`` (one new Gram row, the combination;
    a second combination when ``β < 1``) and an ``m × m`` solve; memory ``2 m B D``.

    Attributes:
        max_iter: iteration budget (see ``Solver`` for the keyword options).
        tol: relative tolerance.
        m: history size (paper: ``m``), ``>= 1``.
        beta: mixing / damping (paper: ``β_k``), in ``(0, 1]``.
        lam: ridge λ relative to the Gram matrix's scale, ``>= 0``.

    Examples:
        >>> import torch, deq_functional as dq
        >>> A = torch.tensor([[0.9, 0.05], [0.0, 0.9]])
        >>> z, info = dq.Anderson(tol=1e-6)(lambda z: A @ z + 1.0, torch.zeros(2))
        >>> bool(info.converged)
        True

    Supports: backward / grad / vmap / compile.
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    history: ClassVar[tuple[int, ...]] = (0, 1, 2)  # images, residuals, Gram matrix

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Anderson", "m", self.m, 1)
        check_real("Anderson", "beta", self.beta, 0.0, 1.0, open_low=True)
        check_finite_real("Anderson", "lam", self.lam, 0.0)

    def init(self, z, gz):
        """Ring buffers of images and residuals ``(B, m, D)`` and their Gram matrix ``(B, m, m)``."""
        batch, dim = z.shape
        dtype = work_dtype(z.dtype)
        history = z.new_zeros((batch, self.m, dim), dtype=dtype)
        return history, history.clone(), z.new_zeros((batch, self.m, self.m), dtype=dtype)

    def step(self, state, z, gz, r, k, opts):
        images, residuals, gram = state
        slot = k % self.m
        r = r.to(images.dtype)
        images = write_slot(images, 1, slot, gz, opts.inplace)
        residuals = write_slot(residuals, 1, slot, r, opts.inplace)
        row = project(residuals, r)  # (B, m): rᵢ · r, the one new Gram row
        gram = write_slot(write_slot(gram, 1, slot, row, opts.inplace), 2, slot, row, opts.inplace)
        slots = first_slots(k + 1, self.m, z.device)
        alpha = mixing_coefficients(gram, slots, self.lam)
        if opts.constant_mixing:
            # Unrolled: differentiate through the iterates, not through α. dα/dθ multiplies
            # residuals that vanish at convergence, but the ill-conditioned Gram solve makes
            # that product blow up numerically (seen: a 1e3× gradient after 100 iterations).
            alpha = alpha.detach()
        z_next = combine(alpha, used_slots(images, slots))
        if self.beta != 1.0:
            z_next = z_next - (1.0 - self.beta) * combine(alpha, used_slots(residuals, slots))
        return z_next.to(z.dtype), (images, residuals, gram)
