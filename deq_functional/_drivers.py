"""How often ``Loop.body`` runs, and what is read on the host: the drivers.

======================  ======================================  ==============================
driver                  where                                   stops
======================  ======================================  ==============================
``run_eager``           values readable (eager, incl.           when a host read of the status
                        torch.func.grad), several problems      finds no problem running; one
                        or ``check_every > 1``; optionally on   read every ``check_every``
                        the running rows only (`Compaction`)    iterations
``run_eager_single``    eager, one problem, a read per          right after the problem stops
                        iteration (classified on the host)
``run_while_loop``      under ``torch.compile``, no graph       inside the graph, once no
                        through the iterations                  problem is running
``run_scan``            under compile, every iterate kept       never: the whole ``max_iter``
                        (``return_trajectory``)                 budget, stopped problems masked
``run_budget``          ``vmap`` (no ``while_loop`` rule), or   never: the same masked budget,
                        a graph through the iterations under    as a Python loop
                        compile (``Unrolled``)
======================  ======================================  ==============================

All of them run the same body, so ``z_star``, ``nstep`` and ``status`` agree per problem.
`confirmed` then checks a solver's own residual estimate (GMRES) against ``g`` once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from ._info import Status
from ._loop import Loop, LoopState
from ._stopping import RUNNING
from ._transforms import scan
from ._tree import flatten, unflatten


class Run(NamedTuple):
    """A finished loop: its last state, the status codes if they were read on the host
    (eager; ``None`` otherwise), and the detached iterates when they were kept (a list of
    ``(B, D)`` tensors, or one stacked ``(K, B, D)`` tensor)."""

    state: LoopState
    codes: list | None
    states: Any


def read_host(t: torch.Tensor) -> list:
    """The one place a solve reads values on the host (a device sync); tests count calls here."""
    return t.tolist()


class Compaction(NamedTuple):
    """Continue a per-problem eager solve on its running problems alone (``Solver.compact_below``).

    Attributes:
        below: compact once the running problems are at most this fraction of those iterated.
        map_of: ``rows -> g``: the ``(B', D) -> (B', D)`` map of the problems ``rows`` (a 1-D index).
    """

    below: float
    map_of: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def run_eager(loop: Loop, s: LoopState, *, keep_states: bool = False, compaction: Compaction | None = None) -> Run:
    """Python loop; reads the status at ``k = 0, c, 2c, …`` (``c = check_every``) and once at the end
    of the budget: at most ``ceil(K / c) + 1`` reads for ``K`` iterations (one more after a compaction).

    With ``compaction``, at a read that finds the running problems at most ``below`` of those
    iterated, the loop continues on the running rows alone (``LoopState.take_rows``, the map
    restricted to them), and the rows are scattered back into the whole state at the end."""
    max_iter, every = loop.solver.max_iter, loop.solver.check_every
    states = []
    whole, rows = s, None  # rows: the problems iterated, an index into the whole batch (None: all)
    k, codes, stopped = 0, None, False
    while k < max_iter:
        if k % every == 0:
            codes = read_host(s.status)
            running = [i for i, c in enumerate(codes) if c == RUNNING]
            if not running:
                stopped = True
                break
            if compaction is not None and len(running) < len(codes) and len(running) <= compaction.below * len(codes):
                local = torch.tensor(running, device=s.z.device)
                whole = s if rows is None else whole.put_rows(rows, s)
                rows = local if rows is None else rows[local]
                s, loop = s.take_rows(local), loop.with_map(compaction.map_of(rows))
        s = loop.body(k, s)
        k += 1
        codes = None
        if keep_states:
            states.append(s.z.detach())
    if rows is not None:
        s = whole.put_rows(rows, s)
        codes = read_host(s.status) if stopped else None
    if codes is None:
        codes = read_host(loop.rule.final(s.status, s.res, s.scale, s.res_start))
    return Run(s, codes, states)


def run_eager_single(loop: Loop, s: LoopState, *, keep_states: bool = False) -> Run:
    """One problem, ``check_every=1``: after every iteration one read of ``(‖g(z)−z‖, ‖g(z)‖)``,
    classified on the host by the same rule (no status tensors on the device, no masks):
    ``K + 1`` reads for ``K`` iterations. The loop's ``Loop`` must have ``classifies_on_host=True``."""
    rule, eps = loop.rule, torch.finfo(s.res.dtype).eps
    res, scale = read_host(torch.cat([s.res, s.scale]))
    res_start, res_min, code, k = res, math.inf, rule.update_host(RUNNING, res, scale, math.inf, None, eps), 0
    states = []
    while code == RUNNING and k < loop.solver.max_iter:
        s = loop.body(k, s)
        k += 1
        if keep_states:
            states.append(s.z.detach())
        res_min = min(res_min, res)
        res, scale = read_host(torch.cat([s.res, s.scale]))
        code = rule.update_host(code, res, scale, res_min, res_start, eps)
    if code == RUNNING:
        code = int(Status.CONVERGED) if rule.converged(res, scale, res_start) else int(Status.MAX_ITER)
    device = s.res.device
    s = s._replace(
        status=torch.tensor([code], device=device),
        nstep=torch.tensor([k], device=device),
        res_min=torch.tensor([min(res_min, res)], dtype=s.res.dtype, device=device),
    )
    return Run(s, [code], states)


def confirmed(loop: Loop, run: Run) -> Run:
    """``run`` with its verdicts checked against the true residual (``Loop.confirm``) where the
    solver's residual is its own estimate (GMRES), and the codes read again if they were read."""
    if loop.solver.evaluates_iterate:
        return run
    state = loop.confirm(run.state)
    return run._replace(state=state, codes=None if run.codes is None else read_host(state.status))


def run_budget(loop: Loop, s: LoopState, *, keep_states: bool = False) -> Run:
    """Python loop over the whole budget with stopped problems masked; reads nothing."""
    states = []
    for k in range(loop.solver.max_iter):
        s = loop.body(k, s)
        if keep_states:
            states.append(s.z.detach())
    return Run(s, None, states)


def run_scan(loop: Loop, s: LoopState) -> Run:
    """The masked budget as one ``scan`` over ``k = 0 .. max_iter − 1`` that keeps every iterate,
    for a no-graph solve under ``torch.compile`` that needs them (``return_trajectory``): Dynamo
    traces one iteration whatever ``max_iter`` is. Where scan does not serve, the masked budget
    stays a Python loop (`run_budget`, compile time growing with ``max_iter``): a graph through
    the iterations (``Unrolled``: scan's autograd fails to trace ours, torch 2.14.1 "outs_to_grad
    length != tangents length") and ``vmap`` (scan refuses carries that become batched)."""
    leaves, spec = flatten(s)

    def body(carry, k):
        new = loop.body(k, unflatten(spec, list(carry)))
        return _unaliased(flatten(new)[0], carry), new.z.clone()

    steps = torch.arange(loop.solver.max_iter, device=s.z.device)
    out, states = scan(body, [t.clone() for t in leaves], steps)
    return Run(unflatten(spec, list(out)), None, states)


def run_while_loop(loop: Loop, s: LoopState) -> Run:
    """``torch.while_loop`` over ``(k, *state)``: Dynamo traces one iteration whatever ``max_iter``
    is, and the loop ends once no problem is running. ``k`` is a 0-dim int64 tensor.

    When the loop writes solver history in place (``loop.opts.inplace``: no grad), the history
    buffers (``Solver.history``) are not carried: the body closes over them and writes one slot
    per iteration, so an iteration no longer copies them (carries are functional). They are
    created in this graph and never read after the loop (inductor, torch 2.13 / 2.14.1, can
    return stale values for a captured buffer read after the loop in the same graph)."""
    history = set(loop.solver.history) if loop.opts.inplace else set()
    buffers = tuple(t for i, t in enumerate(s.solver) if i in history)
    carried = s._replace(solver=tuple(t for i, t in enumerate(s.solver) if i not in history))
    leaves, spec = flatten(carried)
    max_iter = loop.solver.max_iter

    def with_history(state: LoopState) -> LoopState:
        it, kept = iter(buffers), iter(state.solver)
        return state._replace(solver=tuple(next(it) if i in history else next(kept) for i in range(len(s.solver))))

    def cond(k, *leaves):
        status = unflatten(spec, leaves).status
        return (k < max_iter) & (status == RUNNING).any()

    def body(k, *leaves):
        new = loop.body(k, with_history(unflatten(spec, leaves)))
        new = new._replace(solver=tuple(t for i, t in enumerate(new.solver) if i not in history))
        return (k + 1, *_unaliased(flatten(new)[0], leaves))

    k0 = torch.zeros((), dtype=torch.int64, device=s.z.device)
    # Fresh copies: an initial carry may also be a tensor the body closes over (IFT's
    # cotangent is g(u_0) and a term of g), and while_loop refuses aliased operands.
    out = torch.while_loop(cond, body, (k0, *[t.clone() for t in leaves]))
    return Run(with_history(unflatten(spec, list(out[1:]))), None, [])


def _unaliased(tensors: list, inputs) -> list:
    """Body outputs with clones wherever one is an input or repeats an earlier one (a solver
    may pass a tensor through): ``torch.while_loop`` forbids outputs that alias its inputs
    or each other."""
    seen = list(inputs)
    out = []
    for t in tensors:
        out.append(t.clone() if any(t is u for u in seen) else t)
        seen.append(t)
    return out
