"""Anderson acceleration (type II), batched over independent problems, on fixed-shape buffers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from .._checks import check_finite_real, check_int, check_real
from .._flat import combine, first_slots, project, slot_mask, used_slots, work_dtype, write_slot
from .._transforms import is_compiling
from ._base import Solver


def mixing_coefficients(gram: torch.Tensor, slots: torch.Tensor | int, lam: float, dtype: torch.dtype) -> torch.Tensor:
    r"""Solve ``min_α ‖Σᵢ αᵢ rᵢ‖²`` s.t. ``Σᵢ αᵢ = 1`` over the history slots in use.

    Args:
        gram: ``(B, m, m)`` Gram matrix ``H = R Rᵀ`` of the residual history ``rᵢ = g(zᵢ) − zᵢ``,
            in the dtype the system is solved in (`solve_dtype`: float64 where the device has it).
        slots: the slots that hold history: the first ``n`` (an int, eagerly) or an ``(m,)`` bool
            mask (traced); entries of other slots are ignored: their rows and columns become the
            identity, with right-hand side 0. With ``n = m`` the same system without masking ops.
        lam: ridge λ relative to ``s = mean(diag H)`` over the slots in use; it stays relative
            as the residuals shrink, so Anderson does not degrade into averaging near convergence.
        dtype: the history's (work) dtype: that of the returned α, and whose epsilon ε is added.

    Returns:
        ``(B, m)`` coefficients α in ``dtype``, summing to 1, zero on unused slots, from
        ``(H/s + (λ+ε)I) w = 1`` on the used block, ``α = w / Σw`` (ε keeps an all-zero history
        finite). With one slot in use this is ``α = (1, 0, …)``: damped Picard. The system is
        always the padded ``m × m`` one, solved in ``gram``'s dtype by `solve_small_spd`, eagerly
        and compiled, so both give the same α in float32 (see there). Cost ``O(B m³)``; nothing
        syncs with the host.
    """
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    if isinstance(slots, int) and slots == gram.shape[1]:  # every slot in use: no masking ops
        scale = gram.diagonal(dim1=1, dim2=2).sum(dim=1) / gram.shape[1] + tiny
        system = gram / scale[:, None, None]
        system.diagonal(dim1=1, dim2=2).add_(lam + eps)
        rhs = torch.ones_like(system[:, :, :1])
    else:
        pad = _padding(slots, gram.shape[1], lam + eps, gram.dtype, gram.device)
        scale = (gram.diagonal(dim1=1, dim2=2) * pad.weights).sum(dim=1) / pad.count + tiny
        system = torch.where(pad.block, gram / scale[:, None, None], 0.0) + pad.diagonal
        rhs = pad.weights[:, None].expand(gram.shape[0], -1, 1)
    w = solve_small_spd(system, rhs)
    return (w / w.sum(dim=1, keepdim=True)).to(dtype)


class _Padding(NamedTuple):
    """What pads the mixing system of the used slots to ``m × m``: the slots as weights ``(m,)``
    (1 used, 0 not), their count, the used block's mask ``(m, m)``, and the diagonal to add
    (``λ + ε`` on used slots, 1 on the others)."""

    weights: torch.Tensor
    count: torch.Tensor
    block: torch.Tensor
    diagonal: torch.Tensor


_PADDINGS: dict[tuple, _Padding] = {}  # eagerly: one per (m, slots in use, ridge, dtype, device)


def _padding(slots: torch.Tensor | int, m: int, ridge: float, dtype: torch.dtype, device: torch.device) -> _Padding:
    """`_Padding` of the first ``slots`` of ``m`` (an int: eagerly, built once per count and kept;
    traced, built in the graph: a cache written while tracing would fail Dynamo's guards) or of a
    slot mask (a tensor of a traced loop): the same numbers either way."""
    if isinstance(slots, int):
        if is_compiling():
            return _padding(slot_mask(slots, m, device), m, ridge, dtype, device)
        key = (m, slots, ridge, dtype, device)
        if key not in _PADDINGS:
            _PADDINGS[key] = _padding(slot_mask(slots, m, device), m, ridge, dtype, device)
        return _PADDINGS[key]
    weights = slots.to(dtype)
    ridge_or_one = torch.where(slots, torch.full((m,), ridge, dtype=dtype, device=device), 1.0)  # ridge in dtype
    diagonal = torch.diag_embed(ridge_or_one)
    return _Padding(weights, weights.sum(), slots[:, None] & slots[None, :], diagonal)


def solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for the Gram matrix and the mixing system, except where the device has none (MPS:
    float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def solve_small_spd(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    r"""``w = A⁻¹ b`` for a batch of small symmetric positive definite systems: ``(B, m, m)``,
    ``(B, m, 1)`` -> ``(B, m)``.

    Eagerly one ``torch.linalg.solve_ex`` (LU; never syncs). Traced by ``torch.compile`` a
    Gauss–Jordan elimination written in elementwise ops (`gauss_jordan`), which inductor fuses
    into the loop body, where ``solve_ex`` is an external call that costs more than the rest of
    the mixing step (MLP: 318 → 254 µs per compiled Anderson iteration, with the float64 Gram matrix). The two round
    differently; in float64 (what Anderson keeps its Gram matrix in) their difference is far below
    float32's resolution, so the float32 α they give are the same numbers but where a rounding
    boundary falls between the two float64 values, and then one rounding step apart (measured:
    1 coefficient in 144,000 over Gram conditions up to the ridge's limit; tests/test_mixing.py):
    compiled and eager iterate alike. A float64 state's α differ by float64 rounding.
    """
    if is_compiling():
        return gauss_jordan(system, rhs)
    return torch.linalg.solve_ex(system, rhs, check_errors=False).result[..., 0]


def gauss_jordan(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    r"""Gauss–Jordan elimination without pivoting: ``(B, m, m)``, ``(B, m, 1)`` -> ``(B, m)``.

    Step ``j`` divides row ``j`` of ``[A | b]`` by its pivot and subtracts its multiples from the
    other rows; after ``m`` steps the last column is ``A⁻¹ b``. Without pivoting this needs
    nonzero pivots, which a symmetric positive definite ``A`` has (its Schur complements are
    positive definite). ``3m`` elementwise ops on ``(B, m, m+1)``, no reduction, no host sync.
    """
    m = system.shape[1]
    aug = torch.cat([system, rhs], dim=2)
    row = torch.arange(m, device=system.device)[:, None]
    for j in range(m):
        pivot_row = aug[:, j : j + 1] / aug[:, j : j + 1, j : j + 1]
        aug = torch.where(row == j, pivot_row, aug - aug[:, :, j : j + 1] * pivot_row)
    return aug[:, :, m]


@dataclass(frozen=True)
class Anderson(Solver):
    r"""Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations").

    With the last ``n = min(k+1, m)`` iterates ``zᵢ``, images ``g(zᵢ)`` and residuals
    ``rᵢ = g(zᵢ) − zᵢ``: ``α = argmin ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1`` (ridge-regularised), then
    ``z_{k+1} = Σ αᵢ g(zᵢ) − (1 − β) Σ αᵢ rᵢ = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``.
    Iteration 0 (one valid slot) is damped Picard; with ``m = 1`` every step is.
    The history lives in ring buffers ``(B, m, D)`` of ``g(zᵢ)`` and ``rᵢ`` with a validity
    mask, so the state has a fixed shape (``torch.while_loop``); half-precision states keep
    their history in float32; the ``(B, m, m)`` Gram matrix and its system are float64.
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
        """Ring buffers of images and residuals ``(B, m, D)`` and their Gram matrix ``(B, m, m)``
        (float64: the row written into it is exact, and the mixing system is solved in it)."""
        batch, dim = z.shape
        history = z.new_zeros((batch, self.m, dim), dtype=work_dtype(z.dtype))
        return history, history.clone(), z.new_zeros((batch, self.m, self.m), dtype=solve_dtype(z.device))

    def step(self, state, z, gz, r, k, opts):
        images, residuals, gram = state
        slot = k % self.m
        r = r.to(images.dtype)
        images = write_slot(images, 1, slot, gz, opts.inplace)
        residuals = write_slot(residuals, 1, slot, r, opts.inplace)
        row = project(residuals, r)  # (B, m): rᵢ · r, the one new Gram row
        gram = write_slot(write_slot(gram, 1, slot, row, opts.inplace), 2, slot, row, opts.inplace)
        slots = first_slots(k + 1, self.m, z.device)
        alpha = mixing_coefficients(gram, slots, self.lam, images.dtype)
        alpha = used_slots(alpha, slots)  # eagerly: the first n columns
        if opts.constant_mixing:
            # Unrolled: differentiate through the iterates, not through α. dα/dθ multiplies
            # residuals that vanish at convergence, but the ill-conditioned Gram solve makes
            # that product blow up numerically (seen: a 1e3× gradient after 100 iterations).
            alpha = alpha.detach()
        z_next = combine(alpha, used_slots(images, slots))
        if self.beta != 1.0:
            z_next = z_next - (1.0 - self.beta) * combine(alpha, used_slots(residuals, slots))
        return z_next.to(z.dtype), (images, residuals, gram)
