"""deq_functional.benchmarking: the timer times what it says, warm-ups stay out of the timings,
the solver's report is recorded, and the module works (and fails clearly) without pytest-benchmark.

The CUDA tests run only where CUDA is available (``bench/gpu_check.py`` runs them on a GPU
machine): the time of a call that only queues device work must include that work.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

import deq_functional as dq
from deq_functional import benchmarking as B

pytest_plugins = ["pytester"]

SLEEP = 0.05
# Upper slack for a sleep on a busy shared machine (scheduler latency); smaller than the
# warm-up sleeps below, so a warm-up counted in the timings fails the tests.
SLACK = 0.12
WARMUP_SLEEP = 0.5

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that DeqBenchmark uses (pedantic, extra_info)."""

    def __init__(self, disabled=False):
        self.extra_info, self.disabled, self.calls = {}, disabled, []

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        assert iterations == 1 and warmup_rounds == 0
        self.calls.append(rounds)
        out = None
        for _ in range(rounds):
            out = target()
        return out


def make_info(nstep, status, residual=1e-3, rel=1e-5):
    nstep, status = torch.as_tensor(nstep), torch.as_tensor(status)
    res = torch.full(nstep.shape, residual)
    return dq.Info(nstep, res, torch.full(nstep.shape, rel), status == int(dq.Status.CONVERGED), status)


# ------------------------------------------------------------------ DeviceTimer ----


def test_wall_timer_times_a_sleep():
    timer = B.DeviceTimer("cpu")
    seconds, out = timer.timed(lambda s: (time.sleep(s), "done")[1], SLEEP)
    assert out == "done"
    assert SLEEP <= seconds < SLEEP + SLACK


def test_thread_clock_counts_work_of_this_thread_not_sleep():
    timer = B.DeviceTimer("cpu", clock="thread")

    def spin(cpu_seconds):
        t0 = time.thread_time()
        while time.thread_time() - t0 < cpu_seconds:
            pass

    assert timer(time.sleep, 0.2) < 0.02
    assert 0.1 <= timer(spin, 0.1) < 0.1 + 0.02
    assert "thread_time" in timer.description


def test_timer_options_are_validated():
    with pytest.raises(ValueError, match="clock must be one of"):
        B.DeviceTimer("cpu", clock="process")
    with pytest.raises(ValueError, match="does not include work on cuda"):
        B.DeviceTimer("cuda", clock="thread")
    with pytest.raises(ValueError, match="CPU or CUDA device"):
        B.DeviceTimer("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="is_available"):
            B.DeviceTimer("cuda")


# ------------------------------------------------------------ DeqBenchmark (unit) ----


def test_warmups_are_not_timed_and_info_is_recorded():
    calls = []

    def fn(x):
        calls.append(None)
        time.sleep(WARMUP_SLEEP if len(calls) <= 2 else SLEEP)  # the warm-ups are slow, like a compile
        return x + 1, make_info(7, 0)

    bench = B.DeqBenchmark(FakeBenchmark())
    z, info = bench.pedantic(fn, (torch.zeros(3),), rounds=3)
    assert len(calls) == 2 + 3 and torch.equal(z, torch.ones(3)) and int(info.nstep) == 7
    e = bench.extra_info
    assert len(e["times_s"]) == 3 and all(SLEEP <= t < SLEEP + SLACK for t in e["times_s"])
    assert e["time_s"]["n"] == 3 and e["time_s"]["max"] < WARMUP_SLEEP
    assert (e["warmup"], e["rounds"], e["device"]) == (2, 3, "cpu")
    assert (e["nstep"], e["status"], e["nstep_per_round"]) == (7, "CONVERGED", [7, 7, 7])
    assert e["residual"] == pytest.approx(1e-3) and e["rel_residual"] == pytest.approx(1e-5)
    assert e["dynamo_compiles_during_timing"] == 0


def test_batched_info_records_status_names_and_counts():
    codes = [0, 0, 1, 2, 0]
    info = make_info([3, 4, 9, 5, 2], codes)
    bench = B.DeqBenchmark(FakeBenchmark())
    bench.pedantic(lambda: {"out": [torch.zeros(1), info]}, rounds=2, warmup=0)  # found inside a dict of lists
    e = bench.extra_info
    assert e["status"] == "CONVERGED+MAX_ITER+DIVERGED"
    assert e["status_counts"] == {"CONVERGED": 3, "MAX_ITER": 1, "DIVERGED": 1}
    assert (e["batch"], e["nstep"], e["nstep_mean"]) == (5, 9, pytest.approx(23 / 5))


def test_records_the_info_of_a_real_per_sample_solve():
    torch.manual_seed(0)
    W = 0.4 * torch.randn(8, 8) / 8**0.5
    x = torch.randn(6, 8)
    x[:2] = 0.0  # z = 0 is their fixed point: converged at once; the others need more than 6 steps

    def solve():
        with torch.no_grad():
            return dq.fixed_point(lambda p, z, x: torch.tanh(z @ p.T + x), W, x, per_sample=True,
                                  solver=dq.Picard(max_iter=6, tol=1e-6), grad_mode=dq.JFB())

    bench = B.DeqBenchmark(FakeBenchmark())
    _, info = bench.pedantic(solve, rounds=2, warmup=1)
    e = bench.extra_info
    codes = info.status.tolist()
    expected = {dq.Status(c).name: codes.count(c) for c in sorted(set(codes))}
    assert e["status_counts"] == expected and len(expected) == 2  # some converged, some ran out
    assert e["nstep"] == int(info.nstep.max()) == 6
    assert e["rel_residual"] == pytest.approx(float(info.rel_residual.max()))


def test_no_info_records_timings_only_and_custom_extractor():
    bench = B.DeqBenchmark(FakeBenchmark())
    bench.pedantic(lambda: 3, rounds=2, warmup=0)
    assert "nstep" not in bench.extra_info and bench.extra_info["time_s"]["n"] == 2
    bench = B.DeqBenchmark(FakeBenchmark())
    bench.pedantic(lambda: ("x", make_info(4, 1)), rounds=1, warmup=0, info=lambda out: out[1])
    assert bench.extra_info["status"] == "MAX_ITER"


def test_record_info_with_prefix_for_ab_arms():
    bench = B.DeqBenchmark(FakeBenchmark())
    out = bench.record_info(make_info(12, 0), prefix="compiled_")
    assert out["nstep"] == 12 and bench.extra_info["compiled_nstep"] == 12
    assert bench.extra_info["compiled_status"] == "CONVERGED"


def test_disabled_benchmark_runs_once_without_warmup():
    calls = []
    fake = FakeBenchmark(disabled=True)
    bench = B.DeqBenchmark(fake)
    bench.pedantic(lambda: calls.append(1) or make_info(2, 0), rounds=5, warmup=3)
    assert calls == [1] and fake.calls == [] and bench.extra_info["nstep"] == 2


def test_bad_rounds_or_warmup_are_refused():
    bench = B.DeqBenchmark(FakeBenchmark())
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        bench.pedantic(lambda: None, rounds=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        bench.pedantic(lambda: None, warmup=-1)


def test_a_compilation_inside_the_timed_rounds_is_counted_and_warned():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.sin(x) + 1, backend="eager")
    x = torch.randn(4)
    bench = B.DeqBenchmark(FakeBenchmark())
    with pytest.warns(RuntimeWarning, match="compiled 1 frame"):
        bench.pedantic(fn, (x,), rounds=2, warmup=0)
    assert bench.extra_info["dynamo_compiles_during_timing"] == 1
    bench = B.DeqBenchmark(FakeBenchmark())
    bench.pedantic(fn, (x,), rounds=2)  # default warm-up: already compiled, nothing in the timings
    assert bench.extra_info["dynamo_compiles_during_timing"] == 0


# ------------------------------------------- the fixture with pytest-benchmark ----

INNER_TEST = f"""
import time, torch, deq_functional as dq

calls = []

def fn(x):
    calls.append(None)
    time.sleep({WARMUP_SLEEP} if len(calls) <= 2 else {SLEEP})
    return x, dq.Info(torch.tensor(7), torch.tensor(1e-3), torch.tensor(1e-5), torch.tensor(True), torch.tensor(0))

def bench_sleep(deq_benchmark):
    z, info = deq_benchmark.pedantic(fn, (torch.zeros(2),), rounds=4)
    assert int(info.nstep) == 7
    assert len(calls) == {{n_calls}}
"""


def test_fixture_with_pytest_benchmark(pytester):
    pytester.makeconftest("from deq_functional.benchmarking import deq_benchmark  # noqa: F401\n")
    pytester.makeini("[pytest]\npython_functions = bench_*\n")
    pytester.makepyfile(test_sleep=INNER_TEST.replace("{n_calls}", "6"))
    result = pytester.runpytest_inprocess("--benchmark-only", "--benchmark-json=out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)  # --benchmark-only keeps it: it depends on `benchmark`
    (bench,) = json.loads((pytester.path / "out.json").read_text())["benchmarks"]
    e = bench["extra_info"]
    assert e["time_s"]["n"] == 4 and all(SLEEP <= t < SLEEP + SLACK for t in e["times_s"])
    assert (e["nstep"], e["status"], e["warmup"], e["device"]) == (7, "CONVERGED", 2, "cpu")
    # pytest-benchmark's own statistics time the same 4 rounds (the warm-ups are not in them)
    assert bench["stats"]["rounds"] == 4
    assert SLEEP <= bench["stats"]["min"] and bench["stats"]["max"] < SLEEP + SLACK


def test_fixture_under_benchmark_disable_runs_once(pytester):
    pytester.makeconftest("from deq_functional.benchmarking import deq_benchmark  # noqa: F401\n")
    pytester.makeini("[pytest]\npython_functions = bench_*\n")
    pytester.makepyfile(test_sleep=INNER_TEST.replace("{n_calls}", "1"))
    pytester.runpytest_inprocess("--benchmark-disable", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_without_pytest_benchmark_import_works_and_the_fixture_says_what_to_install(pytester, monkeypatch):
    spec = importlib.util.spec_from_file_location("deq_functional._benchmarking_without_pb", B.__file__)
    module = importlib.util.module_from_spec(spec)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pytest_benchmark", None)  # as if it were not installed
        spec.loader.exec_module(module)  # importing does not fail
    assert module.DeviceTimer("cpu")(lambda: None) >= 0
    monkeypatch.setitem(sys.modules, spec.name, module)
    pytester.makeconftest(f"from {spec.name} import deq_benchmark  # noqa: F401\n")
    pytester.makepyfile("def test_uses_it(deq_benchmark):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:benchmark", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ImportError: deq_benchmark needs the pytest-benchmark plugin: pip install pytest-benchmark*"])


# ------------------------------------------------------------------------- CUDA ----


def _queue_device_work(seconds_hint: float):
    """A callable that only queues about ``seconds_hint`` of GPU work and returns at once."""
    if hasattr(torch.cuda, "_sleep"):
        # calibrate the spin kernel: cycles per second on this GPU
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(10**7)
        torch.cuda.synchronize()
        cycles = int(10**7 * seconds_hint / (time.perf_counter() - t0))
        return lambda: torch.cuda._sleep(cycles)
    a = torch.randn(4096, 4096, device="cuda")
    return lambda: [a @ a for _ in range(50)]


@needs_cuda
def test_cuda_timings_include_the_device_work():
    work = _queue_device_work(0.2)
    work()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()
    synced = time.perf_counter() - t0  # the reference: host clock, waiting for the device
    t0 = time.perf_counter()
    work()
    launch = time.perf_counter() - t0  # what a naive timer sees: the launch only
    torch.cuda.synchronize()
    timed = B.DeviceTimer("cuda")(work)
    assert launch < 0.2 * synced, "the check cannot tell: the work did not run asynchronously"
    assert 0.8 * synced <= timed <= 1.25 * synced + 0.005


@needs_cuda
def test_cuda_fixture_times_device_work_and_infers_the_device():
    work = _queue_device_work(0.1)
    out = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    torch.cuda.synchronize()
    synced = time.perf_counter() - t0
    bench = B.DeqBenchmark(FakeBenchmark())
    bench.pedantic(lambda: (work(), out)[1], rounds=3)  # the device comes from the warm-up's result
    assert bench.extra_info["device"].startswith("cuda") and "CUDA events" in bench.extra_info["timer"]
    assert all(0.8 * synced <= t <= 1.25 * synced + 0.005 for t in bench.extra_info["times_s"])
