"""`DeqBenchmark`: warm-up calls, timed rounds through pytest-benchmark, and what they record
(timings, Dynamo compilations during the timing, the solver's report). ``benchmarking``
exposes it and defines the fixture that makes one."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ._info import Info
from ._info_summary import find_info, summarize_info
from ._timing import DeviceTimer, summarize
from ._transforms import dynamo_frames_compiled
from ._tree import flatten

#: Untimed calls before the timed rounds. Call 1 compiles (Dynamo and inductor for the forward;
#: AOTAutograd compiles the backward at the first ``backward()``) and creates lazy state (``.grad``
#: tensors, optimizer state, cuDNN/inductor autotuning). Call 2 absorbs the recompilation that the
#: state created by call 1 can trigger (guards on ``.grad`` / ``requires_grad``, automatic dynamic
#: shapes), and under ``mode="reduce-overhead"`` records the CUDA graph (CUDA-graph trees warm up
#: on the first call and record on the second), so the timed rounds replay it.
DEFAULT_WARMUP = 2
#: Timed rounds when the caller does not say.
DEFAULT_ROUNDS = 5


def _first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj`` (a tensor or a pytree of them), or None."""
    return next((t.device for t in flatten(obj)[0] if isinstance(t, torch.Tensor)), None)


def _default_device() -> str:
    """Where work runs when nothing says: CUDA if this process has initialized it, else the CPU."""
    return "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"


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

        compiles_before = dynamo_frames_compiled()
        result = self.benchmark.pedantic(timed_round, rounds=rounds, iterations=1, warmup_rounds=0)
        compiles_after = dynamo_frames_compiled()
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
