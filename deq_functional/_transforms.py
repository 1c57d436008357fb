"""Where a solve runs (eagerly, traced by ``torch.compile``, mapped by ``torch.func.vmap``), how a
custom forward-mode rule is made visible to outer ``torch.func`` levels, and every other use of
private torch API in the library, each behind a named function.

The regime picks the iteration driver (see ``_drivers.py``): values can be read on the
host only eagerly. This is the one module that touches private torch API:

* telling "inside vmap" apart needs functorch's interpreter stack
  (``torch._functorch.pyfunctorch``), because a vmapped solve must treat each mapped
  row as its own problem and must not read values (where that API is missing, a probing
  read answers the same question more slowly);
* `scan` is ``torch._higher_order_ops.scan`` (a loop Dynamo traces once, with autograd and
  vmap rules; not public in torch 2.13 / 2.14.1);
* `outer_visible` runs a custom ``jvp`` rule one functorch level down, so that an outer
  ``jvp`` / ``jacfwd`` differentiates it (torch runs custom jvp rules with forward grad
  off, which made every second forward-mode derivative silently zero);
* `is_batch_norm` tests for ``torch.nn.modules.batchnorm._BatchNorm``, the one common base
  of every batch norm layer (``dq.DEQ`` refuses batch statistics with ``per_sample=True``);
* `dynamo_frames_compiled` reads ``torch._dynamo.utils.counters`` (the benchmarking
  fixture counts the compilations inside its timed rounds);
* the FX form of inductor's graphs, for the opt-in pass in ``loop_hoisting.py``: what an op
  node does (`aten_op`, `is_view_op`, `written_arguments`: ``torch._ops.OpOverload`` and its
  schema), the ``auto_functionalized_v2`` wrapper of a ``while_loop`` that writes captured
  buffers, and its schema (`functionalized_while_loop`, `while_loop_schema`), and inductor's
  ``CustomGraphPass`` interface (`inductor_graph_pass`); inductor is imported only when a
  pass is made (about 1 s);
* the joint-graph form, for the opt-in pass in ``mask_recompute.py``: which ops are pointwise
  (`pointwise_op`: the op's ``torch.Tag.pointwise``) and the node annotation AOTAutograd's
  partitioner reads to recompute a value in the backward instead of saving it
  (`recompute_in_backward`: ``node.meta["recompute"]``, the key activation checkpointing
  writes).
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import torch
from torch import nn

from ._tree import tree_map


def scan(body: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any) -> tuple[Any, Any]:
    """``torch._higher_order_ops.scan``: ``carry, y = body(carry, x)`` over the leading dim of ``xs``."""
    from torch._higher_order_ops.scan import scan as torch_scan

    return torch_scan(body, init, xs)


class Regime(enum.Enum):
    EAGER = "eager"  # values readable: exit early, raise on failures
    COMPILED = "compiled"  # traced by Dynamo: torch.while_loop, nothing read
    MAPPED = "mapped"  # inside vmap: fixed masked budget, nothing read


# Whether a no-grad torch.while_loop body may write buffers it closes over (the solver history,
# see _drivers.run_while_loop). torch 2.13 traces such writes, but fails (functorch "layer.key() ==
# TransformType::Functionalize INTERNAL ASSERT") when the body also runs a torch.func transform:
# IFT's re-linearised vjp, or an f that uses vmap / jvp itself. 2.14.1 traces both.
CAPTURED_LOOP_WRITES = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def is_compiling() -> bool:
    """True while Dynamo traces the caller (public API)."""
    return torch.compiler.is_compiling()


def inside_vmap(sample: torch.Tensor | None = None) -> bool:
    """True inside ``torch.func.vmap`` (each mapped problem is one problem of its own).

    ``sample``: a tensor of the computation that vmap batches when it maps anything the
    solve depends on (e.g. ``f(z0)``). Under ``torch.compile`` it is the only evidence
    (tested for being batched); elsewhere it is probed with a read where functorch's
    interpreter stack is not importable (a fresh tensor would read fine inside vmap).
    """
    if is_compiling():
        # Dynamo cannot walk functorch's interpreter stack, but it traces this test of the
        # tensor itself (True for a tensor vmap has batched, torch 2.13 and 2.14.1)
        from torch._C._functorch import is_batchedtensor

        return sample is not None and is_batchedtensor(sample)
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - other torch versions
        return sample is not None and _read_refused(sample)
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _read_refused(t: torch.Tensor) -> bool:  # pragma: no cover - fallback only
    try:
        t.reshape(-1)[:1].tolist()
    except RuntimeError:  # vmap refuses data-dependent reads
        return True
    return False


def regime(sample: torch.Tensor | None = None) -> Regime:
    """The regime of the code running now (``sample``: see `inside_vmap`)."""
    if inside_vmap(sample):  # first: vmap under compile is MAPPED (while_loop has no vmap rule)
        return Regime.MAPPED
    if is_compiling():
        return Regime.COMPILED
    return Regime.EAGER


def outer_visible(rule: Callable[..., Any], *args: Any) -> Any:
    """``rule(*args)`` run so that *outer* ``torch.func.jvp`` levels differentiate it.

    torch (2.13, 2.14.1) calls a custom ``autograd.Function.jvp`` with forward-mode AD
    disabled, so to an enclosing ``jvp`` the rule's result is a constant and
    ``jvp(jvp(...))`` / ``jacfwd(jacfwd(...))`` lose every term that differentiates the rule.
    Re-enabling forward AD alone is not enough: the rule's tensors are wrapped at the current
    level L and carry its tangents, so every op would be differentiated at L again. So, as
    functorch's own generated rules do: unwrap level L, run the rule one level lower with the
    forward-AD mode L was entered with, wrap the result back at L. Outside functorch's ``jvp``
    (plain ``torch.autograd.forward_ad``, which cannot nest) the rule runs as it is.
    """
    from torch._C._functorch import TransformType, _unwrap_for_grad, _wrap_for_grad, peek_interpreter_stack
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    from torch.autograd.forward_ad import _set_fwd_grad_enabled

    if peek_interpreter_stack() is None:
        return rule(*args)
    interpreter: Any = retrieve_current_functorch_interpreter()  # a JvpInterpreter when the key says so
    if interpreter.key() != TransformType.Jvp:
        return rule(*args)
    level = interpreter.level()
    unwrap = lambda t: _unwrap_for_grad(t, level) if isinstance(t, torch.Tensor) else t  # noqa: E731
    inner = [tree_map(unwrap, a) for a in args]
    with _set_fwd_grad_enabled(interpreter.prev_fwd_grad_mode()), interpreter.lower():
        out = rule(*inner)
    return tree_map(lambda t: _wrap_for_grad(t, level), out)


def is_batch_norm(module: nn.Module) -> bool:
    """True for a batch norm layer: ``BatchNorm1d/2d/3d``, their lazy forms, ``SyncBatchNorm``
    and any subclass of their base.

    Private API because torch exports no common base of these classes:
    ``torch.nn.modules.batchnorm._BatchNorm`` is the one class they all derive from (a tuple
    of the public classes would miss user subclasses of the base).
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def dynamo_frames_compiled() -> int | None:
    """Frames Dynamo has compiled in this process (its counter of compile attempts), or None.

    Private API because torch offers no public count of compilations:
    ``torch._dynamo.utils.counters["frames"]["total"]`` is the counter Dynamo keeps (the one
    ``TORCH_LOGS`` and its own tests read). None where it is absent (another torch version).
    """
    try:
        from torch._dynamo.utils import counters

        return int(counters["frames"]["total"])
    except Exception:  # noqa: BLE001 - a private counter: absent on another torch, say so
        return None


def aten_op(target: Any) -> bool:
    """Whether an FX node's target is a pure ATen / prims operator: no mutation, no random
    numbers (``torch._ops.OpOverload``, its schema and tags)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def pointwise_op(target: Any) -> bool:
    """Whether an FX node's target is a pure (`aten_op`) elementwise operator, such as ``gt``,
    ``le``, ``logical_and``: ``torch.Tag.pointwise`` among its tags."""
    return aten_op(target) and torch.Tag.pointwise in target.tags


def recompute_in_backward(node: Any) -> bool:
    """Mark a joint-graph node so that AOTAutograd's min-cut partitioner recomputes it in the
    backward graph instead of saving it for backward: its inputs are saved (or recomputed in
    turn). The mark is ``CheckpointPolicy.MUST_RECOMPUTE`` under ``node.meta["recompute"]``,
    as ``torch.utils.checkpoint``'s selective policies write it (torch 2.13, 2.14.1). A node
    that already carries a policy (the user's activation checkpointing set one) keeps it.
    Returns whether the node was marked."""
    from torch.utils.checkpoint import CheckpointPolicy

    if node.meta.get("recompute") is not None:
        return False
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    return True


def is_view_op(target: Any) -> bool:
    """Whether an FX node's target is an operator whose output is a view of its first input."""
    return isinstance(target, torch._ops.OpOverload) and target.is_view


def written_arguments(target: Any) -> list[tuple[int, str]]:
    """(position, name) of every argument an operator writes in place (none for non-operators)."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.is_mutable:
        return []
    return [(i, a.name) for i, a in enumerate(target._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def functionalized_while_loop(target: Any, args: tuple) -> bool:
    """Whether an FX call is ``auto_functionalized_v2(while_loop, ...)``: the form a
    ``while_loop`` that writes captured buffers takes in inductor's post-grad graphs."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

    return target is auto_functionalized_v2 and bool(args) and args[0] is torch.ops.higher_order.while_loop


def while_loop_schema(old: Any, cond: Any, body: Any, carried: list, additional: list) -> Any:
    """The ``_op_schema`` constant of an ``auto_functionalized_v2(while_loop)`` call for these
    (example) inputs, with the in-place writes of the ``old`` constant (a pytree spec holding
    the schema, as torch stores it)."""
    from torch._higher_order_ops.auto_functionalize import SchemaHolder
    from torch.utils import _pytree

    arguments = SchemaHolder.from_tree_spec(old).schema.arguments[2:]  # after cond_fn, body_fn
    mutated = ",".join(str(i) for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write)
    schema = torch.ops.higher_order.while_loop.gen_schema(cond, body, carried, additional, mutated)
    return _pytree.tree_flatten(SchemaHolder(schema))[1]


def inductor_graph_pass(fn: Callable[[Any], Any], source: str) -> Any:
    """``fn(graph)`` as an inductor ``CustomGraphPass`` (for ``options={"post_grad_custom_pre_pass":
    ...}`` or ``{"joint_custom_pre_pass": ...}``), whose ``uuid`` keys inductor's FX graph cache
    on the file ``source``."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class GraphPass(CustomGraphPass):
        def __call__(self, graph: Any) -> None:
            fn(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((source,))

        def __repr__(self) -> str:
            return f"<inductor graph pass {fn.__module__}.{fn.__qualname__}>"

    return GraphPass()
