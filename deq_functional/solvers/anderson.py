"""Anderson acceleration (type II), batched over independent problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Solver, check_int, check_real


def mixing_coefficients(gram: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Solve ``min_α ‖Σᵢ αᵢ rᵢ‖²`` s.t. ``Σᵢ αᵢ = 1`` with a ridge relative to the Gram scale.

    Args:
        gram: ``(B, n, n)`` Gram matrix ``H = R Rᵀ`` of the residual history ``rᵢ = g(zᵢ) − zᵢ``.
        lam: ridge λ relative to ``s = mean(diag H)``; it stays relative as the residuals
            shrink, so Anderson does not degrade into averaging near convergence.

    Returns:
        ``(B, n)`` coefficients α summing to 1, from ``(H/s + (λ+ε)I) w = 1``, ``α = w / Σw``
        (ε the dtype's epsilon keeps an all-zero history finite). Cost: ``O(B n³)``.
    """
    n = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None] + torch.finfo(gram.dtype).tiny
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram / scale + (lam + torch.finfo(gram.dtype).eps) * eye, torch.ones_like(gram[..., :1]))
    return (w / w.sum(dim=1, keepdim=True))[..., 0]


def extrapolate(alpha: torch.Tensor, iterates: torch.Tensor, residuals: torch.Tensor, beta: float) -> torch.Tensor:
    """``z_next = Σᵢ αᵢ zᵢ + β Σᵢ αᵢ rᵢ = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``; shapes ``(B,n)``, ``(B,n,D)``."""
    a = alpha[:, None, :]
    return (a @ iterates)[:, 0] + beta * (a @ residuals)[:, 0]


def write_slot(buffer: torch.Tensor, slot: int, item: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``buffer[:, slot] = item`` for a ``(B, m, ...)`` ring buffer: in place when no graph is
    being built, else out of place (``index_copy``) so autograd through the iterations works."""
    if inplace:
        buffer[:, slot] = item
        return buffer
    index = torch.tensor([slot], device=buffer.device)
    return buffer.index_copy(1, index, item[:, None])


@dataclass(frozen=True)
class Anderson(Solver):
    r"""Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations").

    With the last ``n = min(k+1, m)`` iterates ``zᵢ`` and residuals ``rᵢ = g(zᵢ) − zᵢ``:
    ``α = argmin ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1`` (ridge-regularised), then
    ``z_{k+1} = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``. With ``m = 1`` it is damped Picard.
    Cost per iteration: one ``g`` call plus ``O(B m D)`` (the Gram matrix is updated
    one row at a time) and an ``m × m`` solve; memory ``2 m B D``.

    Attributes:
        max_iter: iteration budget.
        tol: relative-residual tolerance (``0.0``: run all ``max_iter``).
        m: history size (paper: ``m``), ``>= 1``.
        beta: mixing / damping (paper: ``β_k``), in ``(0, 1]``.
        lam: ridge λ relative to the Gram matrix's scale, ``>= 0``.

    Example:
        >>> import torch, deq_functional as dq
        >>> A = torch.tensor([[0.9, 0.05], [0.0, 0.9]])
        >>> z, info = dq.Anderson(tol=1e-10)(lambda z: A @ z + 1.0, torch.zeros(2))
        >>> bool(info.converged)
        True

    Supports: backward / grad / vmap / compile.
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("Anderson", "m", self.m, 1)
        check_real("Anderson", "beta", self.beta, 0.0, 1.0, open_low=True)
        check_real("Anderson", "lam", self.lam, 0.0, float("inf"), open_low=False)

    def init(self, z, gz):
        """Ring buffers of iterates and residuals ``(B, m, D)`` and their Gram matrix ``(B, m, m)``."""
        zeros = torch.zeros_like(z)[:, None].repeat(1, self.m, 1)  # batched like z under vmap
        return zeros, zeros.clone(), torch.zeros_like(zeros[:, :, :1]).repeat(1, 1, self.m)

    def step(self, state, z, gz, k):
        iterates, residuals, gram = state
        building_graph = torch.is_grad_enabled() and (z.requires_grad or gz.requires_grad)
        slot, n = k % self.m, min(k + 1, self.m)  # slots 0..n-1 hold the history
        r = gz - z
        iterates = write_slot(iterates, slot, z, not building_graph)
        residuals = write_slot(residuals, slot, r, not building_graph)
        row = (residuals @ r[:, :, None])[..., 0]  # (B, m): rᵢ · r, one new Gram row: O(B m D)
        gram = write_slot(gram, slot, row, not building_graph)
        gram = write_slot(gram.transpose(1, 2), slot, row, not building_graph).transpose(1, 2)
        if n == 1:
            return z + self.beta * r, (iterates, residuals, gram)
        alpha = mixing_coefficients(gram[:, :n, :n], self.lam)
        if building_graph:
            # Unrolled: differentiate through the iterates, not through α. dα/dθ multiplies
            # residuals that vanish at convergence, but the ill-conditioned Gram solve makes
            # that product blow up numerically (seen: a 1e3× gradient after 100 iterations).
            alpha = alpha.detach()
        z_next = extrapolate(alpha, iterates[:, :n], residuals[:, :n], self.beta)
        return z_next, (iterates, residuals, gram)
