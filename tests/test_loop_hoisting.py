"""dq.hoist_loop_invariants: what leaves a while_loop body, what stays, and that results do not change.

The FX tests trace small loops with ``make_fx`` (no code generation) and run them before and
after the pass; the inductor test compiles an IFT training step with and without it.
"""

import subprocess
import sys

import pytest
import torch
from helpers import tanh_f, tanh_params, tuple_f, tuple_params
from torch.fx.experimental.proxy_tensor import make_fx

import deq_functional as dq
from deq_functional import loop_hoisting
from deq_functional._transforms import CAPTURED_LOOP_WRITES, inductor_graph_pass

WHILE_LOOP = torch.ops.higher_order.while_loop
STEPS = 5


def _loop(body, carried, additional):
    """``make_fx`` graph of ``while_loop`` running ``body`` STEPS times (carried[0] counts)."""

    def fn(*inputs):
        return WHILE_LOOP(lambda i, *rest: i < STEPS, body, inputs[: len(carried)], inputs[len(carried) :])

    with torch.no_grad():
        return make_fx(fn, tracing_mode="fake")(*carried, *additional)


def _body_ops(gm) -> list[str]:
    loop = next(n for n in gm.graph.nodes if n.target is WHILE_LOOP)
    body = getattr(gm, loop.args[1].target)
    return [str(n.target) for n in body.graph.nodes if n.op == "call_function"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(0), torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)


def _hoisted(body, carried, additional):
    """(count, body ops after, outputs before, outputs after) of the pass on one traced loop."""
    gm = _loop(body, carried, additional)
    with torch.no_grad():
        before = gm(*[t.clone() for t in (*carried, *additional)])
    count = loop_hoisting.hoist(gm.graph)
    gm.recompile()
    with torch.no_grad():
        after = gm(*[t.clone() for t in (*carried, *additional)])
    return count, _body_ops(gm), before, after


def test_an_invariant_forward_runs_once_before_the_loop_with_the_same_result():
    i0, z0, W, x = _inputs()

    def body(i, z, W, x):
        return i + 1, z * torch.tanh(x @ W.T) + 0.1  # tanh(x Wᵀ) is the same every iteration

    count, ops, before, after = _hoisted(body, (i0, z0), (W, x))
    assert count == 1
    assert not {"aten.mm.default", "aten.tanh.default"} & set(ops), ops
    expected = z0.clone()
    for _ in range(STEPS):
        expected = expected * torch.tanh(x @ W.T) + 0.1
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(after[1], expected, rtol=0, atol=0)


def test_nothing_moves_that_only_views_an_input_or_only_reads_constants():
    i0, z0, W, x = _inputs()

    def body(i, z, W, x):
        mask = torch.arange(4) == 2  # constants alone: inductor inlines it
        return i + 1, torch.tanh(z @ W.T + x) + mask * z  # W.T: a view of an input

    count, ops, before, after = _hoisted(body, (i0, z0), (W, x))
    assert count == 0 and "aten.permute.default" in ops and "aten.arange.default" in ops
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_random_numbers_stay_in_the_body():
    i0, z0, _, x = _inputs()

    def body(i, z, x):
        return i + 1, z + torch.rand_like(x) * x  # new numbers every iteration

    gm = _loop(body, (i0, z0), (x,))
    assert loop_hoisting.hoist(gm.graph) == 0
    assert "aten.rand_like.default" in _body_ops(gm)


def test_a_value_the_body_returns_stays_in_the_body():
    i0, z0, W, x = _inputs()

    def body(i, z, e, W, x):
        return i + 1, z + e, torch.exp(x @ W.T)  # returned as is: an output may not alias an input

    count, ops, before, after = _hoisted(body, (i0, z0, torch.zeros(3, 4)), (W, x))
    assert count == 1 and "aten.exp.default" in ops and "aten.mm.default" not in ops  # its input moves
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("read_first", [False, True])
def test_a_buffer_the_body_writes_is_not_invariant(read_first):
    """Writes to a captured buffer (as the solvers' in-place history does) make it, and all
    computed from it, variant, read before or after the write; the rest still moves."""
    i0, z0, W, x = _inputs()

    def body(i, z, W, x, buf):
        total = buf.sum() if read_first else None
        buf.add_(1.0)
        total = buf.sum() if total is None else total
        return i + 1, z * torch.tanh(x @ W.T) + 1e-3 * total

    buf = torch.zeros(2)
    gm = _loop(body, (i0, z0), (W, x, buf))
    with torch.no_grad():
        b0 = buf.clone()
        before = gm(i0, z0, W, x, b0)
        count = loop_hoisting.hoist(gm.graph)
        gm.recompile()
        b1 = buf.clone()
        after = gm(i0, z0, W, x, b1)
    assert count == 1 and "aten.sum.default" in _body_ops(gm) and "aten.tanh.default" not in _body_ops(gm)
    assert torch.equal(b0, b1) and torch.equal(b1, torch.full((2,), float(STEPS)))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_computed_value_the_body_writes_stays_in_the_body():
    i0, z0, W, x = _inputs()

    def body(i, z, W, x):
        t = torch.tanh(x @ W.T)
        t.add_(z)  # written in place: moved out, it would accumulate across iterations
        return i + 1, 0.5 * z + 0.1 * t

    count, ops, before, after = _hoisted(body, (i0, z0), (W, x))
    assert count == 1 and "aten.tanh.default" in ops and "aten.mm.default" not in ops
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_importing_the_library_does_not_import_inductor():
    code = "import sys, deq_functional as dq; assert 'torch._inductor' not in sys.modules; dq.hoist_loop_invariants"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert callable(dq.hoist_loop_invariants) and dq.hoist_loop_invariants.uuid()


@pytest.mark.compile
def test_compiled_ift_step_with_the_pass_equals_the_step_without_it():
    """Inductor, IFT with Anderson, two solves in one graph (a tensor state as one problem, a
    tuple state per sample): each adjoint's forward of f leaves its loop (on torch 2.14 the
    loops write their history in place: the ``auto_functionalized_v2`` form), and the loss,
    gradients, iterations and statuses are the unhoisted compile's, bit for bit, and eager's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    tanh_p, tuple_p = tanh_params(8, 8, dtype=torch.float32), tuple_params(8, dtype=torch.float32)
    W0 = tanh_p["W"]
    solver = dq.Anderson(tol=1e-6, max_iter=60)

    def loss_fn(W):
        z, info = dq.fixed_point(tanh_f, {**tanh_p, "W": W}, x, solver=solver, grad_mode="ift")
        (a, b), info_tuple = dq.fixed_point(tuple_f, {**tuple_p, "W1": W}, x, solver=solver,
                                            z0=(torch.zeros(4, 8), torch.zeros(4, 4)), grad_mode="ift", per_sample=True)
        return ((z - y) ** 2).sum() + (a * y).sum() + b.square().sum(), (info, info_tuple)

    hoisted, forms = [], set()

    def counting(graph):
        forms.update(loop.functionalized for n in graph.nodes if (loop := loop_hoisting._Loop.at(n)) is not None)
        hoisted.append(loop_hoisting.hoist(graph))

    def run(fn):
        W = W0.clone().requires_grad_()
        loss, infos = fn(W)
        loss.backward()
        return loss.detach(), W.grad, infos

    plain = run(torch.compile(loss_fn, fullgraph=True))
    with torch.compiler.config.patch(force_disable_caches=True):  # a cached graph would skip the pass
        passed = run(torch.compile(lambda W: loss_fn(W), fullgraph=True, options={
            "post_grad_custom_pre_pass": inductor_graph_pass(counting, loop_hoisting.__file__)}))
    eager = run(loss_fn)
    assert sum(hoisted) >= 2  # each adjoint's loop-invariant forward of f left its loop
    assert forms == {CAPTURED_LOOP_WRITES}
    assert torch.equal(passed[0], plain[0]) and torch.equal(passed[1], plain[1])
    for p, q, e in zip(passed[2], plain[2], eager[2], strict=True):
        assert torch.equal(p.nstep, q.nstep) and torch.equal(p.status, q.status) and torch.equal(p.status, e.status)
    torch.testing.assert_close(passed[1], eager[1], rtol=1e-4, atol=1e-5)
