"""Gradient modes: how gradients flow from ``z*`` back to ``params`` and ``x``.

Each mode is a frozen dataclass with ``attach(problem, loop) -> z_star``, which
builds the differentiable output from the solver's last iterate ``z_K``:

========== ============================================================ ===================
mode       gradient returned (ḡ = ∂L/∂z*, J = ∂f/∂z at z_K)               backward cost
========== ============================================================ ===================
IFT        exact implicit: ``u = Jᵀu + ḡ`` solved by a solver on vjps      one vjp / iteration
JFB        one application ``f(params, z_K.detach(), x)``                one vjp
Neumann(k) ``u = Σ_{i=0..k} (Jᵀ)^i ḡ``; ``Neumann(0) == JFB``             k + 1 vjps
Phantom    k damped steps ``z ← (1−λ)z + λ f(z)`` from ``z_K.detach()``    k vjps
Unrolled   backprop through every solver iteration (reference)          stores all iterations
========== ============================================================ ===================

IFT, JFB, Neumann and Phantom keep autograd memory constant in the number of
solver iterations: the forward solve runs with params and x detached and
under ``torch.no_grad``. They give first-order gradients (no double backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._loop import LoopResult, iterate
from ._problem import Problem
from ._tree import flatten, tree_map, unflatten
from ._vjp import vjp_in_z
from .solvers import Solver, as_solver
from .solvers._base import check_int, check_real


class _AdjointFn(torch.autograd.Function):
    """Identity on ``z_out = f(params, z_K, x)`` whose backward maps ḡ to the mode's adjoint ``u``.

    ``forward(mode, problem, *z_out, *z_K, *params, *x)``: every tensor is an
    input (the torch.func rule), ctx-free, with ``setup_context`` and a generated vmap
    rule. The gradient then reaches params and x through ``z_out``'s own graph:
    ``(∂f/∂θ)ᵀ u`` — the IFT gradient when ``u = (I − Jᵀ)⁻¹ ḡ``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mode, problem, *tensors):
        return tuple(t.view_as(t) for t in tensors[: problem.z_spec_size])

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, problem, *tensors = inputs
        ctx.mode, ctx.problem = mode, problem
        ctx.save_for_backward(*tensors[problem.z_spec_size :])

    @staticmethod
    def backward(ctx, *grads):
        problem = ctx.problem
        saved = ctx.saved_tensors
        n_z, n_p = len(grads), len(problem.param_leaves)
        z_leaves, p_leaves, x_leaves = saved[:n_z], list(saved[n_z : n_z + n_p]), list(saved[n_z + n_p :])
        z_K = unflatten(problem.z_spec, z_leaves)
        gbar = unflatten(problem.z_spec, [torch.zeros_like(z) if g is None else g for g, z in zip(grads, z_leaves)])
        p_leaves = [t.detach() for t in p_leaves]
        x_leaves = [t.detach() for t in x_leaves]
        jt = vjp_in_z(lambda z: problem.call(p_leaves, z, x_leaves), z_K)
        u = ctx.mode.adjoint(jt, gbar, problem)
        return (None, None, *flatten(u)[0], *([None] * len(saved)))


def _with_adjoint(mode, problem: Problem, loop: LoopResult) -> Any:
    """``z_out = f(params, z_K, x)`` routed through ``_AdjointFn`` so backward uses ``mode.adjoint``."""
    z_out = problem.map(detached=False)(loop.z)
    out_leaves = flatten(z_out)[0]
    if not any(t.requires_grad for t in out_leaves):
        # Nothing to differentiate: the Function is the identity. (Also sidesteps a Dynamo
        # bug in torch 2.14 that passes a ctx to a setup_context-style forward in this case.)
        return z_out
    tensors = (*out_leaves, *flatten(loop.z)[0], *problem.param_leaves, *problem.x_leaves)
    return unflatten(problem.z_spec, list(_AdjointFn.apply(mode, problem, *tensors)))


def _add(a: Any, b: Any) -> Any:
    return tree_map(torch.add, a, b)


@dataclass(frozen=True)
class IFT:
    r"""Exact implicit-function-theorem gradient.

    Backward solves the adjoint fixed point ``u = J(z*)ᵀ u + ḡ`` with ``solver``
    applied to the map ``u ↦ Jᵀu + ḡ`` (one ``torch.func.vjp`` per iteration, no
    Jacobian formed), then returns ``(∂f/∂θ)ᵀ u`` and ``(∂f/∂x)ᵀ u``.
    ``on_nonconvergence`` of the ``fixed_point`` call also governs this solve.

    Attributes:
        solver: solver for the adjoint problem (instance or "picard" | "anderson" |
            "broyden"); ``None`` reuses the forward solver.

    References: Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: Any = None

    def __post_init__(self) -> None:
        if self.solver is not None:
            object.__setattr__(self, "solver", as_solver(self.solver, owner="IFT"))

    def attach(self, problem: Problem, loop: LoopResult) -> Any:
        return _with_adjoint(self, problem, loop)

    def adjoint(self, jt, gbar: Any, problem: Problem) -> Any:
        solver: Solver = self.solver or problem.solver
        zeros = tree_map(torch.zeros_like, gbar)
        out = iterate(solver, lambda u: _add(jt(u), gbar), zeros, gbar, per_sample=problem.per_sample)
        problem.report(out.info, "the IFT adjoint (backward) solve", solver)
        return out.gz


@dataclass(frozen=True)
class JFB:
    """Jacobian-free backprop (Fung et al., AAAI-22): differentiate ``f(params, z_K.detach(), x)``.

    The gradient is ``(∂f/∂θ)ᵀ ḡ`` — ``(I − Jᵀ)⁻¹`` replaced by ``I``; a descent
    direction when f is contractive in z. Backward cost: one vjp.
    """

    def attach(self, problem: Problem, loop: LoopResult) -> Any:
        return problem.map(detached=False)(loop.z)


@dataclass(frozen=True)
class Neumann:
    r"""Truncated Neumann series ``u = Σ_{i=0..k} (Jᵀ)^i ḡ`` for ``(I − Jᵀ)⁻¹ ḡ``.

    ``Neumann(0)`` equals JFB; as ``k → ∞`` it approaches IFT when ``ρ(J) < 1``.
    Backward cost: ``k + 1`` vjps.

    Attributes:
        k: number of series terms beyond the first, ``>= 0``.
    """

    k: int = 5

    def __post_init__(self) -> None:
        check_int("Neumann", "k", self.k, 0)

    def attach(self, problem: Problem, loop: LoopResult) -> Any:
        return _with_adjoint(self, problem, loop)

    def adjoint(self, jt, gbar: Any, problem: Problem) -> Any:
        u = term = gbar
        for _ in range(self.k):
            term = jt(term)
            u = _add(u, term)
        return u


@dataclass(frozen=True)
class Phantom:
    r"""Phantom gradient (Geng et al., "On Training Implicit Models", NeurIPS 2021).

    ``k`` damped differentiable steps from ``z_K.detach()``:
    ``z ← (1 − λ) z + λ f(params, z, x)``; the output is the last one.
    ``Phantom(k=1, damping=1.0)`` equals JFB. Backward cost: ``k`` vjps; memory
    ``k`` applications of f, independent of the solver depth.

    Attributes:
        k: number of differentiable steps, ``>= 1``.
        damping: ``λ ∈ (0, 1]``.
    """

    k: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_int("Phantom", "k", self.k, 1)
        check_real("Phantom", "damping", self.damping, 0.0, 1.0, open_low=True)

    def attach(self, problem: Problem, loop: LoopResult) -> Any:
        step = problem.map(detached=False)
        z = tree_map(torch.Tensor.detach, loop.z)
        for _ in range(self.k):
            fz = step(z)
            z = fz if self.damping == 1.0 else tree_map(lambda a, b: a + self.damping * (b - a), z, fz)
        return z


@dataclass(frozen=True)
class Unrolled:
    """Plain backprop through every solver iteration: exact for the iterations run,
    memory grows linearly with them. The reference the implicit modes are checked against."""

    def attach(self, problem: Problem, loop: LoopResult) -> Any:
        return loop.gz


GRAD_MODES = {"ift": IFT, "jfb": JFB, "neumann": Neumann, "phantom": Phantom, "unrolled": Unrolled}
