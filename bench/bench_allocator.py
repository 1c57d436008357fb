"""(6) The CPU allocator, measured: the same solves and step under glibc malloc's defaults and
with its thresholds raised (``bench/allocator_probe.py`` in a child process per setting and arm).

glibc serves allocations of 128 KiB and more with ``mmap`` and hands freed memory at the
top of its heap back to the kernel past a trim threshold; a solver that allocates and
frees multi-100-KiB ``(B, D)`` buffers every iteration (and inside ``torch.while_loop``,
where carries are functional, a fresh copy of Anderson's history every iteration) then
takes fresh pages, and a page fault for each, again and again. "tuned" sets
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` to 1 GiB, so freed memory is
reused (what jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends,
do by design). The library sets neither: this only measures what it costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SETTINGS = {
    "glibc defaults": {},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)},
}
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allocator_probe.py")


ARMS = [(w, m) for w in ("mlp", "conv") for m in ("eager", "compiled")]


@pytest.mark.compile
@pytest.mark.parametrize("setting", list(SETTINGS))
def bench_cpu_allocator(benchmark, device, setting):
    if device.type != "cpu":
        pytest.skip("glibc malloc settings are a CPU matter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(SETTINGS[setting])
    arms = {}

    def probe():
        for workload, mode in ARMS:
            out = subprocess.run([sys.executable, PROBE, workload, mode], env=env, capture_output=True,
                                 text=True, check=True)
            arms[f"{workload} solve, {mode}"] = json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.group = "allocator"
    benchmark.pedantic(probe, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"kind": "allocator", "setting": setting, "env": SETTINGS[setting], "arms": arms})
