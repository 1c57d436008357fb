"""The two workloads every benchmark shares, and the training steps built on them.

- ``mlp``: an MLP DEQ, latent 256, batch 128 (inputs 784 = flattened 28×28).
- ``conv``: the JFB paper's MNIST convolutional implicit network, batch 64, 28×28×1.

Both use the reference models in ``deq_functional.models``
(``init(generator, ...) -> params``, ``apply(params, z, x)``, plus ``embed`` / ``readout``).

A workload is a params dict (leaf tensors requiring grad), a pure
``f(params, z, x)``, ``embed(params, inp) -> x``, ``readout(params, z) -> logits``,
a fixed batch (seeded) and its labels. "ours" and "torchdeq" get the *same*
``f`` and the same weights (cloned), so the comparison is one of libraries only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import deq_functional as dq
from deq_functional._tree import flatten, tree_map
from deq_functional._tree import named_leaves as _named_leaves
from deq_functional.benchmarking import summarize_info

SEED = 0
MLP_LATENT, MLP_BATCH, MLP_IN = 256, 128, 784
CONV_BATCH = 64


@dataclass
class Workload:
    name: str
    params: dict
    f: Callable  # f(params, z, x) -> z_next
    embed: Callable  # embed(params, inp) -> x
    readout: Callable  # readout(params, z) -> logits
    inp: torch.Tensor
    target: torch.Tensor
    z_like: Callable  # z_like(x) -> zeros shaped like the state
    source: str  # which model and init, e.g. "deq_functional.models.mlp: ..."
    meta: dict = field(default_factory=dict)

    def clone_params(self) -> Any:
        return tree_map(lambda v: v.detach().clone().requires_grad_(v.requires_grad), self.params)

    def f_bare_args(self):
        """(params detached, z, x) for timing one bare f call, z taken near the fixed point."""
        params = tree_map(torch.Tensor.detach, self.params)
        with torch.no_grad():
            x = self.embed(params, self.inp)
            z = self.z_like(x)
            for _ in range(5):
                z = self.f(params, z, x)
        return params, z, x


def named_leaves(params: Any) -> dict:
    """{"latent.weight": tensor, ...} (dotted key paths) for any nested params pytree."""
    return dict(_named_leaves(params))


# ---------------------------------------------------------------- models ----


def _leafify(params: Any, device) -> Any:
    return tree_map(lambda v: v.detach().to(device).clone().requires_grad_(True), params)


def _model(kind: str, gen: torch.Generator) -> tuple[Any, Callable, Callable, Callable, str]:
    """params, f, embed, readout from deq_functional.models.<kind> (MNIST sizes)."""
    from deq_functional.models import conv, mlp

    if kind == "mlp":
        params = mlp.init(gen, in_features=MLP_IN, hidden=MLP_LATENT, num_classes=10, contraction=0.9)
        return params, mlp.apply, mlp.embed, mlp.readout, (
            "deq_functional.models.mlp: mlp.init(in_features=784, hidden=256, num_classes=10, contraction=0.9)"
        )
    params = conv.init(gen, in_shape=(1, 28, 28), num_classes=10)
    with torch.no_grad():  # the paper's Lipschitz rescaling, as its training loop projects it
        params, _ = conv.rescale(params, lipschitz=0.9, generator=gen)
    params = tree_map(torch.Tensor.detach, params)
    return params, conv.apply, conv.embed, conv.readout, (
        "deq_functional.models.conv: conv.init(in_shape=(1, 28, 28)) + conv.rescale(lipschitz=0.9)"
    )


def _make(kind: str, batch: int, meta: dict, device="cpu", dtype=torch.float32) -> Workload:
    gen = torch.Generator().manual_seed(SEED)
    params, f, embed, readout, source = _model(kind, gen)
    params = tree_map(lambda v: v.to(dtype), params)
    inp = torch.randn(batch, 1, 28, 28, generator=gen).to(device, dtype)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return Workload(
        kind, _leafify(params, device), f, embed, readout, inp, target,
        z_like=torch.zeros_like, source=source, meta=meta,
    )


def make_mlp(device="cpu", dtype=torch.float32) -> Workload:
    return _make("mlp", MLP_BATCH, {"latent": MLP_LATENT, "batch": MLP_BATCH}, device, dtype)


def make_conv(device="cpu", dtype=torch.float32) -> Workload:
    return _make("conv", CONV_BATCH, {"batch": CONV_BATCH}, device, dtype)


WORKLOADS = {"mlp": make_mlp, "conv": make_conv}


# ---------------------------------------------------------- loss / steps ----


def ours_loss(w: Workload, solver, grad_mode, counter: list | None = None) -> Callable:
    """loss_fn(params) -> (loss, z_star, info) with deq_functional.fixed_point."""
    f = w.f
    if counter is not None:
        def f(p, z, x, _f=w.f):
            counter[0] += 1
            return _f(p, z, x)

    def loss_fn(params):
        x = w.embed(params, w.inp)
        z, info = dq.fixed_point(f, params, x, solver=solver, grad_mode=grad_mode, z0=w.z_like(x))
        return F.cross_entropy(w.readout(params, z), w.target), z, info

    return loss_fn


def torchdeq_loss(w: Workload, max_iter: int, tol: float, m: int, ift: bool,
                  counter: list | None = None) -> Callable:
    """loss_fn(params) -> (loss, z_star, info) with torchdeq, configured to match ours.

    Anderson forward (history ``m``, ``max_iter`` f calls, relative stop ``tol``);
    IFT: torchdeq's autograd.Function IFT (not the hook variant) with an Anderson
    adjoint solve of the same budget and tolerance; otherwise its 1-step phantom
    gradient (grad=1, tau=1), which is JFB. No norm / dropout modules, no
    spectral-radius estimate, no trajectory sampling (n_states=1).
    """
    import torchdeq

    deq = torchdeq.get_deq(
        core="sliced", ift=ift, hook_ift=False, grad=1, tau=1.0, n_states=1,
        f_solver="anderson", b_solver="anderson",
        f_max_iter=max_iter, b_max_iter=max_iter, f_tol=tol, b_tol=tol,
        f_stop_mode="rel", b_stop_mode="rel",
    )
    deq.train()

    def loss_fn(params):
        x = w.embed(params, w.inp)

        def func(z):
            if counter is not None:
                counter[0] += 1
            return w.f(params, z, x)

        z_out, info = deq(func, w.z_like(x), solver_kwargs={"m": m})
        z = z_out[-1]
        return F.cross_entropy(w.readout(params, z), w.target), z, info

    loss_fn.deq = deq
    return loss_fn


def one_f_loss(w: Workload) -> Callable:
    """Reference for saved bytes: the same loss with one differentiable f at a detached z."""

    def loss_fn(params, z_detached):
        x = w.embed(params, w.inp)
        z = w.f(params, z_detached, x)
        return F.cross_entropy(w.readout(params, z), w.target)

    return loss_fn


class TrainStep:
    """zero_grad; loss = loss_fn(params); loss.backward(); SGD step. Returns the info.

    ``lr=0.0`` by default: the step is timed, not the learning. The SGD update still
    runs (``param.add_(grad, alpha=-lr)``), but every round solves the same problem,
    so rounds (and the two sides of an A/B pair) stay comparable, and a mode whose
    gradient is wrong (e.g. ``Unrolled`` through 100 Anderson iterations, see
    RESULTS.md) cannot wreck the weights for the rounds after it.
    """

    def __init__(self, loss_fn: Callable, params: Any, lr: float = 0.0):
        self.loss_fn, self.params = loss_fn, params
        self.opt = torch.optim.SGD(flatten(params)[0], lr=lr)
        self.last = None

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss, z, info = self.loss_fn(self.params)
        loss.backward()
        self.opt.step()
        self.last = (loss.detach(), info)
        return self.last


def info_summary(info: Any) -> dict:
    """nstep / residual(s) (/ status) of an info (ours: ``dq.Info``; torchdeq: dict) as Python numbers."""
    if isinstance(info, dict):  # torchdeq SolverStat
        return {
            "nstep": float(info["nstep"].float().mean()),
            "abs_residual": float(info["abs_lowest"].max()),
            "rel_residual": float(info["rel_lowest"].max()),
        }
    # ours: the library's summary (the one deq_functional.benchmarking records): nstep,
    # residual, rel_residual, status names (+ per-status counts for a batch)
    return summarize_info(info)

