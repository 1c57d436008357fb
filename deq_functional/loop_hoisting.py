"""Loop-invariant code motion for ``torch.while_loop`` bodies: an inductor graph pass, opt-in.

Inductor compiles a ``while_loop`` body as a graph of its own and runs every node of it every
iteration, also the nodes whose inputs never change inside the loop (it has no loop-invariant
code motion; XLA has). The library's compiled IFT backward is the case that pays for it: its
adjoint solve needs ``u ↦ Jᵀu`` at the fixed point, and because torch cannot lift a vjp closure
made outside a loop body into it, the body re-runs f's forward at z* every iteration (see
``_linearize.py``): one forward of f per adjoint iteration whose result is the same every time.

`hoist_loop_invariants` moves such nodes out. For each ``while_loop`` in a post-grad graph (also
one wrapped in ``auto_functionalized_v2``, as loops that write captured buffers in place are),
a body node is *invariant* when it is a pure ATen / prims op (no mutation, no random numbers, no
higher-order op) all of whose inputs are invariant; the loop's non-mutated captured inputs
(``additional_inputs``) are the seeds. The invariant values the rest of the body reads are
computed once, before the loop, and passed in as new captured inputs; the body reads them
instead of recomputing them. Kept in the body: values that are only views of inputs (nothing
to save), values made of constants alone (inductor inlines them where they are read), values
the body returns (a loop's outputs may not alias its inputs), and anything a mutating op
writes, or depends on such a value.

Use it per compile, through inductor's option (the library sets no global flag)::

    step = torch.compile(step, fullgraph=True,
                         options={"post_grad_custom_pre_pass": dq.hoist_loop_invariants})

It changes where values are computed, not how: the hoisted ops are the same ops on the same
inputs, so results equal the unhoisted compile's (tests/test_loop_hoisting.py checks them
bitwise, and against eager). Cost: the hoisted values stay alive for the whole loop (for IFT's
adjoint, about one forward's activations of f), and they are computed even when the loop runs
no iteration. Measured gain: bench/analysis.md and the compile guide.

It works on the FX form of inductor's graphs as torch 2.13 and 2.14.1 write them; the private
torch API that needs is behind named helpers in ``_transforms.py``. It is imported (and with it
inductor, about 1 s) only when ``dq.hoist_loop_invariants`` is first used.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx

from ._transforms import (
    aten_op,
    functionalized_while_loop,
    inductor_graph_pass,
    is_view_op,
    while_loop_schema,
    written_arguments,
)

__all__ = ["hoist", "hoist_loop_invariants"]

_INPUT_KEY = re.compile(r"^(_?)(carried|additional)_input(\d+)(_base_index)?$")


@dataclass
class _Loop:
    """One ``while_loop`` call in a graph, in either of its two FX forms.

    ``carried`` / ``additional``: the outer nodes passed in, in order; ``None`` for an input that
    ``auto_functionalized_v2`` passes as a mutated base (``_additional_inputK_base_index``)."""

    node: fx.Node
    cond: fx.GraphModule
    body: fx.GraphModule
    carried: list
    additional: list
    functionalized: bool

    @classmethod
    def at(cls, node: fx.Node) -> _Loop | None:
        if node.op != "call_function":
            return None
        gm = node.graph.owning_module

        def graph_of(ref: Any) -> fx.GraphModule:  # a get_attr node of a cond / body graph
            return getattr(gm, ref.target)

        if node.target is torch.ops.higher_order.while_loop and not node.kwargs:
            cond, body, carried, additional = cast(tuple[Any, Any, tuple, tuple], node.args)
            return cls(node, graph_of(cond), graph_of(body), list(carried), list(additional), False)
        if functionalized_while_loop(node.target, node.args):
            inputs: dict[str, dict[int, fx.Node | None]] = {"carried": {}, "additional": {}}
            for key, value in node.kwargs.items():
                m = _INPUT_KEY.match(key)
                if m:
                    inputs[m.group(2)][int(m.group(3))] = None if m.group(4) else cast(fx.Node, value)
            carried, additional = ([d[i] for i in range(len(d))] for d in (inputs["carried"], inputs["additional"]))
            return cls(node, graph_of(node.kwargs["cond_fn"]), graph_of(node.kwargs["body_fn"]), carried, additional, True)
        return None

    def captured(self) -> dict[fx.Node, fx.Node | None]:
        """{body placeholder of a captured input: the outer node passed in (None: a mutated base)}."""
        placeholders = [n for n in self.body.graph.nodes if n.op == "placeholder"]
        return dict(zip(placeholders[len(self.carried):], self.additional, strict=True))

    def add_inputs(self, values: list[fx.Node]) -> None:
        """Append ``values`` to the loop's captured inputs (outer graph, cond and body)."""
        for sub in (self.cond, self.body):
            last = [n for n in sub.graph.nodes if n.op == "placeholder"][-1]
            for k, value in enumerate(values):
                with sub.graph.inserting_after(last):
                    last = sub.graph.placeholder(f"hoisted_{len(self.additional) + k}")
                last.meta.update(value.meta)
        if not self.functionalized:
            cond, body, carried, additional = cast(tuple[Any, Any, tuple, tuple], self.node.args)
            self.node.args = (cond, body, carried, (*additional, *values))
        else:
            kwargs = dict(self.node.kwargs)
            for k, value in enumerate(values):
                kwargs[f"additional_input{len(self.additional) + k}"] = value
            old_schema = cast(fx.Node, kwargs["_op_schema"])
            kwargs["_op_schema"] = self._schema_node(kwargs, values)
            self.node.kwargs = kwargs
            if not old_schema.users:  # superseded
                self.node.graph.erase_node(old_schema)
        self.additional += values

    def _schema_node(self, kwargs: dict, values: list[fx.Node]) -> fx.Node:
        """A get_attr node of the loop's schema with ``values`` appended as (read-only) inputs."""
        graph = self.node.graph
        gm = graph.owning_module
        bases = kwargs["_all_bases"]

        def example(kind: str, i: int):
            node = kwargs.get(f"{kind}_input{i}")
            return (node if node is not None else bases[kwargs[f"_{kind}_input{i}_base_index"]]).meta["val"]

        carried = [example("carried", i) for i in range(len(self.carried))]
        additional = [example("additional", i) for i in range(len(self.additional))] + [v.meta["val"] for v in values]
        old = getattr(gm, kwargs["_op_schema"].target)
        name = f"_hoisted_schema_{self.node.name}"
        setattr(gm, name, while_loop_schema(old, self.cond, self.body, carried, additional))
        with graph.inserting_before(self.node):
            return graph.create_node("get_attr", name)  # as torch's tracer stores its constants


def _is_pure(node: fx.Node) -> bool:
    """An ATen / prims op without mutation or random numbers, or ``getitem`` of one's tuple."""
    return node.op == "call_function" and (node.target is operator.getitem or aten_op(node.target))


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and is_view_op(node.target)


def _written(graph: fx.Graph) -> set[fx.Node]:
    """Nodes some op in ``graph`` writes in place (followed through views to their base)."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        for i, name in written_arguments(node.target) if node.op == "call_function" else []:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(name)
            for written in value if isinstance(value, (list, tuple)) else [value]:
                while isinstance(written, fx.Node):
                    out.add(written)
                    written = written.args[0] if _is_view(written) and written.args else None
    return out


def _invariant_outputs(loop: _Loop) -> list[fx.Node]:
    """The body's invariant nodes that the rest of the body reads and that are worth passing in,
    in the body's order: each computes something (not only views) from the loop's inputs (a
    value made of constants alone, such as an index mask, inductor inlines where it is read)."""
    body = loop.body.graph
    written = _written(body)
    seeds = {ph for ph, outer in loop.captured().items() if outer is not None}
    invariant = seeds - written
    reads_input = set(invariant)  # invariant nodes computed from a loop input
    for node in body.nodes:
        if _is_pure(node) and node not in written and all(a in invariant for a in node.all_input_nodes):
            invariant.add(node)
            if any(a in reads_input for a in node.all_input_nodes):
                reads_input.add(node)
    hoisted = invariant - seeds

    def computes(node: fx.Node) -> bool:  # does node's hoisted closure do arithmetic on data?
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or n not in hoisted:
                continue
            seen.add(n)
            if not _is_view(n) and n.target is not operator.getitem and n.all_input_nodes:
                return True
            stack.extend(n.all_input_nodes)
        return False

    def passable(node: fx.Node) -> bool:
        returned = any(u.op == "output" for u in node.users)
        tensor = isinstance(node.meta.get("val"), torch.Tensor)
        return not returned and tensor and node in reads_input and computes(node)

    changed = True
    while changed:  # demote what cannot or need not be passed in; its inputs may become frontier
        changed = False
        for node in [n for n in body.nodes if n in hoisted]:
            if any(u not in hoisted for u in node.users) and not passable(node):
                hoisted.discard(node)
                changed = True
    return [n for n in body.nodes if n in hoisted and any(u not in hoisted for u in n.users)]


def _hoist_loop(loop: _Loop) -> int:
    frontier = _invariant_outputs(loop)
    if not frontier:
        return 0
    body, graph = loop.body.graph, loop.node.graph
    env = loop.captured()
    old_placeholders = len(loop.carried) + len(env)
    needed: set[fx.Node] = set()
    stack = list(frontier)
    while stack:
        n = stack.pop()
        if n not in needed and n.op != "placeholder":
            needed.add(n)
            stack.extend(n.all_input_nodes)
    with graph.inserting_before(loop.node):
        for node in body.nodes:
            if node in needed:
                env[node] = graph.node_copy(node, lambda a: env[a])
    loop.add_inputs([cast(fx.Node, env[n]) for n in frontier])  # copies made just above
    new_placeholders = [n for n in body.nodes if n.op == "placeholder"][old_placeholders:]
    for old, new in zip(frontier, new_placeholders, strict=True):
        old.replace_all_uses_with(new)
    body.eliminate_dead_code()
    for sub in (loop.cond, loop.body):
        sub.graph.lint()
        sub.recompile()
    return len(frontier)


def hoist(graph: fx.Graph) -> int:
    """Hoist the invariant values out of every ``while_loop`` body called in ``graph`` (nested
    loops are handled as inductor visits their graphs, innermost first); returns how many
    values now enter a loop from outside."""
    count = 0
    for node in list(graph.nodes):
        loop = _Loop.at(node)
        if loop is not None:
            count += _hoist_loop(loop)
    if count:
        graph.lint()
    return count


hoist_loop_invariants = inductor_graph_pass(hoist, __file__)
"""An inductor graph pass that computes loop-invariant values of ``torch.while_loop`` bodies once,
before the loop. Pass it per compile call::

    torch.compile(fn, fullgraph=True, options={"post_grad_custom_pre_pass": dq.hoist_loop_invariants})

What moves: body values computed by pure ATen / prims ops from the loop's read-only captured
inputs alone (for IFT's compiled adjoint: f's forward at z*, which the body re-runs to linearise
f every iteration). What stays: views of inputs, values made of constants only, random numbers,
values the body returns, and anything written in place (the solvers' history) or computed from
it. The moved ops are the same ops on the same inputs: results equal the unhoisted compile's bit
for bit. Cost: the moved values stay in memory while the loop runs (for IFT's adjoint about one
forward's activations of f) and are computed even if the loop runs no iteration.

It is `hoist` as an inductor ``CustomGraphPass``, run on every graph inductor compiles (forward
and backward); its ``uuid`` keys inductor's FX graph cache on this file, so a graph cached by
another version of the pass is not reused. Measured gains: the compile guide ("On a CPU")."""
