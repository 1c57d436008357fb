"""``fixed_point``: validate the call, solve without a graph, attach the gradient mode."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ._info import add_fields
from ._loop import LoopResult, inside_vmap, iterate
from ._problem import ON_NONCONVERGENCE, Problem
from ._tree import tree_map
from .gradients import GRAD_MODES, IFT, JFB, Neumann, Phantom, Unrolled
from .solvers import Anderson, as_solver

GradMode = IFT | JFB | Neumann | Phantom | Unrolled


def as_grad_mode(mode: Any) -> GradMode:
    """A grad-mode instance from an instance or a name in ``GRAD_MODES`` (``ValueError`` otherwise)."""
    if isinstance(mode, tuple(GRAD_MODES.values())):
        return mode
    if isinstance(mode, str) and mode.lower() in GRAD_MODES:
        return GRAD_MODES[mode.lower()]()
    raise ValueError(f"fixed_point: unknown grad_mode {mode!r}; use one of {sorted(GRAD_MODES)} or an instance")


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
) -> tuple[Any, tuple]:
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
            ``(B,)`` and converged samples are frozen. Under ``vmap`` each mapped
            problem is one problem whatever this says.
        on_nonconvergence: "ignore" | "warn" | "raise" (``FixedPointError``); also
            governs IFT's backward solve. Eager only: under compile/vmap values
            cannot be read, so nothing is raised and ``info.converged`` reports it.
        trace: add ``info.trace``, the residual at each iteration.
        return_trajectory: ``k > 0`` adds ``info.trajectory``, k states evenly spaced
            over iterations 1..K (the last is z_K), each one differentiable
            application ``f(params, z_i.detach(), x)`` (JFB-style gradient), for the
            fixed-point correction loss. Costs k extra f calls and K detached copies of z.

    Returns:
        ``(z_star, info)``: ``z_star`` has the structure of z0; ``info`` is ``Info``.

    Raises:
        ValueError: bad options, or f's output does not match z (structure, shape, dtype).
        FixedPointError: non-finite iterate (eager), or non-convergence with "raise".

    Under ``torch.compile`` and ``vmap`` the loop runs the full ``max_iter`` budget with
    converged samples frozen by masks (no host sync); eagerly it exits early.

    Example:
        >>> import torch, deq_functional as dq
        >>> W = 0.3 * torch.eye(3, dtype=torch.float64)
        >>> f = lambda p, z, x: torch.tanh(z @ p["W"] + x)
        >>> z, info = dq.fixed_point(f, {"W": W}, torch.ones(2, 3, dtype=torch.float64), grad_mode="jfb")
        >>> z.shape, bool(info.converged)
        (torch.Size([2, 3]), True)

    Supports: backward / grad / vmap / compile.
    """
    solver = Anderson() if solver is None else as_solver(solver)
    mode = IFT() if grad_mode is None else as_grad_mode(grad_mode)
    if on_nonconvergence not in ON_NONCONVERGENCE:
        raise ValueError(f"fixed_point: on_nonconvergence must be one of {ON_NONCONVERGENCE}, got {on_nonconvergence!r}")
    if isinstance(return_trajectory, bool) or not isinstance(return_trajectory, int) or return_trajectory < 0:
        raise ValueError(f"fixed_point: return_trajectory must be an integer >= 0, got {return_trajectory!r}")
    per_sample = bool(per_sample) and not inside_vmap()
    problem = Problem(f, params, x, solver=solver, per_sample=per_sample, on_nonconvergence=on_nonconvergence)

    z0_given = z0 is not None
    if not z0_given:
        z0 = tree_map(torch.zeros_like, x)
    unrolled = isinstance(mode, Unrolled)
    if not unrolled:
        z0 = tree_map(torch.Tensor.detach, z0)
    with contextlib.nullcontext() if unrolled else torch.no_grad():
        out0 = problem.raw(z0, detached=not unrolled)
        problem.check_output(out0, z0, z0_given, x)
        gz0 = tree_map(lambda o, z: o.to(z.dtype), out0, z0)
        loop = iterate(
            solver, problem.map(detached=not unrolled), z0, gz0,
            per_sample=per_sample, trace=trace, keep_states=return_trajectory > 0,
        )
    problem.report(loop.info, "the forward solve", solver)
    info = loop.info
    if return_trajectory:
        info = add_fields(info, trajectory=_trajectory(problem, loop, return_trajectory))
    return mode.attach(problem, loop), info


def _trajectory(problem: Problem, loop: LoopResult, k: int) -> tuple:
    """``k`` states evenly spaced over iterations 1..K (last = K), each ``f(params, z_i.detach(), x)``."""
    states = loop.states or [loop.view.to_flat(loop.z).detach()]
    n = len(states)
    picks = sorted({round(n - 1 - i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})
    step = problem.map(detached=False)
    return tuple(step(loop.view.from_flat(states[i])) for i in picks)
