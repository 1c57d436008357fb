"""Jacobian diagnostics and penalties at a fixed point, from vector-Jacobian products only.

``J = ∂f(params, z, x)/∂z`` at ``z = z_star`` is never formed: both functions
use ``torch.func.vjp`` (one forward of ``f``, then one backward per product).
``z_star`` may be a tensor or a pytree (dict / list / tuple) of tensors; it is
treated as a constant (detached), as in Bai et al., so the gradient of the
penalty reaches ``params`` (and ``x``) through ``J`` itself.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch

from ._checks import check_choice, check_int
from ._flat import common_batch
from ._power import power_iteration
from ._tree import describe, flatten, tree_map

__all__ = ["jacobian_frobenius", "spectral_radius"]

_PROBES = ("gaussian", "rademacher")


def _leaves(tree: Any, what: str, fn: str) -> list[torch.Tensor]:
    leaves = flatten(tree)[0]
    if not leaves or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in leaves):
        raise ValueError(f"{fn}: {what} must be a floating tensor or a pytree of them, got {describe(tree)}")
    return leaves


def _sq_norm(tree: Any, per_sample: bool) -> torch.Tensor:
    """Σ of squares over all leaves: a scalar, or ``(B,)`` over non-batch dims when ``per_sample``."""
    leaves = flatten(tree)[0]
    if per_sample:
        return torch.stack([t.reshape(t.shape[0], -1).pow(2).sum(1) for t in leaves]).sum(0)
    return torch.stack([t.pow(2).sum() for t in leaves]).sum()


def _scale(tree: Any, s: torch.Tensor, per_sample: bool) -> Any:
    """Multiply every leaf by ``s`` (a scalar, or ``(B,)`` broadcast over each leaf's batch dim)."""
    if per_sample:
        return tree_map(lambda t: t * s.reshape(-1, *([1] * (t.dim() - 1))), tree)
    return tree_map(lambda t: t * s, tree)


def _unit(tree: Any, per_sample: bool) -> tuple[Any, torch.Tensor]:
    """``(tree / ‖tree‖, ‖tree‖)``: one norm over all leaves, or one per sample ``(B,)`` when ``per_sample``."""
    norm = _sq_norm(tree, per_sample).sqrt()
    return _scale(tree, 1.0 / (norm + torch.finfo(norm.dtype).tiny), per_sample), norm


def _probe(like: torch.Tensor, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _pullback(f: Callable, params: Any, z_star: Any, x: Any) -> tuple[Any, Callable]:
    z = tree_map(torch.Tensor.detach, z_star)
    out, pull = torch.func.vjp(lambda z: f(params, z, x), z)[:2]
    return out, lambda v: pull(v)[0]


def jacobian_frobenius(
    f: Callable[[Any, Any, Any], Any],
    params: Any,
    z_star: Any,
    x: Any,
    n_samples: int = 1,
    *,
    generator: torch.Generator | None = None,
    probe: str = "gaussian",
    per_sample: bool = False,
) -> torch.Tensor:
    r"""Hutchinson estimate of ``‖J‖²_F / d`` with ``J = ∂f/∂z`` at ``z_star``, differentiable in params.

    With probes ``ε`` (i.i.d., ``E[ε εᵀ] = I``) shaped like ``f``'s output:

        ‖J‖²_F = E_ε ‖εᵀ J‖²   ≈   (1/n) Σ_{i=1..n} ‖ε_iᵀ J‖²,     returned: that / d

    where ``d`` is the number of elements of ``z_star`` (the whole batch when
    ``per_sample=False``, exactly as in Bai et al.'s code; one sample's when
    ``per_sample=True``). Unbiased for any ``n_samples``; the estimate's
    variance is ``2‖JᵀJ‖²_F / n`` for Gaussian probes and
    ``2(‖JᵀJ‖²_F − Σ_i (JJᵀ)_ii²) / n`` for Rademacher ones (never larger).
    Add ``γ · jacobian_frobenius(...)`` to the training loss to keep ``f``
    contractive around its fixed points (Bai, Koltun, Kolter 2021).

    Cost: one forward of ``f`` plus ``n_samples`` vjps; the graph for
    ``backward`` holds those vjps (double backward through ``f``).

    Args:
        f: ``f(params, z, x) -> z_next``, a pure function.
        params: pytree of weights; the result is differentiable w.r.t. them (and ``x``).
        z_star: the point to differentiate at, tensor or pytree; detached here.
        x: injected input, passed to ``f`` unchanged.
        n_samples: number of probes (>= 1).
        generator: optional ``torch.Generator`` for the probes. Under ``torch.func.vmap``
            pass ``randomness="different"`` (or ``"same"``) to ``vmap``.
        probe: ``"gaussian"`` or ``"rademacher"`` (±1 entries).
        per_sample: if True, the leading dim of every leaf is a batch of independent
            problems (``f`` must not mix samples) and the result has shape ``(B,)``;
            its mean equals the ``per_sample=False`` value.

    Returns:
        Scalar tensor (or ``(B,)`` with ``per_sample``) in the dtype of ``f``'s output.

    Raises:
        ValueError: ``n_samples < 1``, unknown ``probe``, non-floating ``z_star``, or
            (``per_sample``) leaves without a common leading dim.

    References:
        Bai, Koltun, Kolter. "Stabilizing Equilibrium Models by Jacobian
        Regularization", ICML 2021. Hutchinson, "A stochastic estimator of the
        trace of the influence matrix", 1989.

    Supports: backward / torch.func.grad (w.r.t. params, x), torch.func.vmap (with ``randomness=``).

    Examples:
        >>> import torch, deq_functional as dq
        >>> f = lambda p, z, x: torch.tanh(z @ p["W"].T + x)
        >>> params = {"W": (0.5 * torch.eye(3)).requires_grad_()}
        >>> z, x = torch.zeros(1, 3), torch.zeros(1, 3)
        >>> pen = dq.jacobian_frobenius(f, params, z, x, n_samples=4, probe="rademacher")
        >>> round(pen.item(), 4)   # J = 0.5·I exactly: each ‖εᵀJ‖² = 0.75, d = 3
        0.25
        >>> pen.backward()
    """
    fn = "jacobian_frobenius"
    check_int(fn, "n_samples", n_samples, 1)
    check_choice(fn, "probe", probe, _PROBES)
    z_leaves = _leaves(z_star, "z_star", fn)
    if per_sample:
        batch = common_batch(z_leaves, f"{fn}(per_sample=True)", "z_star")
        dim = sum(t.numel() for t in z_leaves) // batch
    else:
        dim = sum(t.numel() for t in z_leaves)
    out, pull = _pullback(f, params, z_star, x)
    probes = (tree_map(lambda t: _probe(t, probe, generator), out) for _ in range(n_samples))
    total = torch.stack([_sq_norm(pull(eps), per_sample) for eps in probes]).sum(0)
    return total / (n_samples * dim)


def spectral_radius(
    f: Callable[[Any, Any, Any], Any],
    params: Any,
    z_star: Any,
    x: Any,
    n_iter: int = 50,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    r"""Power-iteration estimate of the spectral radius ``ρ(J) = max |λ(J)|`` of ``J = ∂f/∂z`` at ``z_star``.

    Iterates on ``Jᵀ`` (one vjp per step) from a random unit ``v_0``:

        w_k = Jᵀ v_k,    ρ̂_k = ‖w_k‖,    v_{k+1} = w_k / ‖w_k‖

    and returns ``ρ̂`` after ``n_iter`` steps. ``Jᵀ`` has the same eigenvalues
    as ``J``, so when the largest-modulus eigenvalue ``λ_1`` is unique in modulus
    (e.g. real and simple), ``v_k`` tends to its eigenvector and ``ρ̂ → |λ_1| = ρ(J)``
    with error ``O(|λ_2/λ_1|^k)``. This is the **spectral radius**, not the spectral
    norm: ``ρ(J) ≤ ‖J‖₂``, with equality when ``J`` is normal (e.g. symmetric).
    If the dominant eigenvalues are a complex pair (or ``±λ``), ``v_k`` does not
    settle and ``ρ̂`` oscillates within ``[ρ(J) − …, ‖J‖₂]``; use more iterations and read it as
    an indication only. ``ρ(J) < 1`` is the local condition for Picard iteration
    to converge at ``z_star``.

    A monitoring tool (as in Bai et al.'s plots): computed without a graph and
    returned detached. To penalise the Jacobian use `jacobian_frobenius`.

    Cost: one forward of ``f`` plus ``n_iter`` vjps, no graph kept.

    Args:
        f: ``f(params, z, x) -> z_next``.
        params: as for `jacobian_frobenius`.
        z_star: as for `jacobian_frobenius`.
        x: as for `jacobian_frobenius`.
        n_iter: power iterations (>= 1).
        generator: optional ``torch.Generator`` for ``v_0``.
        per_sample: if True, one estimate per leading-dim sample, shape ``(B,)``
            (``f`` must not mix samples).

    Returns:
        Detached tensor: scalar, or ``(B,)`` with ``per_sample``.

    Raises:
        ValueError: ``n_iter < 1``, non-floating ``z_star``, or (``per_sample``) leaves
            without a common leading dim.

    References:
        Bai, Koltun, Kolter. "Stabilizing Equilibrium Models by Jacobian Regularization",
        ICML 2021 (spectral radius of ``J_f`` at the equilibrium as a stability diagnostic).
        von Mises & Pollaczek-Geiringer, power iteration, 1929.

    Supports: eager, torch.func.vmap (with ``randomness=``); the result carries no gradient.

    Examples:
        >>> import torch, deq_functional as dq
        >>> f = lambda p, z, x: z @ p["A"].T + x
        >>> params = {"A": torch.tensor([[0.5, 2.0], [0.0, -0.8]])}  # eigenvalues 0.5, -0.8
        >>> rho = dq.spectral_radius(f, params, torch.zeros(2), torch.zeros(2), n_iter=200)
        >>> round(rho.item(), 4)
        0.8
    """
    fn = "spectral_radius"
    check_int(fn, "n_iter", n_iter, 1)
    z_leaves = _leaves(z_star, "z_star", fn)
    if per_sample:
        common_batch(z_leaves, f"{fn}(per_sample=True)", "z_star")
    with torch.no_grad():
        params = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, params)
        x = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)
        out, pull = _pullback(f, params, z_star, x)
        if [t.shape for t in flatten(out)[0]] != [t.shape for t in z_leaves]:
            raise ValueError(
                f"{fn}: f must map z to the same structure and shapes (square Jacobian); "
                f"z_star is {describe(z_star)} but f returned {describe(out)}"
            )
        unit = partial(_unit, per_sample=per_sample)
        v, _ = unit(tree_map(lambda t: torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device), out))
        _, rho = power_iteration(pull, v, n_iter, unit)
    return rho
