"""Anderson acceleration (type II), batched over independent problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Solver, check_int, check_real


def mixing_coefficients(residuals: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Solve ``min_α ‖Σᵢ αᵢ rᵢ‖²`` s.t. ``Σᵢ αᵢ = 1`` with a ridge relative to the Gram scale.

    Args:
        residuals: ``(B, n, D)`` history of residuals ``rᵢ = g(zᵢ) − zᵢ``.
        lam: ridge λ relative to ``mean(diag(H))``; it stays relative as the residuals
            shrink, so Anderson does not degrade into averaging near convergence.

    Returns:
        ``(B, n)`` coefficients α summing to 1, from ``(H/s + (λ+ε)I) w = 1``, ``α = w / Σw``
        with ``H = R Rᵀ``, ``s = mean(diag H)`` (ε the dtype's epsilon keeps an all-zero
        history finite). Cost: ``O(B n² D)``.
    """
    gram = residuals @ residuals.transpose(1, 2)
    n = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None] + torch.finfo(gram.dtype).tiny
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    ridge = lam + torch.finfo(gram.dtype).eps
    w = torch.linalg.solve(gram / scale + ridge * eye, torch.ones_like(gram[..., :1]))[..., 0]
    return w / w.sum(dim=1, keepdim=True)


def extrapolate(alpha: torch.Tensor, iterates: torch.Tensor, residuals: torch.Tensor, beta: float) -> torch.Tensor:
    """``z_next = Σᵢ αᵢ zᵢ + β Σᵢ αᵢ rᵢ = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``; shapes ``(B,n)``, ``(B,n,D)``."""
    a = alpha[:, None, :]
    return (a @ iterates)[:, 0] + beta * (a @ residuals)[:, 0]


def push(history: tuple, item: torch.Tensor, m: int) -> tuple:
    """Append ``item``, dropping the oldest entry beyond ``m`` (functional: no in-place writes)."""
    return (history + (item,))[-m:]


@dataclass(frozen=True)
class Anderson(Solver):
    r"""Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations").

    With the last ``n = min(k+1, m)`` iterates ``zᵢ`` and residuals ``rᵢ = g(zᵢ) − zᵢ``:
    ``α = argmin ‖Σ αᵢ rᵢ‖ s.t. Σ αᵢ = 1`` (ridge-regularised), then
    ``z_{k+1} = (1 − β) Σ αᵢ zᵢ + β Σ αᵢ g(zᵢ)``. With ``m = 1`` it is damped Picard.
    Cost per iteration: one ``g`` call plus ``O(B m² D)``; memory ``2 m B D``.

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
        return (), ()

    def step(self, state, z, gz, k):
        iterates, residuals = push(state[0], z, self.m), push(state[1], gz - z, self.m)
        if len(iterates) == 1:
            z_next = z + self.beta * residuals[0]
        else:
            Z, R = torch.stack(iterates, dim=1), torch.stack(residuals, dim=1)
            z_next = extrapolate(mixing_coefficients(R, self.lam), Z, R, self.beta)
        return z_next, (iterates, residuals)
