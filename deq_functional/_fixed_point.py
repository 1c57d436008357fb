"""``fixed_point``: validate the call, solve without a graph, attach the gradient mode."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ._checks import check_bool, check_choice, check_int
from ._info import Info, with_fields
from ._problem import Problem
from ._report import ON_NONCONVERGENCE, Policy
from ._solve import Solution, iterate
from ._transforms import Regime, regime
from ._tree import detached, flatten, tree_map
from .gradients import IFT, ForwardCall, as_grad_mode
from .solvers import Anderson, as_solver

FORWARD_SOLVE = "fixed_point: the forward solve"


def fixed_point(
    f: Callable[[Any, Any, Any], Any],
    params: Any,
    x: Any,
    solver: Any = None,
    grad_mode: Any = None,
    z0: Any = None,
    *,
    per_sample: bool = False,
    on_nonconvergence: str = "ignore",
    trace: bool = False,
    return_trajectory: int = 0,
) -> tuple[Any, Info]:
    r"""Solve ``z* = f(params, z*, x)`` and let gradients flow through it by ``grad_mode``.

    Counting: ``z_0 = z0``; each iteration makes ``z_{k+1}`` from ``f(z_k)`` (and the
    solver's history); after ``K = info.nstep`` iterations the result is one more
    application ``z* = f(params, z_K, x)`` and ``info.residual = ‖f(z_K) − z_K‖``.
    Picard with K iterations therefore returns ``f^{K+1}(z0)``.

    Args:
        f: ``f(params, z, x) -> z_next``, same pytree structure, shapes, dtypes as z.
        params: pytree of tensors (the weights).
        x: tensor or pytree (the injected input).
        solver: ``Picard`` / ``Anderson`` / ``Broyden`` instance or "picard" |
            "anderson" | "broyden"; default ``Anderson()``.
        grad_mode: ``IFT()`` (default), ``JFB()``, ``Neumann(k)``, ``Phantom(k, damping)``,
            ``Unrolled()`` or "ift" | "jfb" | "neumann" | "phantom" | "unrolled".
        z0: initial guess with f's output structure; ``None`` means zeros shaped like x.
        per_sample: ``False``: the whole batch is one problem (one norm, scalar info).
            ``True``: the leading dim of every leaf is the batch, info tensors are
            ``(B,)`` and stopped samples are frozen. Under ``vmap`` each mapped
            problem is one problem whatever this says. An empty batch gives an empty result.
        on_nonconvergence: "ignore" | "warn" (``FixedPointWarning``) | "raise"
            (``FixedPointError``) when a problem ends ``MAX_ITER`` or ``DIVERGED``; also
            governs IFT's backward solve. Eager only: under compile/vmap values cannot be
            read, so nothing is raised and ``info.status`` reports it.
        trace: add ``info.trace``, the residual at each iteration.
        return_trajectory: ``k > 0`` adds ``info.trajectory``, k states evenly spaced
            over iterations 1..K (the last is z_K), each one differentiable application
            ``f(params, z_i.detach(), x)`` (JFB-style gradient), for the fixed-point
            correction loss. Costs k extra f calls and K detached copies of z; under
            compile it runs the masked full budget instead of ``torch.while_loop``.

    Returns:
        ``(z_star, info)``: ``z_star`` has the structure of z0; ``info`` is an ``Info``.

    Raises:
        ValueError: bad options, or f's output does not match z (structure, shape, dtype).
        FixedPointError: eagerly, a non-finite iterate (always), or MAX_ITER / DIVERGED
            with ``on_nonconvergence="raise"``.

    Where it runs (see ``Solver.check_every`` for host reads): eagerly the loop exits as
    soon as no problem is running; under ``torch.compile`` the solves of the implicit modes
    run in ``torch.while_loop`` (compile time independent of ``max_iter``, early exit);
    under ``vmap``, and for ``Unrolled`` under compile, the whole ``max_iter`` budget runs
    with stopped problems masked.

    Examples:
        >>> import torch, deq_functional as dq
        >>> W = 0.3 * torch.eye(3, dtype=torch.float64)
        >>> f = lambda p, z, x: torch.tanh(z @ p["W"] + x)
        >>> z, info = dq.fixed_point(f, {"W": W}, torch.ones(2, 3, dtype=torch.float64), grad_mode="jfb")
        >>> z.shape, bool(info.converged), dq.Status(int(info.status)).name
        (torch.Size([2, 3]), True, 'CONVERGED')

    Supports: backward / grad / vmap / compile.
    """
    solver = Anderson() if solver is None else as_solver(solver)
    mode = IFT() if grad_mode is None else as_grad_mode(grad_mode)
    check_choice("fixed_point", "on_nonconvergence", on_nonconvergence, ON_NONCONVERGENCE)
    check_int("fixed_point", "return_trajectory", return_trajectory, 0)
    check_bool("fixed_point", "per_sample", per_sample)
    check_bool("fixed_point", "trace", trace)
    z0_given = z0 is not None
    if not z0_given:
        z0 = tree_map(torch.zeros_like, x)
    problem = Problem(f, params, x, z0)

    graph = mode.differentiates_iterations
    if not graph:
        z0 = detached(z0)
    with contextlib.nullcontext() if graph else torch.no_grad():
        gz0 = problem.first_call(z0, detached=not graph, z0_given=z0_given)
        sol = iterate(
            solver, problem.map(detached=not graph), z0, gz0,
            per_sample=per_sample, what=FORWARD_SOLVE, trace=trace,
            keep_states=return_trajectory > 0, graph=graph, constant_mixing=mode.constant_mixing,
            policy=Policy(on_nonconvergence), restrict=lambda rows: problem.map(detached=not graph, rows=rows),
        )
    z_star = mode.output(ForwardCall(problem, solver, per_sample, on_nonconvergence), sol.z, sol.answer)
    info = sol.info
    if return_trajectory:
        info = with_fields(info, trajectory=_trajectory(problem, sol, return_trajectory))
    return z_star, info


def _trajectory(problem: Problem, sol: Solution, k: int) -> tuple:
    """``k`` states evenly spaced over iterations 1..K (last = K), each ``f(params, z_i.detach(), x)``.

    K is the number of iterations the solve took: eagerly the states the loop kept; under
    compile or vmap, where the whole budget ran with stopped problems frozen, the largest
    ``info.nstep`` of the call, so the picks are eager's (there, when K < k, a state repeats
    instead of the list being shorter)."""
    step = problem.map(detached=False)
    if not len(sol.states):
        return (step(detached(sol.z)),)
    if regime(flatten(sol.info.nstep)[0][0]) is Regime.EAGER:
        n = len(sol.states)
        picks = sorted({round(n - 1 - i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})
        return tuple(step(sol.states[i]) for i in picks)
    last = (sol.info.nstep.max() - 1).clamp(min=0)
    picks = [torch.round(last - last * (i / max(k - 1, 1))).long() for i in reversed(range(k))]
    return tuple(step(sol.states.at(i)) for i in picks)
