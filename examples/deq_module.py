"""A classifier written with nn.Module whose middle is a ``dq.DEQ`` (a conv cell with batch norm).

    python examples/deq_module.py [--data digits|synthetic] [--steps 60] [--grad-mode jfb|ift]

Model: image ``d (1×8×8)`` → ``u = stem(d)`` → ``z* = cell(z*, u)`` with
``cell(z, u) = tanh(conv(z) + BN(u))`` → linear → 10 logits.
``dq.DEQ`` registers the cell as a submodule, so ``model.parameters()`` (Adam here),
``state_dict`` and ``.train()/.eval()`` reach it like any layer. Batch norm in train mode
normalises with batch statistics during the solve and ``dq.DEQ`` updates its running
statistics once per forward (not once per solver iteration); ``model.eval()`` then uses them.
``--data digits`` is scikit-learn's 8×8 digits (the ``examples`` extra); ``synthetic``
needs nothing. Prints the loss and ``info.status`` during training, then test accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import deq_functional as dq


class Cell(nn.Module):
    """``z ↦ tanh(conv(z) + BN(u))`` on ``(B, C, 8, 8)`` states, ``0.9``-Lipschitz in z.

    The kernel is scaled by ``min(1, 0.9 / (3‖K‖_F))`` in forward: a 3×3 convolution's
    operator norm is at most ``3‖K‖_F``, so the cell stays a contraction while it trains.
    Batch norm acts on the injection ``u``: in the z-path it would rescale z's Jacobian by
    a batch-dependent factor, and no contraction could be promised.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        kernel = self.conv.weight
        kernel = kernel * (0.9 / (3 * kernel.norm())).clamp(max=1.0)
        return torch.tanh(F.conv2d(z, kernel, padding=1) + self.norm(u))


class Classifier(nn.Module):
    def __init__(self, channels: int = 8, grad_mode: str = "jfb"):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.deq = dq.DEQ(Cell(channels), dq.Anderson(max_iter=25, tol=1e-4), grad_mode)
        self.head = nn.Linear(channels * 64, 10)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, dq.Info]:
        z, info = self.deq(self.stem(d))
        return self.head(z.flatten(1)), info


def load(name: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(d_train, y_train, d_test, y_test)``: ``(N, 1, 8, 8)`` float images, int labels."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        d, y = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(bunch.target)
    else:  # 10 random prototypes plus noise
        y = torch.arange(1200) % 10
        d = torch.randn(10, 1, 8, 8, generator=gen)[y] + 0.8 * torch.randn(1200, 1, 8, 8, generator=gen)
    d = (d - d.mean()) / d.std()
    perm = torch.randperm(len(y), generator=gen)
    test, train = perm[:300], perm[300:]
    return d[train], y[train], d[test], y[test]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grad-mode", choices=("jfb", "ift"), default="jfb")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    d_train, y_train, d_test, y_test = load(args.data, gen)

    model = Classifier(grad_mode=args.grad_mode)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        idx = torch.randint(len(y_train), (args.batch_size,), generator=gen)
        logits, info = model(d_train[idx])
        loss = F.cross_entropy(logits, y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            status = dq.Status(int(info.status)).name
            print(f"step {step:3d}  loss {loss.item():.3f}  status {status}  iterations {int(info.nstep)}")

    model.eval()  # batch norm now uses the running statistics the DEQ kept
    with torch.no_grad():
        logits, info = model(d_test)
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}  status {dq.Status(int(info.status)).name}")
    return {"losses": losses, "test_accuracy": accuracy, "model": model}


if __name__ == "__main__":
    main()
