"""(3) ``torch.compile``: cold compile time vs ``max_iter``, compiled ÷ eager training step,
and what a compiled solve pays for a large budget (issue 8).

Training step (``bench_compiled_step``): ``torch.compile(loss_fn, fullgraph=True)`` of the
loss (embed, ``fixed_point``, readout, cross-entropy); ``loss.backward()`` (compiled by
AOTAutograd) and the SGD step (lr=0) run outside. Forward ``Anderson(m=5, tol=1e-4,
max_iter=K)``; IFT's adjoint the same solver. Under compile the forward solve (and IFT's
adjoint solve) runs inside ``torch.while_loop`` and stops when converged, eagerly the
loop exits early too: both arms solve to the same tolerance, and both step counts are
recorded (they must agree).

* Compile time, **cold**: ``torch._dynamo.reset()`` and a fresh, empty inductor cache
  (``torch._inductor.utils.fresh_cache()``: new cache directory, in-memory caches
  cleared) for every configuration, so no configuration reuses another's kernels (JFB's
  backward graph does not depend on K and would otherwise hit the cache; the cache
  counters of the compile are recorded). Once per session, a tiny IFT DEQ is compiled
  first (forward and backward, same code paths) so that the one-time imports and
  toolchain start-up are not charged to whichever configuration runs first.
  Compile s = first compiled step − the median steady compiled step.
* Compiled ÷ eager: the two steps timed back to back, order alternating per round
  (``measure.Rotating``), after one more untimed call of each; ratio per round, min /
  median. A third arm replays only the eager step's model GEMMs / convolutions
  (``measure.ModelOps``: embedding, every f, readout and their backward; not the
  solver's ``bmm``): ÷ eager, the lowest compiled ÷ eager a compiler can reach that runs
  the same model arithmetic on the same BLAS / oneDNN. The conv workload: JFB and IFT at
  K=30 only (its compile is several times the MLP's), with two more arms: compiled with
  ``options={"joint_custom_pre_pass": dq.recompute_masks}`` (the library's opt-in pass: the
  backward recomputes the leaky-ReLU / max-pool masks instead of loading saved bool tensors),
  and with that and ``dq.hoist_loop_invariants`` both (``PASS_ARMS``).

``bench_compiled_budget``: a compiled no-grad solve with ``max_iter=4000`` vs the same
with ``max_iter=30`` on a problem that converges in 14 iterations (MLP, Anderson m=5,
tol 1e-6): with ``torch.while_loop`` neither pays for its unused budget.

Before timing, compiled and eager are checked to agree (loss, gradients, nstep, status).

``bench_mask_store``: why that pass pays on a CPU. One compiled elementwise kernel, the conv
net's leaky-ReLU comparison on its state's shape, writing its result as bool against as float32,
and one reading a bool mask against a float32 mask (``where``), each against eager: inductor's
x86 vector code moves bool tensors element by element.

``bench_torchdeq_fullgraph``: whether torchdeq's loss compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import contextlib
import functools
import time

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

TOL, M = 1e-4, 5
MLP_MAX_ITERS = (10, 30, 100)
CONV_MAX_ITER = 30
ROUNDS = {"mlp": 10, "conv": 4}
MODES = {
    "jfb": lambda k: dq.JFB(),
    "ift": lambda k: dq.IFT(solver=dq.Anderson(max_iter=k, tol=TOL, m=M)),
}
BUDGET_TOL, BUDGETS, BUDGET_ROUNDS = 1e-6, (30, 4000), 15

# agreement required between compiled and eager before timing (relative 2-norm errors)
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-2


def fresh_inductor_cache():
    """An empty inductor cache directory with the in-memory caches cleared (cold compiles)."""
    try:
        from torch._inductor.utils import fresh_cache
    except ImportError:  # older torch: the session's fresh TORCHINDUCTOR_CACHE_DIR only
        return contextlib.nullcontext()
    return fresh_cache()


def cache_counters() -> dict:
    """Inductor FX-graph and AOTAutograd cache hits / misses / bypasses so far (a cold compile has no hits)."""
    from torch._dynamo.utils import counters

    return {f"{group}.{name}": counters[group][name] for group, names in
            (("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")),
             ("aot_autograd", ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")))
            for name in names}


def counters_since(before: dict) -> dict:
    now = cache_counters()
    return {k: now[k] - before[k] for k in now}


_PROCESS_WARMED = []


def warm_process_once():
    """Compile (forward and backward) a tiny DEQ once per session, on the same code paths
    (``torch.while_loop`` forward solve, IFT's ``autograd.Function`` and adjoint loop), so the
    first configuration is not charged the imports and compiler start-up every later one skips."""
    if _PROCESS_WARMED:
        return
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(4, 4, generator=gen)).requires_grad_()
    x = torch.randn(2, 4, generator=gen)
    solver = dq.Anderson(max_iter=3, tol=TOL, m=2)

    def loss(w):
        z, _ = dq.fixed_point(lambda p, z, x: torch.tanh(z @ p.T + x), w, x, solver=solver,
                              grad_mode=dq.IFT(solver=solver), z0=torch.zeros_like(x))
        return z.square().sum()

    with fresh_inductor_cache():
        torch.compile(loss, fullgraph=True)(w).backward()
    torch._dynamo.reset()
    _PROCESS_WARMED.append(True)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check_same(step_c, step_e, params_c, params_e):
    """After one step of each from the same weights: loss, every gradient, nstep, status agree."""
    (lc, ic), (le, ie) = step_c.last, step_e.last
    gc, ge = wl.named_leaves(params_c), wl.named_leaves(params_e)
    check = {
        "loss_rel_err": _rel(lc, le),
        "grad_rel_err_max": max(_rel(gc[k].grad, ge[k].grad) for k in ge if ge[k].grad is not None),
        "nstep_compiled": int(ic.nstep), "nstep_eager": int(ie.nstep),
        "status_compiled": int(ic.status), "status_eager": int(ie.status),
    }
    assert check["loss_rel_err"] < LOSS_RTOL and check["grad_rel_err_max"] < GRAD_RTOL, f"compiled ≠ eager: {check}"
    assert check["nstep_compiled"] == check["nstep_eager"], f"compiled and eager ran different iterations: {check}"
    assert check["status_compiled"] == check["status_eager"], f"compiled and eager ended differently: {check}"
    return check


STEP_CASES = [("mlp", m, k) for m in MODES for k in MLP_MAX_ITERS] + [("conv", m, CONV_MAX_ITER) for m in MODES]
# the conv steps once more per set of the library's opt-in passes (arm name -> inductor options)
PASS_ARMS = {
    "masks_recomputed": {"joint_custom_pre_pass": dq.recompute_masks},
    "both_passes": {"joint_custom_pre_pass": dq.recompute_masks, "post_grad_custom_pre_pass": dq.hoist_loop_invariants},
}


@pytest.mark.compile
@pytest.mark.parametrize("workload,mode,max_iter", STEP_CASES)
def bench_compiled_step(deq_benchmark, make_workload, workload, mode, max_iter):
    w = make_workload(workload)
    solver = dq.Anderson(max_iter=max_iter, tol=TOL, m=M)
    grad_mode = MODES[mode](max_iter)
    loss_fn = wl.ours_loss(w, solver, grad_mode)
    timer = deq_benchmark.make_timer()
    warm_process_once()

    params_e, params_c = w.clone_params(), w.clone_params()
    eager = wl.TrainStep(loss_fn, params_e)
    eager()  # eager reference step from the same weights (also its warm-up)
    torch._dynamo.reset()
    with fresh_inductor_cache():
        compiled = wl.TrainStep(torch.compile(loss_fn, fullgraph=True), params_c)
        before = cache_counters()
        first_step_s = timer(compiled)  # cold: Dynamo, inductor forward, AOTAutograd + inductor backward
        cache = counters_since(before)
        check = _check_same(compiled, eager, params_c, params_e)
        for step in (compiled, eager):  # one more untimed call each (a second call may still specialise)
            step()
    arms = {"compiled": compiled, "eager": eager}
    pass_checks = {}
    for name, options in PASS_ARMS.items() if workload == "conv" else ():
        # the same loss compiled with the library's passes (a warm inductor cache: their own graphs)
        params_p = w.clone_params()
        arms[name] = wl.TrainStep(torch.compile(loss_fn, fullgraph=True, options=options), params_p)
        arms[name]()
        pass_checks[name] = _check_same(arms[name], eager, params_p, params_e)
        arms[name]()

    floor = measure.ModelOps(eager)  # the eager step's model GEMMs/convs, replayed alone
    rot = measure.Rotating(timer, {**arms, "model_ops": floor.replay})
    load_before = measure.load_average()
    deq_benchmark.group = "compile"
    deq_benchmark.pedantic(rot.round, rounds=ROUNDS[workload], warmup=0)
    compiled_s = measure.stats(rot.samples["compiled"])
    deq_benchmark.extra_info.update({
        "kind": "compiled_step", "workload": workload, "workload_source": w.source, "mode": mode,
        "max_iter": max_iter, "solver_repr": repr(solver), "grad_mode_repr": repr(grad_mode),
        "solver": f"Anderson(m={M}, tol={TOL:g}, max_iter=K)",
        "compiled_s": compiled_s,
        "eager_s": measure.stats(rot.samples["eager"]),
        "ratio_compiled_over_eager": rot.ratio("compiled", "eager"),
        "ratio_of_min": min(rot.samples["compiled"]) / min(rot.samples["eager"]),
        "model_ops_s": measure.stats(rot.samples["model_ops"]),
        "model_ops_counts": floor.counts,
        "ratio_model_ops_over_eager": rot.ratio("model_ops", "eager"),
        "pass_arms": {name: {"options": sorted(PASS_ARMS[name]), "s": measure.stats(rot.samples[name]),
                             "ratio_over_eager": rot.ratio(name, "eager"), "ratio_over_compiled": rot.ratio(name, "compiled"),
                             "check": check, "info": wl.info_summary(arms[name].last[1])}
                      for name, check in pass_checks.items()},
        "compile_s": first_step_s - compiled_s["median"],
        "first_compiled_step_s": first_step_s,
        "compile_cache": "cold: torch._dynamo.reset() + torch._inductor.utils.fresh_cache()",
        "compile_cache_counters": cache,
        "check": check,
        "compiled_info": wl.info_summary(compiled.last[1]),
        "eager_info": wl.info_summary(eager.last[1]),
        "load_average": [load_before, measure.load_average()],
    })


@pytest.mark.compile
def bench_compiled_budget(deq_benchmark, make_workload):
    w = make_workload("mlp")
    params = wl.tree_map(torch.Tensor.detach, w.params)
    with torch.no_grad():
        x = w.embed(params, w.inp)
    z0 = w.z_like(x)

    def solve_with(solver):
        def solve(params, x, z0):
            with torch.no_grad():
                return dq.fixed_point(w.f, params, x, solver=solver, grad_mode=dq.JFB(), z0=z0)

        return solve

    timer = deq_benchmark.make_timer()
    warm_process_once()
    solvers = {k: dq.Anderson(max_iter=k, tol=BUDGET_TOL, m=M) for k in BUDGETS}
    _, eager_info = solve_with(solvers[BUDGETS[0]])(params, x, z0)
    torch._dynamo.reset()
    arms, compile_s, infos = {}, {}, {}
    with fresh_inductor_cache():
        for k, solver in solvers.items():
            fn = torch.compile(solve_with(solver), fullgraph=True)
            compile_s[k] = timer(fn, params, x, z0)  # first call: compile + one solve
            fn(params, x, z0)  # second untimed call
            arms[f"max_iter={k}"] = functools.partial(fn, params, x, z0)
    for name, arm in arms.items():
        z, info = arm()
        infos[name] = wl.info_summary(info)
        assert int(info.nstep) == int(eager_info.nstep) < min(BUDGETS), (
            f"{name}: nstep {int(info.nstep)}, eager {int(eager_info.nstep)}: the budget must not bind")

    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    deq_benchmark.group = "compile"
    deq_benchmark.pedantic(rot.round, rounds=BUDGET_ROUNDS, warmup=0)
    small, large = (f"max_iter={k}" for k in BUDGETS)
    deq_benchmark.extra_info.update({
        "kind": "compiled_budget", "workload": "mlp", "workload_source": w.source,
        "solver_repr": repr(solvers[BUDGETS[1]]), "budgets": list(BUDGETS),
        "solver": f"Anderson(m={M}, tol={BUDGET_TOL:g})",
        **{f"{name}_s": measure.stats(v) for name, v in rot.samples.items()},
        "ratio_large_over_small": rot.ratio(large, small),
        "ratio_of_min": min(rot.samples[large]) / min(rot.samples[small]),
        "compile_s": {f"max_iter={k}": v for k, v in compile_s.items()},
        "infos": infos, "eager_info": wl.info_summary(eager_info),
        "load_average": [load_before, measure.load_average()],
    })


# torchdeq's loss under torch.compile(fullgraph=True), its configuration of bench_vs_torchdeq.py
TD_MAX_ITER, TD_TOL, TD_M = 30, 1e-6, 6


MASK_ROUNDS = 40
MASK_KERNELS = {  # name -> (kernel, which input it reads: the state or a mask of it)
    "store bool": (lambda a: a > 0, "state"),
    "store float32": (lambda a: (a > 0).to(a.dtype), "state"),
    "load bool": (lambda m, g: torch.where(m, g, 0.1 * g), "bool mask"),
    "load float32": (lambda m, g: torch.where(m != 0, g, 0.1 * g), "float32 mask"),
}


@pytest.mark.compile
def bench_mask_store(benchmark, make_workload, timer, device):
    w = make_workload("conv")
    shape = w.f_bare_args()[1].shape  # the conv net's state
    gen = torch.Generator(device).manual_seed(0)
    a, g = (torch.randn(shape, generator=gen, device=device) for _ in range(2))
    inputs = {"state": (a,), "bool mask": (a > 0, g), "float32 mask": ((a > 0).to(a.dtype), g)}
    arms = {}
    for name, (kernel, reads) in MASK_KERNELS.items():
        compiled = torch.compile(kernel, fullgraph=True)
        for arm, fn in (("compiled " + name, compiled), ("eager " + name, kernel)):
            arms[arm] = functools.partial(fn, *inputs[reads])
            arms[arm]()  # compiles (once per kernel), warms
    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    benchmark.group = "compile"
    benchmark.pedantic(rot.round, rounds=MASK_ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({
        "kind": "mask_store", "workload": "conv", "workload_source": w.source, "shape": list(a.shape),
        "numel": a.numel(), "kernels": {k: reads for k, (_, reads) in MASK_KERNELS.items()},
        "time_s": {arm: measure.stats(rot.samples[arm]) for arm in arms},
        "load_average": [load_before, measure.load_average()],
    })


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["ift", "jfb"])
def bench_torchdeq_fullgraph(benchmark, make_workload, mode):
    """torchdeq's loss under torch.compile(fullgraph=True): record whether it compiles."""
    w = make_workload("mlp")
    loss_fn = wl.torchdeq_loss(w, TD_MAX_ITER, TD_TOL, TD_M, ift=(mode == "ift"))
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
