"""What every gradient mode shares: the call it differentiates, the ``GradMode`` base, and the
``ImplicitMode`` base of IFT and Neumann with the derivative solves of IFT.

An implicit mode's ``z_star`` is the solve's ``f(z_K)`` attached to the ``autograd.Function`` of
``_implicit.py``, which calls the mode's ``adjoint`` from backward and ``tangent`` from forward
mode; IFT solves those linear equations with `derivative_solve` (and, with ``fallback="jfb"``,
`fall_back` replaces the problems whose solve failed by JFB's vector).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from ._implicit import ProblemMap, SolveSetup, Spec, attach
from ._info import Status
from ._linearize import Linearization
from ._problem import Problem
from ._report import Policy
from ._solve import Solution, iterate
from ._transforms import inside_vmap, is_compiling
from ._tree import detached, flatten, tree_add, tree_map

if TYPE_CHECKING:  # annotations only: the solvers sit above the solve this module runs
    from .solvers import Solver


class ForwardCall(NamedTuple):
    """What a gradient mode needs to know about the ``fixed_point`` call it differentiates."""

    problem: Problem
    solver: Solver
    per_sample: bool
    on_nonconvergence: str


class GradMode:
    """Base of the gradient modes (frozen dataclasses).

    ``differentiates_iterations``: the forward solve builds an autograd graph through its
    iterations (``Unrolled``); every other mode solves under ``torch.no_grad``.
    """

    differentiates_iterations: ClassVar[bool] = False

    @property
    def constant_mixing(self) -> bool:
        """Hold the solver's data-dependent coefficients constant in a graph through the
        iterations (see ``StepOptions``); only ``Unrolled`` builds such a graph."""
        return False

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:  # pragma: no cover - abstract
        """The differentiable ``z_star`` from the last iterate ``z_K`` (and ``gz_K = f(z_K)``)."""
        raise NotImplementedError


ADJOINT_SOLVE = "fixed_point: the IFT adjoint (backward) solve"
TANGENT_SOLVE = "fixed_point: the IFT tangent (forward-mode) solve"


class ImplicitMode(GradMode):
    """A mode whose ``z_star`` carries derivatives defined by linear algebra on ``J = ∂f/∂z``
    rather than by a graph of f: its value is ``f(z_K)`` (computed by the solve), and the
    ``autograd.Function`` in ``_implicit.py`` calls `adjoint` from backward and `tangent` from
    forward mode, at every derivative order.

    ``linearizes_at_output``: ``J`` is taken at ``z_star`` itself, which carries its own
    implicit derivative (IFT: exact at every order); otherwise at ``z_K`` held constant.
    """

    linearizes_at_output: ClassVar[bool] = True

    def adjoint(self, spec: Spec, lin: Linearization, cotangent: Any) -> Any:  # pragma: no cover - abstract
        """The adjoint vector ``u`` for the cotangent ``ḡ`` (backward returns ``Jₚᵀu``)."""
        raise NotImplementedError

    def tangent(self, spec: Spec, point: Any, params: list, param_tangents: list) -> Any:  # pragma: no cover
        """The tangent of ``z_star`` for the parameter tangents ``ṗ`` (``None``: none)."""
        raise NotImplementedError

    def adjoint_solver(self, call: ForwardCall) -> Solver:
        """The solver of the derivative solves (the forward solver unless the mode names one)."""
        return call.solver

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        problem = call.problem
        params = [*problem.param_leaves, *problem.x_leaves]
        value = detached(gz_K)
        if is_compiling() and inside_vmap(flatten(value)[0][0]):
            # Dynamo cannot trace a custom autograd.Function inside vmap (torch 2.13, 2.14.1: "vmap
            # over ApplyTemplate"), and batched tensors hide whether anything requires grad.
            if torch.is_grad_enabled():
                raise NotImplementedError(
                    f"fixed_point: grad_mode={type(self).__name__} under torch.compile over torch.func.vmap needs a "
                    "custom autograd.Function, which torch cannot compile inside vmap. Use per_sample=True instead "
                    "of vmap, vmap outside the compiled function, grad_mode='jfb' / Phantom / Unrolled, or "
                    "torch.no_grad() if no gradient is wanted."
                )
            return value
        if is_compiling() and not any(t.requires_grad for t in params):
            # Nothing to differentiate, so the Function would be the identity; skipping it sidesteps
            # a Dynamo bug in torch 2.14 that passes a ctx to a setup_context-style forward then.
            # (Only under compile: inside vmap, batched tensors report requires_grad=False even when
            # the tensors they wrap require it, and skipping would silently give JFB's gradient.)
            return value
        policy = Policy(call.on_nonconvergence, getattr(self, "fallback", None))  # IFT's fallback, if any
        setup = SolveSetup(self.adjoint_solver(call), call.per_sample, policy)
        n = problem.n_state_leaves
        spec = Spec(self, ProblemMap(problem), setup, n, 0 if self.linearizes_at_output else n)
        return attach(spec, value, None if self.linearizes_at_output else detached(z_K), params)


def derivative_solve(spec: Spec, product: Any, rhs: Any, kind: str) -> Solution:
    """Solve ``v = product(v) + rhs`` from ``v₀ = 0`` (so ``g(v₀) = rhs``) without a graph, by
    the spec's solver: an IFT adjoint (``kind="adjoint"``) or tangent solve."""
    setup = spec.setup
    what = ADJOINT_SOLVE if kind == "adjoint" else TANGENT_SOLVE
    if setup.order > 1:
        what += f" of a derivative of order {setup.order}"
    # (Traced, the cotangents of a pytree state can be views of one tensor, and the body of
    # torch.while_loop refuses tensors that alias one another: fresh copies there.)
    rhs = tree_map(torch.clone, detached(rhs)) if is_compiling() else detached(rhs)
    with torch.no_grad():
        zeros = tree_map(torch.zeros_like, rhs)
        return iterate(
            setup.solver, lambda v: tree_add(product(v), rhs), zeros, rhs,
            per_sample=setup.per_sample, what=what, policy=setup.policy, rows_are_problems=setup.rows_are_problems,
        )


def fall_back(sol: Solution, exact: Any, jfb: Any, per_sample: bool) -> Any:
    """``exact`` where a problem's derivative solve converged, ``jfb`` (JFB's vector) elsewhere."""
    failed = sol.info.status != int(Status.CONVERGED)

    def pick(e: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        f = failed.reshape(failed.shape + (1,) * (e.dim() - failed.dim())) if per_sample else failed
        return torch.where(f, j, e)

    return tree_map(pick, exact, jfb)


