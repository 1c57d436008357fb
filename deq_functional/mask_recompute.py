"""Recompute boolean masks in the backward instead of saving them: an inductor joint-graph pass, opt-in.

A compiled training step saves, for its backward, whatever AOTAutograd's min-cut partitioner
picks; for a ReLU / leaky ReLU / clamp / max-pool layer that is often the boolean mask of the
forward (``x > 0``), one byte per element where the float input costs four. On x86 CPUs the
bytes are the cheap part: inductor's vectorised C++ writes and reads bool tensors through a
generic, element-by-element path (torch 2.13 and 2.14.1, AVX2 and AVX-512): on the conv net's
state (165,888 elements, bench/RESULTS.md table 3) the compiled ``a > 0`` takes ~1.5 ms writing
bool against ~0.1 ms eagerly or writing float32, and reading a bool mask in ``where`` ~0.6 ms
against ~0.1 ms for a float32 mask. The conv net's JFB step spent ~6 ms of its ~52 ms there,
which made the compiled step slower than eager.

`recompute_masks` marks every boolean-valued elementwise node of the joint forward-backward
graph for recomputation (`tag_masks`). The partitioner then saves the float values the mask is
computed from (or what they are recomputed from in turn) and the backward kernel evaluates the
comparison itself, fused into its elementwise work: no mask made by an elementwise op crosses
from the forward graph to the backward graph. Use it per compile, through inductor's option (the library sets
no global flag)::

    step = torch.compile(loss_fn, fullgraph=True,
                         options={"joint_custom_pre_pass": dq.recompute_masks})

It changes what is saved, not what is computed: a recomputed mask is the same comparison of the
same float values, so gradients equal the plain compile's bit for bit (tests/test_mask_recompute.py).
Random masks (dropout's ``rand < p``) stay correct: random ops are never recomputed, so their
random values are saved and the comparison is redone on them. Costs: the saved float values
can take more memory than the masks (the conv JFB step: 10.5 MB against 8.5 MB plain compiled
and 17.7 MB eager), and each recomputed comparison reads its float inputs in the backward, inside
the kernel that used to read the mask. It helps where the step saves masks (ReLU-family and max-pool
layers); a tanh / sigmoid network has none and is left as it is. Measured gain: bench/RESULTS.md
and the compile guide.

It works on the FX form of the joint graph that torch 2.13 and 2.14.1 hand to
``joint_custom_pre_pass``; the private torch API that needs is behind named helpers in
``_transforms.py``. It is imported (and with it inductor, about 1 s) only when
``dq.recompute_masks`` is first used.
"""

from __future__ import annotations

import torch
from torch import fx

from ._transforms import inductor_graph_pass, pointwise_op, recompute_in_backward

__all__ = ["recompute_masks", "tag_masks"]


def _is_mask(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def tag_masks(graph: fx.Graph) -> int:
    """Mark every boolean-valued elementwise node of a joint graph to be recomputed in the
    backward; returns how many were marked.

    A node is marked when it calls a pure elementwise ATen / prims operator (no mutation, no
    random numbers: a random op is never marked, so its values are saved) and its value is a
    bool tensor of any shape. Nodes that only view a mask, reductions to a mask (``any``,
    ``all``) and higher-order ops (``while_loop``: a solve's outputs are never marked) are left to
    the partitioner, and a node that already carries a recompute policy (``torch.utils.checkpoint``
    with a selective policy sets them) keeps its own. Cost: one pass over the nodes.
    """
    marked = 0
    for node in graph.nodes:
        if node.op == "call_function" and pointwise_op(node.target) and _is_mask(node):
            marked += recompute_in_backward(node)
    return marked


recompute_masks = inductor_graph_pass(tag_masks, __file__)
"""An inductor graph pass after which no bool mask is saved for the backward: the backward
recomputes each from the float values it compares. Pass it per compile call::

    torch.compile(fn, fullgraph=True, options={"joint_custom_pre_pass": dq.recompute_masks})

What it marks: every bool-valued elementwise ATen / prims node of the joint forward-backward
graph (``gt``, ``le``, ``logical_and``, ...), never a random op, so a random mask is recomputed
from its saved random values. The partitioner then saves the comparison's float inputs instead
of its bool output: gradients equal the plain compile's bit for bit, and the saved bytes can grow
(a float32 value is 4 bytes per element, a mask 1). A graph without masks is left as it is.

It is `tag_masks` as an inductor ``CustomGraphPass``, run on the joint graph before AOTAutograd
partitions it; its ``uuid`` keys inductor's FX graph cache on this file. Measured gains: the
compile guide ("On a CPU")."""
