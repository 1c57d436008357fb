"""dq.DEQ (the nn.Module form) and cells with buffers (batch norm) in DEQ and from_module."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import loss_weights, tanh_f, tanh_params
from torch import nn

import deq_functional as dq

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _solver(max_iter=100, tol=1e-12):
    return dq.Anderson(max_iter=max_iter, tol=tol)


class TanhCell(nn.Module):
    """``z ← tanh(W z + U x + b)``, the module form of ``helpers.tanh_f`` with the same weights."""

    def __init__(self, n: int = 6, m: int = 4, *, dtype=F64, seed: int = 0):
        super().__init__()
        p = tanh_params(n, m, dtype=dtype, seed=seed)
        self.W = nn.Linear(n, n, dtype=dtype)
        self.U = nn.Linear(m, n, bias=False, dtype=dtype)
        with torch.no_grad():
            self.W.weight.copy_(p["W"]), self.W.bias.copy_(p["b"]), self.U.weight.copy_(p["U"])

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))

    def as_params(self) -> dict:
        """The weights as ``tanh_f``'s params: fresh leaves requiring grad."""
        p = {"W": self.W.weight, "b": self.W.bias, "U": self.U.weight}
        return {k: v.detach().clone().requires_grad_() for k, v in p.items()}


class BNCell(nn.Module):
    """``z ← tanh(0.5 · BN(conv(z) + x))`` on ``(B, C, H, W)``: BatchNorm2d inside the z-path.

    x's unit variance keeps BN's ``1/σ`` moderate, so the cell contracts (Lipschitz ≈ 0.2).
    """

    def __init__(self, c: int = 3, *, dtype=F64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False, dtype=dtype)
        self.bn = nn.BatchNorm2d(c, dtype=dtype)
        with torch.no_grad():
            self.conv.weight.copy_(0.1 * torch.randn(c, c, 3, 3, generator=g, dtype=dtype))
            self.bn.weight.copy_(1 + 0.1 * torch.randn(c, generator=g, dtype=dtype))
            self.bn.bias.copy_(0.1 * torch.randn(c, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(0.5 * self.bn(self.conv(z) + x))


def bn_f(p, z, x, running=None):
    """Hand-written :class:`BNCell`: batch statistics, or ``running = (mean, var)`` (eval mode)."""
    v = F.conv2d(z, p["conv.weight"], padding=1) + x
    mean, var = running if running is not None else (None, None)
    return torch.tanh(0.5 * F.batch_norm(v, mean, var, p["bn.weight"], p["bn.bias"], training=running is None))


def _leaf_params(module: nn.Module) -> dict:
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


def _bn_input(seed: int = 1, b: int = 6):
    return torch.randn(b, 3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _set_running_stats(bn: nn.BatchNorm2d) -> None:
    """Running statistics far from the batch's, so eval and train mode differ visibly."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=g, dtype=F64))
        bn.running_var.copy_(2.0 + torch.rand(bn.num_features, generator=g, dtype=F64))
        bn.num_batches_tracked.fill_(5)


# ----------------------------------------------------------------------------- the layer equals fixed_point on f
@pytest.mark.parametrize("mode", ["ift", "jfb"])
def test_gradients_equal_fixed_point_on_the_hand_written_f(mode):
    cell = TanhCell()
    deq = dq.DEQ(cell, _solver(), mode)
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    z0 = torch.zeros(5, 6, dtype=F64)
    c = loss_weights((5, 6))
    z, info = deq(x, z0)
    (z * c).sum().backward()

    p, x_ref = cell.as_params(), x.detach().clone().requires_grad_()
    z_ref, info_ref = dq.fixed_point(tanh_f, p, x_ref, _solver(), mode, z0)
    (z_ref * c).sum().backward()

    assert bool(info.converged) and int(info.nstep) == int(info_ref.nstep)
    torch.testing.assert_close(z, z_ref, **TIGHT)
    for got, ref in [(cell.W.weight.grad, p["W"].grad), (cell.W.bias.grad, p["b"].grad),
                     (cell.U.weight.grad, p["U"].grad), (x.grad, x_ref.grad)]:
        torch.testing.assert_close(got, ref, **TIGHT)


def test_state_dict_round_trips_into_a_fresh_deq():
    x = _bn_input()
    trained = dq.DEQ(BNCell(seed=0), _solver())
    _set_running_stats(trained.cell.bn)
    fresh = dq.DEQ(BNCell(seed=1), _solver())
    assert set(trained.state_dict()) == {f"cell.{n}" for n in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                               "bn.running_var", "bn.num_batches_tracked")}
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x)[0], trained(x)[0])  # not vacuous
        fresh.load_state_dict(trained.state_dict())
        assert torch.equal(fresh(x)[0], trained(x)[0])


def test_a_model_containing_it_trains_with_torch_optim():
    torch.manual_seed(0)
    model = nn.ModuleDict({"inp": nn.Linear(4, 8), "deq": dq.DEQ(TanhCell(8, 8, dtype=torch.float32),
                                                                 dq.Anderson(max_iter=30, tol=1e-5), "jfb"),
                           "out": nn.Linear(8, 1)})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=g)
    y = torch.sin(x @ torch.randn(4, 1, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert {id(p) for p in model["deq"].cell.parameters()} <= {id(p) for g in opt.param_groups for p in g["params"]}

    def loss():
        z, _ = model["deq"](model["inp"](x))
        return F.mse_loss(model["out"](z), y)

    losses = []
    for _ in range(80):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert model["deq"].cell.W.weight.grad.abs().max() > 0
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_to_dtype_converts_params_and_buffers():
    deq = dq.DEQ(BNCell(dtype=torch.float32), dq.Anderson(max_iter=50, tol=1e-6)).eval()
    _set_running_stats(deq.cell.bn)
    x = _bn_input().float()
    z32, _ = deq(x)
    deq.to(F64)
    assert {t.dtype for t in deq.parameters()} == {F64} and deq.cell.bn.running_var.dtype == F64
    z64, info = deq(x.double())
    assert z32.dtype == torch.float32 and z64.dtype == F64 and bool(info.converged)
    torch.testing.assert_close(z64, z32.double(), rtol=1e-4, atol=1e-5)


def test_bad_options_raise_value_error_naming_them():
    cell = TanhCell()
    for kwargs, name in [({"cell": lambda z, x: z}, "cell"), ({"solver": "newton"}, "solver"),
                         ({"grad_mode": "magic"}, "grad_mode"), ({"per_sample": 1}, "per_sample"),
                         ({"on_nonconvergence": "explode"}, "on_nonconvergence")]:
        with pytest.raises(ValueError, match=rf"DEQ: .*{name}"):
            dq.DEQ(**{"cell": cell, **kwargs})


def test_repr_names_the_cell_and_the_options():
    text = repr(dq.DEQ(TanhCell(), dq.Picard(max_iter=7), "jfb", on_nonconvergence="warn"))
    for part in ("DEQ(", "(cell): TanhCell(", "Picard(", "max_iter=7", "grad_mode=JFB()", "per_sample=False",
                 "on_nonconvergence='warn'"):
        assert part in text, text


# ----------------------------------------------------------------------------- cells with buffers: batch norm
@pytest.mark.parametrize("mode", ["ift", "jfb", "unrolled"])
def test_train_mode_batch_norm_updates_running_stats_once_at_z_star(mode):
    cell = BNCell()
    plain = copy.deepcopy(cell)
    x = _bn_input()
    z, info = dq.DEQ(cell, dq.Anderson(max_iter=30, tol=1e-10), mode)(x)
    assert bool(info.converged) and int(info.nstep) > 5
    with torch.no_grad():
        plain(z, x)  # one ordinary forward of the cell at z*
    assert int(cell.bn.num_batches_tracked) == 1
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(cell.named_buffers())[name], buffer), name
    assert cell.bn.running_mean.abs().max() > 1e-3  # moved from its initial zeros
    before = [b.clone() for b in cell.buffers()]
    (z * loss_weights(z.shape)).sum().backward()  # backward works and writes no buffer
    assert all(torch.equal(a, b) for a, b in zip(before, cell.buffers(), strict=True))
    assert cell.conv.weight.grad.abs().max() > 0


def test_eval_mode_batch_norm_uses_the_running_stats_and_leaves_them():
    cell = BNCell()
    _set_running_stats(cell.bn)
    before = [b.clone() for b in cell.buffers()]
    deq = dq.DEQ(cell, _solver()).eval()
    x = _bn_input()
    z, info = deq(x)
    assert bool(info.converged)
    running = (cell.bn.running_mean, cell.bn.running_var)
    z_ref, _ = dq.fixed_point(lambda p, zz, xx: bn_f(p, zz, xx, running), _leaf_params(cell), x, _solver())
    torch.testing.assert_close(z, z_ref, **TIGHT)
    assert all(torch.equal(a, b) for a, b in zip(before, cell.buffers(), strict=True))
    z_train, _ = deq.train()(x)
    assert (z_train - z).abs().max() > 1e-2  # eval really used the running statistics


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_ift_gradient_matches_finite_differences(train):
    """float64 reference independent of the library's adjoint: central differences of the solved loss."""
    cell = BNCell()
    _set_running_stats(cell.bn)
    deq = dq.DEQ(cell, _solver(200, 1e-14)).train(train)
    x = _bn_input().requires_grad_()
    c = loss_weights((6, 3, 5, 5))
    (deq(x)[0] * c).sum().backward()
    tensors = [*cell.parameters(), x]
    grads = [t.grad.clone() for t in tensors]
    g = torch.Generator().manual_seed(11)
    h = 1e-5
    for _ in range(3):
        dirs = [torch.randn(t.shape, generator=g, dtype=F64) for t in tensors]
        with torch.no_grad():
            values = []
            for sign in (1, -1):
                for t, d in zip(tensors, dirs, strict=True):
                    t.add_(sign * h * d)
                values.append(float((deq(x)[0] * c).sum()))
                for t, d in zip(tensors, dirs, strict=True):
                    t.sub_(sign * h * d)
        fd = (values[0] - values[1]) / (2 * h)
        analytic = sum(float((gr * d).sum()) for gr, d in zip(grads, dirs, strict=True))
        assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(fd)), (fd, analytic)


@pytest.mark.parametrize("mode", ["ift", "jfb"])
def test_batch_norm_gradients_equal_the_hand_written_functional_version(mode):
    """Train mode: JFB is ``(∂f/∂θ)ᵀ ḡ`` at z*, IFT the implicit gradient, both with batch statistics."""
    cell = BNCell()
    x = _bn_input()
    c = loss_weights((6, 3, 5, 5))
    z, _ = dq.DEQ(cell, _solver(), mode)(x)
    (z * c).sum().backward()
    p = _leaf_params(cell)
    z_ref, _ = dq.fixed_point(bn_f, p, x, _solver(), mode)
    (z_ref * c).sum().backward()
    torch.testing.assert_close(z, z_ref, **TIGHT)
    for name, param in cell.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, **TIGHT, msg=name)
    if mode == "jfb":  # and the closed form of JFB: one vjp of f at z*.detach()
        q = _leaf_params(cell)
        closed = torch.autograd.grad((bn_f(q, z.detach(), x) * c).sum(), list(q.values()))
        for (name, param), ref in zip(cell.named_parameters(), closed, strict=True):
            torch.testing.assert_close(param.grad, ref, **TIGHT, msg=name)


@pytest.mark.parametrize("mode", ["ift", "jfb"])
def test_from_module_with_train_mode_batch_norm_backprops_and_never_writes_buffers(mode):
    """The reported failure: IFT's backward hit torch.func's 'mutate a captured Tensor', and the
    solver's 30 iterations made 30 running-statistics updates. f now works on buffer copies."""
    cell = BNCell()
    before = [b.clone() for b in cell.buffers()]
    params, f = dq.from_module(cell)
    x = _bn_input()
    z, info = dq.fixed_point(f, params, x, dq.Anderson(max_iter=30), mode)
    (z * loss_weights(z.shape)).sum().backward()
    assert int(info.nstep) > 1
    assert all(torch.equal(a, b) for a, b in zip(before, cell.buffers(), strict=True))
    p = _leaf_params(cell)
    z_ref, _ = dq.fixed_point(bn_f, p, x, dq.Anderson(max_iter=30), mode)
    (z_ref * loss_weights(z.shape)).sum().backward()
    for name in params:
        torch.testing.assert_close(params[name].grad, p[name].grad, **TIGHT, msg=name)


def test_per_sample_refuses_batch_statistics_and_names_the_layer():
    deq = dq.DEQ(BNCell(), _solver(), per_sample=True)
    x = _bn_input()
    with pytest.raises(ValueError, match=r"per_sample=True.*cell\.bn \(BatchNorm2d\).*batch statistics"):
        deq(x)
    _, info = deq.eval()(x)  # eval mode: running statistics, samples independent
    assert info.status.shape == (6,) and bool(info.converged.all())
    cell = BNCell()
    cell.bn = nn.GroupNorm(1, 3, dtype=F64)  # the suggested fix: per-sample statistics
    z, info = dq.DEQ(cell, _solver(), per_sample=True)(x)
    assert bool(info.converged.all())
    torch.testing.assert_close(z[:1], dq.DEQ(cell, _solver())(x[:1])[0], **TIGHT)
    cell = BNCell()
    cell.bn = nn.BatchNorm2d(3, track_running_stats=False, dtype=F64)
    with pytest.raises(ValueError, match=r"cell\.bn"):  # no running stats: batch statistics even in eval
        dq.DEQ(cell, per_sample=True).eval()(x)


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.compile
def test_compiled_model_matches_eager_with_batch_norm_and_ift():
    torch._dynamo.reset()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 1, dtype=F64)
            self.deq = dq.DEQ(BNCell(), dq.Anderson(max_iter=30, tol=1e-8), "ift")

        def forward(self, d):
            z, info = self.deq(self.stem(d))
            return z.square().mean(), info

    torch.manual_seed(0)
    eager = Model()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    d = _bn_input()
    results = []
    for m, fn in ((eager, eager), (model, compiled)):
        loss, info = fn(d)
        loss.backward()
        results.append((loss.detach(), info, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())))
    (le, ie, ge, be), (lc, ic, gc, bc) = results
    torch.testing.assert_close(lc, le, **TIGHT)
    assert int(ic.nstep) == int(ie.nstep) and bool(ic.converged)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], **TIGHT, msg=name)
    for name in be:  # the running statistics were updated once, as eagerly
        torch.testing.assert_close(bc[name], be[name], **TIGHT, msg=name)
    assert int(bc["deq.cell.bn.num_batches_tracked"]) == 1
    d2 = _bn_input(seed=2)
    torch.testing.assert_close(compiled(d2)[0], eager(d2)[0], **TIGHT)


# ----------------------------------------------------------------------------- examples/deq_module.py
@pytest.mark.parametrize("data", ["synthetic", pytest.param("digits", marks=pytest.mark.examples)])
def test_deq_module_example_trains(data, capsys):
    if data == "digits":
        pytest.importorskip("sklearn")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import deq_module

    result = deq_module.main(["--data", data, "--steps", "40"])
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::5]
    assert result["test_accuracy"] > 0.6
    out = capsys.readouterr().out
    assert "status CONVERGED" in out and "test accuracy" in out
    assert not result["model"].training and int(result["model"].deq.cell.norm.num_batches_tracked) == 40
