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

Every part is guarded: one that fails is reported with its error and the others still
run. Exit status 1 when any part failed. Without CUDA it stops at once (exit status 2).
``--device cpu`` is a dry run of the script's own code on a CPU (syncs are not counted, the
CUDA tests skip, CUDA graphs do not apply): its numbers are not GPU numbers.
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
PART_NAMES = ("syncs", "compile", "reduce-overhead", "timing")


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


PARTS = dict(zip(PART_NAMES, (part_syncs, part_compile, part_reduce_overhead, part_timing), strict=True))


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
