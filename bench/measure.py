"""Measurement helpers shared by the benchmarks: timers, saved bytes, peak memory.

Everything here is deliberately small and explicit so that RESULTS.md can say
exactly what each number means:

- ``Timer``: the library's ``deq_functional.benchmarking.DeviceTimer``: seconds of one
  call. CPU: ``time.perf_counter`` (or, with ``clock="thread"``, ``time.thread_time``,
  the CPU time of the calling thread). CUDA: synchronize, a pair of CUDA events around
  the call, synchronize. ``stats`` is its ``summarize`` (min / median / mean / max / n).
- ``saved_bytes``: bytes that autograd saves for backward while ``fn`` runs,
  counted by the library's ``deq_functional.SavedTensorBytes``
  (``torch.autograd.graph.saved_tensors_hooks``); a storage saved several times
  (or viewed by several saved tensors) counts once, keyed by its device and
  ``untyped_storage().data_ptr()``; reported with and without the parameters.
- ``ModelOps``: the model's GEMMs and convolutions of one call (``aten.mm``, ``addmm``,
  ``convolution`` and their backward), recorded through a ``TorchDispatchMode`` with
  copies of their inputs, replayed alone: a floor for any compiled version of the same
  call that runs the same GEMMs on the same BLAS / oneDNN.
- ``PeakMemory``: CPU: the kernel's peak-RSS counter (``VmHWM``), reset by
  writing ``5`` to ``/proc/self/clear_refs`` before the call; the reported
  number is the peak minus the RSS just before the call. CUDA:
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
- ``record_solves``: the ``Info`` summary of every solve the library runs inside a block,
  IFT's adjoint (backward) solve included, which has no ``Info`` of its own to return.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch

import deq_functional as dq
from deq_functional.benchmarking import DeviceTimer as Timer
from deq_functional.benchmarking import summarize as stats
from deq_functional.benchmarking import summarize_info

__all__ = ["Timer", "stats", "saved_bytes", "PeakMemory", "load_average", "Alternating", "Rotating",
           "record_solves"]


def saved_bytes(fn: Callable[[], object], exclude=()):
    """Run ``fn()`` under saved-tensor hooks; return (output, unique saved bytes, bytes not in ``exclude``, count).

    ``exclude``: tensors (e.g. the parameters) whose storages are alive anyway, so
    a saved reference to them costs no memory; the third value leaves them out.
    The hooks do not copy anything: pack returns the tensor itself. Only the
    forward (graph-building) part should run inside, so the backward's own
    machinery (e.g. ``torch.func.vjp`` in an IFT backward) is not affected.
    """
    with dq.SavedTensorBytes(exclude=list(exclude)) as saved:
        out = fn()
    return out, saved.total_bytes, saved.bytes, saved.count


def _read_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _read_status_kb("VmHWM")
        return True
    except OSError:
        return False
    except KeyError:
        return False


class PeakMemory:
    """Peak memory growth (bytes) during one call: RSS on CPU, allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.available = self.cuda or _can_reset_hwm()
        self.what = (
            "torch.cuda.max_memory_allocated growth"
            if self.cuda
            else "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
        )

    def __call__(self, fn: Callable[[], object]) -> int | None:
        if not self.available:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _read_status_kb("VmRSS")
        fn()
        return _read_status_kb("VmHWM") - before


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


class Alternating:
    """A/B timing in one process: each round times both, order flipped every round.

    ``round()`` is what pytest-benchmark times (one pair); the per-side samples and
    the per-pair ratio A/B are kept here and reported through ``extra_info``.
    """

    def __init__(self, timer: Timer, a: Callable[[], object], b: Callable[[], object]):
        self.timer, self.a, self.b = timer, a, b
        self.ta: list[float] = []
        self.tb: list[float] = []
        self.n = 0

    def round(self) -> None:
        if self.n % 2 == 0:
            ta = self.timer(self.a)
            tb = self.timer(self.b)
        else:
            tb = self.timer(self.b)
            ta = self.timer(self.a)
        self.ta.append(ta)
        self.tb.append(tb)
        self.n += 1

    def summary(self, a_name: str, b_name: str) -> dict:
        ratios = [x / y for x, y in zip(self.ta, self.tb, strict=True)]
        return {
            f"{a_name}_s": stats(self.ta),
            f"{b_name}_s": stats(self.tb),
            f"ratio_{a_name}_over_{b_name}": stats(ratios),
            # ratio of the two minima: the least noise-sensitive estimate
            "ratio_of_min": min(self.ta) / min(self.tb),
        }


class Rotating:
    """Like ``Alternating`` for N arms: each round times every arm once, starting one
    arm later than the round before, so no arm always runs first or last.

    An arm is a callable (timed whole) or a pair ``(setup, fn)``: ``setup()`` runs untimed
    just before, and only ``fn(setup())`` is timed (e.g. a forward, then its backward)."""

    def __init__(self, timer: Timer, arms: dict):
        self.timer, self.arms = timer, arms
        self.samples: dict[str, list[float]] = {k: [] for k in arms}
        self.n = 0

    def round(self) -> None:
        names = list(self.arms)
        s = self.n % len(names)
        for name in names[s:] + names[:s]:
            arm = self.arms[name]
            if isinstance(arm, tuple):
                setup, fn = arm
                self.samples[name].append(self.timer(fn, setup()))
            else:
                self.samples[name].append(self.timer(arm))
        self.n += 1

    def ratio(self, a: str, b: str) -> dict:
        return stats([x / y for x, y in zip(self.samples[a], self.samples[b], strict=True)])


class record_solves:
    """Within the block, every ``deq_functional`` solve's ``(what, info summary)`` is appended to
    ``self.solves``: wraps ``deq_functional._solve.iterate`` where the library's modules imported
    it (restored on exit). ``what`` names the solve ("fixed_point: the IFT adjoint (backward)
    solve", ...); the summary is ``deq_functional.benchmarking.summarize_info`` (nstep, residual,
    rel_residual, status). Eager use only."""

    def __init__(self):
        self.solves: list = []
        self._patched: list = []

    def __enter__(self):
        from deq_functional import _solve

        original = _solve.iterate

        def iterate(*args, **kwargs):
            sol = original(*args, **kwargs)
            self.solves.append((kwargs.get("what", ""), summarize_info(sol.info)))
            return sol

        for name, module in list(sys.modules.items()):
            if name.startswith("deq_functional") and getattr(module, "iterate", None) is original:
                self._patched.append((module, original))
                module.iterate = iterate
        return self

    def __exit__(self, *exc):
        for module, original in self._patched:
            module.iterate = original

    def adjoint(self) -> dict | None:
        """The summary of the last IFT adjoint (backward) solve in the block, ``None`` if none ran."""
        found = [info for what, info in self.solves if "adjoint" in what]
        return found[-1] if found else None


MODEL_OPS = ("aten.mm.default", "aten.addmm.default", "aten.convolution.default",
             "aten.convolution_backward.default")


class ModelOps:
    """The ``MODEL_OPS`` that one call of ``fn`` dispatches (forward and backward), kept with
    copies of their arguments; ``replay()`` runs just them, in order. Solver-side ``bmm``
    (Anderson's history) is left out: the floor is the model's own arithmetic."""

    def __init__(self, fn: Callable):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if str(func) in MODEL_OPS:
                    copy = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
                    ops.append((func, copy, kwargs))
                return func(*args, **kwargs)

        with Record():
            fn()
        self.counts = {name: sum(str(f) == name for f, _, _ in ops) for name in MODEL_OPS}

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs in self.ops:
                func(*args, **kwargs)
