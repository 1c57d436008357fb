"""(3) Eager vs ``torch.compile(fullgraph=True)`` training step: steady time and compile time.

The compiled object is the loss function (embed, ``fixed_point``, readout,
cross-entropy) with ``fullgraph=True``; ``loss.backward()`` (compiled by
AOTAutograd) and the SGD step run outside, as DESIGN.md item 4 says. Forward:
``Anderson(m=6, max_iter=30, tol=1e-6)``; under compile the loop runs the full
budget with converged samples frozen by masks, eagerly it exits early — both
step counts are recorded. Compile time = the first compiled step (forward and
backward compilation) minus one steady compiled step. Eager and compiled steps
alternate in one process.

A third arm, eager with ``tol=0`` (exactly the 30 iterations the compiled loop
runs), separates the per-iteration speed of compiled code from the iterations
that eager early exit saves.

Also recorded: torchdeq under ``torch.compile(fullgraph=True)`` (expected to
fail: data-dependent control flow in its Anderson loop), with the error.
"""

from __future__ import annotations

import time

import pytest
import torch

import deq_functional as dq
import measure
import workloads as wl

MAX_ITER, TOL, M = 30, 1e-6, 6
MODES = {
    "ift": lambda: dq.IFT(solver=dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M)),
    "jfb": lambda: dq.JFB(),
}
ROUNDS = {"mlp": 12, "conv": 2}


@pytest.mark.compile
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("workload", ["mlp"])  # conv: compile time does not fit `make bench`'s budget
def bench_compiled_step(benchmark, make_workload, timer, workload, mode):
    w = make_workload(workload)
    solver = dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M)
    loss_fn = wl.ours_loss(w, solver, MODES[mode]())
    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)

    # same numbers as eager, from the same weights
    p_e, p_c = w.clone_params(), w.clone_params()
    le, ze, _ = loss_fn(p_e)
    le.backward()
    first = {}

    def first_step():
        first["loss"], first["z"], _ = compiled_fn(p_c)
        first["loss"].backward()

    first_step_s = timer(first_step)  # compiles forward and (AOTAutograd) backward
    zc = first["z"]
    ge, gc = wl.named_leaves(p_e), wl.named_leaves(p_c)
    g_err = max(float((ge[k].grad - gc[k].grad).norm() / ge[k].grad.norm().clamp_min(1e-30)) for k in ge)
    z_err = float((ze - zc).norm() / ze.norm())
    assert z_err < 1e-3 and g_err < 1e-2, f"compiled differs from eager: z {z_err:.3g}, grads {g_err:.3g}"

    # third arm: eager with tol=0, i.e. the same 30 iterations the compiled loop runs
    full = dq.Anderson(max_iter=MAX_ITER, tol=0.0, m=M)
    full_mode = dq.IFT(solver=full) if mode == "ift" else MODES[mode]()
    arms = {
        "compiled": wl.TrainStep(compiled_fn, w.clone_params()),
        "eager": wl.TrainStep(loss_fn, w.clone_params()),
        "eager_full_budget": wl.TrainStep(wl.ours_loss(w, full, full_mode), w.clone_params()),
    }
    for _ in range(2):  # warm-up (a second compiled call may still specialise)
        for arm in arms.values():
            arm()

    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    benchmark.group = "compile"
    benchmark.pedantic(rot.round, rounds=ROUNDS[workload], iterations=1, warmup_rounds=0)
    compiled_s = measure.stats(rot.samples["compiled"])
    benchmark.extra_info.update({
        "kind": "compile", "workload": workload, "workload_source": w.source, "mode": mode,
        "solver_repr": repr(solver),
        **{f"{k}_s": measure.stats(v) for k, v in rot.samples.items()},
        "ratio_compiled_over_eager": rot.ratio("compiled", "eager"),
        "ratio_compiled_over_eager_full_budget": rot.ratio("compiled", "eager_full_budget"),
        "compile_s": first_step_s - compiled_s["median"],
        "first_compiled_step_s": first_step_s,
        "check": {"z_rel_err": z_err, "grad_rel_err_max": g_err},
        **{f"{k}_info": wl.info_summary(v.last[1]) for k, v in arms.items()},
        "load_average": [load_before, measure.load_average()],
    })


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["ift", "jfb"])
def bench_torchdeq_fullgraph(benchmark, make_workload, mode):
    """torchdeq's loss under torch.compile(fullgraph=True): record whether it compiles."""
    w = make_workload("mlp")
    loss_fn = wl.torchdeq_loss(w, MAX_ITER, TOL, M, ift=(mode == "ift"))
    params = w.clone_params()
    torch._dynamo.reset()
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    result = {}

    def attempt():
        t0 = time.perf_counter()
        try:
            loss, _, _ = compiled_fn(params)
            loss.backward()
            result.update(status="compiled", error=None)
        except Exception as err:  # noqa: BLE001 - the failure is the measurement
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            result.update(status="failed", error=f"{type(err).__name__}: {first[:300]}")
        result["seconds"] = time.perf_counter() - t0

    benchmark.group = "compile"
    benchmark.pedantic(attempt, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"kind": "torchdeq_fullgraph", "workload": "mlp", "mode": mode, **result})
