"""Child process of ``bench_allocator.py``: ``python allocator_probe.py WORKLOAD MODE`` times one
no-grad solve under whatever glibc malloc settings the parent put in the environment, and
prints one JSON line. One arm per process: glibc adapts its thresholds to what a process
has freed so far, so arms sharing a process would change each other's numbers.

The solve (1 thread, denormals flushed, like every benchmark): ``fixed_point`` on the
workload with ``Anderson(m=5, tol=1e-4, max_iter=30)``, eager or compiled
(``fullgraph=True``). Reported: seconds per call (min / median over rounds) and minor page
faults per call (``getrusage``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
import workloads as wl  # noqa: E402

import deq_functional as dq  # noqa: E402

ROUNDS = 15


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(workload: str, mode: str) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    w = wl.WORKLOADS[workload]()
    params, _, x = w.f_bare_args()
    solver = dq.Anderson(max_iter=30, tol=1e-4, m=5)

    def solve(params, x):
        with torch.no_grad():
            return dq.fixed_point(w.f, params, x, solver=solver, grad_mode=dq.JFB())

    run = torch.compile(solve, fullgraph=True) if mode == "compiled" else solve
    for _ in range(3):  # compile and warm up
        _, info = run(params, x)
    times, f0 = [], _faults()
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        run(params, x)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"s": measure.stats(times), "minor_faults_per_call": (_faults() - f0) / ROUNDS,
                      "nstep": int(info.nstep)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
