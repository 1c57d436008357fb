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
    return (a @ (iterates + beta * residuals) if beta != 1.0 else a @ (iterates + residuals))[:, 0]


def push(history: torch.Tensor | None, item: torch.Tensor, m: int) -> torch.Tensor:
    """Append ``item (B, D)`` to ``history (B, n, D)``, dropping the oldest beyond ``m``.

    Functional (one copy of the kept history), so it works under autograd, vmap and compile.
    """
    item = item[:, None]
    if history is None:
        return item
    return torch.cat([history[:, 1:] if history.shape[1] == m else history, item], dim=1)


def push_gram(gram: torch.Tensor | None, residuals: torch.Tensor, m_full: bool) -> torch.Tensor:
    """Gram matrix of ``residuals (B, n, D)`` after a push, updated with one new row: ``O(B n D)``.

    ``gram`` is the previous ``(B, n', n')`` matrix; ``m_full`` says the push dropped the oldest entry.
    """
    row = (residuals @ residuals[:, -1, :, None])[..., 0]  # (B, n): rᵢ · r_new
    if gram is None:
        return row[:, :, None]
    if m_full:
        gram = gram[:, 1:, 1:]
    return torch.cat([torch.cat([gram, row[:, :-1, None]], dim=2), row[:, None, :]], dim=1)


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
        return None, None, None  # iterates (B,n,D), residuals (B,n,D), Gram (B,n,n)

    def step(self, state, z, gz, k):
        iterates, residuals, gram = state
        full = iterates is not None and iterates.shape[1] == self.m
        r = gz - z
        iterates, residuals = push(iterates, z, self.m), push(residuals, r, self.m)
        gram = push_gram(gram, residuals, full)
        if iterates.shape[1] == 1:
            z_next = z + self.beta * r
        else:
            z_next = extrapolate(mixing_coefficients(gram, self.lam), iterates, residuals, self.beta)
        return z_next, (iterates, residuals, gram)
