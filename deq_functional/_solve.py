"""Solve ``z = g(z)`` on a pytree: pick the driver for where we run, run the loop, report.

Shared by the forward solve of ``fixed_point``, IFT's adjoint solve and the
standalone ``solver(g, z0)`` call.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import torch

from ._drivers import Compaction, confirmed, run_budget, run_eager, run_eager_single, run_scan, run_while_loop
from ._flat import FlatView
from ._info import FixedPointWarning, Info
from ._loop import IterativeSolver, Loop, StepOptions
from ._report import IGNORE, Policy, report
from ._transforms import CAPTURED_LOOP_WRITES, Regime, regime
from ._tree import describe, flatten, same_layout


class States:
    """The kept iterates of a solve: ``(B, D)`` rows (a list, or a stacked ``(K, B, D)`` tensor from
    `run_scan`), turned into pytrees shaped like ``z0`` when indexed."""

    def __init__(self, view: FlatView, rows: Any):
        self.view, self.rows = view, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.view.from_flat(self.rows[i])

    def at(self, i: torch.Tensor) -> Any:
        """The iterate at a 0-dim tensor index (under compile or vmap, where ``i`` is not a number)."""
        rows = self.rows if isinstance(self.rows, torch.Tensor) else torch.stack(self.rows)
        return self.view.from_flat(rows.index_select(0, i.reshape(1)).squeeze(0))


class Solution(NamedTuple):
    """A finished solve, as pytrees shaped like ``z0``.

    Attributes:
        z: the last iterate ``z_K`` (or the best one with ``return_best``).
        answer: ``g(z_K)``, one more application of ``g``: what a solve returns (the
            counting contract), and the differentiable path for ``Unrolled``.
        info: the report.
        states: the detached iterates ``z_1 .. z_K`` when ``keep_states``, else empty: a
            sequence whose items are made pytrees when read (under compile only the ones read
            enter the graph).
    """

    z: Any
    answer: Any
    info: Info
    states: States


def iterate(
    solver: IterativeSolver,
    g: Callable[[Any], Any],
    z0: Any,
    gz0: Any,
    *,
    per_sample: bool,
    what: str,
    owner: str = "fixed_point",
    trace: bool = False,
    keep_states: bool = False,
    policy: Policy = IGNORE,
    graph: bool = False,
    constant_mixing: bool = False,
    restrict: Callable[[torch.Tensor], Callable[[Any], Any]] | None = None,
    history_outside_loop: bool = CAPTURED_LOOP_WRITES,
    rows_are_problems: bool = False,
) -> Solution:
    """Run ``solver`` on ``z = g(z)`` from ``z0`` (``gz0 = g(z0)`` already evaluated).

    Args:
        per_sample: the leading dim of every leaf indexes independent problems (ignored
            inside ``vmap``: each mapped problem is one problem of its own; unless
            ``rows_are_problems``: the rows are themselves the problems of a vmapped call,
            solved unmapped by the implicit Function's vmap rule, which an outer transform may
            map again).
        what: names the solve in errors and warnings ("fixed_point: the forward solve").
        owner: names the caller in a bad state's ``ValueError`` ("fixed_point", "Picard", ...).
        policy: what the verdicts turn into, eagerly (see ``_report.Policy``).
        trace, keep_states: keep every residual / every iterate.
        graph: an autograd graph is built through the iterations (``Unrolled``): buffers
            are written out of place and, under compile, the masked budget runs.
        constant_mixing: see ``StepOptions``.
        history_outside_loop: under compile, the solver's history may live outside the
            ``torch.while_loop`` carries, written in place (no grad; see `run_while_loop`);
            default: on torch ≥ 2.14 (``_transforms.CAPTURED_LOOP_WRITES``).
        restrict: ``rows -> g`` of those problems only (``rows`` a 1-D index into the batch):
            lets an eager per-sample solve continue on its running problems once they are at
            most ``solver.compact_below`` of the batch (``fixed_point``'s forward solve).

    Raises:
        FixedPointError: eagerly, when a problem ends NONFINITE, or MAX_ITER / DIVERGED under
            ``policy.on_nonconvergence="raise"`` (``"warn"``: a ``FixedPointWarning``).

    Cost: ``K`` calls of ``g`` plus the solver's own work, ``K ≤ solver.max_iter``.
    """
    where = regime(flatten(gz0)[0][0])
    per_sample = per_sample and (where is not Regime.MAPPED or rows_are_problems)  # under vmap, one per mapped problem
    view = FlatView(z0, per_sample, owner=owner)
    z, gz = view.to_flat(z0), view.to_flat(gz0)
    eager = where is Regime.EAGER
    if where is not Regime.COMPILED:
        _warn_if_tol_unreachable(solver, z, what)
    single = eager and z.shape[0] == 1 and solver.check_every == 1  # read after every iteration
    looped = where is Regime.COMPILED and not graph and not keep_states  # torch.while_loop
    # Solver history in place: eagerly without a graph, and in a no-grad torch.while_loop body,
    # where it lives outside the carries (torch refuses a body that mutates what it closes over
    # while grad mode is on: "Higher order ops do not support input mutation").
    in_place_history = (eager and not graph) or (looped and history_outside_loop and not torch.is_grad_enabled())
    loop = Loop(
        solver,
        _flat_map(view, g),
        opts=StepOptions(inplace=in_place_history, constant_mixing=constant_mixing),
        inplace=eager and not graph,
        trace=trace,
        dtype=z.dtype,
        classifies_on_host=single,
    )
    start = loop.init(z, gz)
    if single:
        run = run_eager_single(loop, start, keep_states=keep_states)
    elif eager:
        compaction = None
        if per_sample and restrict is not None and solver.compact_below > 0 and not graph and not keep_states:
            compaction = Compaction(solver.compact_below, lambda rows: _flat_map(view.rows(len(rows)), restrict(rows)))
        run = run_eager(loop, start, keep_states=keep_states, compaction=compaction)
    elif looped:
        run = run_while_loop(loop, start)
    elif where is Regime.COMPILED and not graph:
        run = run_scan(loop, start)
    else:
        run = run_budget(loop, start, keep_states=keep_states)
    run = confirmed(loop, run)
    z, gz, info = loop.finish(run.state, per_sample)
    report(policy, run.codes, info, solver, what)
    return Solution(view.from_flat(z), view.from_flat(gz), info, States(view, run.states))


def _flat_map(view: FlatView, g: Callable[[Any], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``g`` on the ``(B, D)`` form of ``view``."""
    return lambda flat: view.to_flat(g(view.from_flat(flat)))


def solve_map(solver: IterativeSolver, g: Callable[[Any], Any], z0: Any, *, per_sample: bool, trace: bool) -> tuple[Any, Info]:
    """``solver(g, z0)``: check ``g``'s output layout, solve, return ``(g(z_K), info)``."""
    owner = type(solver).__name__
    gz0 = g(z0)
    if not same_layout(gz0, z0):
        raise ValueError(f"{owner}: g(z) must return the structure and shapes of z; got {describe(gz0)} for z0 = {describe(z0)}")
    # With grad mode on, the caller may backpropagate through the iterations: history out of place.
    out = iterate(solver, g, z0, gz0, per_sample=per_sample, what=owner, owner=owner, trace=trace,
                  graph=torch.is_grad_enabled())
    return out.answer, out.info


def resolution(dtype: torch.dtype, device_type: str) -> float:
    """Relative resolution of the arithmetic f runs in: the state's epsilon, or autocast's when it is on."""
    eps = torch.finfo(dtype).eps
    if torch.is_autocast_enabled(device_type):
        eps = max(eps, torch.finfo(torch.get_autocast_dtype(device_type)).eps)
    return eps


def _warn_if_tol_unreachable(solver: IterativeSolver, z: torch.Tensor, what: str) -> None:
    """Warn (``FixedPointWarning``) when f runs in half precision (a float16/bfloat16 state, or
    autocast) and ``0 < tol`` is below its resolution, so that every solve would silently run its
    whole budget (e.g. the default 1e-5 under bfloat16, epsilon 7.8e-3)."""
    eps = resolution(z.dtype, z.device.type)
    if eps > torch.finfo(torch.float32).eps and 0 < solver.tol < eps and solver.atol == 0:
        warnings.warn(
            f"{what}: tol={solver.tol:g} is below the resolution of the arithmetic (epsilon {eps:.2g} "
            f"in {'autocast' if torch.is_autocast_enabled(z.device.type) else 'the state dtype'}): "
            f"the relative residual usually cannot reach it, so solves may run all "
            f"max_iter={solver.max_iter} iterations. Pass tol >= {eps:.2g} (or an atol) "
            f"to {type(solver).__name__}.",
            FixedPointWarning,
            stacklevel=4,
        )
