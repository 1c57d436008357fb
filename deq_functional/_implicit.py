"""The ``autograd.Function`` behind IFT and Neumann, and the implicit maps it differentiates.

``attach(spec, value, point, params)`` returns ``value`` (the solved ``z*``, detached) with the
derivatives an implicit mode defines for ``z* = F(p, z*)``, where ``F = spec.fn`` and ``p =
params`` (tensors that may require grad or carry torch.func levels):

* ``backward(ḡ)``: ``u = spec.mode.adjoint(...)`` (IFT: ``u = Jᵀu + ḡ`` solved; Neumann: the
  series), then ``Jₚᵀu`` for every parameter that wants a gradient;
* ``jvp(ṗ)``: ``spec.mode.tangent(...)`` (IFT: ``t = J t + Jₚṗ`` solved; Neumann: the series);
* ``vmap``: a mapped call becomes one plain call on the batch, with ``F`` vmapped and each
  mapped row its own problem (`MappedMap`), so every rule above runs unmapped.

``J`` and ``Jₚ`` are taken at ``spec``'s linearisation point: the output itself for IFT (it
carries its own implicit derivative at every outer level, which makes IFT exact at every
order), or the given detached ``point`` for Neumann (held constant, like JFB's). Both rules
are written with torch.func and work when a graph of them is wanted (``create_graph=True``,
``torch.func.grad``/``jacrev``/``hessian``): the derivative solves then attach their own
implicit derivatives through the same Function, with the maps `AdjointMap` / `TangentMap`.

Written the torch.func way (ctx-free ``forward``, ``setup_context``, every tensor an input,
torch.func inside the rules, never hooks). Under ``torch.compile`` the jvp-less
`ImplicitCompiled` is applied (Dynamo refuses a Function that defines ``jvp``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._linearize import Linearization, jvp_z
from ._problem import Problem
from ._report import Policy
from ._transforms import is_compiling, outer_visible
from ._tree import TreeSpec, flatten, leaf_count, tree_add, unflatten

# ------------------------------------------------------------------------------ implicit maps


class ProblemMap:
    """``F(p, z) = f(params, z, x)`` of a ``fixed_point`` call, ``p = [*param leaves, *x leaves]``."""

    def __init__(self, problem: Problem):
        self.problem, self.z_spec = problem, problem.z_spec
        self.n_theta = len(problem.param_leaves)

    def __call__(self, p: list, z: Any) -> Any:
        return self.problem.call(p[: self.n_theta], z, p[self.n_theta :])


class AdjointMap:
    """``G(q, u) = J_F(p, z*)ᵀ u + ḡ`` with ``q = [*z*, *p, *ḡ]``: the adjoint equation of ``F``
    as an implicit map of its own (its derivatives in ``q`` are second derivatives of ``F``)."""

    def __init__(self, base: Any):
        self.base, self.z_spec = base, base.z_spec

    def __call__(self, q: list, u: Any) -> Any:
        point, p, rhs = _unpack(self.z_spec, q)
        pulled = torch.func.vjp(lambda z: self.base(p, z), point)[1](u)[0]
        return tree_add(pulled, rhs)


class TangentMap:
    """``T(q, t) = J_F(p, z*) t + b`` with ``q = [*z*, *p, *b]``: the tangent equation of ``F``."""

    def __init__(self, base: Any):
        self.base, self.z_spec = base, base.z_spec

    def __call__(self, q: list, t: Any) -> Any:
        point, p, rhs = _unpack(self.z_spec, q)
        return tree_add(jvp_z(self.base, p, point)(t), rhs)


class MappedMap:
    """``F`` vmapped over the leading dim of ``z`` and of the parameters whose dim is 0
    (``None``: shared by every row): what a vmapped call of the Function becomes."""

    def __init__(self, base: Any, param_dims: list):
        self.base, self.z_spec, self.param_dims = base, base.z_spec, list(param_dims)

    def __call__(self, p: list, z: Any) -> Any:
        return torch.func.vmap(self.base, in_dims=(self.param_dims, 0))(list(p), z)


def _unpack(z_spec: TreeSpec, q: list) -> tuple[Any, list, Any]:
    """``[*z*, *p, *rhs]`` -> ``(z*, p, rhs)`` (z* and rhs shaped like the state)."""
    n = leaf_count(z_spec)
    return unflatten(z_spec, q[:n]), list(q[n:-n]), unflatten(z_spec, q[-n:])


# ------------------------------------------------------------------------------ the Function


class SolveSetup(NamedTuple):
    """How a derivative solve runs: the solver, per-problem layout, what its verdicts turn into
    (``report_only`` for a vmapped call: nothing raised), and the derivative order it belongs
    to (1 for the first backward / jvp)."""

    solver: Any
    per_sample: bool
    policy: Policy
    order: int = 1
    rows_are_problems: bool = False  # the rows are a vmapped call's problems (see `Implicit.vmap`)


class Spec(NamedTuple):
    """The static part of one application of the Function.

    Attributes:
        mode: the implicit mode (``IFT`` / ``Neumann``): its ``adjoint`` and ``tangent`` rules.
        fn: the implicit map ``F(p, z)`` (`ProblemMap`, `AdjointMap`, `TangentMap`, `MappedMap`).
        setup: how its derivative solves run.
        n_state: tensor leaves of the state.
        n_point: 0 (linearise at the output) or ``n_state`` (at the given detached point).
    """

    mode: Any
    fn: Any
    setup: SolveSetup
    n_state: int
    n_point: int

    def derived(self, fn: Any) -> Spec:
        """The spec of a derivative equation of this one (`AdjointMap` / `TangentMap` of ``fn``):
        exact IFT at the next order, linearised at its own output."""
        return self._replace(fn=fn, setup=self.setup._replace(order=self.setup.order + 1), n_point=0)

    def split(self, saved: tuple) -> tuple[Any, list]:
        """Saved tensors -> ``(point pytree, params list)``."""
        return unflatten(self.fn.z_spec, list(saved[: self.n_state])), list(saved[self.n_state :])


def _forward(spec: Spec, *tensors: torch.Tensor) -> tuple:
    return tuple(t.view_as(t) for t in tensors[: spec.n_state])


def _saved(inputs: tuple, output: tuple) -> tuple:
    """``(*point, *params)``: the linearisation point (the output, or the given point) and params."""
    spec, *tensors = inputs
    n = spec.n_state
    point = tuple(output) if spec.n_point == 0 else tuple(tensors[n : n + spec.n_point])
    return (*point, *tensors[n + spec.n_point :])


def _backward(ctx: Any, *cotangents: torch.Tensor | None) -> tuple:
    spec: Spec = ctx.spec
    point, params = spec.split(ctx.saved_tensors)
    z_leaves = flatten(point)[0]
    cotangent = unflatten(
        spec.fn.z_spec, [torch.zeros_like(z) if c is None else c for c, z in zip(cotangents, z_leaves, strict=True)]
    )
    wanted = list(ctx.needs_input_grad[1 + spec.n_state + spec.n_point :])
    lin = Linearization(spec.fn, params, point, wanted)
    u = spec.mode.adjoint(spec, lin, cotangent)
    return (None, *([None] * (spec.n_state + spec.n_point)), *lin.vjp_params(u))


class ImplicitCompiled(torch.autograd.Function):
    """The Function without forward mode, applied while Dynamo traces (it refuses a Function
    that defines ``jvp``: "Unsupported custom jvp")."""

    forward = staticmethod(_forward)
    backward = staticmethod(_backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]
        ctx.save_for_backward(*_saved(inputs, output))


class Implicit(ImplicitCompiled):
    """The Function with forward mode (``jvp``) and a vmap rule (see the module docstring)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]
        saved = _saved(inputs, output)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(ctx, _spec_tangent, *tangents):
        spec: Spec = ctx.spec
        point, params = spec.split(ctx.saved_tensors)
        param_tangents = list(tangents[spec.n_state + spec.n_point :])

        def rule(point: Any, params: list, param_tangents: list) -> list:
            return flatten(spec.mode.tangent(spec, point, params, param_tangents))[0]

        return tuple(outer_visible(rule, point, params, param_tangents))

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):
        dims = in_dims[1:]
        n = spec.n_state + spec.n_point
        if all(d is None for d in dims):
            return Implicit.apply(spec, *tensors), (None,) * spec.n_state
        rows = [
            t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
            for t, d in zip(tensors[:n], dims[:n], strict=True)
        ]
        params = [t if d is None else t.movedim(d, 0) for t, d in zip(tensors[n:], dims[n:], strict=True)]
        mapped = spec._replace(
            fn=MappedMap(spec.fn, [None if d is None else 0 for d in dims[n:]]),
            setup=spec.setup._replace(
                per_sample=True, rows_are_problems=True, policy=spec.setup.policy._replace(report_only=True)
            ),
        )
        return Implicit.apply(mapped, *rows, *params), (0,) * spec.n_state


def attach(spec: Spec, value: Any, point: Any, params: list) -> Any:
    """``value`` (detached ``z*``, a pytree) with the implicit derivatives ``spec`` defines with
    respect to ``params``; ``point`` the detached linearisation point (``None`` for IFT, which
    linearises at the output)."""
    function = ImplicitCompiled if is_compiling() else Implicit
    point_leaves = [] if point is None else flatten(point)[0]
    out = function.apply(spec, *flatten(value)[0], *point_leaves, *params)
    return unflatten(spec.fn.z_spec, list(out))
