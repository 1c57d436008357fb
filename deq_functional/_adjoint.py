"""The ``autograd.Function`` behind IFT and Neumann: identity forward, adjoint-vector backward.

``ImplicitBackward.apply(mode, call, *z_out, *z_K, *params, *x)`` returns ``z_out``
(= ``f(params, z_K, x)``, which carries the graph to params and x). Its backward
replaces the incoming cotangent ``ḡ`` by the mode's adjoint vector ``u`` (IFT:
``u = (I − Jᵀ)⁻¹ ḡ``), so autograd continues through ``z_out``'s graph and returns
``(∂f/∂θ)ᵀ u`` to params and x. Written the torch.func way: ctx-free ``forward``,
``setup_context``, every tensor an input, a generated vmap rule, ``torch.func.vjp``
(never hooks) in the backward — so ``loss.backward()``, ``torch.func.grad``/``vmap`` and
AOTAutograd's compiled backward all work.
"""

from __future__ import annotations

from typing import Any

import torch

from ._transforms import inside_vmap, is_compiling
from ._tree import flatten, unflatten


class ImplicitBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(mode, call, *tensors):
        return tuple(t.view_as(t) for t in tensors[: call.problem.n_state_leaves])

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, call, *tensors = inputs
        ctx.mode, ctx.call = mode, call
        ctx.save_for_backward(*tensors[call.problem.n_state_leaves :])

    @staticmethod
    def backward(ctx, *cotangents):
        problem = ctx.call.problem
        saved = ctx.saved_tensors
        n_z, n_p = len(cotangents), len(problem.param_leaves)
        z_leaves = saved[:n_z]
        params = [t.detach() for t in saved[n_z : n_z + n_p]]
        x = [t.detach() for t in saved[n_z + n_p :]]
        z_K = unflatten(problem.z_spec, list(z_leaves))
        cotangent = unflatten(
            problem.z_spec, [torch.zeros_like(z) if c is None else c for c, z in zip(cotangents, z_leaves, strict=True)]
        )
        u = ctx.mode.adjoint(ctx.call, z_K, params, x, cotangent)
        return (None, None, *flatten(u)[0], *([None] * len(saved)))


def implicit_output(mode: Any, call: Any, z_K: Any) -> Any:
    """``z_star = f(params, z_K, x)`` routed through ``ImplicitBackward`` so backward uses ``mode.adjoint``."""
    problem = call.problem
    z_out = problem.map(detached=False)(z_K)
    out_leaves = flatten(z_out)[0]
    if is_compiling() and inside_vmap(out_leaves[0]):
        # Dynamo cannot trace a custom autograd.Function inside vmap (torch 2.13, 2.14.1: "vmap
        # over ApplyTemplate"), and batched tensors hide whether anything requires grad.
        if torch.is_grad_enabled():
            raise NotImplementedError(
                f"fixed_point: grad_mode={type(mode).__name__} under torch.compile over torch.func.vmap needs a "
                "custom autograd.Function, which torch cannot compile inside vmap. Use per_sample=True instead "
                "of vmap, vmap outside the compiled function, grad_mode='jfb' / Phantom / Unrolled, or "
                "torch.no_grad() if no gradient is wanted."
            )
        return z_out
    if is_compiling() and not any(t.requires_grad for t in out_leaves):
        # Nothing to differentiate, so the Function would be the identity; skipping it sidesteps
        # a Dynamo bug in torch 2.14 that passes a ctx to a setup_context-style forward then.
        # (Only under compile: inside vmap, batched tensors report requires_grad=False even when
        # the tensors they wrap require it, and skipping would silently give JFB's gradient.)
        return z_out
    tensors = (*out_leaves, *flatten(z_K)[0], *problem.param_leaves, *problem.x_leaves)
    return unflatten(problem.z_spec, list(ImplicitBackward.apply(mode, call, *tensors)))
