"""Vector-Jacobian products of ``z ↦ f(params, z, x)`` with params and x held fixed."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tree import flatten, tree_map, unflatten


def vjp_in_z(f_of_z: Callable[[Any], Any], z: Any) -> Callable[[Any], Any]:
    """Return ``v ↦ J(z)ᵀ v`` for ``J = ∂f_of_z/∂z`` (pytrees shaped like ``z``); no Jacobian is formed.

    Uses ``torch.func.vjp`` (one forward now, one backward per call). torch.func
    refuses to run under ``torch.autograd.graph.saved_tensors_hooks`` (e.g. inside
    ``save_on_cpu()``); there the same product comes from eager autograd on a
    recomputed graph, so IFT/Neumann backward work inside those memory tools too.
    """
    try:
        _, pullback = torch.func.vjp(f_of_z, z)
    except RuntimeError as err:
        if "saved tensor hooks" not in str(err):
            raise
        return _autograd_vjp(f_of_z, z)
    return lambda v: pullback(v)[0]


def _autograd_vjp(f_of_z: Callable[[Any], Any], z: Any) -> Callable[[Any], Any]:
    z_leaves, spec = flatten(tree_map(lambda t: t.detach().requires_grad_(True), z))
    with torch.enable_grad():
        out_leaves = flatten(f_of_z(unflatten(spec, z_leaves)))[0]

    def pullback(v: Any) -> Any:
        grads = torch.autograd.grad(out_leaves, z_leaves, flatten(v)[0], retain_graph=True, allow_unused=True)
        return unflatten(spec, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, z_leaves)])

    return pullback
