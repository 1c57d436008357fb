"""The one iteration driver every solver runs in (forward and adjoint solves alike).

A solver supplies ``init(z, gz) -> state`` and ``step(state, z, gz, k) -> (z_next, state)``
on ``(B, D)`` matrices; this loop owns the budget, the stopping test, the masks
that freeze converged samples, best-so-far, the residual trace and the
non-finite check.

Two regimes, chosen automatically:
  * eager (values can be read on the host): one host sync per iteration, exit as
    soon as every sample has converged, ``FixedPointError`` on a non-finite iterate;
  * traced (``torch.compile``) or mapped (``torch.func.vmap``): no value is read;
    the full ``max_iter`` budget runs with converged samples frozen by
    ``torch.where`` masks; a non-finite iterate shows as ``converged=False``
    with a non-finite ``residual``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ._flat import FlatView
from ._info import FixedPointError, make_info


def values_readable(t: torch.Tensor) -> bool:
    """True when ``t``'s values may be read on the host (not compiling, not under vmap)."""
    if torch.compiler.is_compiling():
        return False
    try:
        t.reshape(-1)[:1].tolist()
    except RuntimeError:  # vmap: data-dependent control flow is not allowed
        return False
    return True


def residuals(z: torch.Tensor, gz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row norms ``‖g(z) − z‖`` and ``‖g(z) − z‖ / (‖g(z)‖ + tiny)`` of ``(B, D)`` inputs."""
    res = torch.linalg.vector_norm(gz - z, dim=1)
    tiny = torch.finfo(res.dtype).tiny
    return res, res / (torch.linalg.vector_norm(gz, dim=1) + tiny)


def _check_finite(res: torch.Tensor, name: str, step: int) -> None:
    if not bool(torch.isfinite(res).all()):
        raise FixedPointError(
            f"{name}: non-finite iterate at step {step}: residual {res.tolist()}. "
            "Try damping (Picard(damping<1), Anderson(beta<1)), a smaller step in f, "
            "or rescaling the weights so f is contractive."
        )


def _all_done(res, rel, active, masked: bool, tol: float, name: str, step: int) -> bool:
    """Eager-only stopping test (one host sync); raises on a non-finite residual."""
    if masked:
        done, finite = torch.stack([~active.any(), torch.isfinite(res).all()]).tolist()
    else:  # one problem: read its residuals directly
        res_v, rel_v = torch.cat([res, rel]).tolist()
        done, finite = tol > 0 and rel_v <= tol, math.isfinite(res_v)
    if not finite:
        _check_finite(res, name, step)
    return done


class LoopResult(NamedTuple):
    z: Any  # z_K, the last (or best) iterate, as a pytree
    gz: Any  # g(z_K)
    info: tuple  # Info
    states: list  # detached iterates z_1..z_K as (B, D) (only when keep_states)
    view: FlatView


def iterate(
    solver,
    g: Callable[[Any], Any],
    z0: Any,
    gz0: Any,
    *,
    per_sample: bool,
    trace: bool = False,
    keep_states: bool = False,
) -> LoopResult:
    """Run ``solver`` on ``z = g(z)`` from ``z0`` (with ``gz0 = g(z0)`` already evaluated).

    Cost: ``K`` calls of ``g`` plus the solver's own work, ``K ≤ solver.max_iter``.
    """
    view = FlatView(z0, per_sample)
    z, gz = view.to_flat(z0), view.to_flat(gz0)
    batch = z.shape[0]
    readable = values_readable(gz)
    masked = per_sample or not readable  # one problem read eagerly: exit instead of masking
    tol, name = solver.tol, type(solver).__name__

    res, rel = residuals(z, gz)
    converged = rel <= tol
    active = ~converged if tol > 0 else torch.ones_like(converged)
    nstep = torch.zeros(batch, dtype=torch.long, device=z.device)
    history = [res] if trace else None
    states = []
    best = (z, gz, res, nstep.clone()) if solver.return_best else None
    state = solver.init(z, gz)

    steps = 0  # iterations run (all problems), for the unmasked eager path
    for k in range(solver.max_iter):
        if readable and _all_done(res, rel, active, masked, tol, name, k):
            break
        z_next, state = solver.step(state, z, gz, k)
        if masked:  # freeze converged problems; count iterations per problem
            z = torch.where(active[:, None], z_next, z)
            nstep = nstep + active.long()
        else:
            z = z_next
        steps += 1
        gz = view.to_flat(g(view.from_flat(z)))
        res, rel = residuals(z, gz)
        if masked and tol > 0:
            active = active & (rel > tol)
        if trace:
            history.append(res)
        if keep_states:
            states.append(z.detach())
        if best is not None:
            better = res < best[2]
            best = (
                torch.where(better[:, None], z, best[0]),
                torch.where(better[:, None], gz, best[1]),
                torch.where(better, res, best[2]),
                torch.where(better, nstep if masked else steps, best[3]),
            )

    if not masked:
        nstep = torch.full((batch,), steps, dtype=torch.long, device=z.device)
    if readable:
        _check_finite(res, name, int(nstep.max()))
    extra = {}
    if trace:
        extra["trace"] = _squeeze(torch.stack(history), per_sample)
    if best is not None:
        z, gz, _, best_step = best
        res, rel = residuals(z, gz)
        extra["best_step"] = _squeeze(best_step, per_sample)
    info = make_info(
        _squeeze(nstep, per_sample),
        _squeeze(res, per_sample),
        _squeeze(rel, per_sample),
        _squeeze(rel <= tol, per_sample),
        **extra,
    )
    return LoopResult(view.from_flat(z), view.from_flat(gz), info, states, view)


def _squeeze(t: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Drop the batch axis (dim -1 of a trace, dim 0 otherwise) when there is one problem."""
    return t if per_sample else t.squeeze(-1)


def inside_vmap() -> bool:
    """True inside ``torch.func.vmap`` (where each mapped problem is one problem).

    Reads functorch's interpreter stack, a private API: where it is missing
    (other torch versions) this answers False and ``per_sample`` is taken as given.
    """
    if torch.compiler.is_compiling():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:
        return False
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
