"""The two workloads every benchmark shares, and the training steps built on them.

- ``mlp``: an MLP DEQ, latent 256, batch 128 (inputs 784 = flattened 28×28).
- ``conv``: the JFB paper's MNIST convolutional implicit network, batch 64, 28×28×1.

Both use the reference models in ``deq_functional.models`` when they are
installed (``init(generator, ...) -> params``, ``apply(params, z, x)``, plus
``embed`` / ``readout``); the fallbacks below are only for running the harness
before the models land and are reported as such in ``extra_info``.

A workload is a params dict (leaf tensors requiring grad), a pure
``f(params, z, x)``, ``embed(params, inp) -> x``, ``readout(params, z) -> logits``,
a fixed batch (seeded) and its labels. "ours" and "torchdeq" get the *same*
``f`` and the same weights (cloned), so the comparison is one of libraries only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten_with_path, tree_leaves, tree_map, keystr

import deq_functional as dq

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
    source: str  # "deq_functional.models.mlp" or "bench fallback"
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
    """{'["latent"]["weight"]': tensor, ...} for any nested params pytree."""
    return {keystr(path): leaf for path, leaf in tree_flatten_with_path(params)[0]}


# ---------------------------------------------------------------- models ----


def _leafify(params: Any, device) -> Any:
    return tree_map(lambda v: v.detach().to(device).clone().requires_grad_(True), params)


def _try_models(kind: str):
    try:
        import importlib

        return importlib.import_module(f"deq_functional.models.{kind}")
    except ImportError:
        return None


def _fallback_mlp(gen: torch.Generator) -> tuple[dict, Callable, Callable, Callable]:
    """tanh(W z + x + b), W spectrally rescaled to norm 0.9; x = U inp; logits = V z."""
    W = torch.randn(MLP_LATENT, MLP_LATENT, generator=gen)
    W = W * (0.9 / torch.linalg.matrix_norm(W, ord=2))
    params = {
        "W": W,
        "b": torch.zeros(MLP_LATENT),
        "U": torch.randn(MLP_LATENT, MLP_IN, generator=gen) / math.sqrt(MLP_IN),
        "V": torch.randn(10, MLP_LATENT, generator=gen) / math.sqrt(MLP_LATENT),
    }

    def f(p, z, x):
        return torch.tanh(z @ p["W"].T + x + p["b"])

    def embed(p, inp):
        return inp.flatten(1) @ p["U"].T

    def readout(p, z):
        return z @ p["V"].T

    return params, f, embed, readout


def _fallback_conv(gen: torch.Generator, channels: int = 32):
    """JFB-paper-style MNIST implicit net: x = conv_d(d); f = relu(z + conv2(relu(conv1(z)))/2 + x)."""

    def w(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    c = channels
    params = {
        "conv_d": w(c, 1, 3, 3, scale=1 / 3),
        "conv1": w(c, c, 3, 3, scale=0.3 / math.sqrt(9 * c)),
        "conv2": w(c, c, 3, 3, scale=0.3 / math.sqrt(9 * c)),
        "fc": w(10, c * 16, scale=1 / math.sqrt(c * 16)),
    }

    def f(p, z, x):
        y = F.relu(F.conv2d(z, p["conv1"], padding=1))
        return 0.5 * z + F.conv2d(y, p["conv2"], padding=1) + x

    def embed(p, inp):
        return F.conv2d(inp, p["conv_d"], padding=1)

    def readout(p, z):
        return F.adaptive_avg_pool2d(z, 4).flatten(1) @ p["fc"].T

    return params, f, embed, readout


def make_mlp(device="cpu", dtype=torch.float32) -> Workload:
    gen = torch.Generator().manual_seed(SEED)
    mod = _try_models("mlp")
    source = "bench fallback"
    params, f, embed, readout = _fallback_mlp(gen)
    if mod is not None:
        params, f, embed, readout, source = _from_models(mod, "mlp", gen)
    params = tree_map(lambda v: v.to(dtype), params)
    inp = torch.randn(MLP_BATCH, 1, 28, 28, generator=gen).to(device, dtype)
    target = torch.randint(0, 10, (MLP_BATCH,), generator=gen).to(device)
    return Workload(
        "mlp", _leafify(params, device), f, embed, readout, inp, target,
        z_like=torch.zeros_like, source=source,
        meta={"latent": MLP_LATENT, "batch": MLP_BATCH},
    )


def make_conv(device="cpu", dtype=torch.float32) -> Workload:
    gen = torch.Generator().manual_seed(SEED)
    mod = _try_models("conv")
    source = "bench fallback"
    params, f, embed, readout = _fallback_conv(gen)
    if mod is not None:
        params, f, embed, readout, source = _from_models(mod, "conv", gen)
    params = tree_map(lambda v: v.to(dtype), params)
    inp = torch.randn(CONV_BATCH, 1, 28, 28, generator=gen).to(device, dtype)
    target = torch.randint(0, 10, (CONV_BATCH,), generator=gen).to(device)
    return Workload(
        "conv", _leafify(params, device), f, embed, readout, inp, target,
        z_like=torch.zeros_like, source=source, meta={"batch": CONV_BATCH},
    )


def _from_models(mod, kind, gen):
    """params, f, embed, readout from deq_functional.models.<kind> (MNIST sizes)."""
    if kind == "mlp":
        params = mod.init(gen, in_features=MLP_IN, hidden=MLP_LATENT, num_classes=10, contraction=0.9)
        note = "mlp.init(in_features=784, hidden=256, num_classes=10, contraction=0.9)"
    else:
        params = mod.init(gen, in_shape=(1, 28, 28), num_classes=10)
        with torch.no_grad():  # the paper's Lipschitz rescaling, as its training loop projects it
            params, _ = mod.rescale(params, lipschitz=0.9, generator=gen)
        params = tree_map(torch.Tensor.detach, params)
        note = "conv.init(in_shape=(1, 28, 28)) + conv.rescale(lipschitz=0.9)"
    return params, mod.apply, mod.embed, mod.readout, f"deq_functional.models.{kind}: {note}"


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
        self.opt = torch.optim.SGD(tree_leaves(params), lr=lr)
        self.last = None

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss, z, info = self.loss_fn(self.params)
        loss.backward()
        self.opt.step()
        self.last = (loss.detach(), info)
        return self.last


def info_summary(info: Any) -> dict:
    """nstep / residual / status of an info (ours: NamedTuple; torchdeq: dict) as Python numbers."""
    if isinstance(info, dict):  # torchdeq SolverStat
        return {
            "nstep": float(info["nstep"].float().mean()),
            "abs_residual": float(info["abs_lowest"].max()),
            "rel_residual": float(info["rel_lowest"].max()),
        }
    out = {
        "nstep": float(info.nstep.float().mean()),
        "residual": float(info.residual.float().max()),
        "rel_residual": float(info.rel_residual.float().max()),
        "converged": bool(info.converged.all()),
    }
    status = getattr(info, "status", None)
    if status is not None:
        out["status"] = str(status.tolist() if torch.is_tensor(status) else status)
    else:
        out["status"] = "converged" if out["converged"] else "max_iter"
    return out

