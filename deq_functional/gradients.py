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
under ``torch.no_grad``. Every mode composes with forward mode and higher-order
derivatives; what a second derivative means for each is the table in the
gradient-modes guide (IFT: exact; JFB, Neumann, Phantom: ``z_K`` held constant;
Unrolled: the iterations differentiated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ._checks import check_bool, check_choice, check_int, check_real
from ._grad_mode import ForwardCall, GradMode, ImplicitMode, derivative_solve, fall_back
from ._implicit import AdjointMap, Spec, TangentMap, attach
from ._linearize import Linearization, jvp_params, jvp_z
from ._tree import detached, flatten, tree_add, tree_map
from .solvers import Solver, as_solver


@dataclass(frozen=True)
class IFT(ImplicitMode):
    r"""Exact implicit-function-theorem gradient, and derivatives of every order.

    Backward solves the adjoint fixed point ``u = J(z*)ᵀ u + ḡ`` with ``solver``
    applied to the map ``u ↦ Jᵀu + ḡ`` (one vjp per iteration, no Jacobian formed),
    then returns ``(∂f/∂θ)ᵀ u`` and ``(∂f/∂x)ᵀ u``. Forward mode (``torch.func.jvp``,
    ``jacfwd``, ``hessian``) solves the tangent ``t = J t + (∂f/∂θ)θ̇ + (∂f/∂x)ẋ`` the same way,
    with one jvp per iteration. ``J`` is taken at ``z*`` itself, which carries its own implicit
    derivative; when a graph of the backward is wanted (``create_graph=True``,
    ``torch.func.grad``/``jacrev``/``hessian``), ``u`` is attached as the solution of its own
    implicit equation, so second and higher derivatives are exact too (up to the solvers'
    tolerance). A plain ``loss.backward()`` takes a fast path: one graph of f at ``z*``, the
    adjoint iterations backpropagate through it in z only, then once to the weights.

    Every derivative solve ends with a status like the forward one, but has no ``info`` to
    return it in: eagerly, NONFINITE raises ``FixedPointError`` and MAX_ITER / DIVERGED
    follow the call's ``on_nonconvergence`` (warn or raise); under compile or vmap nothing
    is raised. Problems whose solve did not converge keep the last iterate, or, with
    ``fallback="jfb"``, get JFB's vector instead (``u = ḡ``, ``t = (∂f/∂θ)θ̇ + (∂f/∂x)ẋ``),
    per problem (a ``torch.where``: also under compile and vmap); the warning counts them.
    Under ``torch.compile`` the adjoint runs in ``torch.while_loop`` and re-runs f once per
    iteration to linearise it inside the loop body (a forward and a backward of f each);
    forward mode is not available there (Dynamo cannot trace a custom jvp).

    Attributes:
        solver: solver for the derivative solves (instance or "picard" | "anderson" |
            "broyden"; ``dq.GMRES`` where the adjoint is hard for fixed-point iteration);
            ``None`` reuses the forward solver.
        fallback: ``None`` or ``"jfb"``: what problems whose derivative solve did not
            converge get (see above).

    References:
        Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """

    solver: Any = None
    fallback: str | None = None

    def __post_init__(self) -> None:
        if self.solver is not None:
            object.__setattr__(self, "solver", as_solver(self.solver, owner="IFT", affine_ok=True))
        if self.fallback is not None:
            check_choice("IFT", "fallback", self.fallback, ("jfb",))

    def adjoint_solver(self, call: ForwardCall) -> Solver:
        return self.solver or call.solver

    def adjoint(self, spec: Spec, lin: Linearization, cotangent: Any) -> Any:
        """``u = (I − Jᵀ)⁻¹ ḡ`` by the adjoint solver, attached as an implicit solution when a
        graph of the backward is wanted."""
        sol = derivative_solve(spec, lin.solve_vjp, cotangent, "adjoint")
        u = sol.answer
        if lin.differentiable:
            q = [*flatten(lin.point)[0], *lin.params, *flatten(cotangent)[0]]
            u = attach(spec.derived(AdjointMap(spec.fn)), u, None, q)
        return fall_back(sol, u, cotangent, spec.setup.per_sample) if self.fallback else u

    def tangent(self, spec: Spec, point: Any, params: list, param_tangents: list) -> Any:
        """``t = (I − J)⁻¹ Jₚṗ`` by the adjoint solver, attached as an implicit solution."""
        b = jvp_params(spec.fn, params, point, param_tangents)
        sol = derivative_solve(spec, jvp_z(spec.fn, detached(params), detached(point)), b, "tangent")
        t = attach(spec.derived(TangentMap(spec.fn)), sol.answer, None, [*flatten(point)[0], *params, *flatten(b)[0]])
        return fall_back(sol, t, b, spec.setup.per_sample) if self.fallback else t


@dataclass(frozen=True)
class JFB(GradMode):
    """Jacobian-free backprop (Fung et al., AAAI-22): differentiate ``f(params, z_K.detach(), x)``.

    The gradient is ``(∂f/∂θ)ᵀ ḡ`` — ``(I − Jᵀ)⁻¹`` replaced by ``I``; a descent
    direction when f is contractive in z. Backward cost: one vjp.
    """

    def output(self, call: ForwardCall, z_K: Any, gz_K: Any) -> Any:
        return call.problem.map(detached=False)(detached(z_K))


@dataclass(frozen=True)
class Neumann(ImplicitMode):
    r"""Truncated Neumann series ``u = Σ_{i=0..k} (Jᵀ)^i ḡ`` for ``(I − Jᵀ)⁻¹ ḡ``.

    ``Neumann(0)`` equals JFB; as ``k → ∞`` it approaches IFT when ``ρ(J) < 1``.
    Forward mode gives the matching tangent ``t = Σ_{i=0..k} J^i ((∂f/∂θ)θ̇ + (∂f/∂x)ẋ)``.
    ``J`` and ``∂f/∂θ`` are taken at the last iterate ``z_K`` held constant (as JFB holds it),
    so higher derivatives differentiate these series in θ and x only.
    Backward cost: ``k + 1`` vjps.

    Attributes:
        k: number of series terms beyond the first, ``>= 0``.
    """

    k: int = 5
    linearizes_at_output: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int("Neumann", "k", self.k, 0)

    def adjoint(self, spec: Spec, lin: Linearization, cotangent: Any) -> Any:
        u = term = cotangent
        for _ in range(self.k):
            term = lin.vjp_z(term)
            u = tree_add(u, term)
        return u

    def tangent(self, spec: Spec, point: Any, params: list, param_tangents: list) -> Any:
        t = term = jvp_params(spec.fn, params, point, param_tangents)
        product = jvp_z(spec.fn, params, point)
        for _ in range(self.k):
            term = product(term)
            t = tree_add(t, term)
        return t


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
        z = detached(z_K)
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
