"""What a finished solve's verdicts turn into: an error, a warning, or nothing (the ``Policy``).

Eager only: it works from the status codes the eager driver already read on the host
(no extra device sync unless something failed). Under compile or vmap nothing can be
read, so nothing is raised and ``info.status`` reports it.

* NONFINITE raises ``FixedPointError`` whatever ``on_nonconvergence`` says;
* MAX_ITER / DIVERGED warn (``FixedPointWarning``) or raise (``FixedPointError``) as
  ``on_nonconvergence`` says; the message counts each code and, for an IFT derivative solve
  with ``fallback="jfb"``, says that those problems got JFB's gradient instead;
* ``report_only`` (a derivative solve of a vmapped call, run unmapped on the batch) raises
  and warns nothing, as under vmap itself.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import NamedTuple

from ._info import FixedPointError, FixedPointWarning, Info, Status
from ._loop import IterativeSolver

ON_NONCONVERGENCE = ("ignore", "warn", "raise")
_FAILED = (Status.MAX_ITER, Status.DIVERGED)


class Policy(NamedTuple):
    """What a solve does about its verdicts (see the module docstring)."""

    on_nonconvergence: str = "ignore"
    fallback: str | None = None
    report_only: bool = False


IGNORE = Policy()


def report(policy: Policy, codes: list | None, info: Info, solver: IterativeSolver, what: str) -> None:
    """Raise or warn for the verdicts of a finished solve, as ``policy`` says (``codes``: the status
    codes the eager driver read on the host, ``None`` where nothing could be read)."""
    if policy.report_only or codes is None:
        return
    if Status.NONFINITE in codes:
        _raise_nonfinite(info, what)
    if policy.on_nonconvergence == "ignore":
        return
    counts = Counter(Status(c) for c in codes if c in _FAILED)
    if not counts:
        return
    failed = sum(counts.values())
    rel = info.rel_residual.reshape(-1)
    mask = (info.status.reshape(-1) == Status.MAX_ITER) | (info.status.reshape(-1) == Status.DIVERGED)
    worst = float(rel[mask].max())
    kinds = ", ".join(f"{n} {s.name}" for s, n in sorted(counts.items()))
    raising = policy.on_nonconvergence == "raise"
    fell_back = f"; they got JFB's gradient instead (fallback={policy.fallback!r})" if policy.fallback and not raising else ""
    msg = (
        f"{what} did not converge: {failed} of {len(codes)} problem(s) stopped ({kinds}) "
        f"at rel_residual up to {worst:.3g} > tol {solver.tol:g} after {solver.max_iter} iterations "
        f"at most ({type(solver).__name__}){fell_back}. Try: {counts.most_common(1)[0][0].advice}."
    )
    if raising:
        raise FixedPointError(msg)
    warnings.warn(msg, FixedPointWarning, stacklevel=5)


def _raise_nonfinite(info: Info, what: str) -> None:
    bad = (info.status == Status.NONFINITE).reshape(-1)
    steps = sorted(set(info.nstep.reshape(-1)[bad].tolist()))
    raise FixedPointError(
        f"{what}: non-finite iterate at step {', '.join(map(str, steps))}: "
        f"residual {info.residual.reshape(-1)[bad].tolist()} "
        f"({int(bad.sum())} of {bad.numel()} problem(s); NaN/Inf values, or norms past the dtype's range). "
        f"Try: {Status.NONFINITE.advice}."
    )
