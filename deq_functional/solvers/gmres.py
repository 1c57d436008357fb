"""Restarted GMRES for affine fixed points ``u = A u + b``, batched, on fixed-shape Arnoldi state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._checks import check_int
from .._flat import combine, first_slots, project, row_norms, slot_mask, used_slots, work_dtype, write_slot
from ._base import Solver


def _phase(k: Any, restart: int) -> tuple[Any, Any]:
    """``(restarting, j)`` for iteration ``k``: the first cycle makes Arnoldi steps ``j = 0..m−1``
    (its residual came with ``z0``); every later cycle first evaluates ``g`` at the iterate
    (``restarting``: its true residual starts the cycle), then makes steps ``j = 0..m−1``.
    Python ints eagerly, 0-dim tensors inside ``torch.while_loop``."""
    m = restart
    if isinstance(k, int):
        if k < m:
            return False, k
        t = (k - m) % (m + 1)
        return t == 0, max(t - 1, 0)
    t = (k - m).remainder(m + 1)
    return (k >= m) & (t == 0), torch.where(k < m, k, (t - 1).clamp(min=0))


def least_squares(hessenberg: torch.Tensor, beta: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    r"""``y = argmin ‖β e₁ − H y‖`` over the Arnoldi columns in use, by a QR factorisation.

    Args:
        hessenberg: ``(B, m+1, m)`` upper Hessenberg ``H`` (columns not in use are zero).
        beta: ``(B,)`` the cycle's initial residual norm ``β``.
        cols: ``(m,)`` bool mask of the columns in use; the others become ``e_{c+1}``, which
            leaves the used block's solution unchanged and gives ``y_c = 0`` for them. (One
            padded ``(m+1) × m`` system eagerly and compiled, so both round alike.)

    Returns:
        ``(B, m)`` coefficients ``y`` (zero on unused columns). A column with no component of
        its own (``R_cc = 0``: a breakdown, where the Krylov space became invariant and the
        solution is already in it, or ``β = 0``) gets ``y_c = 0`` rather than 0/0. Cost ``O(B m³)``.
    """
    m = hessenberg.shape[2]
    shift = torch.eye(m + 1, m + 1, dtype=hessenberg.dtype, device=hessenberg.device)[:, 1:]  # e_{c+1}
    q, r = torch.linalg.qr(torch.where(cols, hessenberg, shift))
    diag = r.diagonal(dim1=1, dim2=2)
    live = diag.abs() > torch.finfo(r.dtype).eps * diag.abs().amax(dim=1, keepdim=True)
    r = r + torch.diag_embed(torch.where(live, 0.0, 1.0 - diag))  # a dead column's pivot becomes 1 ...
    rhs = torch.where(live, beta[:, None] * q[:, 0, :], 0.0).unsqueeze(2)  # ... with right-hand side 0 (Qᵀ β e₁)
    return torch.linalg.solve_triangular(r, rhs, upper=True).squeeze(2)


def _unit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w / ‖w‖, ‖w‖)`` per row; a zero row (a breakdown: the Krylov space is invariant) stays zero."""
    norm = row_norms(w)[:, None]
    return w * ((norm > 0) / torch.where(norm > 0, norm, 1.0)), norm


@dataclass(frozen=True)
class GMRES(Solver):
    r"""Restarted GMRES (Saad & Schultz 1986) for an affine fixed point ``u = A u + b``.

    GMRES solves ``(I − A) u = b`` and needs only products with ``A``: given ``g(u) = A u + b``
    (IFT's adjoint map ``u ↦ Jᵀu + ḡ``, one vjp per call) it gets ``A v = (g(u₀ + s v) −
    g(u₀)) / s`` from one call of ``g`` at a shifted point (``s = ‖u₀‖ + ‖g(u₀)‖``, so the
    difference does not cancel). Iteration ``j`` of a cycle extends the Krylov basis
    ``V = [v₀ … v_j]`` of ``(I − A)`` from ``v₀ = r/‖r‖`` by one Arnoldi step (classical
    Gram–Schmidt, twice: as stable as modified Gram–Schmidt, and batched), then takes the
    iterate ``u = u_c + V y`` that minimises the residual, ``y = argmin ‖β e₁ − H y‖``
    (``H`` the ``(j+2) × (j+1)`` Hessenberg matrix, ``β = ‖r‖``). While iterating, the loop
    stops on the Krylov residual ``V_{j+1}(β e₁ − H y)``, which equals ``g(u) − u`` for an
    affine ``g`` in exact arithmetic; after ``restart`` steps the cycle restarts from the
    iterate, whose true residual costs one more call of ``g`` (so a cycle after the first is
    ``restart + 1`` iterations); and when the loop ends, ``g`` runs once more at the last
    iterate: ``info.residual`` and the answer ``g(u_K)`` are the true ones, and a problem is
    CONVERGED only if that true residual passes too (else MAX_ITER). With ``restart ≥`` the
    dimension of the problem it is full GMRES: exact after that many steps, in exact
    arithmetic; a breakdown (the solution reached early) leaves the later columns inert.

    Use it where fixed-point iteration cannot solve the adjoint: ``IFT(solver=dq.GMRES())``
    converges whenever ``I − Jᵀ`` is invertible, also when ``ρ(J) > 1`` (a forward solved by
    Anderson or Broyden beyond Picard's reach), where a Picard adjoint diverges. The Krylov
    residual never grows within a cycle, and each cycle starts from the last one's iterate,
    so a residual that stagnates ends MAX_ITER, never DIVERGED (``divergence_ratio`` is off by
    default). ``g`` must be affine:
    as the forward solver of ``fixed_point`` (a nonlinear map) it is refused.
    State of fixed shape (runs inside ``torch.while_loop``): the basis ``(B, m+1, D)`` and
    ``H`` ``(B, m+1, m)``, ``m = restart``; half-precision states work in float32.
    Cost per iteration: one ``g`` call, ``O(B m D)`` (Gram–Schmidt twice, the iterate and its
    residual) and an ``(m+1) × m`` QR; one more ``g`` call per solve; memory ``(m + 4) B D``.

    Attributes:
        max_iter: iteration budget (calls of ``g``), see ``Solver`` for the keyword options.
        tol: relative tolerance.
        restart: Krylov dimension of a cycle (``m``), ``>= 1``.
        divergence_ratio: (keyword) off (``math.inf``) by default, see above.

    Examples:
        >>> import torch, deq_functional as dq
        >>> A = torch.tensor([[1.5, 0.0], [0.3, 0.5]], dtype=torch.float64)   # ρ(A) = 1.5
        >>> u, info = dq.GMRES(tol=1e-12)(lambda u: A @ u + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> bool(info.converged), int(info.nstep), [round(v, 12) for v in u.tolist()]   # (I − A)⁻¹ 1
        (True, 2, [-2.0, 0.8])

    References:
        Saad, Schultz, "GMRES: a generalized minimal residual algorithm for solving
        nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986.

    Supports: backward / grad / vmap / compile (as IFT's adjoint solver and standalone).
    """

    restart: int = 20
    divergence_ratio: float = field(default=math.inf, kw_only=True)
    affine_only: ClassVar[bool] = True
    evaluates_iterate: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("GMRES", "restart", self.restart, 1)

    def init(self, z, gz):
        """``(V, H, u_c, r_c norm β, origin u₀, g(u₀), shift s)``: the cycle's start ``u_c`` and the
        fixed origin of the matvecs, all ``(B, ·)`` in the work dtype."""
        batch, dim = z.shape
        dtype = work_dtype(z.dtype)
        z, gz = z.to(dtype), gz.to(dtype)
        v0, beta = _unit(gz - z)
        basis = write_slot(z.new_zeros((batch, self.restart + 1, dim), dtype=dtype), 1, 0, v0, False)
        hessenberg = z.new_zeros((batch, self.restart + 1, self.restart), dtype=dtype)
        shift = row_norms(z)[:, None] + row_norms(gz)[:, None]
        shift = torch.where(shift > 0, shift, 1.0)
        return basis, hessenberg, z, beta[:, 0], z.clone(), gz.clone(), shift

    def step(self, state, z, gz, r, k, opts):
        """The point where ``g`` is evaluated next: ``u₀ + s v_j`` (an Arnoldi step) or, at a
        restart, the iterate itself."""
        basis, _, _, _, origin, _, shift = state
        restarting, j = _phase(k, self.restart)
        v_j = basis.select(1, j) if isinstance(j, int) else _gather(basis, j)
        arnoldi = (origin + shift * v_j).to(z.dtype)
        if isinstance(restarting, bool):
            return (z if restarting else arnoldi), state
        return torch.where(restarting, z, arnoldi), state

    def observe(self, state, p, gp, k, opts):
        """From ``g(p)``: the next iterate ``u``, its image estimated as ``u + r`` (``r`` the Krylov
        residual, exact for an affine ``g`` up to rounding), and the new state."""
        basis, hessenberg, start, beta, origin, g_origin, shift = state
        restarting, j = _phase(k, self.restart)
        dtype = basis.dtype
        p, gp = p.to(dtype), gp.to(dtype)
        if isinstance(restarting, bool):
            if restarting:
                return self._restart(state, p, gp)
            return self._arnoldi(state, gp, j, opts)
        z_r, gz_r, state_r = self._restart(state, p, gp)
        z_a, gz_a, state_a = self._arnoldi(state, gp, j, opts._replace(inplace=False))
        pick = lambda a, b: torch.where(restarting, a, b)  # noqa: E731
        return pick(z_r, z_a), pick(gz_r, gz_a), tuple(pick(a, b) for a, b in zip(state_r, state_a, strict=True))

    def _restart(self, state, u, gu):
        """A new cycle from the iterate ``u`` with its true residual ``g(u) − u``."""
        basis, hessenberg, _, _, origin, g_origin, shift = state
        v0, beta = _unit(gu - u)
        basis = write_slot(basis, 1, 0, v0, False)
        return u, gu, (basis, torch.zeros_like(hessenberg), u, beta[:, 0], origin, g_origin, shift)

    def _arnoldi(self, state, gp, j, opts):
        """Arnoldi step ``j``: ``w = (I − A) v_j``, orthogonalised against ``v_0..v_j`` twice; the
        minimal-residual iterate over the extended basis and its Krylov residual."""
        basis, hessenberg, start, beta, origin, g_origin, shift = state
        v_j = basis.select(1, j) if isinstance(j, int) else _gather(basis, j)
        w = v_j - (gp - g_origin) / shift  # (I − A) v_j
        slots = first_slots(j + 1, self.restart + 1, basis.device)
        used = used_slots(basis, slots)
        coef = 0  # the projections of w on v_0..v_j, summed over both passes
        for _ in range(2):  # classical Gram–Schmidt, twice
            c = project(used, w)
            if not isinstance(slots, int):
                c = c * slots
            w = w - combine(c, used)
            coef = coef + c
        assert isinstance(coef, torch.Tensor)
        v_next, norm = _unit(w)
        if isinstance(slots, int):  # the new column of H: (B, m+1), zero below row j+1
            h = torch.cat([coef, norm, coef.new_zeros((coef.shape[0], self.restart - slots))], dim=1)
        else:
            h = coef + norm * _onehot(j + 1, coef)
        basis = write_slot(basis, 1, j + 1, v_next, opts.inplace)
        hessenberg = write_slot(hessenberg, 2, j, h, opts.inplace)
        cols = first_slots(j + 1, self.restart, basis.device)
        y = used_slots(least_squares(hessenberg, beta, slot_mask(cols, self.restart, basis.device)).unsqueeze(2), cols)
        y = y.squeeze(2)  # (B, n) eagerly, (B, m) compiled
        n = y.shape[1]
        hy = torch.bmm(hessenberg[:, : n + 1, :n], y.unsqueeze(2)).squeeze(2)
        y_ext = torch.nn.functional.pad(y, (0, 1))  # (B, n+1)
        g = beta[:, None] * _onehot(0, hy) - hy  # β e₁ − H y: the residual's coefficients
        # one pass over the basis for both u = start + V y and u + r = start + V (y + β e₁ − H y)
        both = torch.bmm(torch.stack([y_ext, y_ext + g], dim=1), basis[:, : n + 1]) + start[:, None]
        u, gu = both.unbind(1)
        return u, gu, (basis, hessenberg, start, beta, origin, g_origin, shift)


def _gather(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``buffer[:, index]`` for a 0-dim tensor index (inside ``torch.while_loop``)."""
    return buffer.index_select(1, index.reshape(1)).squeeze(1)


def _onehot(index: Any, like: torch.Tensor) -> torch.Tensor:
    """A row ``e_index`` shaped like the columns of ``like`` ``(B, n)``, broadcast over B."""
    return (torch.arange(like.shape[1], device=like.device) == index).to(like.dtype)
