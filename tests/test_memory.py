"""Autograd memory: constant in solver depth for the implicit modes, growing for Unrolled."""

import pytest
import torch
from helpers import tanh_f, tanh_params

import deq_functional as dq


def _saved_bytes(mode, depth, exclude_params=True):
    p = {k: v.float().requires_grad_() for k, v in tanh_params(64, 32).items()}
    x = torch.randn(16, 32)
    with dq.SavedTensorBytes(exclude=p if exclude_params else None) as saved:
        solver = dq.Anderson(max_iter=depth, tol=0.0)
        z, info = dq.fixed_point(tanh_f, p, x, z0=torch.zeros(16, 64), solver=solver, grad_mode=mode)
        loss = z.square().sum()
    assert int(info.nstep) == depth
    loss.backward()  # the graph is usable
    assert all(t.grad is not None for t in p.values())
    return saved.bytes


def _one_application_bytes():
    p = {k: v.float().requires_grad_() for k, v in tanh_params(64, 32).items()}
    with dq.SavedTensorBytes(exclude=p) as saved:
        tanh_f(p, torch.zeros(16, 64), torch.randn(16, 32))
    return saved.bytes


@pytest.mark.parametrize("mode", [dq.IFT(), dq.JFB(), dq.Neumann(3), dq.Phantom(2, 0.8)], ids=repr)
def test_implicit_modes_save_the_same_bytes_at_depth_10_and_100(mode):
    assert _saved_bytes(mode, 10, exclude_params=False) == _saved_bytes(mode, 100, exclude_params=False)
    activations = _saved_bytes(mode, 10)
    assert activations == _saved_bytes(mode, 100)
    k = mode.k if isinstance(mode, dq.Phantom) else 1  # Phantom keeps k applications of f
    assert activations <= 1.1 * k * _one_application_bytes()


def test_unrolled_memory_grows_with_depth():
    shallow, deep = _saved_bytes(dq.Unrolled(), 10), _saved_bytes(dq.Unrolled(), 100)
    assert deep > 5 * shallow
