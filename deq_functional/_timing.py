"""Timing one call on CPU or CUDA, including the device work it queued (used by ``benchmarking``)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

_CLOCKS = ("wall", "thread")


def summarize(samples: list[float]) -> dict:
    """``{"min", "median", "mean", "max", "n"}`` of a non-empty list of numbers."""
    if not samples:
        raise ValueError("summarize: no samples")
    s = sorted(samples)
    return {"min": s[0], "median": statistics.median(s), "mean": statistics.fmean(s), "max": s[-1], "n": len(s)}


class DeviceTimer:
    """Seconds taken by one call, including the device work it queued.

    Args:
        device: where the timed work runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
            ``torch.device``).
        clock: ``"wall"`` (default) or, on CPU only, ``"thread"``.

    * CUDA: ``torch.cuda.synchronize`` (queued work from before is not charged), a CUDA
      event recorded on the current stream, the call, a second event,
      ``torch.cuda.synchronize``; the time is the events' ``elapsed_time``. Work the call
      queues on other streams is waited for by the synchronize but only timed if the
      current stream waits on it.
    * CPU, ``clock="wall"``: ``time.perf_counter`` before and after.
    * CPU, ``clock="thread"``: ``time.thread_time``, the CPU time of the calling thread.
      Time the thread spends descheduled (other processes on a busy machine) and asleep
      is not counted, and neither is work of other threads: use it with
      ``torch.set_num_threads(1)``, where torch's kernels run in the calling thread.
      Far less noisy than wall time on a shared machine; it cannot see I/O or waits.

    ``timer(fn, *args, **kwargs)`` returns the seconds; ``timer.timed(...)`` returns
    ``(seconds, fn's result)``.
    """

    def __init__(self, device: Any = "cpu", clock: str = "wall"):
        self.device = torch.device(device)
        if clock not in _CLOCKS:
            raise ValueError(f"DeviceTimer: clock must be one of {_CLOCKS}, got {clock!r}")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DeviceTimer: device must be a CPU or CUDA device, got {self.device}")
        self.cuda = self.device.type == "cuda"
        if self.cuda and clock != "wall":
            raise ValueError(
                f"DeviceTimer: clock={clock!r} measures CPU time of this thread, which does not include "
                f"work on {self.device}; use clock='wall' (CUDA events) there"
            )
        if self.cuda:
            if not torch.cuda.is_available():
                raise RuntimeError(f"DeviceTimer: device {self.device} requested but torch.cuda.is_available() is False")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.clock = clock
        self._now = time.thread_time if clock == "thread" else time.perf_counter

    @property
    def description(self) -> str:
        """What the timer measures, for reports."""
        if self.cuda:
            return f"CUDA events on the current stream of {self.device}, synchronize before and after"
        if self.clock == "thread":
            return "time.thread_time (CPU time of the calling thread)"
        return "time.perf_counter (wall clock)"

    def timed(self, fn: Callable, *args, **kwargs) -> tuple[float, Any]:
        """``(seconds, fn(*args, **kwargs))``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            stream = torch.cuda.current_stream(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn(*args, **kwargs)
            end.record(stream)
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, out
        t0 = self._now()
        out = fn(*args, **kwargs)
        return self._now() - t0, out

    def __call__(self, fn: Callable, *args, **kwargs) -> float:
        return self.timed(fn, *args, **kwargs)[0]

    def __repr__(self) -> str:
        return f"DeviceTimer(device={str(self.device)!r}, clock={self.clock!r})"
