"""torch.compile(fullgraph=True): no graph break, eager's numbers, a loop whose graph does not grow.

Inductor compiles cost tens of seconds each on 2 cores, so the solver × grad-mode matrix
runs on the ``aot_eager`` backend (Dynamo capture with fullgraph and AOTAutograd's
compiled backward, without code generation) and inductor runs the pairings that matter
most (Anderson with IFT and JFB) plus one whole train step.
"""

import pytest
import torch
from helpers import SOLVER_CLASSES
from torch._dynamo.testing import CompileCounterWithBackend

import deq_functional as dq
from deq_functional._transforms import CAPTURED_LOOP_WRITES

pytestmark = pytest.mark.compile

N, B = 8, 4


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.3 * torch.randn(N, N, generator=g) / N**0.5
    return W, torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)


def f(p, z, x):
    return torch.tanh(z @ p["W"].T + x)


def two_scale(p, z, x):
    """A tuple state ``(B, N), (B, N/2)`` coupled by pooling and upsampling."""
    a, b = z
    return torch.tanh(a @ p["W"].T + x + b.repeat_interleave(2, dim=1)), 0.5 * (a[:, ::2] + a[:, 1::2]) * p["s"]


def _loss_fn(solver, mode):
    """Two solves in one graph: a tensor state as one problem, a tuple state per sample."""

    def loss_fn(W, x, y):
        z, info = dq.fixed_point(f, {"W": W}, x, solver=solver, grad_mode=mode)
        z0 = (torch.zeros(B, N), torch.zeros(B, N // 2))
        (a, b), info_tuple = dq.fixed_point(
            two_scale, {"W": W, "s": torch.tensor(0.4)}, x, z0=z0, solver=solver, grad_mode=mode, per_sample=True
        )
        return ((z - y) ** 2).sum() + (a * y).sum() + b.square().sum(), (info, info_tuple)

    return loss_fn


def _run(fn, W, x, y):
    Wg = W.clone().requires_grad_()
    loss, infos = fn(Wg, x, y)
    loss.backward()  # outside the compiled region: AOTAutograd's compiled backward
    return loss.detach(), Wg.grad, infos


def _check_compiled_matches_eager(solver, mode, backend):
    torch._dynamo.reset()
    W, x, y = _data()
    loss_fn = _loss_fn(solver, mode)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    (lc, gc, ic), (le, ge, ie) = _run(compiled, W, x, y), _run(loss_fn, W, x, y)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    for c, e in zip(ic, ie, strict=True):  # per problem: the same iterations, the same verdict
        assert torch.equal(c.nstep, e.nstep) and torch.equal(c.status, e.status)
        assert torch.equal(c.converged, e.converged) and bool(e.converged.all())
        assert int(e.nstep.max()) < solver.max_iter  # it exited early, in both
    graphs = counter.frame_count
    # new values of params and x (same shapes): no recompile, still eager's numbers
    W2, x2, y2 = _data(seed=1)
    (lc, gc, _), (le, ge, _) = _run(compiled, W2, x2, y2), _run(loss_fn, W2, x2, y2)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == graphs == 1


@pytest.mark.parametrize("mode", ["jfb", "ift"])
def test_inductor_anderson(mode):
    _check_compiled_matches_eager(dq.Anderson(max_iter=40, tol=1e-4), mode, "inductor")


@pytest.mark.parametrize("mode", ["ift", "jfb", "neumann", "unrolled", "phantom"])
@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_every_solver_and_grad_mode_compiles_fullgraph(name, mode):
    budget = 20 if mode == "unrolled" else 40  # Unrolled's loop is unrolled: compile time grows with it
    _check_compiled_matches_eager(SOLVER_CLASSES[name](max_iter=budget, tol=1e-4), mode, "aot_eager")


class GraphSize:
    """A backend that records the number of nodes of each captured graph (then runs it eagerly)."""

    def __init__(self):
        self.nodes = []

    def __call__(self, gm, example_inputs):
        self.nodes.append(len(gm.graph.nodes))
        return gm.forward


@pytest.mark.parametrize("mode", ["jfb", "ift"])
def test_the_graph_does_not_grow_with_max_iter(mode):
    """Dynamo traces one iteration inside torch.while_loop, whatever the budget."""
    W, x, y = _data()
    sizes = {}
    for max_iter in (5, 500):
        torch._dynamo.reset()
        backend = GraphSize()
        fn = torch.compile(_loss_fn(dq.Anderson(max_iter=max_iter, tol=1e-4), mode), fullgraph=True, backend=backend)
        _run(fn, W, x, y)
        sizes[max_iter] = backend.nodes
    assert sizes[5] == sizes[500] and len(sizes[5]) == 1


class LoopCarries:
    """A backend that records the shapes of each ``torch.while_loop``'s carries (then runs eagerly)."""

    def __init__(self):
        self.carries = []

    def __call__(self, gm, example_inputs):
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.while_loop:
                self.carries.append([tuple(a.meta["example_value"].shape) for a in node.args[2]])
        return gm.forward


@pytest.mark.parametrize("name, history", [("anderson", (1, 5, B * N)), ("broyden", (1, 10, B * N))])
def test_solver_history_is_written_in_place_not_carried(name, history):
    """No-grad forward solve under compile: the history buffers stay outside the loop's carries
    (written one slot per iteration in place; torch ≥ 2.14), and the solve still equals eager."""
    W, x, _ = _data()
    solver = SOLVER_CLASSES[name](max_iter=40, tol=1e-5)

    def solve(W, x):
        with torch.no_grad():
            return dq.fixed_point(f, {"W": W}, x, solver=solver, grad_mode="jfb")

    torch._dynamo.reset()
    backend = LoopCarries()
    z, info = torch.compile(solve, fullgraph=True, backend=backend)(W, x)
    z_eager, info_eager = solve(W, x)
    # torch 2.13 keeps the history carried (it cannot trace the writes when f runs a torch.func transform)
    assert len(backend.carries) == 1 and (1, B * N) in backend.carries[0]
    assert (history in backend.carries[0]) == (not CAPTURED_LOOP_WRITES)
    assert torch.equal(info.nstep, info_eager.nstep) and torch.equal(info.status, info_eager.status)
    torch.testing.assert_close(z, z_eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["jfb", "ift"])
@pytest.mark.parametrize("name", SOLVER_CLASSES)
def test_in_place_history_equals_eager_per_sample_with_spread_convergence(name, mode):
    """Per-sample problems that stop at very different steps (inputs across three orders of
    magnitude): the compiled loop, history written in place, gives eager's nstep and status per
    sample, z_star and gradients; new values recompile nothing."""
    g = torch.Generator().manual_seed(3)
    W = 0.9 * torch.linalg.qr(torch.randn(N, N, generator=g))[0]
    x = torch.randn(6, N, generator=g) * torch.logspace(-2, 1, 6)[:, None]

    def loss(W, x):
        z, info = dq.fixed_point(f, {"W": W}, x, solver=SOLVER_CLASSES[name](max_iter=200, tol=1e-5),
                                 grad_mode=mode, per_sample=True)
        return torch.sin(z).sum(), info

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    for scale in (1.0, 0.5):  # new values of W and x: the same graph
        results = []
        for fn in (loss, compiled):
            Wg = (scale * W).requires_grad_()
            value, info = fn(Wg, scale * x)
            value.backward()
            results.append((value.detach(), Wg.grad, info))
        (le, ge, ie), (lc, gc, ic) = results
        assert len(set(ie.nstep.tolist())) > 2  # the samples stop at different steps
        assert torch.equal(ic.nstep, ie.nstep) and torch.equal(ic.status, ie.status)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_return_trajectory_compiles_one_iteration_and_equals_eager(tol):
    """The trajectory needs every iterate: a scan over the budget, whose graph does not grow with
    it; the states are picked over the iterations the solve took (nstep), as eagerly, also when
    it stops before the budget (tol > 0)."""
    W, x, y = _data()
    sizes = {}
    for max_iter in (8, 40):

        def loss(W, x, y, max_iter=max_iter):
            z, info = dq.fixed_point(f, {"W": W}, x, solver=dq.Anderson(max_iter=max_iter, tol=tol), grad_mode="jfb",
                                     return_trajectory=3)
            return ((z - y) ** 2).sum() + sum(t.square().sum() for t in info.trajectory), info

        torch._dynamo.reset()
        backend = GraphSize()
        (lc, gc, ic), (le, ge, ie) = _run(torch.compile(loss, fullgraph=True, backend=backend), W, x, y), _run(loss, W, x, y)
        assert int(ie.nstep) == (max_iter if tol == 0 else int(ie.nstep)) and (tol == 0 or int(ie.nstep) < max_iter)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
        for a, b in zip(ic.trajectory, ie.trajectory, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        sizes[max_iter] = backend.nodes
    assert sizes[8] == sizes[40] and len(sizes[8]) == 1


def test_an_f_running_a_torch_func_transform_compiles():
    """torch 2.13 cannot trace history writes in a loop body that runs a torch.func transform:
    there the history stays carried, so such an f still compiles (and equals eager)."""
    W, x, _ = _data()

    def rowwise(p, z, x):
        return torch.func.vmap(lambda zi, xi: torch.tanh(p["W"] @ zi + xi))(z, x)

    def solve(W, x):
        with torch.no_grad():
            return dq.fixed_point(rowwise, {"W": W}, x, solver=dq.Anderson(max_iter=40, tol=1e-5), grad_mode="jfb")

    torch._dynamo.reset()
    (zc, ic), (ze, ie) = torch.compile(solve, fullgraph=True, backend="aot_eager")(W, x), solve(W, x)
    assert torch.equal(ic.nstep, ie.nstep)
    torch.testing.assert_close(zc, ze, rtol=1e-6, atol=1e-7)


def test_return_trajectory_under_vmap_picks_each_problems_own_iterations():
    W, x, _ = _data()
    solver = dq.Anderson(max_iter=40, tol=1e-4)

    def one(xi):
        z, info = dq.fixed_point(f, {"W": W}, xi, solver=solver, grad_mode="jfb", return_trajectory=3)
        return torch.stack(info.trajectory)

    mapped = torch.func.vmap(one)(x)
    for i in range(B):
        torch.testing.assert_close(mapped[i], one(x[i]), rtol=1e-5, atol=1e-6)


def test_a_huge_budget_still_exits_early():
    W, x, _ = _data()
    solver = dq.Anderson(max_iter=100_000, tol=1e-5)
    torch._dynamo.reset()

    def solve(W, x):
        with torch.no_grad():
            return dq.fixed_point(f, {"W": W}, x, solver=solver, grad_mode="jfb", trace=True)

    z, info = torch.compile(solve, fullgraph=True, backend="aot_eager")(W, x)
    z_eager, info_eager = solve(W, x)
    assert int(info.status) == int(dq.Status.CONVERGED) and 0 < int(info.nstep) < 30
    assert torch.equal(info.nstep, info_eager.nstep)
    assert bool(torch.isnan(info.trace[int(info.nstep) + 1 :]).all())  # rows after the exit never ran
    torch.testing.assert_close(z, z_eager)


def test_whole_train_step_with_autograd_grad_inside():
    # config.patch, not monkeypatch.setattr: restoring a Dynamo config value by setattr/delattr
    # broke later config.patch calls on the same option ("does not exist")
    torch._dynamo.reset()
    W, x, y = _data()
    loss_fn = _loss_fn(dq.Anderson(max_iter=30, tol=1e-4), "ift")

    def train_step(W, x, y):
        W = W.detach().requires_grad_()
        loss, _ = loss_fn(W, x, y)
        (grad,) = torch.autograd.grad(loss, [W])
        return W.detach() - 0.1 * grad, loss.detach()

    compiled = torch.compile(train_step, fullgraph=True)
    Wc, Wc_loss = W, []
    We, We_loss = W, []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(2):
            Wc, lc = compiled(Wc, x, y)
            We, le = train_step(We, x, y)
            Wc_loss.append(lc)
            We_loss.append(le)
    torch.testing.assert_close(Wc, We, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(Wc_loss), torch.stack(We_loss), rtol=1e-5, atol=1e-6)
    assert We_loss[1] < We_loss[0]


def test_failures_are_flagged_in_info_not_raised():
    torch._dynamo.reset()
    W, x, _ = _data()

    def run(scale):
        return dq.fixed_point(lambda p, z, x: p["c"] * z + x, {"c": scale}, x, solver=dq.Picard(max_iter=60), grad_mode="jfb")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    _, diverged = compiled(torch.tensor(2.0))
    assert int(diverged.status) == int(dq.Status.DIVERGED) and int(diverged.nstep) == 14  # 2^14 > 1e4
    _, nonfinite = compiled(torch.tensor(float("nan")))  # no exception can be raised inside the graph
    assert int(nonfinite.status) == int(dq.Status.NONFINITE) and not bool(nonfinite.converged)
    _, eager_diverged = run(torch.tensor(2.0))
    assert torch.equal(eager_diverged.nstep, diverged.nstep)
    with pytest.raises(dq.FixedPointError, match="non-finite"):
        run(torch.tensor(float("nan")))  # eager raises


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_new_batch_size_recompiles_once_with_dynamic_shapes(per_sample):
    """torch.compile's default retries a new shape with symbolic sizes: that graph must work
    (a torch.Size of SymInts cannot be lifted into while_loop) and serve every later size."""
    torch._dynamo.reset()
    W, _, _ = _data()
    solver = dq.Broyden(max_iter=40, tol=1e-5)

    def fn(W, x):
        return dq.fixed_point(f, {"W": W}, x, solver=solver, grad_mode="ift", per_sample=per_sample)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for batch in (4, 6, 7, 9):
        x = torch.randn(batch, N, generator=torch.Generator().manual_seed(batch))
        (zc, ic), (ze, ie) = compiled(W, x), fn(W, x)
        torch.testing.assert_close(zc, ze, rtol=1e-5, atol=1e-6)
        assert torch.equal(ic.nstep, ie.nstep) and torch.equal(ic.status, ie.status)
    assert counter.frame_count == 2  # the static first size, then one dynamic graph


@pytest.mark.parametrize("mode", ["jfb", "ift"])
def test_dynamic_true_compiles_one_graph_for_every_batch_size(mode):
    """``dynamic=True`` makes sizes and the Python floats Dynamo reads symbolic from the first
    call; a symbolic float the loop body reads cannot be lifted into ``while_loop`` (torch
    2.14.1), so the library's own loop reads none (its stopping rule's 0.5 was a module float)."""
    torch._dynamo.reset()
    W, _, _ = _data()
    y = torch.randn(9, N, generator=torch.Generator().manual_seed(0))

    def loss_fn(W, x, y):
        z, info = dq.fixed_point(f, {"W": W}, x, solver=dq.Anderson(max_iter=40, tol=1e-5), grad_mode=mode,
                                 per_sample=True)
        return ((z - y[: len(z)]) ** 2).sum(), info

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend=counter)
    for batch in (4, 6, 9):
        x = torch.randn(batch, N, generator=torch.Generator().manual_seed(batch))
        (lc, gc, ic), (le, ge, ie) = _run(compiled, W, x, y), _run(loss_fn, W, x, y)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
        assert torch.equal(ic.nstep, ie.nstep) and torch.equal(ic.status, ie.status)
    assert counter.frame_count == 1


@pytest.mark.parametrize("per_sample", [False, True])
def test_compiled_vmap_over_fixed_point_equals_eager_vmap(per_sample):
    # inside vmap (compiled or not) each mapped problem is one problem of its own and the
    # masked budget runs (torch.while_loop has no vmap rule); JFB and Unrolled compile there
    W, x, y = _data()

    def loss_for(mode):
        def loss(W, x, y):
            z, info = torch.func.vmap(
                lambda xi: dq.fixed_point(f, {"W": W}, xi, solver=dq.Anderson(max_iter=12, tol=1e-4), grad_mode=mode,
                                          per_sample=per_sample)
            )(x)
            return ((z - y) ** 2).sum(), info

        return loss

    for mode in ("jfb", "unrolled"):
        torch._dynamo.reset()
        le, ge, ie = _run(loss_for(mode), W, x, y)
        lc, gc, ic = _run(torch.compile(loss_for(mode), fullgraph=True, backend="aot_eager"), W, x, y)
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(gc, ge)
        assert ic.nstep.shape == (B,) and torch.equal(ic.nstep, ie.nstep) and torch.equal(ic.status, ie.status)


def test_compiled_vmap_with_ift_raises_a_clear_error_and_runs_without_grad():
    torch._dynamo.reset()
    W, x, y = _data()

    def loss(W, x):
        z, _ = torch.func.vmap(lambda xi: dq.fixed_point(f, {"W": W}, xi, grad_mode="ift"))(x)
        return ((z - y) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="torch.compile over torch.func.vmap"):
        compiled(W.clone().requires_grad_(), x)
    with torch.no_grad():
        torch.testing.assert_close(compiled(W, x), loss(W, x))
