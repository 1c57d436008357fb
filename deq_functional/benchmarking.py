"""Benchmarking DEQ code correctly on GPU and CPU: a timer and a pytest fixture.

Two mistakes make DEQ timings wrong:

* **Asynchronous devices.** A CUDA call returns as soon as its kernels are queued, so
  ``perf_counter`` around it times the launch, not the work. `DeviceTimer`
  synchronizes before the call (earlier queued work is not charged to it), records a
  pair of CUDA events around it and synchronizes again, so the time includes all the
  device work the call queued.
* **Compilation inside the timing.** The first call of a ``torch.compile``-d function
  compiles (tens of seconds), and the second can still recompile. The fixture makes
  ``warmup`` untimed calls first (default 2, see `DEFAULT_WARMUP`) and counts
  Dynamo compilations during the timed rounds (``extra_info["dynamo_compiles_during_timing"]``;
  a warning when it is not 0).

It also records how much work each timed call did: ``nstep``, ``residual``,
``rel_residual`` and ``status`` of the ``dq.Info`` the timed function returns, so a
benchmark that got faster by running fewer iterations (or by failing to converge)
shows it.

Usage, with `pytest-benchmark <https://pypi.org/project/pytest-benchmark/>`_
installed (``pip install pytest-benchmark``; an optional dependency: this module
imports without it, and only using the fixture needs it). In your ``conftest.py``:

    pytest_plugins = ["deq_functional.benchmarking"]   # or: from deq_functional.benchmarking import deq_benchmark

and in a test:

    import torch, deq_functional as dq

    def test_solve_speed(deq_benchmark):
        solve = torch.compile(lambda x: dq.fixed_point(f, params, x, solver=dq.Anderson(max_iter=50)))
        z, info = deq_benchmark(solve, x)        # 2 untimed warm-up calls, then 5 timed rounds
        assert deq_benchmark.extra_info["status"] == "CONVERGED"

``deq_benchmark.pedantic(fn, args, kwargs, rounds=20, warmup=3, clock="thread")`` sets
the options. Timings per round are in ``extra_info["time_s"]`` (min / median / mean / max)
and ``extra_info["times_s"]``; pytest-benchmark's own table times the same rounds with
``perf_counter`` (on CUDA the timed call ends with a synchronize, so it includes the
device work too).

Why a module and not a pytest plugin entry point: an entry point would import this
module, and with it torch, in every pytest run of every environment where
deq_functional is installed, and would claim a fixture name there. Opting in with one
line in ``conftest.py`` keeps it where it is wanted.

Without pytest, `DeviceTimer` and `summarize_info` are usable on their own.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ._info import Info, Status
from ._timing import DeviceTimer, summarize
from ._tree import flatten

__all__ = ["DEFAULT_ROUNDS", "DEFAULT_WARMUP", "DeviceTimer", "DeqBenchmark", "deq_benchmark", "find_info",
           "summarize", "summarize_info"]

#: Untimed calls before the timed rounds. Call 1 compiles (Dynamo and inductor for the forward;
#: AOTAutograd compiles the backward at the first ``backward()``) and creates lazy state (``.grad``
#: tensors, optimizer state, cuDNN/inductor autotuning). Call 2 absorbs the recompilation that the
#: state created by call 1 can trigger (guards on ``.grad`` / ``requires_grad``, automatic dynamic
#: shapes), and under ``mode="reduce-overhead"`` records the CUDA graph (CUDA-graph trees warm up
#: on the first call and record on the second), so the timed rounds replay it.
DEFAULT_WARMUP = 2
#: Timed rounds when the caller does not say.
DEFAULT_ROUNDS = 5

_INSTALL_HINT = (
    "deq_benchmark needs the pytest-benchmark plugin: pip install pytest-benchmark "
    "(or pip install 'deq_functional[test]')"
)


def find_info(obj: Any, _depth: int = 0) -> Info | None:
    """The first ``dq.Info`` in ``obj``: itself, or inside (nested) tuples, lists and dict values."""
    if isinstance(obj, Info):
        return obj
    if _depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        found = find_info(item, _depth + 1)
        if found is not None:
            return found
    return None


def _status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return str(code)


def summarize_info(info: Info) -> dict:
    """Python numbers from an ``Info`` (reads its tensors: a host sync; call it outside timings).

    One problem: ``nstep`` (int), ``residual``, ``rel_residual`` (floats), ``status`` (the
    code's name, e.g. ``"CONVERGED"``). A batch (``per_sample=True``, shape ``(B,)``):
    ``nstep`` is the largest (the iterations the solve ran), ``nstep_mean`` the mean,
    ``residual``/``rel_residual`` the largest, ``status`` the names present joined by
    ``"+"`` in code order, and ``status_counts`` ``{name: count}``; ``batch`` is B.
    """
    nstep = info.nstep.detach().reshape(-1).cpu()
    codes = info.status.detach().reshape(-1).cpu().tolist()
    residual = info.residual.detach().reshape(-1).float().cpu()
    rel = info.rel_residual.detach().reshape(-1).float().cpu()
    if info.nstep.dim() == 0:
        return {"nstep": int(nstep[0]), "residual": float(residual[0]), "rel_residual": float(rel[0]),
                "status": _status_name(codes[0])}
    if not codes:
        return {"batch": 0, "nstep": 0, "status": "", "status_counts": {}}
    counts = {_status_name(c): codes.count(c) for c in sorted(set(codes))}
    return {
        "batch": len(codes),
        "nstep": int(nstep.max()),
        "nstep_mean": float(nstep.float().mean()),
        "residual": float(residual.max()),
        "rel_residual": float(rel.max()),
        "status": "+".join(counts),
        "status_counts": counts,
    }


def _first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj`` (a tensor or a pytree of them), or None."""
    return next((t.device for t in flatten(obj)[0] if isinstance(t, torch.Tensor)), None)


def _default_device() -> str:
    """Where work runs when nothing says: CUDA if this process has initialized it, else the CPU."""
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"


def _dynamo_compiles() -> int | None:
    """Frames Dynamo has compiled in this process (its counter of compile attempts), or None."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["frames"]["total"])
    except Exception:  # noqa: BLE001 - a private counter: absent on another torch, say so
        return None


class DeqBenchmark:
    """What the ``deq_benchmark`` fixture gives a test: pytest-benchmark's ``benchmark``,
    timed with `DeviceTimer`, with warm-up calls and the solver's report recorded.

    Args:
        benchmark: pytest-benchmark's ``benchmark`` fixture (anything with ``pedantic``,
            ``extra_info`` and ``disabled``).
        rounds: default timed rounds for `pedantic`.
        warmup: default untimed warm-up calls for `pedantic`.
        device: default device for `pedantic` (None: inferred per call).
        clock: default clock for `pedantic` (``"wall"`` or ``"thread"``).

    Attributes:
        extra_info: pytest-benchmark's ``extra_info`` dict (saved in its JSON).
        samples: seconds of each timed round, from the last `pedantic`.
        timer: the `DeviceTimer` of the last `pedantic`.
    """

    def __init__(self, benchmark: Any, *, rounds: int = DEFAULT_ROUNDS, warmup: int = DEFAULT_WARMUP,
                 device: Any = None, clock: str = "wall"):
        self.benchmark = benchmark
        self.rounds, self.warmup, self.device, self.clock = rounds, warmup, device, clock
        self.samples: list[float] = []
        self.timer: DeviceTimer | None = None

    @property
    def extra_info(self) -> dict:
        return self.benchmark.extra_info

    @property
    def group(self):
        return getattr(self.benchmark, "group", None)

    @group.setter
    def group(self, value) -> None:
        self.benchmark.group = value

    def __call__(self, fn: Callable, *args, **kwargs) -> Any:
        """Time ``fn(*args, **kwargs)`` with the defaults; returns the last timed call's result."""
        return self.pedantic(fn, args, kwargs)

    def make_timer(self, device: Any = None, clock: str | None = None) -> DeviceTimer:
        """A `DeviceTimer` for rounds you drive yourself (e.g. A/B comparisons): on ``device``,
        else this fixture's device, else the current CUDA device if CUDA was initialized in this
        process, else the CPU; ``clock`` defaults to this fixture's."""
        device = device if device is not None else self.device
        return DeviceTimer(device if device is not None else _default_device(), clock or self.clock)

    def pedantic(
        self,
        fn: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        rounds: int | None = None,
        warmup: int | None = None,
        device: Any = None,
        clock: str | None = None,
        info: Callable[[Any], Info | None] | None = None,
    ) -> Any:
        """Warm up, time ``rounds`` calls of ``fn(*args, **kwargs)``, record them; return the last result.

        Args:
            rounds: timed calls (one per pytest-benchmark round).
            warmup: untimed calls first (default `DEFAULT_WARMUP`; the device is
                synchronized after them).
            device: where the work runs. Default: the device of the first tensor in
                ``args``/``kwargs``, else in the warm-up result; else the current CUDA
                device if CUDA was initialized in this process, else the CPU.
            clock: ``"wall"`` or ``"thread"`` (CPU only), see `DeviceTimer`.
            info: ``result -> Info``; default: the first ``Info`` in the result (`find_info`).

        Records in ``extra_info``: ``time_s`` (summary), ``times_s`` (every round),
        ``timer``, ``device``, ``warmup``, ``rounds``, ``dynamo_compiles_during_timing``,
        and from the last timed call's ``Info`` (when there is one) the fields of
        `summarize_info` plus ``nstep_per_round``.
        """
        kwargs = kwargs or {}
        rounds = self.rounds if rounds is None else rounds
        warmup = self.warmup if warmup is None else warmup
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"deq_benchmark: rounds must be an int >= 1, got {rounds!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"deq_benchmark: warmup must be an int >= 0, got {warmup!r}")
        get_info = info or find_info
        device = device if device is not None else self.device
        if getattr(self.benchmark, "disabled", False):  # --benchmark-disable: run once, as a test
            out = fn(*args, **kwargs)
            self._record_info([get_info(out)])
            return out

        out = None
        for _ in range(warmup):
            out = fn(*args, **kwargs)
        if device is None:
            device = _first_device((args, kwargs))
        if device is None and warmup:
            device = _first_device(out)
        if device is None:
            device = _default_device()
        timer = self.timer = DeviceTimer(device, clock or self.clock)
        if timer.cuda:
            torch.cuda.synchronize(timer.device)
        del out

        samples: list[float] = []
        infos: list[Info | None] = []  # the report's tensors only (no extras, no autograd history)

        def timed_round():
            seconds, result = timer.timed(fn, *args, **kwargs)
            samples.append(seconds)
            found = get_info(result)
            infos.append(None if found is None else Info(*found[: len(Info._fields)]))
            return result

        compiles_before = _dynamo_compiles()
        result = self.benchmark.pedantic(timed_round, rounds=rounds, iterations=1, warmup_rounds=0)
        compiles_after = _dynamo_compiles()
        compiled = None if compiles_before is None or compiles_after is None else compiles_after - compiles_before
        self.samples = samples
        self.extra_info.update({
            "time_s": summarize(samples),
            "times_s": list(samples),
            "timer": timer.description,
            "device": str(timer.device),
            "warmup": warmup,
            "rounds": rounds,
            "dynamo_compiles_during_timing": compiled,
        })
        if compiled:
            warnings.warn(
                f"deq_benchmark: Dynamo compiled {compiled} frame(s) during the timed rounds, so "
                f"compilation is in the timings; raise warmup (now {warmup}) or find the recompilation "
                f"(TORCH_LOGS=recompiles)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._record_info(infos)
        return result

    def _record_info(self, infos: list) -> None:
        if not infos or infos[-1] is None:
            return
        self.extra_info.update(summarize_info(infos[-1]))
        self.extra_info["nstep_per_round"] = [None if i is None else summarize_info(i)["nstep"] for i in infos]

    def record_info(self, info: Info, prefix: str = "") -> dict:
        """Record `summarize_info` of ``info`` in ``extra_info`` under ``prefix + name``
        (e.g. one per arm of an A/B benchmark); returns the summary."""
        summary = summarize_info(info)
        self.extra_info.update({prefix + k: v for k, v in summary.items()})
        return summary


try:  # pytest is not a dependency of the library: the fixture exists only where pytest does
    import pytest as _pytest
except ImportError:  # pragma: no cover - exercised by tests with pytest absent
    _pytest = None

try:
    import pytest_benchmark as _pytest_benchmark  # noqa: F401
except ImportError:
    _pytest_benchmark = None


def _missing_pytest_benchmark(*_args, **_kwargs):
    raise ImportError(_INSTALL_HINT, name="pytest_benchmark")


if _pytest is None:  # pragma: no cover
    deq_benchmark = _missing_pytest_benchmark  # pyright: ignore[reportAssignmentType]
elif _pytest_benchmark is None:

    @_pytest.fixture
    def deq_benchmark():
        """Unavailable: pytest-benchmark is not installed (using it raises ImportError saying so)."""
        _missing_pytest_benchmark()

else:

    @_pytest.fixture
    def deq_benchmark(benchmark):
        """pytest-benchmark's ``benchmark`` as a `DeqBenchmark`: device-synchronized timing,
        `DEFAULT_WARMUP` untimed warm-up calls, the returned ``Info`` recorded in ``extra_info``."""
        return DeqBenchmark(benchmark)

