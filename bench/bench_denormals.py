"""(5) The CPU denormal pitfall, measured: one IFT training step with and without
``torch.set_flush_denormal(True)``, alternating in one process.

Every other benchmark runs with denormals flushed (bench/conftest.py sets it; the
library never changes global flags). Here the flag is switched off for the
"no flush" arm only and restored right after it. Conv workload, Anderson(m=6,
30 iterations, tol 1e-6) forward and adjoint, for us and for torchdeq.
"""

from __future__ import annotations

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

MAX_ITER, TOL, M = 30, 1e-6, 6


def _flushing(step, flag):
    def run():
        torch.set_flush_denormal(flag)
        try:
            step()
        finally:
            torch.set_flush_denormal(True)

    return run


@pytest.mark.parametrize("lib", ["ours", "torchdeq"])
def bench_flush_denormal(benchmark, make_workload, timer, device, lib):
    if device.type != "cpu":
        pytest.skip("denormal flushing is a CPU setting")
    w = make_workload("conv")
    if lib == "ours":
        solver = dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M)
        loss_fn = wl.ours_loss(w, solver, dq.IFT(solver=solver))
    else:
        loss_fn = wl.torchdeq_loss(w, MAX_ITER, TOL, M, ift=True)
    step = wl.TrainStep(loss_fn, w.clone_params())
    no_flush, flush = _flushing(step, False), _flushing(step, True)
    no_flush()  # warm-up, both arms
    flush()

    ab = measure.Alternating(timer, no_flush, flush)
    load_before = measure.load_average()
    benchmark.group = "denormals"
    benchmark.pedantic(ab.round, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({
        "kind": "denormals", "workload": "conv", "workload_source": w.source, "lib": lib, "mode": "ift",
        **ab.summary("no_flush", "flush"),
        "info": wl.info_summary(step.last[1]),
        "load_average": [load_before, measure.load_average()],
    })
