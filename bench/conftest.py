"""Session set-up for the benchmarks (collected only under bench/, see pytest.ini).

Global flags are set here, by the benchmark, never by the library:
``torch.set_num_threads(--threads, default 1)`` and ``torch.set_flush_denormal(True)``
(float32 denormals make DEQ iterations on CPU several times slower).
``--device cuda`` runs the same suite on a GPU with CUDA-event timings.

Timing goes through the library's ``deq_functional.benchmarking`` (what users get):
``deq_benchmark`` is its ``DeqBenchmark`` on the session device (device-synchronized
timer, untimed warm-up calls, the solver's ``Info`` recorded in ``extra_info``), and
``timer`` its ``DeviceTimer`` for the A/B rounds the benchmarks drive themselves.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile

# Cold compiles: a fresh inductor cache per session, so "compile s" is never a cache hit
# from an earlier run (must be set before inductor is first used).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deq_bench_inductor_")

import jax_mlp
import measure
import pytest  # noqa: E402
import torch  # noqa: E402
import workloads

from deq_functional.benchmarking import DeqBenchmark


def pytest_addoption(parser):
    group = parser.getgroup("deq_functional bench")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                    help="device to benchmark on (cuda needs a GPU; no silent fallback)")
    # 1 thread: on the shared 2-core machine this was written on, other jobs keep the
    # cores busy and 2 OpenMP threads ran the MLP f *slower* than 1 (0.55 vs 0.33 ms).
    group.addoption("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")


def _source_digest() -> str:
    """sha256 (12 hex) of the library's .py files as imported by this session."""
    import hashlib

    import deq_functional

    root = os.path.dirname(deq_functional.__file__)
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), "rb") as fh:
                    h.update(name.encode() + fh.read())
    return h.hexdigest()[:12]


_PROVENANCE: dict = {}


def pytest_configure(config):
    # Provenance as of the start of the session, i.e. of the code this run imports.
    _PROVENANCE.update(
        git_commit=_git("rev-parse", "--short", "HEAD"),
        library_uncommitted=bool(_git("status", "--porcelain", "--untracked-files=no", "--", "../deq_functional")),
        bench_uncommitted=bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".")),
        library_sha256=_source_digest(),
        load_average_start=measure.load_average(),
    )
    device = config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch.cuda.is_available() is False on this machine; "
                                "run without --device (CPU) instead")
    torch.set_num_threads(config.getoption("--threads"))
    torch.set_flush_denormal(True)
    # One compiled function per benchmark, many benchmarks: each one resets dynamo
    # itself; this only keeps a long session from hitting the recompile limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except Exception:  # noqa: BLE001 - best effort provenance only
        return ""


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def pytest_benchmark_update_machine_info(config, machine_info):
    import importlib.metadata as md

    device = config.getoption("--device")
    machine_info["deq_bench"] = {
        "cpu_model": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchdeq": md.version("torchdeq"),
        "python": sys.version.split()[0],
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "flush_denormal": True,
        "inductor_cache": "fresh per session (cold compiles)",
        **_PROVENANCE,
        "command": "make bench  (= python -m pytest " + " ".join(config.invocation_params.args) + ")",
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_info"]["deq_bench"]["load_average_end"] = measure.load_average()


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def timer(device):
    return measure.Timer(device)


@pytest.fixture
def deq_benchmark(benchmark, device):
    """``deq_functional.benchmarking.DeqBenchmark`` around pytest-benchmark's ``benchmark``, on --device."""
    return DeqBenchmark(benchmark, device=device)


@pytest.fixture(scope="session")
def make_workload(device):
    """make_workload(name) -> a fresh Workload (own params) on the session device."""

    def make(name):
        return workloads.WORKLOADS[name](device=device)

    return make


@pytest.fixture(scope="session")
def jax():
    """The ``jax`` module, imported single threaded (``jax_mlp.load_jax``); skips the benchmark
    with an install hint where jax is missing (``make bench`` runs without it)."""
    if not jax_mlp.available():
        pytest.skip(f"JAX arm skipped: jax is not installed; {jax_mlp.INSTALL_HINT}")
    return jax_mlp.load_jax()
