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

# The public path of the parts (``_timing``: the timer; ``_timed_rounds``: warm-ups, rounds and
# what they record; ``_info_summary``: the solver's report as numbers) and the home of the fixture,
# whose form depends on what this import finds installed.
from ._info_summary import find_info, summarize_info
from ._timed_rounds import DEFAULT_ROUNDS, DEFAULT_WARMUP, DeqBenchmark
from ._timing import DeviceTimer, summarize

__all__ = ["DEFAULT_ROUNDS", "DEFAULT_WARMUP", "DeviceTimer", "DeqBenchmark", "deq_benchmark", "find_info",
           "summarize", "summarize_info"]

_INSTALL_HINT = (
    "deq_benchmark needs the pytest-benchmark plugin: pip install pytest-benchmark "
    "(or pip install 'deq_functional[test]')"
)


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
