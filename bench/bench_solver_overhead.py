"""(1) Solver overhead: time per solver iteration ÷ one bare f call, under no_grad.

A solve cannot cost less than its f calls; this is our distance to that limit.
Per iteration = the *marginal* cost, ``(T(K2) − T(K1)) / (K2 − K1)`` with
``tol=0.0`` (exactly K iterations), so the per-call constants of
``fixed_point`` (input validation's f call, the final f application) cancel;
the whole-call ratio ``T(K2) / (K2 · t_f)`` is reported too. Each round times
bare f (mean of several calls), the K1 solve and the K2 solve back to back;
the ratio is taken per round, then min and median over rounds; and once from
the minima of each column, ``(min T(K2) − min T(K1)) / (K2 − K1) / min t_f``,
the estimate least sensitive to a busy machine (noise only ever adds time).

Compiled: ``torch.compile(solve, fullgraph=True)`` of the whole no-grad
``fixed_point`` call (one compile per K), compared against a compiled bare f
(same ``fullgraph=True``) and, for reference, the eager bare f.

Peer (``torchdeq`` rows, MLP, eager): torchdeq's own solvers (``torchdeq.solver.get_solver``:
``fixed_point_iter``, ``anderson`` with m=6, ``broyden``) on the same f, same z0, same K1 / K2
(stopping never triggers: relative tol 1e-30), timed the same way: is a per-iteration ratio of ours
a floor of eager PyTorch, or does a peer beat it?

Clock (``deq_functional.benchmarking.DeviceTimer``): on CPU ``time.thread_time``, the
CPU time of the calling thread. With ``torch.set_num_threads(1)`` (bench/conftest.py)
every kernel runs in that thread, so it counts the same work as wall time but not the
time the thread waits for a core while other processes run: on the shared 2-core
machine these ratios of sub-millisecond timings were dominated by that noise under
``perf_counter``. On CUDA: CUDA events (wall time of the device work).
"""

from __future__ import annotations

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

SOLVERS = {
    "picard": lambda k: dq.Picard(max_iter=k, tol=0.0),
    "anderson": lambda k: dq.Anderson(max_iter=k, tol=0.0, m=6),
    "broyden": lambda k: dq.Broyden(max_iter=k, tol=0.0),
}
K_EAGER = (10, 30)
K_COMPILED = (5, 10)  # compile time grows fast with K (the loop is unrolled)
ROUNDS = {"mlp": 15, "conv": 7}
F_CALLS = {"mlp": 20, "conv": 5}  # bare-f calls averaged per round


def _solve_fn(w, solver):
    def solve(params, x):
        with torch.no_grad():
            return dq.fixed_point(w.f, params, x, solver=solver, grad_mode=dq.JFB())

    return solve


TORCHDEQ_SOLVERS = {"picard": ("fixed_point_iter", {}), "anderson": ("anderson", {"m": 6}), "broyden": ("broyden", {})}


def _torchdeq_solve_fn(w, solver, k):
    """torchdeq's solver ``solver`` for exactly k iterations of the same f; returns (z, nstep)."""
    from torchdeq.solver import get_solver

    name, kwargs = TORCHDEQ_SOLVERS[solver]
    run = get_solver(name)

    def solve(params, x):
        with torch.no_grad():
            z, _, info = run(lambda z: w.f(params, z, x), w.z_like(x), max_iter=k, tol=1e-30, stop_mode="rel", **kwargs)
            return z, info["nstep"]

    return solve


CASES = [(wname, s, "eager") for wname in ("mlp", "conv") for s in SOLVERS]
CASES += [("mlp", s, "torchdeq") for s in SOLVERS]  # the eager peer on the same f
# compiled: MLP only -- on 2 cores each compile takes 10-100 s, conv ones longer
CASES += [pytest.param("mlp", s, "compiled", marks=pytest.mark.compile) for s in SOLVERS]


@pytest.mark.parametrize("workload,solver,mode", CASES)
def bench_solver_overhead(deq_benchmark, make_workload, device, workload, solver, mode):
    timer = deq_benchmark.make_timer(clock="thread" if device.type == "cpu" else "wall")
    wall = deq_benchmark.make_timer()  # compile times: wall clock (inductor compiles in worker processes)
    w = make_workload(workload)
    params, z, x = w.f_bare_args()
    k1, k2 = K_COMPILED if mode == "compiled" else K_EAGER
    if mode == "torchdeq":
        pytest.importorskip("torchdeq", reason="the peer rows need the bench extra (pip install -e '.[bench]')")
        solves = {k: _torchdeq_solve_fn(w, solver, k) for k in (k1, k2)}
    else:
        solves = {k: _solve_fn(w, SOLVERS[solver](k)) for k in (k1, k2)}

    def bare():
        with torch.no_grad():
            return w.f(params, z, x)

    compile_s = {}
    bare_eager = bare
    if mode == "compiled":
        torch._dynamo.reset()
        bare = torch.compile(bare, fullgraph=True)
        for k in (k1, k2):
            solves[k] = torch.compile(solves[k], fullgraph=True)
            compile_s[f"K={k}"] = wall(solves[k], params, x)
        compile_s["bare_f"] = wall(bare)

    # warm-up (compiled: already compiled above; this also runs each once more)
    for _ in range(2):
        bare()
        bare_eager()
        for k in (k1, k2):
            solves[k](params, x)

    n_f = F_CALLS[workload]
    rows = []

    def one_round():
        tf = timer(lambda: [bare() for _ in range(n_f)]) / n_f
        tfe = timer(lambda: [bare_eager() for _ in range(n_f)]) / n_f if mode == "compiled" else tf
        t1 = timer(lambda: solves[k1](params, x))
        t2 = timer(lambda: solves[k2](params, x))
        rows.append((tf, tfe, t1, t2))

    load_before = measure.load_average()
    deq_benchmark.group = "solver_overhead"
    # warm-up done above (compiled: compile included); the fixture's own clock is the same
    deq_benchmark.pedantic(one_round, rounds=ROUNDS[workload], warmup=0, clock=timer.clock)

    z_star, info = solves[k2](params, x)
    if mode == "torchdeq":  # torchdeq reports its step count per problem
        info = {"nstep": int(torch.as_tensor(info).max())}
    else:
        info = wl.info_summary(info)
    marginal = [(t2 - t1) / (k2 - k1) / tf for tf, _, t1, t2 in rows]
    mins = [min(col) for col in zip(*rows, strict=True)]  # noise only adds time: minima are the robust estimate
    whole = [t2 / (k2 * tf) for tf, _, t1, t2 in rows]
    deq_benchmark.extra_info.update({
        "kind": "solver_overhead", "workload": workload, "workload_source": w.source,
        "solver": solver, "mode": mode, "solver_repr": repr(SOLVERS[solver](k2)), "K": [k1, k2],
        "clock": timer.description,
        "ratio_per_iter": measure.stats(marginal),
        "ratio_per_iter_of_minima": (mins[3] - mins[2]) / (k2 - k1) / mins[0],
        "ratio_per_iter_of_minima_vs_eager_f": (mins[3] - mins[2]) / (k2 - k1) / mins[1],
        "ratio_whole_call": measure.stats(whole),
        "bare_f_s": measure.stats([r[0] for r in rows]),
        "bare_f_eager_s": measure.stats([r[1] for r in rows]),
        "ratio_per_iter_vs_eager_f": measure.stats([(t2 - t1) / (k2 - k1) / tfe for _, tfe, t1, t2 in rows]),
        "solve_s": {f"K={k1}": measure.stats([r[2] for r in rows]), f"K={k2}": measure.stats([r[3] for r in rows])},
        "compile_s": compile_s,
        "info": info,
        "load_average": [load_before, measure.load_average()],
    })
