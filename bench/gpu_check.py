"""GPU check (issue 8): what only a CUDA machine can tell, in one script, in under 5 minutes.

    python bench/gpu_check.py REPORT.md            # from the repository root, on a CUDA machine

Prints a markdown report and writes it to REPORT.md:

1. **Device syncs per eager solve** for ``check_every`` 1, 4 and 16: every synchronizing
   CUDA call, counted with ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per
   sync, captured), next to the library's own host reads (``deq_functional._drivers.read_host``
   calls, counted by wrapping it) and the solve's nstep and time. A no-grad solve and an
   IFT training step on the MLP workload.
2. **Compiled ÷ eager training step**, same tolerance (both exit early): MLP (JFB, IFT)
   and the conv net (JFB), ``Anderson(m=5, tol=1e-4, max_iter=30)``; compile seconds
   (first step − steady step), nstep of both arms, ratio per round (order alternating).
3. **``mode="reduce-overhead"``** (CUDA graphs) on the MLP JFB step: does it compile and
   run, its time beside the default mode and eager, and how many times inductor skipped
   CUDA graphs (``counters["inductor"]["cudagraph_skips"]``).
4. **The timing check of ``deq_functional.benchmarking``**: runs the CUDA tests of
   ``tests/test_benchmarking.py`` (a call that only queues device work is timed with the
   work), and shows the numbers: launch-only ``perf_counter``, ``DeviceTimer``, and
   ``perf_counter`` with a synchronize, for the same queued work.
5. **``backend="cudagraphs"``**, where torch 2.14.1 can record a ``torch.while_loop`` as a CUDA-graph
   WHILE node: (a) the no-grad MLP forward solve, (b) the JFB training step (when (a) works): compiles
   and runs or the error, whether the loop became a WHILE node (torch's ``while_loop_node`` and the
   backend's graph hook and skip log, wrapped), nstep / status / values against eager, and time beside
   eager and inductor. Arms: the library as it is (history written in place) and, as a diagnostic, the
   history carried through the loop.

Every part is guarded: one that fails is reported with its error and the others still
run. Exit status 1 when any part failed. Without CUDA it stops at once (exit status 2).
``--device cpu`` is a dry run of the script's own code on a CPU (syncs are not counted, the
CUDA tests skip, CUDA graphs do not apply, part 5 says it is skipped): its numbers are not GPU numbers.
The inductor and Triton caches are fresh per run (a temporary directory), unless
``TORCHINDUCTOR_CACHE_DIR`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECK_EVERY = (1, 4, 16)
TOL, M, MAX_ITER = 1e-4, 5, 30
SYNC_SOLVE = dict(max_iter=50, tol=1e-6, m=5)  # the no-grad solve whose syncs are counted
SYNC_WARNING = "synchronizing CUDA operation"
PART_NAMES = ("syncs", "compile", "reduce-overhead", "timing", "cudagraphs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="markdown file to write the report to")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per A/B comparison (conv: half)")
    p.add_argument("--skip", action="append", default=[], choices=list(PART_NAMES),
                   help="leave a part out (repeatable)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of this script's code only (no GPU numbers)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def require_cuda(torch) -> str:
    """The GPU's name; exits (status 2) with a clear message when CUDA is not usable."""
    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run it on a GPU machine "
              "(the CPU benchmarks are `make bench`; `--device cpu` only dry-runs this script).", file=sys.stderr)
        sys.exit(2)
    return torch.cuda.get_device_name()


def count_sync_warnings(caught) -> int:
    """How many of the captured warnings are sync-debug-mode reports of a synchronizing call."""
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def ratio_stats(a: list[float], b: list[float]) -> dict:
    """min / median of the per-round ratios a[i] / b[i]."""
    from deq_functional.benchmarking import summarize

    return summarize([x / y for x, y in zip(a, b, strict=True)])


def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def fmt_ms(stats: dict) -> str:
    return f"{stats['min'] * 1e3:.2f} / {stats['median'] * 1e3:.2f}"


def fmt_ratio(stats: dict) -> str:
    return f"{stats['min']:.2f} / {stats['median']:.2f}"


# ------------------------------------------------------------------- parts ----


class Context:
    """What every part needs: torch, the library, the workloads, a timer on the GPU."""

    def __init__(self, rounds: int, device: str = "cuda"):
        import torch

        sys.path.insert(0, str(HERE))  # bench/workloads.py, bench/measure.py
        import measure
        import workloads

        import deq_functional as dq
        from deq_functional import _drivers
        from deq_functional.benchmarking import DeviceTimer

        self.torch, self.dq, self.wl, self.measure, self.drivers = torch, dq, workloads, measure, _drivers
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.timer = DeviceTimer(self.device)
        self.rounds = rounds

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def counting_host_reads(ctx):
    """Count calls of deq_functional._drivers.read_host (the library's one host read)."""
    original, calls = ctx.drivers.read_host, [0]

    def counted(t):
        calls[0] += 1
        return original(t)

    ctx.drivers.read_host = counted
    try:
        yield calls
    finally:
        ctx.drivers.read_host = original


def measure_syncs(ctx, fn) -> tuple[int | str, int, object]:
    """(CUDA syncs, library host reads, fn's result) of one call of fn, after a warm-up call."""
    torch = ctx.torch
    fn()
    ctx.sync()
    with counting_host_reads(ctx) as reads, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode("default")
    return (count_sync_warnings(caught) if ctx.cuda else "n/a (CPU)"), reads[0], out


def part_syncs(ctx) -> list[str]:
    torch, dq, wl = ctx.torch, ctx.dq, ctx.wl
    w = wl.make_mlp(device=ctx.device)
    params = wl.tree_map(torch.Tensor.detach, w.params)
    with torch.no_grad():
        x = w.embed(params, w.inp)
    rows = []
    for c in CHECK_EVERY:
        solver = dq.Anderson(**SYNC_SOLVE, check_every=c)

        def solve(solver=solver):
            with torch.no_grad():
                return dq.fixed_point(w.f, params, x, solver=solver, grad_mode=dq.JFB(), z0=torch.zeros_like(x))

        syncs, reads, (_, info) = measure_syncs(ctx, solve)
        seconds = [ctx.timer(solve) for _ in range(ctx.rounds)]
        rows.append(["no-grad solve", c, int(info.nstep), dq.Status(int(info.status)).name, syncs, reads,
                     fmt_ms(ctx.measure.stats(seconds))])

        adj = dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M, check_every=c)
        step = wl.TrainStep(wl.ours_loss(w, dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M, check_every=c),
                                         dq.IFT(solver=adj)), w.clone_params())
        syncs, reads, (_, info) = measure_syncs(ctx, step)
        seconds = [ctx.timer(step) for _ in range(ctx.rounds)]
        rows.append(["IFT training step", c, int(info.nstep), dq.Status(int(info.status)).name, syncs, reads,
                     fmt_ms(ctx.measure.stats(seconds))])
    return [
        "## 1. Device syncs per eager solve",
        "",
        f"MLP workload (latent 256, batch 128). No-grad solve: `Anderson({SYNC_SOLVE})`; IFT training step: "
        f"`Anderson(m={M}, tol={TOL:g}, max_iter={MAX_ITER})` forward and adjoint (nstep: forward). "
        "Syncs: synchronizing CUDA calls reported by `torch.cuda.set_sync_debug_mode('warn')` during one call "
        "(after a warm-up call); host reads: calls of `deq_functional._drivers.read_host`. Expected: "
        "host reads ≤ ceil(nstep / check_every) + 1 per solve.",
        "",
        *md_table(["what", "check_every", "nstep", "status", "CUDA syncs", "library host reads", "ms min / median"],
                  rows),
        "",
    ]


def _compiled_vs_eager(ctx, workload, mode, rounds, compile_mode=None):
    """{'compile_s', 'compiled', 'eager' (stats), 'ratio', 'nstep'} for one training-step A/B."""
    torch, dq, wl = ctx.torch, ctx.dq, ctx.wl
    w = wl.WORKLOADS[workload](device=ctx.device)
    solver = dq.Anderson(max_iter=MAX_ITER, tol=TOL, m=M)
    grad_mode = dq.IFT(solver=solver) if mode == "ift" else dq.JFB()
    loss_fn = wl.ours_loss(w, solver, grad_mode)
    torch._dynamo.reset()
    kwargs = {"fullgraph": True} if compile_mode is None else {"fullgraph": True, "mode": compile_mode}
    compiled_step = wl.TrainStep(torch.compile(loss_fn, **kwargs), w.clone_params())
    if compile_mode == "reduce-overhead" and ctx.cuda:
        inner = compiled_step

        def compiled_step():  # CUDA-graph trees: a new step begins (earlier outputs may be overwritten)
            torch.compiler.cudagraph_mark_step_begin()
            return inner()

        compiled_step.inner = inner
    eager_step = wl.TrainStep(loss_fn, w.clone_params())
    first = ctx.timer(compiled_step)
    for _ in range(2):  # untimed: recompiles, CUDA-graph recording (reduce-overhead)
        compiled_step()
        eager_step()
    rot = ctx.measure.Rotating(ctx.timer, {"compiled": compiled_step, "eager": eager_step})
    for _ in range(rounds):
        rot.round()
    last = getattr(compiled_step, "inner", compiled_step).last[1]
    c = ctx.measure.stats(rot.samples["compiled"])
    return {
        "compile_s": first - c["median"], "compiled": c, "eager": ctx.measure.stats(rot.samples["eager"]),
        "ratio": rot.ratio("compiled", "eager"),
        "nstep": f"{int(eager_step.last[1].nstep)} / {int(last.nstep)}",
    }


def part_compile(ctx) -> list[str]:
    rows = []
    for workload, mode in (("mlp", "jfb"), ("mlp", "ift"), ("conv", "jfb")):
        rounds = ctx.rounds if workload == "mlp" else max(1, ctx.rounds // 2)
        try:
            r = _compiled_vs_eager(ctx, workload, mode, rounds)
            rows.append([workload, mode, f"{r['compile_s']:.1f}", fmt_ms(r["eager"]), fmt_ms(r["compiled"]),
                         f"**{fmt_ratio(r['ratio'])}**", r["nstep"]])
        except Exception as err:  # noqa: BLE001 - reported, the other rows still run
            rows.append([workload, mode, "failed", f"`{type(err).__name__}: {str(err).splitlines()[0][:200]}`",
                         "", "", ""])
    return [
        "## 2. Compiled ÷ eager training step (same tolerance, both exit early)",
        "",
        f"`torch.compile(loss_fn, fullgraph=True)`, backward and SGD step (lr=0) outside; "
        f"`Anderson(m={M}, tol={TOL:g}, max_iter={MAX_ITER})`, IFT's adjoint the same. Compile s = first compiled "
        f"step − median steady one (fresh inductor/Triton cache per run, shared by the rows: later rows may reuse "
        f"kernels of earlier ones). Targets (CPU, issue 8): "
        "MLP ≤ 0.6, conv ≤ 0.9.",
        "",
        *md_table(["workload", "mode", "compile s", "eager ms min / median", "compiled ms min / median",
                   "compiled ÷ eager min / median", "nstep eager / compiled"], rows),
        "",
    ]


def part_reduce_overhead(ctx) -> list[str]:
    from torch._dynamo.utils import counters

    before = counters["inductor"]["cudagraph_skips"]
    lines = ["## 3. `mode=\"reduce-overhead\"` (CUDA graphs), MLP JFB training step", ""]
    try:
        r = _compiled_vs_eager(ctx, "mlp", "jfb", ctx.rounds, compile_mode="reduce-overhead")
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        return lines + [f"**Failed**: `{type(err).__name__}: {str(err).strip()[:500]}`", ""]
    skips = counters["inductor"]["cudagraph_skips"] - before
    return lines + [
        f"Compiles and runs: **yes**. CUDA graphs skipped by inductor: {skips} time(s) "
        f"({'graphs in use' if skips == 0 else 'at least one graph ran without CUDA graphs; see TORCH_LOGS=perf_hints'}).",
        "",
        *md_table(["compile s", "eager ms min / median", "reduce-overhead ms min / median",
                   "reduce-overhead ÷ eager min / median", "nstep eager / compiled"],
                  [[f"{r['compile_s']:.1f}", fmt_ms(r["eager"]), fmt_ms(r["compiled"]), fmt_ratio(r["ratio"]),
                    r["nstep"]]]),
        "",
    ]


class _Outcomes:
    """A pytest plugin that keeps each test's outcome."""

    def __init__(self):
        self.outcomes: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid.split("::")[-1]] = report.outcome


def part_timing(ctx) -> list[str]:
    import pytest

    torch = ctx.torch
    seen = _Outcomes()
    rc = pytest.main(["-q", str(ROOT / "tests" / "test_benchmarking.py"), "-k", "cuda"], plugins=[seen])
    passed = sum(v == "passed" for v in seen.outcomes.values())
    ok = rc == 0 and (passed >= 2 or not ctx.cuda)
    verdict = ", ".join(f"{k}: {v}" for k, v in seen.outcomes.items()) or f"no test ran (exit status {int(rc)})"
    head = [
        "## 4. `deq_functional.benchmarking` on CUDA: timings include the device work",
        "",
        f"`pytest tests/test_benchmarking.py -k cuda`: **{'passed' if ok else 'FAILED'}** ({verdict}).",
        "",
    ]
    if not ctx.cuda:
        return head + ["(CPU dry run: the CUDA tests skip, no numbers.)", ""]
    # the same kind of work, in numbers: a kernel that spins ~0.1 s on the GPU
    sys.path.insert(0, str(ROOT / "tests"))
    from test_benchmarking import _queue_device_work

    work = _queue_device_work(0.1)
    work()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    launch = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()
    synced = time.perf_counter() - t0
    timed = ctx.timer(work)
    return head + [
        *md_table(["perf_counter around the call (launch only)", "DeviceTimer (CUDA events)",
                   "perf_counter with synchronize"],
                  [[f"{launch * 1e3:.2f} ms", f"{timed * 1e3:.2f} ms", f"{synced * 1e3:.2f} ms"]]),
        "",
    ] + ([] if ok else ["__failed__"])


# ------------------------------------------------- 5. cudagraphs backend ----

CG_VARIANTS = {  # label -> what the cudagraphs arm runs
    "as-is": "the library as it is (no-grad solve: the solver history is closed over by the loop body and "
             "written in place, not carried)",
    "carried": "diagnostic: the history carried through the loop instead (`history_outside_loop=False` patched "
               "into `fixed_point`'s solve by this script), so the body mutates nothing",
}
CAPTURE_MODE = "CUDAGraphCaptureControlFlowOpDispatchMode"  # torch's mode whose WHILE nodes are replayed


class _CudagraphObserver:
    """What torch's cudagraphs backend did, seen through three module-level functions of torch
    (patched inside the ``with``, restored on exit), each event tagged with ``self.label``:

    - ``torch._dynamo.backends.cudagraphs.check_for_skip``: every forward/backward graph the backend gets;
      counts its ``while_loop`` nodes, bare or wrapped in ``auto_functionalized_v2`` (how AOT functionalizes
      a loop whose body writes captured tensors in place);
    - ``torch._dynamo.backends.cudagraphs.log_cudagraph_skip_and_bump_counter``: "skipping cudagraphs due
      to ..." (that graph then runs without CUDA graphs);
    - ``torch._higher_order_ops.cudagraph_conditional_nodes.while_loop_node``: a ``while_loop`` being turned
      into a CUDA-graph WHILE node, with the dispatch mode it runs under (``CAPTURE_MODE``: recorded into the
      graph that is replayed; the warm-up mode's recording is discarded)."""

    def __init__(self, torch):
        self.torch, self.label = torch, None
        self.graphs: list = []  # (label, bare while_loops, wrapped while_loops)
        self.skips: list = []  # (label, message)
        self.nodes: list = []  # (label, dispatch mode's class name)
        self._restore: list = []

    def __enter__(self):
        import torch._dynamo.backends.cudagraphs as backend
        import torch._higher_order_ops.cudagraph_conditional_nodes as nodes
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        ops = self.torch.ops.higher_order
        check, log, node = backend.check_for_skip, backend.log_cudagraph_skip_and_bump_counter, nodes.while_loop_node

        def check_for_skip(aot_model, *args, **kwargs):
            calls = [n for n in aot_model.graph.nodes if n.op == "call_function"]
            bare = sum(n.target is ops.while_loop for n in calls)
            wrapped = sum(n.target is ops.auto_functionalized_v2 and bool(n.args) and n.args[0] is ops.while_loop
                          for n in calls)
            self.graphs.append((self.label, bare, wrapped))
            return check(aot_model, *args, **kwargs)

        def log_skip(msg, *args, **kwargs):
            self.skips.append((self.label, str(msg)))
            return log(msg, *args, **kwargs)

        def while_loop_node(*args, **kwargs):
            self.nodes.append((self.label, type(_get_current_dispatch_mode()).__name__))
            return node(*args, **kwargs)

        for module, name, new in ((backend, "check_for_skip", check_for_skip),
                                  (backend, "log_cudagraph_skip_and_bump_counter", log_skip),
                                  (nodes, "while_loop_node", while_loop_node)):
            self._restore.append((module, name, getattr(module, name)))
            setattr(module, name, new)
        return self

    def __exit__(self, *exc):
        for module, name, old in reversed(self._restore):
            setattr(module, name, old)
        self._restore.clear()

    def verdict(self, label) -> str:
        """Was the loop recorded as a WHILE node, from the events tagged ``label``."""
        recorded = sum(lab == label and mode == CAPTURE_MODE for lab, mode in self.nodes)
        warm = sum(lab == label and mode != CAPTURE_MODE for lab, mode in self.nodes)
        graphs = [(b, w) for lab, b, w in self.graphs if lab == label]
        skips = [m for lab, m in self.skips if lab == label]
        bare, wrapped = sum(b for b, _ in graphs), sum(w for _, w in graphs)
        seen = (f"{len(graphs)} graph(s); `while_loop`: {bare} bare, {wrapped} in `auto_functionalized_v2`; "
                f"WHILE nodes at capture: {recorded}, at warm-up: {warm}")
        if recorded:
            return f"**yes** ({seen})"
        if skips:
            return f"**no**: `{skips[0].splitlines()[0][:300]}` ({seen})"
        if not graphs:
            return "not observable (the backend's graph hook never ran)"
        if wrapped and not bare:
            return (f"**no**: the loop reaches the backend as `auto_functionalized_v2(while_loop, ...)` (a body "
                    f"that writes captured buffers); torch's capture mode passes it through, so the loop is a host "
                    f"loop ({seen})")
        return f"**no** ({seen})"


def _carried_history():
    """A context-manager factory: while active, ``fixed_point``'s solves keep the solver history in the
    loop's carries (``deq_functional._solve.iterate(..., history_outside_loop=False)``). One wrapper
    object, swapped in and out, so Dynamo's guard on that global holds from call to call."""
    import inspect

    from deq_functional import _fixed_point

    original = _fixed_point.iterate
    if "history_outside_loop" not in inspect.signature(original).parameters:
        raise RuntimeError("deq_functional._solve.iterate has no `history_outside_loop` parameter any more")

    def iterate(*args, **kwargs):
        return original(*args, **{**kwargs, "history_outside_loop": False})

    @contextlib.contextmanager
    def active():
        _fixed_point.iterate = iterate
        try:
            yield
        finally:
            _fixed_point.iterate = original

    return active


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip()}"[:2000]


def _cg_probe(ctx, obs, label, call, snapshot) -> dict:
    """Three calls of ``call`` (compile + warm-up, CUDA-graph recording, replay), events tagged ``label``:
    {'ok': True, 'out' (snapshot of the replay), 'first_s'} or {'ok': False, 'stage', 'error'}."""
    stages = ("call 1 (compile, warm-up)", "call 2 (CUDA-graph recording)", "call 3 (replay)")
    obs.label, out, times = label, None, []
    try:
        for _ in stages:
            t0 = time.perf_counter()
            out = snapshot(call())
            ctx.sync()
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        return {"ok": False, "stage": stages[len(times)], "error": _error_text(err)}
    finally:
        obs.label = None
    return {"ok": True, "out": out, "first_s": times[0]}


def _cg_compare(ctx, ref: dict, out: dict) -> tuple[bool, list]:
    """(agrees with eager, [nstep, status, max |Δ| cells]): same nstep and status, values within TOL."""
    torch, dq = ctx.torch, ctx.dq

    def show(t, name=False):
        vals = [dq.Status(c).name if name else c for c in t.flatten().tolist()]
        return vals[0] if len(vals) == 1 else vals

    same = torch.equal(ref["nstep"], out["nstep"]) and torch.equal(ref["status"], out["status"])
    delta = max(float((a.double() - b.double()).abs().max()) for a, b in zip(ref["values"], out["values"], strict=True))
    agrees = same and delta <= TOL
    return agrees, [f"{show(ref['nstep'])} / {show(out['nstep'])}",
                    f"{show(ref['status'], True)} / {show(out['status'], True)}",
                    f"{delta:.1e}" + ("" if agrees else " **MISMATCH**")]


def _cg_section(ctx, obs, what, arms, snapshot, variants) -> tuple[list, list, dict]:
    """Probe the cudagraphs arm of each variant; time those that agree with eager against eager and
    inductor (rotating order). ``arms(variant)``: a fresh callable (``None``: eager, ``"inductor"``, or a
    key of CG_VARIANTS: cudagraphs). Returns (Markdown lines, timing rows, {variant: works})."""
    torch = ctx.torch
    eager = arms(None)
    ref = snapshot(eager())
    rows, errors, works, timed = [], [], {}, {}
    for variant in variants:
        label = f"{what}, {variant}"
        try:
            patch = _carried_history() if variant == "carried" else contextlib.nullcontext
            fn = arms(variant)

            def call(fn=fn, patch=patch):  # a new CUDA-graph-tree step per call (earlier outputs may be overwritten)
                if ctx.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                with patch():
                    return fn()

            r = _cg_probe(ctx, obs, label, call, snapshot)
        except Exception as err:  # noqa: BLE001 - e.g. the diagnostic patch no longer applies
            r = {"ok": False, "stage": "set-up", "error": _error_text(err)}
        if not r["ok"]:
            works[variant] = False
            rows.append([variant, f"**no**, at {r['stage']} (error below)", obs.verdict(label), "", "", ""])
            errors += [f"Error, {label}, at {r['stage']}:", "", "```text", r["error"], "```", ""]
            torch._dynamo.reset()  # a failed recording must not leave the CUDA-graph trees half-built
            continue
        agrees, cells = _cg_compare(ctx, ref, r["out"])
        works[variant] = agrees
        rows.append([variant, f"yes (first call {r['first_s']:.1f} s)", obs.verdict(label), *cells])
        if agrees:
            timed[f"cudagraphs, {variant}"] = call
    try:
        timing = _cg_timing(ctx, what, arms, eager, timed)
    except Exception as err:  # noqa: BLE001 - keep the results above
        timing = [[what, f"timing failed: `{_error_text(err).splitlines()[0][:300]}`", "", "", ""]]
    header = ["variant", "compiles and runs", "loop as a CUDA-graph WHILE node", "nstep eager / cudagraphs",
              "status eager / cudagraphs", "max abs Δ vs eager"]
    return [*md_table(header, rows), "", *errors], timing, works


def _cg_timing(ctx, what, arms, eager, timed) -> list:
    """Timing rows: eager, inductor (compiled here) and the ``timed`` cudagraphs arms, rotating order."""
    from torch._dynamo.utils import counters

    timing_arms = {"eager": eager}
    try:
        inductor = arms("inductor")
        t0 = time.perf_counter()
        inductor()
        ctx.sync()
        note = f"inductor's first call {time.perf_counter() - t0:.1f} s"
        timing_arms["inductor"] = inductor
    except Exception as err:  # noqa: BLE001
        note = f"inductor failed: `{_error_text(err).splitlines()[0][:300]}`"
    timing_arms.update(timed)
    for fn in timing_arms.values():  # untimed: recompiles after a reset, CUDA-graph re-recording
        for _ in range(2):
            fn()
    graphs_before = counters["stats"]["unique_graphs"]
    rot = ctx.measure.Rotating(ctx.timer, timing_arms)
    for _ in range(ctx.rounds):
        rot.round()
    recompiles = counters["stats"]["unique_graphs"] - graphs_before
    stats = {k: ctx.measure.stats(v) for k, v in rot.samples.items()}
    rows = [[what, "eager", fmt_ms(stats["eager"]), "", ""]]
    if "inductor" in timing_arms:
        rows.append([what, "inductor (`fullgraph=True`, default mode)", fmt_ms(stats["inductor"]),
                     fmt_ratio(rot.ratio("inductor", "eager")), ""])
    for name in timed:
        rows.append([what, name, fmt_ms(stats[name]), f"**{fmt_ratio(rot.ratio(name, 'eager'))}**",
                     f"**{fmt_ratio(rot.ratio(name, 'inductor'))}**" if "inductor" in timing_arms else "n/a"])
    return rows + [[what, f"_{note}; graphs compiled during the timed rounds: {recompiles}_", "", "", ""]]


def _cg_solve(ctx):
    """(arms, snapshot) for the no-grad MLP forward solve."""
    torch, dq, wl = ctx.torch, ctx.dq, ctx.wl
    w = wl.make_mlp(device=ctx.device)
    params = wl.tree_map(torch.Tensor.detach, w.params)
    with torch.no_grad():
        x = w.embed(params, w.inp)
    solver = dq.Anderson(m=M, tol=TOL, max_iter=MAX_ITER)

    def solve(params, x):
        return dq.fixed_point(w.f, params, x, solver=solver, grad_mode="jfb", z0=torch.zeros_like(x))

    def arms(variant):
        fn = (solve if variant is None else torch.compile(solve, fullgraph=True) if variant == "inductor"
              else torch.compile(solve, backend="cudagraphs", fullgraph=True))

        def call():
            with torch.no_grad():
                return fn(params, x)

        return call

    def snapshot(out):
        z, info = out
        return {"nstep": info.nstep.clone(), "status": info.status.clone(), "values": [z.detach().clone()]}

    return arms, snapshot


def _cg_step(ctx):
    """(arms, snapshot) for the MLP JFB training step (forward + backward + SGD with lr=0)."""
    torch, dq, wl = ctx.torch, ctx.dq, ctx.wl
    w = wl.make_mlp(device=ctx.device)
    loss_fn = wl.ours_loss(w, dq.Anderson(m=M, tol=TOL, max_iter=MAX_ITER), dq.JFB())

    def arms(variant):
        fn = (loss_fn if variant is None else torch.compile(loss_fn, fullgraph=True) if variant == "inductor"
              else torch.compile(loss_fn, backend="cudagraphs", fullgraph=True))
        step = wl.TrainStep(fn, w.clone_params())
        return lambda: (*step(), step.params)

    def snapshot(out):
        loss, info, params = out
        grads = [p.grad.detach().clone() for p in wl.flatten(params)[0] if p.grad is not None]
        return {"nstep": info.nstep.clone(), "status": info.status.clone(), "values": [loss.clone(), *grads]}

    return arms, snapshot


def part_cudagraphs(ctx) -> list[str]:
    torch = ctx.torch
    lines = [
        "## 5. `backend=\"cudagraphs\"`: the solve's `torch.while_loop` as a CUDA-graph WHILE node",
        "",
        f"MLP workload, `Anderson(m={M}, tol={TOL:g}, max_iter={MAX_ITER})`, `grad_mode=\"jfb\"`, "
        "`torch.compile(..., backend=\"cudagraphs\", fullgraph=True)`. torch 2.14.1 records a `while_loop` as a "
        "WHILE node there (`torch/_higher_order_ops/cudagraph_conditional_nodes.py`) given a CUDA ≥ 12.4 build, "
        "carries that are all CUDA tensors, a CUDA bool scalar predicate and no kwargs. Cudagraphs arms: "
        + "; ".join(f"**{k}**: {v}" for k, v in CG_VARIANTS.items()) + ".",
        "",
    ]
    if not ctx.cuda:
        return lines + ["**Skipped: no CUDA device** (`--device cpu` dry run): the cudagraphs backend and its "
                        "WHILE nodes need CUDA.", ""]
    cuda = torch.version.cuda or "none"
    lines.append(f"torch built with CUDA {cuda}; `torch.cuda.CUDAGraph.begin_capture_to_while_node`: "
                 f"{'present' if hasattr(torch.cuda.CUDAGraph, 'begin_capture_to_while_node') else '**absent**'}.")
    with contextlib.suppress(ValueError):
        if tuple(int(v) for v in cuda.split(".")[:2]) < (12, 4):
            lines.append("**This build predates CUDA 12.4: expect no WHILE nodes.**")
    lines += [
        "",
        "WHILE node: seen by wrapping torch's `cudagraph_conditional_nodes.while_loop_node` (a call under the "
        "capture mode is a node of the replayed graph), the backend's `check_for_skip` (the `while_loop` nodes "
        "of each graph) and its skip log. Each cudagraphs arm is probed with three calls (compile + warm-up, "
        "recording, replay) and the replay compared with eager; those that agree (same nstep and status, "
        f"Δ ≤ {TOL:g}) are timed. Timing: eager, inductor and the cudagraphs arms in rotating order, {ctx.rounds} "
        "rounds, `torch.compiler.cudagraph_mark_step_begin()` before each cudagraphs call.",
        "",
    ]
    with _CudagraphObserver(torch) as obs:
        torch._dynamo.reset()
        out, timing, works = _cg_section(ctx, obs, "no-grad solve", *_cg_solve(ctx), list(CG_VARIANTS))
        lines += ["### (a) No-grad forward solve", "", "Δ: z*.", "", *out]
        lines += ["### (b) JFB training step (forward + backward)", ""]
        run = [v for v, ok in works.items() if ok]
        if run:
            torch._dynamo.reset()
            try:
                out, more, _ = _cg_section(ctx, obs, "JFB step", *_cg_step(ctx), run)
                timing += more
                lines += ["Δ: the loss and every parameter gradient.", "", *out]
            except Exception:  # noqa: BLE001 - keep (a) and its timing
                lines += ["**Failed**:", "", "```text", traceback.format_exc().rstrip(), "```", ""]
        lines += [f"- {v}: skipped, (a) did not work for it (see above)." for v, ok in works.items() if not ok]
        lines += [""] if not all(works.values()) else []
    header = ["what", "arm", "ms min / median", "÷ eager min / median", "÷ inductor min / median"]
    return lines + ["### Timing", "", *md_table(header, timing), ""]


PARTS = dict(zip(PART_NAMES, (part_syncs, part_compile, part_reduce_overhead, part_timing, part_cudagraphs),
                 strict=True))


def main(argv=None) -> int:
    args = parse_args(argv)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # fresh caches: compile times of this run, not of an earlier one
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deq_gpu_check_inductor_")
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton"))
    import torch

    gpu = require_cuda(torch) if args.device == "cuda" else "CPU DRY RUN (not GPU numbers)"
    torch.set_flush_denormal(True)  # no effect on CUDA; the CPU dry run matches `make bench`
    ctx = Context(args.rounds, args.device)
    started = time.perf_counter()
    lines = [
        "# GPU check",
        "",
        f"`python bench/gpu_check.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}`; "
        f"{gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Times: `DeviceTimer`, {ctx.timer.description}; "
        "min / median over rounds.",
        "",
    ]
    failed = []
    for name, part in PARTS.items():
        if name in args.skip:
            lines += [f"_{name}: skipped (--skip {name})._", ""]
            continue
        t0 = time.perf_counter()
        try:
            out = part(ctx)
        except Exception:  # noqa: BLE001 - one part's failure must not hide the others
            out = [f"## {name}: **failed**", "", "```text", traceback.format_exc().rstrip(), "```", ""]
            failed.append(name)
        if "__failed__" in out:
            out.remove("__failed__")
            failed.append(name)
        lines += out + [f"_({name}: {time.perf_counter() - t0:.0f} s)_", ""]
        print("\n".join(out), flush=True)
    lines.append(f"Total {time.perf_counter() - started:.0f} s" + (f"; failed: {', '.join(failed)}." if failed else "."))
    report = "\n".join(lines) + "\n"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    print(f"\nwritten to {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
