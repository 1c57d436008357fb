"""Fit a small tanh DEQ on generated data with each gradient mode and print a table.

    python examples/quickstart.py [--steps 150] [--seed 0]

The model is z* = tanh(W z* + U x + b), prediction V z*; the target is a fixed
random nonlinear function of x. Each mode trains from the same initial weights.
"""

from __future__ import annotations

import argparse
import time

import torch

import deq_functional as dq


def f(p, z, x):
    return torch.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])


def init(n_in: int, width: int, gen: torch.Generator) -> dict:
    W = torch.randn(width, width, generator=gen)
    return {
        "W": 0.5 * W / torch.linalg.matrix_norm(W, ord=2),
        "U": torch.randn(width, n_in, generator=gen) / n_in**0.5,
        "b": torch.zeros(width),
        "V": torch.randn(1, width, generator=gen) / width**0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # float32 denormals slow CPU iterations several-fold

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(256, 8, generator=gen)
    y = torch.sin(x @ torch.randn(8, 1, generator=gen)) + 0.1 * x[:, :1] ** 2
    start = init(8, 64, gen)
    solver = dq.Anderson(max_iter=40, tol=1e-4, m=5)

    print(f"{'mode':<10}{'final loss':>12}{'time (s)':>10}{'fwd iters':>11}{'residual':>11}")
    for mode in ("ift", "jfb", "neumann", "unrolled"):
        params = {k: v.clone().requires_grad_() for k, v in start.items()}
        opt = torch.optim.Adam(params.values(), lr=3e-3)
        t0, iters = time.perf_counter(), 0
        for _ in range(args.steps):
            z, info = dq.fixed_point(f, params, x, z0=torch.zeros(x.shape[0], 64), solver=solver, grad_mode=mode)
            loss = ((z @ params["V"].T - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # keep the latent map contractive: ‖W‖₂ ≤ 0.9
                params["W"].mul_(torch.clamp(0.9 / torch.linalg.matrix_norm(params["W"], ord=2), max=1.0))
            iters += int(info.nstep)
        elapsed = time.perf_counter() - t0
        print(f"{mode:<10}{loss.detach().item():>12.4f}{elapsed:>10.2f}{iters / args.steps:>11.1f}{float(info.residual):>11.2e}")


if __name__ == "__main__":
    main()
