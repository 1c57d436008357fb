"""The products of an implicit map's Jacobians that the derivative rules need, at one point.

For ``F(p, z)`` (``p`` a list of tensors, ``z`` a pytree; the maps of ``_implicit.py``) at
``(p, z*)``, with ``J = ∂F/∂z`` and ``Jₚ = ∂F/∂p``, `Linearization` gives the reverse products
``u ↦ Jᵀu`` and ``u ↦ Jₚᵀu``, built the cheapest way that is still correct where the backward
runs:

=================== ====================================== =====================================
where               how                                    cost
=================== ====================================== =====================================
plain backward (no  one autograd graph of F on detached    one forward of F in all; each product
graph of it wanted) leaves; each product asks only for its  backpropagates only the branch it
                    inputs                                  needs (``Jᵀu`` skips the weights)
a graph of the      ``torch.func.vjp`` at the given        one forward of F per kind of product;
backward wanted     tensors (they carry outer derivatives)  the products are differentiable
traced by Dynamo    ``Jᵀu`` re-runs F inside the           a forward and a backward of F per
                    ``torch.while_loop`` body (a vjp        product
                    closure made outside the body cannot
                    be lifted into it)
=================== ====================================== =====================================

`jvp_z` / `jvp_params` give the forward products ``t ↦ J t`` and ``ṗ ↦ Jₚ ṗ`` by
``torch.func.jvp`` (a forward and a forward-mode pass of F each), differentiable.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._transforms import is_compiling
from ._tree import detached, flatten, tree_map, unflatten

Map = Callable[[list, Any], Any]  # F(p, z) -> z


class Linearization:
    """The reverse products of ``fn`` at ``(params, point)`` (see the module's table).

    Args:
        fn: ``F(p, z)``.
        params: ``p``, a list of tensors.
        point: ``z*``, a pytree of tensors.
        wanted: one bool per parameter: whether `vjp_params` must return its product.

    Products (each a pytree shaped like ``z``, or a list for `vjp_params`):

    * ``solve_vjp(u)``: ``Jᵀu`` on values only (no graph, no tangents): for the iterations of
      an adjoint solve;
    * ``vjp_z(u)``: ``Jᵀu``, differentiable where a graph of the backward is wanted;
    * ``vjp_params(u)``: ``[Jₚᵀu]``, a tensor per wanted parameter (``None`` elsewhere),
      differentiable where a graph is wanted.
    """

    def __init__(self, fn: Map, params: list, point: Any, wanted: list):
        self.fn, self.params, self.point, self.wanted = fn, list(params), point, list(wanted)
        self.traced = is_compiling()
        self.differentiable = torch.is_grad_enabled() and not self.traced
        self._graph: tuple | None = None
        self._pullbacks: dict[bool, Callable] = {}
        if self.traced:  # fresh copies, made outside the loop body (see `_relinearized`)
            self._copies = tree_map(torch.clone, (self.point, self.params))

    def solve_vjp(self, u: Any) -> Any:
        if self.traced:
            return self._relinearized(u)
        if self.differentiable:
            return self._pullback(detach=True)(u)
        return self._graph_grads(u, z=True)

    def vjp_z(self, u: Any) -> Any:
        if self.differentiable or self.traced:
            return self._pullback(detach=False)(u)
        return self._graph_grads(u, z=True)

    def vjp_params(self, u: Any) -> list:
        if not any(self.wanted):
            return [None] * len(self.params)
        if self.differentiable or self.traced:
            chosen = [t for t, w in zip(self.params, self.wanted, strict=True) if w]
            pullback = torch.func.vjp(lambda *c: self.fn(_merge(self.params, self.wanted, c), self.point), *chosen)[1]
            grads = list(pullback(u))
        else:
            grads = self._graph_grads(u, z=False)
        it = iter(grads)
        return [next(it) if w else None for w in self.wanted]

    def _pullback(self, detach: bool) -> Callable[[Any], Any]:
        """``u ↦ Jᵀu`` from one ``torch.func.vjp`` (at detached copies when ``detach``)."""
        if detach not in self._pullbacks:
            params, point = (detached(self.params), detached(self.point)) if detach else (self.params, self.point)
            pullback = torch.func.vjp(lambda z: self.fn(params, z), point)[1]
            self._pullbacks[detach] = lambda u: pullback(u)[0]
        return self._pullbacks[detach]

    def _graph_grads(self, u: Any, z: bool) -> Any:
        """``Jᵀu`` (``z``) or the wanted ``Jₚᵀu`` from one autograd graph of F on detached leaves;
        ``torch.autograd.grad`` backpropagates only what the asked-for inputs need. (Also where
        torch.func refuses to run: under ``saved_tensors_hooks`` such as ``save_on_cpu``.)"""
        if self._graph is None:
            z_leaves, z_spec = flatten(tree_map(lambda t: t.detach().requires_grad_(), self.point))
            p = [t.detach().requires_grad_(w) for t, w in zip(self.params, self.wanted, strict=True)]
            with torch.enable_grad():
                out = flatten(self.fn(p, unflatten(z_spec, z_leaves)))[0]
            self._graph = (z_leaves, z_spec, [t for t, w in zip(p, self.wanted, strict=True) if w], out)
        z_leaves, z_spec, chosen, out = self._graph
        inputs = z_leaves if z else chosen
        u_leaves = flatten(u)[0]
        live = [i for i, t in enumerate(out) if t.requires_grad]  # outputs computed from the inputs
        grads = [None] * len(inputs)
        if live:
            grads = torch.autograd.grad(
                [out[i] for i in live], inputs, [u_leaves[i] for i in live], retain_graph=z, allow_unused=True
            )
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]
        return unflatten(z_spec, grads) if z else grads

    def _relinearized(self, u: Any) -> Any:
        """``Jᵀu`` re-running F at every call, for a ``torch.while_loop`` body traced by Dynamo
        (torch 2.13 and 2.14.1 cannot lift a vjp closure, saved tensors or a view made outside
        the body into it). Tensors the body closes over must not alias one another (z's leaves
        may be views of one flat iterate): fresh copies made once, and again inside the body
        (2.13 refuses to trace a vjp on the lifted ones)."""
        point, params = tree_map(torch.clone, self._copies)
        return torch.func.vjp(lambda v: self.fn(params, v), point)[1](u)[0]


def jvp_z(fn: Map, params: list, point: Any) -> Callable[[Any], Any]:
    """``t ↦ J t`` by ``torch.func.jvp`` (a forward and a forward-mode pass of F per product)."""
    return lambda t: torch.func.jvp(lambda z: fn(params, z), (point,), (t,))[1]


def jvp_params(fn: Map, params: list, point: Any, tangents: list) -> Any:
    """``Jₚ ṗ`` over the parameters that have a tangent (``None`` entries have none); zeros
    shaped like ``point`` when none has."""
    wanted = [t is not None for t in tangents]
    if not any(wanted):
        return tree_map(torch.zeros_like, point)
    primals = tuple(p for p, w in zip(params, wanted, strict=True) if w)
    return torch.func.jvp(
        lambda *c: fn(_merge(params, wanted, c), point), primals, tuple(t for t in tangents if t is not None)
    )[1]


def _merge(params: list, wanted: list, chosen: tuple) -> list:
    """``params`` with the wanted entries replaced, in order, by ``chosen``."""
    it = iter(chosen)
    return [next(it) if w else t for t, w in zip(params, wanted, strict=True)]
