"""What every solver shares: budget and stopping options, their validation, and the step protocol.

A solver is a frozen set of hyperparameters with pure maths on ``(B, D)`` matrices:

* ``init(z, gz) -> state``: a tuple of fixed-shape tensors (history buffers, counts), each
  with the problems as its leading dim (so a subset of problems is a subset of rows). The
  entries listed in ``history`` are ring buffers that ``step`` changes only by `write_slot`
  with ``opts.inplace`` (one slot per call) and returns as the same objects when in place:
  under compile they stay outside ``torch.while_loop``'s carries, written in place;
* ``step(state, z, gz, r, k, opts) -> (z_next, state)``: one update from the current
  iterate ``z``, its image ``gz = g(z)``, the residual ``r = gz − z`` (the loop computes
  it once for its norms) and the iteration index ``k`` (a Python int eagerly, a 0-dim
  int64 tensor inside ``torch.while_loop``);
* ``observe(state, p, gp, k, opts) -> (z, gz, state)``, only for a solver whose
  ``evaluates_iterate`` is False (GMRES): ``step`` then returns the point ``p`` where ``g``
  is evaluated next (an Arnoldi direction), and ``observe`` turns ``g(p)`` into the next
  iterate and its image.

The loop (``_loop.py``) owns everything else: the budget, the stopping rule, masks,
best-so-far, the trace. ``StepOptions`` carries the two things the caller decides:
whether buffers may be written in place, and whether mixing coefficients are
differentiated (a gradient-mode decision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from .._checks import check_bool, check_finite_real, check_int, check_real
from .._stopping import Rule


class StepOptions(NamedTuple):
    """How a step may treat its state (decided by the driver and the gradient mode).

    Attributes:
        inplace: write history buffers (the state entries named by ``Solver.history``) in
            place: eager solves that build no graph, and no-grad ``torch.while_loop`` bodies,
            where those buffers live outside the loop's carries.
        constant_mixing: treat the solver's data-dependent coefficients (Anderson's α,
            Broyden's inverse-Jacobian pairs) as constants when a graph is built through
            the iterations (``Unrolled``): their derivative multiplies the residual, which
            vanishes at the fixed point, while past convergence they are rounding noise.
    """

    inplace: bool
    constant_mixing: bool


@dataclass(frozen=True)
class Solver:
    """Base of the fixed-point solvers: a frozen set of hyperparameters, no problem inside.

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
    history: ClassVar[tuple[int, ...]] = ()  # state entries written one slot per step (in place if allowed)
    evaluates_iterate: ClassVar[bool] = True  # False: g is evaluated at step's point, then `observe`
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

    @property
    def rule(self) -> Rule:
        """The stopping rule these options define (see ``Status``)."""
        return Rule(float(self.tol), float(self.atol), float(self.divergence_ratio))

    def __call__(self, g: Callable[[Any], Any], z0: Any, *, per_sample: bool = False, trace: bool = False):
        """Find a fixed point ``z = g(z)`` from ``z0`` (a tensor or pytree of tensors).

        Returns ``(g(z_K), info)``: one more application of ``g`` after the last
        iterate ``z_K`` (see ``Info``). No gradient mode is attached: call it under
        ``torch.no_grad()`` unless you mean to backpropagate through the iterations.
        Non-finite iterates raise ``FixedPointError`` eagerly, as in ``fixed_point``.
        """
        # The driver depends on this protocol, not the other way round: the convenience
        # entry hands the solver to it at call time.
        from .._solve import solve_map

        return solve_map(self, g, z0, per_sample=per_sample, trace=trace)

    def init(self, z: torch.Tensor, gz: torch.Tensor) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(  # pragma: no cover
        self, state: tuple, z: torch.Tensor, gz: torch.Tensor, r: torch.Tensor, k: Any, opts: StepOptions
    ) -> tuple:
        raise NotImplementedError

    def observe(self, state: tuple, p: torch.Tensor, gp: torch.Tensor, k: Any, opts: StepOptions) -> tuple:
        """``(z, gz, state)`` from ``gp = g(p)`` (see the module docstring); the identity here."""
        return p, gp, state
