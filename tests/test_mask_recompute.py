"""dq.recompute_masks: which joint-graph nodes it marks, that no mask is saved for backward, and
that gradients do not change (also with a random mask, which must not be redrawn).

The FX test traces a small function with ``make_fx`` (no code generation); the inductor test
compiles a JFB training step of a leaky-ReLU DEQ with and without the pass.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import tanh_params
from torch.fx.experimental.proxy_tensor import make_fx

import deq_functional as dq
from deq_functional import mask_recompute
from deq_functional._transforms import inductor_graph_pass


def _marked(fn, *args) -> tuple[int, set[str], set[str]]:
    """(count, marked targets, unmarked targets) of `tag_masks` on ``make_fx(fn)``."""
    gm = make_fx(fn, tracing_mode="fake")(*args)
    count = mask_recompute.tag_masks(gm.graph)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return (count, {str(n.target) for n in calls if "recompute" in n.meta},
            {str(n.target) for n in calls if "recompute" not in n.meta})


def test_elementwise_bool_nodes_are_marked_and_nothing_else():
    def fn(x, y):
        keep = torch.rand_like(x) < 0.5  # random values: the rand is never marked, its comparison is
        mask = (x > 0) & (y <= x)
        return torch.where(mask, x, 0.1 * x) * keep, mask.any(), (x * y).sum()

    count, marked, unmarked = _marked(fn, torch.randn(3, 4), torch.randn(3, 4))
    assert marked == {"aten.lt.Scalar", "aten.gt.Scalar", "aten.le.Tensor", "aten.bitwise_and.Tensor"}
    assert count == 4
    assert {"aten.rand_like.default", "aten.any.default", "aten.where.self", "aten.mul.Tensor"} <= unmarked


def test_a_policy_already_set_is_kept():
    """A mask the user's activation checkpointing chose to save stays saved; the others are marked."""
    from torch.utils.checkpoint import CheckpointPolicy

    gm = make_fx(lambda x: ((x > 0) & (x < 1)).float(), tracing_mode="fake")(torch.randn(3, 4))
    gt = next(n for n in gm.graph.nodes if str(n.target) == "aten.gt.Scalar")
    gt.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    assert mask_recompute.tag_masks(gm.graph) == 2  # lt and bitwise_and
    assert gt.meta["recompute"] is CheckpointPolicy.MUST_SAVE
    assert {str(n.target) for n in gm.graph.nodes if n.meta.get("recompute") is CheckpointPolicy.MUST_RECOMPUTE} == {
        "aten.lt.Scalar", "aten.bitwise_and.Tensor"}


def test_a_graph_without_masks_is_left_as_it_is():
    count, marked, _ = _marked(lambda x, W: torch.tanh(x @ W.T).sum(), torch.randn(3, 4), torch.randn(4, 4))
    assert count == 0 and marked == set()


def test_importing_the_library_does_not_import_inductor():
    code = "import sys, deq_functional as dq; assert 'torch._inductor' not in sys.modules; dq.recompute_masks"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert callable(dq.recompute_masks) and dq.recompute_masks.uuid()


def leaky_f(p, z, x):
    """``z ← leaky_relu(z Wᵀ + x Uᵀ + b, 0.1)``: its backward needs the mask of the pre-activation."""
    return F.leaky_relu(z @ p["W"].T + x @ p["U"].T + p["b"], 0.1)


@pytest.mark.compile
def test_compiled_jfb_step_with_the_pass_saves_no_mask_and_equals_the_step_without_it():
    """Inductor, JFB with Anderson on a leaky-ReLU DEQ whose readout multiplies by a random
    keep-mask (returned, so eager can apply the same one): without the pass the forward saves at
    least one bool tensor for the backward, with it none; the loss, mask, gradients, iterations
    and status are the plain compile's bit for bit, and the gradients are eager's for that mask."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    p0 = tanh_params(8, 8)
    solver = dq.Anderson(tol=1e-10, max_iter=60)

    def loss_fn(W, keep=None):
        z, info = dq.fixed_point(leaky_f, {**p0, "W": W}, x, solver=solver, grad_mode="jfb")
        keep = torch.rand_like(z) < 0.5 if keep is None else keep
        return ((z * keep - y) ** 2).sum(), keep, info

    saved_masks = []  # per compile: bool inputs of its backward graph (values saved by the forward)

    def count_saved_masks(graph):
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        if any(n.name.startswith("tangents") for n in inputs):
            saved_masks.append(sum(mask_recompute._is_mask(n) for n in inputs))

    def run(fn, *keep):
        W = p0["W"].clone().requires_grad_()
        torch.manual_seed(1)
        loss, keep, info = fn(W, *keep)
        loss.backward()
        return loss.detach(), keep, W.grad, info

    with torch.compiler.config.patch(force_disable_caches=True):  # a cached graph would skip the passes
        counting = inductor_graph_pass(count_saved_masks, mask_recompute.__file__)
        plain = run(torch.compile(loss_fn, fullgraph=True, options={"post_grad_custom_post_pass": counting}))
        passed = run(torch.compile(lambda W: loss_fn(W), fullgraph=True, options={
            "post_grad_custom_post_pass": counting, "joint_custom_pre_pass": dq.recompute_masks}))
    assert saved_masks[0] >= 1 and saved_masks[1:] == [0]
    for a, b in zip(passed[:3], plain[:3], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(passed[3].nstep, plain[3].nstep) and torch.equal(passed[3].status, plain[3].status)
    eager = run(loss_fn, passed[1])  # the compiled step's random mask, applied eagerly
    assert torch.equal(eager[3].status, passed[3].status)
    torch.testing.assert_close(passed[2], eager[2], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(passed[0], eager[0], rtol=1e-9, atol=1e-12)
