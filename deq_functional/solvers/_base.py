"""What every solver shares: budget and stopping options, their validation, and the standalone call.

A solver is a frozen set of hyperparameters implementing the step protocol of the loop
(``_loop.IterativeSolver``: ``init``, ``step``, and ``observe`` where ``evaluates_iterate`` is
False; ``StepOptions``), which lives with the loop that calls it. ``solver(g, z0)`` hands the
solver to the solve (``_solve.solve_map``): solvers sit above the solve, which never imports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .._checks import check_bool, check_finite_real, check_int, check_real
from .._loop import IterativeSolver
from .._solve import solve_map


@dataclass(frozen=True)
class Solver(IterativeSolver):
    """Base of the fixed-point solvers: a frozen set of hyperparameters, no problem inside.

    Subclasses implement the step protocol (``init`` / ``step``, see ``_loop.IterativeSolver``).

    Attributes:
        max_iter: iteration budget (>= 1).
        tol: relative tolerance; a problem has converged when
            ``‖f(z) − z‖ <= atol + tol · ‖f(z)‖`` and, after ``z0``, its residual has at least
            halved from ``z0``'s. ``tol = atol = 0`` runs exactly ``max_iter`` iterations.
        atol: (keyword) absolute tolerance, default 0.
        divergence_ratio: (keyword) a problem whose residual exceeds this multiple of the
            smallest residual it has had is stopped as ``Status.DIVERGED``; ``math.inf``
            turns the rule off. Default 1e4; for float16 iterates a finite ratio is capped
            at 256 (√ of float16's largest value), so the iterates stop well before overflow.
        check_every: (keyword) eagerly, read the status on the host once every this many
            iterations (one device sync each; the iterations in between are masked, so
            results do not depend on it). Default 1: on a CPU a read costs about a
            microsecond; on a GPU, 4 to 16 cut the syncs.
        return_best: (keyword) return the iterate with the lowest residual seen
            (per problem) instead of the last; ``info.best_step`` says which iteration.
        compact_below: (keyword) eagerly, for the forward solve of ``fixed_point`` with
            ``per_sample=True``: once the running problems are at most this fraction of the
            problems being iterated, continue on the running ones alone (their rows of the
            state, of the solver's history and of x gathered; results scattered back at the
            end), so the tail of a batch costs what its running problems cost. Results equal
            the masked loop's up to the rounding of f on a smaller batch. It assumes f treats
            rows independently (what ``per_sample=True`` means), that the leaves of x whose
            leading dim is the batch are per-sample and that params are shared. Default 0: off.
    """

    max_iter: int = 50
    tol: float = 1e-5
    affine_only: ClassVar[bool] = False  # solves affine maps only (GMRES): refused as fixed_point's solver
    atol: float = field(default=0.0, kw_only=True)
    divergence_ratio: float = field(default=1e4, kw_only=True)
    check_every: int = field(default=1, kw_only=True)
    return_best: bool = field(default=False, kw_only=True)
    compact_below: float = field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "max_iter", self.max_iter, 1)
        check_finite_real(owner, "tol", self.tol, 0.0)
        check_finite_real(owner, "atol", self.atol, 0.0)
        check_real(owner, "divergence_ratio", self.divergence_ratio, 1.0, math.inf, open_low=True)
        check_int(owner, "check_every", self.check_every, 1)
        check_bool(owner, "return_best", self.return_best)
        check_real(owner, "compact_below", self.compact_below, 0.0, 1.0)

    def __call__(self, g: Callable[[Any], Any], z0: Any, *, per_sample: bool = False, trace: bool = False):
        """Find a fixed point ``z = g(z)`` from ``z0`` (a tensor or pytree of tensors).

        Returns ``(g(z_K), info)``: one more application of ``g`` after the last
        iterate ``z_K`` (see ``Info``). No gradient mode is attached: call it under
        ``torch.no_grad()`` unless you mean to backpropagate through the iterations.
        Non-finite iterates raise ``FixedPointError`` eagerly, as in ``fixed_point``.
        """
        return solve_map(self, g, z0, per_sample=per_sample, trace=trace)
