r"""Power iteration on a linear operator given as a function, and its start vectors.

One loop serves every norm or eigenvalue estimate in the library:

* the spectral norm of a weight matrix ``M`` (`deq_functional.spectral_normalize`):
  iterate ``u ↦ M Mᵀ u``; ``σ̂ = ‖Mᵀ u‖``;
* the operator norm of a convolution ``A`` (`deq_functional.conv_lipschitz_rescale`,
  ``models.conv.lipschitz_bound``): iterate ``x ↦ Aᵀ A x`` (``Aᵀ`` = transposed convolution);
  ``σ̂ = ‖A x‖``;
* the spectral radius of a Jacobian (`deq_functional.spectral_radius`): iterate
  ``v ↦ Jᵀ v`` (one vjp), on a pytree, with one norm per sample.

For the norm of an operator ``B`` the iterate is a unit vector ``x`` in ``B``'s input space and
``σ̂ = ‖B x‖ = sqrt(xᵀ BᵀB x) ≤ ‖B‖₂`` for any unit ``x``: the estimate never overshoots, and
rises to ``‖B‖₂`` as ``x`` turns to the top right singular vector (the angle shrinking like
``(σ₂/σ₁)^{2k}`` after ``k`` steps, the relative error of ``σ̂`` like its square).

Every function here is plain tensor code (no ``.item()``, no data-dependent branch), so it
runs inside ``torch.compile(fullgraph=True)`` and ``vmap``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

EPS = 1e-12  # keeps a zero vector zero instead of NaN in unit()


def unit(v: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v / (‖v‖ + eps), ‖v‖)``: the direction of ``v`` (any shape, one norm over all elements)."""
    norm = torch.linalg.vector_norm(v)
    return v / (norm + eps), norm


def power_iteration(
    op: Callable[[Any], Any],
    v: Any,
    n_iter: int,
    normalize: Callable[[Any], tuple[Any, torch.Tensor]] = unit,
) -> tuple[Any, torch.Tensor]:
    r"""``n_iter`` steps of ``v ← normalize(op(v))``; returns the last ``v`` and the last norm.

    With ``w_k = op(v_k)``:

        v_{k+1} = w_k / ‖w_k‖,      ρ̂_k = ‖w_k‖,      k = 0 .. n_iter−1

    For a linear ``op`` whose eigenvalue ``λ₁`` of largest modulus is unique in modulus,
    ``v_k`` tends to its eigenvector and ``ρ̂_k → |λ₁|`` with error ``O(|λ₂/λ₁|^k)``. With
    ``op = BᵀB`` (symmetric, eigenvalues ``σ_i²``) ``v_k`` tends to the top right singular
    vector of ``B``; the caller then reads ``σ̂ = ‖B v‖`` (differentiably, if it needs a gradient).

    Args:
        op: the linear operator, ``v -> op(v)`` of the same structure and shapes as ``v``.
            Pass it detached weights: the loop keeps no graph on purpose.
        v: start vector (a tensor, or whatever ``op`` and ``normalize`` take, e.g. a pytree).
            Need not be a unit vector; it must not be orthogonal to the top eigenvector.
        n_iter: number of steps (``>= 1``; the caller validates it).
        normalize: ``w -> (w / ‖w‖, ‖w‖)``; default `unit`. Pass a per-sample version
            to run ``B`` independent iterations at once (``‖w‖`` then has shape ``(B,)``).

    Returns:
        ``(v_n, ρ̂_{n−1})``: the last unit iterate and ``‖op(v_{n−1})‖``.

    Cost: ``n_iter`` applications of ``op`` and of ``normalize``; memory of two iterates.

    References:
        von Mises & Pollaczek-Geiringer, "Praktische Verfahren der Gleichungsauflösung",
        ZAMM 1929 (power iteration). Golub & Van Loan, "Matrix Computations", §7.3.1.
    """
    v, norm = normalize(op(v))
    for _ in range(n_iter - 1):
        v, norm = normalize(op(v))
    return v, norm


def random_unit(shape: tuple, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian random unit vector of ``shape`` in ``like``'s dtype and device (almost surely
    not orthogonal to any fixed vector, so a valid power-iteration start)."""
    v = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    return unit(v)[0]


def start_vector(
    state: dict | None, key: str, shape: tuple, like: torch.Tensor, generator: torch.Generator | None, owner: str
) -> torch.Tensor:
    """The start vector for ``key``: ``state[key]`` (detached, cast like ``like``), or a random
    unit vector when ``state`` is ``None``.

    ``state`` is the ``{key: vector}`` dict a previous call returned, so one power-iteration
    step per call keeps tracking a slowly moving top singular vector (warm start).

    Raises:
        ValueError: ``state`` has no vector for ``key``, or one of another shape; the message
            names ``owner`` and says to pass ``state=None`` to restart.
    """
    if state is None:
        return random_unit(shape, like, generator)
    if key not in state:
        raise ValueError(
            f"{owner}: state has no vector for {key!r} (it holds {sorted(state)}); pass state=None to restart"
        )
    v = state[key]
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(shape):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(
            f"{owner}: state[{key!r}] has shape {got}, expected {tuple(shape)}; pass state=None to restart"
        )
    return v.detach().to(dtype=like.dtype, device=like.device)
