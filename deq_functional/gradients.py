"""Gradient modes: how gradients flow from ``z*`` back to ``params`` and ``x``.

Each mode is a frozen dataclass derived from ``GradMode``; ``output(call, z_K, gz_K)``
builds the differentiable ``z_star`` from the solver's last iterate ``z_K``:

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
from typing import Any, ClassVar, NamedTuple

import torch

from ._adjoint import implicit_output
from ._checks import check_bool, check_int, check_real
from ._problem import Problem
from ._report import apply_policy
from ._solve import iterate
from ._transforms import is_compiling
from ._tree import tree_map
from .solvers import Solver, as_solver


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


def _add(a: Any, b: Any) -> Any:
    return tree_map(torch.add, a, b)


ADJOINT_SOLVE = "fixed_point: the IFT adjoint (backward) solve"


@dataclass(frozen=True)
class IFT(GradMode):
    r"""Exact implicit-function-theorem gradient.

    Backward solves the adjoint fixed point ``u = J(z*)ᵀ u + ḡ`` with ``solver``
    applied to the map ``u ↦ Jᵀu + ḡ`` (one ``torch.func.vjp`` per iteration, no
    Jacobian formed), then returns ``(∂f/∂θ)ᵀ u`` and ``(∂f/∂x)ᵀ u``.

    The adjoint solve ends with a status like the forward one, but has no ``info`` to
    return it in: eagerly, NONFINITE raises ``FixedPointError`` from ``backward()`` and
    MAX_ITER / DIVERGED follow the call's ``on_nonconvergence`` (warn or raise); under
    compile or vmap nothing is raised and the gradient comes from the last adjoint iterate.
    Under ``torch.compile`` the adjoint runs in ``torch.while_loop`` and re-runs f once per
    iteration to linearise it inside the loop body (a forward and a backward of f each).

    Attributes:
        solver: solver for the adjoint problem (instance or "picard" | "anderson" |
            "broyden"); ``None`` reuses the forward solver.

    References:
        Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: Any = None

    def __post_init__(self) -> None:
        if self.solver is not None:
            object.__setattr__(self, "solver", as_solver(self.solver, owner="IFT"))

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        return implicit_output(self, call, z_K)

    def adjoint(self, call: ForwardCall, z_K: Any, params: list, x: list, cotangent: Any) -> Any:
        """``u = (I − Jᵀ)⁻¹ ḡ`` by the adjoint solver, from ``u_0 = 0`` (so ``g(u_0) = ḡ``)."""
        solver = self.solver or call.solver
        vjp = call.problem.transposed_jacobian(z_K, params, x, relinearize=is_compiling())
        zeros = tree_map(torch.zeros_like, cotangent)
        sol = iterate(solver, lambda u: _add(vjp(u), cotangent), zeros, cotangent, per_sample=call.per_sample, what=ADJOINT_SOLVE)
        apply_policy(call.on_nonconvergence, sol.host_status, sol.info, solver, ADJOINT_SOLVE)
        return sol.answer


@dataclass(frozen=True)
class JFB(GradMode):
    """Jacobian-free backprop (Fung et al., AAAI-22): differentiate ``f(params, z_K.detach(), x)``.

    The gradient is ``(∂f/∂θ)ᵀ ḡ`` — ``(I − Jᵀ)⁻¹`` replaced by ``I``; a descent
    direction when f is contractive in z. Backward cost: one vjp.
    """

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        return call.problem.map(detached=False)(tree_map(torch.Tensor.detach, z_K))


@dataclass(frozen=True)
class Neumann(GradMode):
    r"""Truncated Neumann series ``u = Σ_{i=0..k} (Jᵀ)^i ḡ`` for ``(I − Jᵀ)⁻¹ ḡ``.

    ``Neumann(0)`` equals JFB; as ``k → ∞`` it approaches IFT when ``ρ(J) < 1``.
    Backward cost: ``k + 1`` vjps.

    Attributes:
        k: number of series terms beyond the first, ``>= 0``.
    """

    k: int = 5

    def __post_init__(self) -> None:
        check_int("Neumann", "k", self.k, 0)

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        return implicit_output(self, call, z_K)

    def adjoint(self, call: ForwardCall, z_K: Any, params: list, x: list, cotangent: Any) -> Any:
        vjp = call.problem.transposed_jacobian(z_K, params, x, relinearize=False)
        u = term = cotangent
        for _ in range(self.k):
            term = vjp(term)
            u = _add(u, term)
        return u


@dataclass(frozen=True)
class Phantom(GradMode):
    r"""Phantom gradient (Geng et al., "On Training Implicit Models", NeurIPS 2021).

    The gradient of ``k`` damped differentiable steps from ``z_K.detach()``:
    ``z ← (1 − λ) z + λ f(params, z, x)``. The value returned is still ``f(params, z_K, x)``
    (the counting rule every mode follows): ``f(z_K) + (z_k − z_k.detach())``, which is
    exactly ``f(z_K)`` and differentiates like ``z_k``. ``Phantom(k=1, damping=1.0)`` equals
    JFB. Backward cost: ``k`` vjps; memory ``k`` applications of f, independent of the
    solver depth.

    Attributes:
        k: number of differentiable steps, ``>= 1``.
        damping: ``λ ∈ (0, 1]``.
    """

    k: int = 1
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_int("Phantom", "k", self.k, 1)
        check_real("Phantom", "damping", self.damping, 0.0, 1.0, open_low=True)

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        step = call.problem.map(detached=False)
        z = tree_map(torch.Tensor.detach, z_K)
        for _ in range(self.k):
            fz = step(z)
            z = fz if self.damping == 1.0 else tree_map(lambda a, b: a + self.damping * (b - a), z, fz)
        return tree_map(lambda value, chain: value.detach() + (chain - chain.detach()), gz_K, z)


@dataclass(frozen=True)
class Unrolled(GradMode):
    """Plain backprop through every solver iteration: exact for the iterations run,
    memory grows linearly with them. The reference the implicit modes are checked against.

    Attributes:
        differentiate_mixing: also differentiate the solver's data-dependent coefficients
            (Anderson's α, Broyden's secant pairs). Off by default: their derivative
            multiplies residuals that vanish at convergence, but it blows up numerically
            (Anderson: a 1e3× gradient after 100 iterations on the JFB paper's conv net;
            Broyden: pairs built from rounding noise once converged).
    """

    differentiate_mixing: bool = False
    differentiates_iterations: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_bool("Unrolled", "differentiate_mixing", self.differentiate_mixing)

    @property
    def constant_mixing(self) -> bool:
        return not self.differentiate_mixing

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        return gz_K


GRAD_MODES = {"ift": IFT, "jfb": JFB, "neumann": Neumann, "phantom": Phantom, "unrolled": Unrolled}


def as_grad_mode(mode: Any, owner: str = "fixed_point") -> GradMode:
    """A grad-mode instance from an instance or a name in ``GRAD_MODES`` (``ValueError`` otherwise)."""
    if isinstance(mode, GradMode):
        return mode
    if isinstance(mode, str) and mode.lower() in GRAD_MODES:
        return GRAD_MODES[mode.lower()]()
    raise ValueError(f"{owner}: unknown grad_mode {mode!r}; use one of {sorted(GRAD_MODES)} or a GradMode instance")
