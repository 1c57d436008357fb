"""One iteration of a solve, written once for every driver (eager, ``torch.while_loop``, masked
budget), and the step protocol the solvers implement for it.

The loop state is a NamedTuple of fixed-shape tensors on the ``(B, D)`` form of the
state (see ``_flat.py``); ``Loop.body`` maps it to the next one and is pure apart from
the in-place history writes that ``StepOptions.inplace`` allows. The drivers in
``_drivers.py`` decide how often it runs and what is read on the host. A solver is a
frozen set of options with pure maths on ``(B, D)`` matrices (`IterativeSolver`); the loop
owns everything else: the budget, the stopping rule, masks, best-so-far, the trace.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from ._flat import row_norms, write_slot
from ._info import Info, Status, make_info
from ._stopping import RUNNING, Rule


class StepOptions(NamedTuple):
    """How a step may treat its state (decided by the driver and the gradient mode).

    Attributes:
        inplace: write the history buffers (the state entries named by ``history``) in
            place: eager solves that build no graph, and no-grad ``torch.while_loop`` bodies,
            where those buffers live outside the loop's carries.
        constant_mixing: treat the solver's data-dependent coefficients (Anderson's α,
            Broyden's inverse-Jacobian pairs) as constants when a graph is built through
            the iterations (``Unrolled``): their derivative multiplies the residual, which
            vanishes at the fixed point, while past convergence they are rounding noise.
    """

    inplace: bool
    constant_mixing: bool


class IterativeSolver:
    """The step protocol the loop calls, with the options it reads (the base of ``Solver``).

    Options (frozen dataclass fields of the concrete solver): ``max_iter``, ``tol``, ``atol``,
    ``divergence_ratio`` (the stopping `rule`), ``check_every``, ``return_best``,
    ``compact_below``. Class attributes: ``history``, the indices of the state entries that are
    ring buffers, written one slot per step by ``_flat.write_slot`` with ``opts.inplace`` and
    returned as the same objects when in place (under compile they live outside the loop's
    carries); ``evaluates_iterate``: False where ``step`` returns the point at which ``g`` is
    evaluated next rather than the next iterate (then `observe` names the iterate).
    """

    max_iter: int
    tol: float
    atol: float
    divergence_ratio: float
    check_every: int
    return_best: bool
    compact_below: float
    history: ClassVar[tuple[int, ...]] = ()
    evaluates_iterate: ClassVar[bool] = True

    @property
    def rule(self) -> Rule:
        """The stopping rule these options define (see ``Status``)."""
        return Rule(float(self.tol), float(self.atol), float(self.divergence_ratio))

    def init(self, z: torch.Tensor, gz: torch.Tensor) -> tuple:
        """The solver's state before iteration 0.

        Args:
            z: ``(B, D)`` the initial iterate ``z_0`` (B problems of D unknowns).
            gz: ``(B, D)`` its image ``g(z_0)``.

        Returns:
            a tuple of fixed-shape tensors, each with the B problems as its leading dim (so a
            subset of problems is a subset of rows), in the work dtype (float32 for half states)
            or wider (Anderson's float64 Gram matrix).
        """
        raise NotImplementedError

    def step(
        self, state: tuple, z: torch.Tensor, gz: torch.Tensor, r: torch.Tensor, k: Any, opts: StepOptions
    ) -> tuple[torch.Tensor, tuple]:
        """Iteration ``k``: ``(z_next, state)``.

        Args:
            state: from `init` or the last step.
            z, gz, r: ``(B, D)`` the iterate ``z_k``, its image ``g(z_k)`` and the residual
                ``g(z_k) − z_k`` (computed once by the loop for its norms).
            k: the iteration index: a Python int eagerly, a 0-dim int64 tensor inside
                ``torch.while_loop`` / ``scan`` (then no shape may depend on it).
            opts: in-place history writes and constant mixing (`StepOptions`).

        Returns:
            ``z_{k+1}`` ``(B, D)`` in ``z``'s dtype (or, when ``evaluates_iterate`` is False,
            the point where ``g`` is evaluated next) and the new state.
        """
        raise NotImplementedError

    def observe(self, state: tuple, p: torch.Tensor, gp: torch.Tensor, k: Any, opts: StepOptions) -> tuple:
        """Only for ``evaluates_iterate = False`` (GMRES): ``(z_{k+1}, g(z_{k+1}), state)`` from the
        point ``p`` ``(B, D)`` that `step` returned and ``gp = g(p)``."""
        raise NotImplementedError


class LoopState(NamedTuple):
    """Everything carried from one iteration to the next (all tensors; empty tuples when unused).

    Attributes:
        z, gz, r: ``(B, D)`` iterate, its image ``g(z)`` and the residual ``g(z) − z``.
        res, scale: ``(B,)`` ``‖g(z) − z‖`` and ``‖g(z)‖`` (float32 for half states).
        res_min: ``(B,)`` smallest residual so far (the divergence rule).
        res_start: ``(B,)`` the residual of ``z0`` (CONVERGED needs progress from it).
        status: ``(B,)`` int64, ``RUNNING`` or a final ``Status`` code.
        nstep: ``(B,)`` int64 iterations taken.
        best: ``()`` or ``(z, gz, res, step)`` of the lowest-residual iterate (``return_best``).
        trace: ``()`` or ``((max_iter+1, B) residuals, NaN once stopped,)`` (``trace=True``).
        solver: the solver's own fixed-shape state.
    """

    z: torch.Tensor
    gz: torch.Tensor
    r: torch.Tensor
    res: torch.Tensor
    scale: torch.Tensor
    res_min: torch.Tensor
    res_start: torch.Tensor
    status: torch.Tensor
    nstep: torch.Tensor
    best: tuple
    trace: tuple
    solver: tuple

    def take_rows(self, rows: torch.Tensor) -> LoopState:
        """The state of the problems ``rows`` only (a 1-D index): every tensor's batch rows (the
        leading dim; dim 1 of the trace)."""
        return _zip_rows(lambda dim, t: t.index_select(dim, rows), self)

    def put_rows(self, rows: torch.Tensor, sub: LoopState) -> LoopState:
        """This state with the problems ``rows`` replaced by ``sub`` (from `take_rows`)."""
        return _zip_rows(lambda dim, t, u: t.index_copy(dim, rows, u), self, sub)


_GROUPS = {"best": 0, "trace": 1, "solver": 0}  # the fields holding tuples of tensors, and their batch dim


def _zip_rows(fn: Callable[..., torch.Tensor], *states: LoopState) -> LoopState:
    """``fn(batch dim, *tensors)`` over the corresponding tensors of ``states`` (the trace's batch is dim 1)."""

    def field(name: str) -> Any:
        values = [getattr(s, name) for s in states]
        if name not in _GROUPS:
            return fn(0, *values)
        return tuple(fn(_GROUPS[name], *ts) for ts in zip(*values, strict=True))

    return LoopState._make([field(name) for name in LoopState._fields])


class Loop:
    """The static set-up of one solve: the solver, the map on ``(B, D)`` matrices, and options.

    Args:
        solver: the solver (its options give the budget and the stopping rule).
        g: ``(B, D) -> (B, D)``, the map whose fixed point is sought.
        opts: in-place history writes / constant mixing, passed to the solver's step.
        inplace: the loop's own buffers (the trace) may be written in place (eager, no graph).
        dtype: the iterates' dtype (the stopping rule depends on it: `Rule.for_state`).
        trace: keep the residual of every iteration.
        classifies_on_host: the driver classifies on the host (eager, one problem, a read after every
            iteration, so it stops right after the problem does): the body leaves ``status``,
            ``nstep`` and ``res_min`` alone and masks nothing. Otherwise stopped problems are
            masked out of every update (iterations run between reads: per-problem batches,
            ``check_every > 1``, compile, vmap).
    """

    def __init__(
        self, solver: IterativeSolver, g: Callable[[torch.Tensor], torch.Tensor], *,
        opts: StepOptions, inplace: bool, trace: bool, dtype: torch.dtype, classifies_on_host: bool = False,
    ):
        self.solver, self.g, self.opts, self.inplace, self.trace = solver, g, opts, inplace, trace
        self.classifies_on_host = classifies_on_host
        self.rule = solver.rule.for_state(dtype)
        self.autocast = False  # set by init: whether the user's autocast is on for z's device

    def with_map(self, g: Callable[[torch.Tensor], torch.Tensor]) -> Loop:
        """This loop on another map (the same problems' subset: see ``LoopState.take_rows``)."""
        other = copy.copy(self)
        other.g = g
        return other

    def init(self, z: torch.Tensor, gz: torch.Tensor) -> LoopState:
        r = gz - z
        res, scale = row_norms(r), row_norms(gz)
        status = self.rule.initial(res, scale)
        nstep = torch.zeros(res.shape, dtype=torch.int64, device=res.device)
        best = (z, gz, res, nstep) if self.solver.return_best else ()
        trace = ()
        if self.trace:
            rows = torch.full((self.solver.max_iter + 1, *res.shape), torch.nan, dtype=res.dtype, device=res.device)
            trace = (write_slot(rows, 0, 0, res, self.inplace),)
        self.autocast = torch.is_autocast_enabled(z.device.type)
        with self._no_autocast(z):
            solver_state = self.solver.init(z, gz)
        return LoopState(z, gz, r, res, scale, res, res, status, nstep, best, trace, solver_state)

    def _no_autocast(self, z: torch.Tensor):
        """Solver maths runs in the state's own dtype even inside the user's autocast."""
        return torch.autocast(z.device.type, enabled=False) if self.autocast else contextlib.nullcontext()

    def body(self, k: Any, s: LoopState) -> LoopState:
        """Iteration ``k`` (int, or 0-dim int64 tensor inside ``torch.while_loop``): ``z_k -> z_{k+1}``."""
        with self._no_autocast(s.z):
            z, solver_state = self.solver.step(s.solver, s.z, s.gz, s.r, k, self.opts)
        if self.classifies_on_host:  # runs only while the one problem is running
            running = None
            status, nstep, res_min = s.status, s.nstep, s.res_min
        else:
            running = s.status == RUNNING
            z = torch.where(running[:, None], z, s.z)
        gz = self.g(z)
        if not self.solver.evaluates_iterate:  # g ran at the solver's point: it names the iterate
            with self._no_autocast(s.z):
                z, gz, solver_state = self.solver.observe(solver_state, z, gz, k, self.opts)
            z, gz = z.to(s.z.dtype), gz.to(s.z.dtype)
            if running is not None:
                z, gz = torch.where(running[:, None], z, s.z), torch.where(running[:, None], gz, s.gz)
        r = gz - z
        res, scale = row_norms(r), row_norms(gz)
        if running is not None:
            status = self.rule.update(s.status, res, scale, s.res_min, s.res_start)
            nstep, res_min = s.nstep + running, torch.minimum(s.res_min, res)
        best = s.best
        if best:
            better = res < best[2]
            best = (
                torch.where(better[:, None], z, best[0]),
                torch.where(better[:, None], gz, best[1]),
                torch.where(better, res, best[2]),
                torch.where(better, k + 1 if running is None else nstep, best[3]),
            )
        trace = s.trace
        if trace:
            row = res if running is None else torch.where(running, res, torch.nan)
            trace = (write_slot(trace[0], 0, k + 1, row, self.inplace),)
        return LoopState(z, gz, r, res, scale, res_min, s.res_start, status, nstep, best, trace, solver_state)

    def confirm(self, s: LoopState) -> LoopState:
        """For a solver whose residual is its own estimate (``evaluates_iterate = False``: GMRES's
        Krylov residual): ``g`` at the final iterate, its true residual and norms, and CONVERGED
        only where the true residual passes the rule too (else MAX_ITER; NONFINITE if it is not
        finite). Cost: one more call of ``g``."""
        gz = self.g(s.z)
        r = gz - s.z
        res, scale = row_norms(r), row_norms(gz)
        finite = (res < math.inf) & (scale < math.inf)
        passed = self.rule.converged(res, scale, s.res_start)
        verdict = torch.where(finite, torch.where(passed, int(Status.CONVERGED), int(Status.MAX_ITER)), int(Status.NONFINITE))
        status = torch.where(s.status == int(Status.CONVERGED), verdict, s.status)
        return s._replace(gz=gz, r=r, res=res, scale=scale, status=status)

    def finish(self, s: LoopState, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor, Info]:
        """``(z_K, g(z_K), info)`` with final status codes; info tensors detached."""
        status = self.rule.final(s.status, s.res, s.scale, s.res_start)
        z, gz, res, scale = s.z, s.gz, s.res, s.scale
        extra = {}
        if s.best:
            z, gz, res, best_step = s.best
            scale = row_norms(gz)
            extra["best_step"] = best_step
        if s.trace:
            extra["trace"] = s.trace[0]
        rel = res / (scale + torch.finfo(scale.dtype).tiny)
        squeeze = (lambda t: t.detach()) if per_sample else (lambda t: t.detach().squeeze(-1))
        info = make_info(
            squeeze(s.nstep), squeeze(res), squeeze(rel), squeeze(status),
            **{name: squeeze(extra[name]) for name in sorted(extra)},
        )
        return z, gz, info
