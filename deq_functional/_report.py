"""The ``on_nonconvergence`` policy: turn MAX_ITER / DIVERGED problems into a warning or an error.

Eager only: it works from the status codes the eager driver already read on the host
(no extra device sync unless something failed). Under compile or vmap nothing can be
read, so nothing is raised and ``info.status`` reports it.
"""

from __future__ import annotations

import warnings
from collections import Counter

from ._info import FixedPointError, FixedPointWarning, Info, Status
from .solvers._base import Solver

ON_NONCONVERGENCE = ("ignore", "warn", "raise")
_FAILED = (Status.MAX_ITER, Status.DIVERGED)


def apply_policy(policy: str, host_status: list | None, info: Info, solver: Solver, what: str) -> None:
    """Warn (``FixedPointWarning``) or raise (``FixedPointError``) if a problem ended MAX_ITER or DIVERGED."""
    if policy == "ignore" or host_status is None:
        return
    counts = Counter(Status(c) for c in host_status if c in _FAILED)
    if not counts:
        return
    failed = sum(counts.values())
    rel = info.rel_residual.reshape(-1)
    mask = (info.status.reshape(-1) == Status.MAX_ITER) | (info.status.reshape(-1) == Status.DIVERGED)
    worst = float(rel[mask].max())
    kinds = ", ".join(f"{n} {s.name}" for s, n in sorted(counts.items()))
    msg = (
        f"{what} did not converge: {failed} of {len(host_status)} problem(s) stopped ({kinds}) "
        f"at rel_residual up to {worst:.3g} > tol {solver.tol:g} after {solver.max_iter} iterations "
        f"at most ({type(solver).__name__}). Try: {counts.most_common(1)[0][0].advice}."
    )
    if policy == "raise":
        raise FixedPointError(msg)
    warnings.warn(msg, FixedPointWarning, stacklevel=4)
