"""Composition with autograd, torch.func (grad, vjp, vmap), memory tools and autocast."""

import pytest
import torch
import torch.func as tf
from helpers import contractive_matrix, linear_f, linear_solution, loss_weights, tanh_f, tanh_params, tuple_f, tuple_params

import deq_functional as dq

SOLVER = dq.Anderson(max_iter=200, tol=1e-12)
MODES = ["ift", "jfb", "neumann", "unrolled", dq.Phantom(3, 0.7)]


def _problem():
    p = tanh_params(6, 4)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return p, x, torch.zeros(5, 6, dtype=torch.float64), loss_weights((5, 6))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_func_grad_equals_loss_backward(mode):
    p, x, z0, c = _problem()

    def loss(p, x):
        z, _ = dq.fixed_point(tanh_f, p, x, solver=SOLVER, grad_mode=mode, z0=z0)
        return (z * c).sum()

    gp, gx = tf.grad(loss, argnums=(0, 1))(p, x)
    p_eager = {k: v.clone().requires_grad_() for k, v in p.items()}
    x_eager = x.clone().requires_grad_()
    loss(p_eager, x_eager).backward()
    for k in p:
        torch.testing.assert_close(gp[k], p_eager[k].grad, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx, x_eager.grad, atol=1e-12, rtol=1e-10)


def test_func_vjp_of_the_fixed_point_matches_the_closed_form():
    A = contractive_matrix(4, 0.6)
    x = torch.randn(2, 4, dtype=torch.float64)
    c = loss_weights((2, 4))
    z, pullback = tf.vjp(lambda A, x: dq.fixed_point(linear_f, {"A": A}, x, solver=SOLVER)[0], A, x)
    gA, gx = pullback(c)
    _, exact = tf.vjp(linear_solution, A, x)
    eA, ex = exact(c)
    torch.testing.assert_close(gA, eA, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gx, ex, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("per_sample", [False, True])
def test_vmap_over_x_equals_the_batched_call(per_sample):
    p, x, z0, _ = _problem()
    z_batch, info_batch = dq.fixed_point(tanh_f, p, x, z0=z0, solver=SOLVER, per_sample=True)
    z_map, info_map = tf.vmap(lambda xx, zz: dq.fixed_point(tanh_f, p, xx, z0=zz, solver=SOLVER, per_sample=per_sample))(x, z0)
    torch.testing.assert_close(z_map, z_batch, atol=1e-11, rtol=1e-11)
    assert info_map.nstep.shape == (5,) and bool(info_map.converged.all())  # one problem per mapped row


@pytest.mark.parametrize("mode", ["ift", "neumann", "jfb", "unrolled", dq.Phantom(3, 0.7)], ids=str)
def test_per_sample_gradients_with_vmap_of_grad(mode):
    p, x, z0, c = _problem()

    def loss(p, xx, zz, cc):
        z, _ = dq.fixed_point(tanh_f, p, xx[None], z0=zz[None], solver=SOLVER, grad_mode=mode)
        return (z[0] * cc).sum()

    per_sample = tf.vmap(tf.grad(loss), in_dims=(None, 0, 0, 0))(p, x, z0, c)
    for i in (0, 3):
        single = tf.grad(loss)(p, x[i], z0[i], c[i])
        torch.testing.assert_close(per_sample["W"][i], single["W"], atol=1e-10, rtol=1e-9)


def test_tuple_state_trains():
    p = {k: v.clone().requires_grad_() for k, v in tuple_params(8).items()}
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = (torch.full((4, 8), 0.3, dtype=torch.float64), torch.full((4, 4), -0.2, dtype=torch.float64))
    z0 = tuple(torch.zeros_like(t) for t in target)
    opt = torch.optim.Adam(p.values(), lr=0.05)
    losses = []
    for _ in range(30):
        z, _ = dq.fixed_point(tuple_f, p, x, z0=z0, solver=dq.Anderson(max_iter=40, tol=1e-7))
        loss = sum(((a - b) ** 2).mean() for a, b in zip(z, target, strict=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("mode", ["ift", "neumann", "jfb", "unrolled"])
def test_inside_save_on_cpu_and_saved_tensors_hooks(mode):
    p, x, z0, c = _problem()

    def grads():
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        z, _ = dq.fixed_point(tanh_f, q, x, z0=z0, solver=SOLVER, grad_mode=mode)
        (z * c).sum().backward()
        return q["W"].grad

    reference = grads()
    with torch.autograd.graph.save_on_cpu():
        torch.testing.assert_close(grads(), reference)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t.clone(), lambda t: t):
        torch.testing.assert_close(grads(), reference)
    assert packed  # the hooks really were active


def test_from_module_round_trip_and_gradients():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 5, dtype=torch.float64)
            self.inj = torch.nn.Linear(3, 5, bias=False, dtype=torch.float64)
            with torch.no_grad():
                self.lin.weight.mul_(0.3)

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + self.inj(x))

    module = Layer()
    params, f = dq.from_module(module)
    assert set(params) == {"lin.weight", "lin.bias", "inj.weight"}
    x = torch.randn(2, 3, dtype=torch.float64)
    z0 = torch.zeros(2, 5, dtype=torch.float64)
    z, _ = dq.fixed_point(f, params, x, z0=z0, solver=SOLVER)
    torch.testing.assert_close(z, module(z, x), atol=1e-10, rtol=1e-10)
    z.sum().backward()
    assert params["lin.weight"].grad is not None and module.lin.weight.grad is None  # module untouched
    trained = {k: v.detach() + 1.0 for k, v in params.items()}
    dq.to_module(module, trained)
    torch.testing.assert_close(module.lin.bias.detach(), trained["lin.bias"])
    with pytest.raises(ValueError, match="not parameters"):
        dq.to_module(module, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        dq.to_module(module, {"lin.bias": torch.zeros(4)})


def test_a_standalone_solver_under_vmap_treats_each_mapped_problem_as_one():
    z0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solve = dq.Picard(max_iter=200, tol=1e-10)
    z, info = tf.vmap(lambda c: solve(lambda z: 0.5 * z + c, torch.zeros_like(c), per_sample=True))(z0)
    assert info.nstep.shape == (3,) and bool(info.converged.all())
    torch.testing.assert_close(z, 2 * z0)
