"""(7) The MLP training step written in JAX vs ours, eager and compiled, A/B/C in one process.

The JAX arm is ``bench/jax_mlp.py``: the same step (embed, Anderson forward solve with our
stopping rule, readout, cross-entropy, gradients of every parameter, SGD with lr=0) under one
``jax.jit``, JFB or IFT (a ``jax.custom_vjp`` whose adjoint is the same Anderson on vjps).
Ours: ``workloads.TrainStep`` of ``workloads.ours_loss`` (eager), and of
``torch.compile(loss_fn, fullgraph=True)`` with ``backward()`` and the SGD step outside, as in
``bench_compile.py``, and the same compiled with ``options={"cpp.use_decompose_tanh": True}``
("fast tanh": inductor lowers tanh through exp; a user's option, never the library's), with
``options={"post_grad_custom_pre_pass": dq.hoist_loop_invariants}`` ("hoisted": the library's
opt-in pass that moves loop-invariant work, IFT's adjoint forward of f, out of the loop), with
both, and with both and ``cpp_wrapper=True`` (inductor writes the code around its kernels,
the while_loop's iteration included, as C++ instead of Python).
``Anderson(m=5, tol=1e-4, max_iter=K)`` forward and (IFT) adjoint,
K = 30 and 100, float32, the weights of ``workloads.make_mlp`` converted to numpy → jax.

Before timing, one step of each arm from the same weights: the forward ``nstep`` and status
must agree across the arms, IFT's adjoint ``nstep`` between JAX and our eager step (read
by ``measure.record_solves``, which wraps the library's ``_solve.iterate`` during that step), and
every parameter gradient must agree (max over leaves of ``‖a − b‖∞ / ‖b‖∞``, JAX and compiled vs eager).

Threads: torch runs with ``torch.set_num_threads(1)`` (bench/conftest.py), XLA with one
compute thread (``jax_mlp.load_jax``: ``XLA_FLAGS`` and ``NPROC=1`` before jax's CPU client
exists). Checked per arm before timing: repeated calls for ≥ ``THREAD_CHECK_S`` seconds, the
CPU time of every thread of the process from ``/proc/self/task/*/stat``: no thread may have used
more than 0.7 × the CPU time of the busiest one. (With ``XLA_FLAGS`` alone, jaxlib 0.10.2 split
this step's work evenly between two pool threads, 0.44 / 0.45 s, and a sampler of the threads'
states found two or three of them running at once in 20 % of samples; with ``NPROC=1`` its one
pool thread did 68–94 % of the CPU time, the next busiest 2–44 % of its, process CPU ÷ wall
time was 0.99–1.00 in a run where the torch arms got a full core too (1.00), and two threads
were "running" at once in 2–6 % of samples on a loaded machine, where that includes waiting.)

Timing: ``measure.Rotating`` (each round times every arm once, starting one arm later each
round), wall clock; the JAX call ends with ``jax.block_until_ready``. Per-round ratios
ours ÷ JAX. Without jax installed the benchmark is skipped (``pip install jax``).
"""

from __future__ import annotations

import os
import threading
import time

import jax_mlp
import measure
import numpy as np
import pytest
import torch
import workloads as wl

import deq_functional as dq

TOL, M = 1e-4, 5
MAX_ITERS = (30, 100)
MODES = {
    "jfb": lambda k: dq.JFB(),
    "ift": lambda k: dq.IFT(solver=dq.Anderson(max_iter=k, tol=TOL, m=M)),
}
ROUNDS = 50
# inductor options of the compiled arms (each the user's choice per torch.compile call): none; the
# option that lowers tanh to exp (inductor's own tanh costs ~6× eager's on this CPU;
# bench_iteration_vs_jax); the library's loop-invariant pass (IFT's adjoint forward leaves the
# loop; JFB has no invariant work in its loop); both; and both with inductor's C++ wrapper (the
# code around the kernels, the while_loop's Python loop included, generated as C++).
FAST_TANH = {"cpp.use_decompose_tanh": True}
HOISTED = {"post_grad_custom_pre_pass": dq.hoist_loop_invariants}
COMPILED_ARMS = {"compiled": {}, "compiled, fast tanh": FAST_TANH, "compiled, hoisted": HOISTED,
                 "compiled, hoisted, fast tanh": {**HOISTED, **FAST_TANH},
                 "compiled, hoisted, fast tanh, C++ wrapper": {**HOISTED, **FAST_TANH, "cpp_wrapper": True}}
THREAD_CHECK_S, MAX_SECOND_OVER_TOP = 0.5, 0.7
# agreement required before timing: max over leaves of ‖a − b‖∞ / ‖b‖∞ (float32; measured ~1e-6)
JAX_GRAD_RTOL, COMPILED_GRAD_RTOL = 1e-4, 1e-2


# ------------------------------------------------------------------- helpers ----


def _thread_cpu() -> dict:
    """{thread id: (name, CPU seconds user + system)} of this process's threads, from /proc."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as fh:
                name = fh.read().strip()
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def threads_used(fn) -> dict:
    """Call ``fn`` for at least THREAD_CHECK_S seconds; which threads did the work.

    ``threads``: ``[name, CPU s]`` of every thread that used CPU (``main`` marks the calling
    thread), largest first; ``top_share``: the busiest thread's share of the process's CPU time;
    ``second_over_top``: the second busiest thread's CPU time ÷ the busiest's (work split across a
    pool of two gives ~1). ``cpu_over_wall``: process CPU time ÷ wall time (above 1 only if
    threads ran at once; below 1 when other processes take the core).
    """
    if not os.path.isdir("/proc/self/task"):
        return {"top_share": None, "second_over_top": None}
    main = threading.get_native_id()
    before, cpu0, t0 = _thread_cpu(), time.process_time(), time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < THREAD_CHECK_S:
        fn()
        calls += 1
    wall, cpu, after = time.perf_counter() - t0, time.process_time() - cpu0, _thread_cpu()
    used = sorted(((name + (" (main)" if tid == main else ""), s - before.get(tid, (name, 0.0))[1])
                   for tid, (name, s) in after.items()), key=lambda t: -t[1])
    used = [(name, round(s, 3)) for name, s in used if s > 0]
    total = sum(s for _, s in used)
    return {
        "top_share": used[0][1] / total if total else None,
        "second_over_top": (used[1][1] / used[0][1] if len(used) > 1 else 0.0) if total else None,
        "threads": used, "cpu_over_wall": cpu / wall, "calls": calls, "wall_s": wall,
    }


def to_jax(w: wl.Workload):
    """(params, inp, target, lr) of the JAX step: copies of the workload's tensors."""
    import jax
    import jax.numpy as jnp

    def copy(t):
        return jnp.asarray(np.array(t.detach().cpu().numpy(), copy=True))

    params = jax.tree_util.tree_map(copy, w.params)
    return params, copy(w.inp), jnp.asarray(w.target.cpu().numpy().astype(np.int32)), jnp.float32(0.0)


def _flat_grads(grads) -> dict:
    """{"embed.weight": numpy array, ...} from a nested dict of (jax or torch) gradients."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = np.asarray(node.detach().cpu().numpy() if isinstance(node, torch.Tensor) else node)

    walk("", grads)
    return out


def _max_rel(a: dict, b: dict) -> dict:
    """Per leaf ``‖a − b‖∞ / ‖b‖∞`` and ``‖a − b‖₂ / ‖b‖₂``, with the max of each over leaves."""
    inf = {k: float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30)) for k in b}
    two = {k: float(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)) for k in b}
    return {"max_rel_inf": max(inf.values()), "max_rel_2": max(two.values()), "per_leaf_inf": inf}


def _jax_report(report) -> dict:
    nstep, status, rel = (float(v) for v in np.asarray(report))
    return {"nstep": int(nstep), "status": dq.Status(int(status)).name, "rel_residual": rel}


def check_agreement(jax_out, eager: wl.TrainStep, compiled: dict, adjoint_eager, mode) -> dict:
    """Iterations, status, loss and gradients of one step of each arm from the same weights
    (``compiled``: {arm name: its TrainStep}; "compiled" among them)."""
    _, loss_j, grads_j, report = jax_out

    def grads(step):
        return _flat_grads({k: v.grad for k, v in wl.named_leaves(step.params).items()})

    eager_grads = grads(eager)
    check = {
        "forward": {"jax": _jax_report(report["forward"]), "eager": wl.info_summary(eager.last[1]),
                    **{name: wl.info_summary(step.last[1]) for name, step in compiled.items()}},
        "adjoint": ({"jax": _jax_report(report["adjoint"]), "eager": adjoint_eager} if mode == "ift" else None),
        "loss": {"jax": float(loss_j), "eager": float(eager.last[0]),
                 **{name: float(step.last[0]) for name, step in compiled.items()}},
        "grad_jax_vs_eager": _max_rel(_flat_grads(grads_j), eager_grads),
        **{f"grad_{name}_vs_eager": _max_rel(grads(step), eager_grads) for name, step in compiled.items()},
    }
    fwd = check["forward"]
    steps = {arm: (fwd[arm]["nstep"], fwd[arm]["status"]) for arm in fwd}
    assert len(set(steps.values())) == 1, f"forward solves ended differently (nstep, status): {steps}"
    if mode == "ift":
        adj = check["adjoint"]
        assert adj["eager"] is not None, "the eager step's adjoint solve was not observed (deq_functional._solve changed?)"
        pair = {arm: (adj[arm]["nstep"], adj[arm]["status"]) for arm in ("jax", "eager")}
        assert len(set(pair.values())) == 1, f"adjoint solves ended differently (nstep, status): {pair}"
    assert check["grad_jax_vs_eager"]["max_rel_inf"] <= JAX_GRAD_RTOL, f"JAX ≠ eager gradients: {check}"
    for name in compiled:
        assert check[f"grad_{name}_vs_eager"]["max_rel_inf"] <= COMPILED_GRAD_RTOL, f"{name} ≠ eager gradients: {check}"
    return check


# ----------------------------------------------------------------- benchmark ----


@pytest.mark.compile
@pytest.mark.parametrize("max_iter", MAX_ITERS)
@pytest.mark.parametrize("mode", list(MODES))
def bench_vs_jax(benchmark, make_workload, timer, jax, mode, max_iter):
    w = make_workload("mlp")
    if w.inp.device.type != "cpu":
        pytest.skip("the JAX arm runs on CPU only")
    solver = dq.Anderson(max_iter=max_iter, tol=TOL, m=M)
    grad_mode = MODES[mode](max_iter)
    loss_fn = wl.ours_loss(w, solver, grad_mode)

    eager = wl.TrainStep(loss_fn, w.clone_params())
    with measure.record_solves() as rec:
        eager()
    torch._dynamo.reset()
    compiled = {name: wl.TrainStep(torch.compile(loss_fn, fullgraph=True, options=options), w.clone_params())
                for name, options in COMPILED_ARMS.items()}
    compiled_first_s = {name: timer(step) for name, step in compiled.items()}  # Dynamo, inductor, AOTAutograd + one step

    jax_step = jax_mlp.make_train_step(mode, jax_mlp.Anderson(max_iter=max_iter, tol=TOL, m=M))
    jax_args = to_jax(w)
    jax_first_s, jax_out = timer.timed(lambda: jax.block_until_ready(jax_step(*jax_args)))  # trace + XLA compile + one step
    check = check_agreement(jax_out, eager, compiled, rec.adjoint(), mode)

    arms = {"jax": lambda: jax.block_until_ready(jax_step(*jax_args)), "eager": eager, **compiled}
    for arm in arms.values():  # one more untimed call each
        arm()
    threads = {name: threads_used(arm) for name, arm in arms.items()}
    for name, t in threads.items():
        assert t["second_over_top"] is None or t["second_over_top"] <= MAX_SECOND_OVER_TOP, (
            f"{name}: not one thread did the work: {t}")

    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    benchmark.group = "vs_jax"
    benchmark.pedantic(rot.round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    s = {name: measure.stats(v) for name, v in rot.samples.items()}
    benchmark.extra_info.update({
        "kind": "vs_jax", "workload": "mlp", "workload_source": w.source, "mode": mode, "max_iter": max_iter,
        "solver": f"Anderson(m={M}, tol={TOL:g}, max_iter={max_iter})" + (" forward and adjoint" if mode == "ift" else ""),
        "solver_repr": repr(solver), "grad_mode_repr": repr(grad_mode),
        **{f"{name}_s": v for name, v in s.items()},
        "ratio_eager_over_jax": rot.ratio("eager", "jax"),
        "ratio_compiled_over_jax": rot.ratio("compiled", "jax"),
        "ratio_fast_tanh_over_jax": rot.ratio("compiled, fast tanh", "jax"),
        "ratio_hoisted_over_jax": rot.ratio("compiled, hoisted", "jax"),
        "ratio_hoisted_fast_tanh_over_jax": rot.ratio("compiled, hoisted, fast tanh", "jax"),
        "ratio_hoisted_over_compiled": rot.ratio("compiled, hoisted", "compiled"),
        "ratio_hoisted_over_eager": rot.ratio("compiled, hoisted", "eager"),
        "ratio_all_options_over_jax": rot.ratio("compiled, hoisted, fast tanh, C++ wrapper", "jax"),
        "ratio_cpp_wrapper_over_python_wrapper": rot.ratio("compiled, hoisted, fast tanh, C++ wrapper",
                                                           "compiled, hoisted, fast tanh"),
        "ratio_of_min_eager_over_jax": s["eager"]["min"] / s["jax"]["min"],
        "ratio_of_min_compiled_over_jax": s["compiled"]["min"] / s["jax"]["min"],
        "first_call_s": {"jax": jax_first_s, **compiled_first_s},
        "check": check,
        "threads": threads,
        "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(), "torch": torch.__version__},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_threads": "XLA_FLAGS as set + NPROC=1 while jax's CPU client was created (bench/jax_mlp.load_jax)",
        "load_average": [load_before, measure.load_average()],
    })


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"
