"""Before / after: the same training step with the library at a git revision and as it is now,
timed A/B in one process (what "speed unchanged" claims are measured with).

    python bench/ab_revision.py --base <rev> [--workload mlp|conv] [--modes ift jfb]
                                [--rounds 60] [--compile] [--out bench/AB.md]

The package at ``--base`` is exported with ``git archive`` into a temporary directory and
imported under another name (``deq_functional_base``; the package imports itself only
relatively), so both versions run in one process on the same weights, the same batch and
the same f (``deq_functional.models`` of the working tree). Each round times one step of
each side, order flipped every round; one intra-op thread, denormals flushed. Before timing,
both sides must take the same forward iterations and agree on the gradients. Prints a
Markdown table (min / median ms per side, the median and min of the per-round ratios
now ÷ base) and appends it to ``--out`` with the command, the revisions and the load.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import workloads  # noqa: E402
from measure import Alternating, Timer, load_average, stats  # noqa: E402

import deq_functional as now  # noqa: E402


def load_revision(rev: str, name: str = "deq_functional_base"):
    """The package ``deq_functional`` as of git revision ``rev``, imported as ``name``."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    blob = subprocess.run(["git", "-C", root, "archive", rev, "deq_functional"], capture_output=True, check=True).stdout
    target = tempfile.mkdtemp(prefix="deq_ab_")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(target, filter="data")
    os.rename(os.path.join(target, "deq_functional"), os.path.join(target, name))
    spec = importlib.util.spec_from_file_location(name, os.path.join(target, name, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def train_step(lib, w, mode: str, compiled: bool):
    """One SGD step (lr 0: every round solves the same problem) with ``lib.fixed_point``."""
    solver = lib.Anderson(max_iter=30, tol=1e-4, m=5)

    def loss_fn(params):
        x = w.embed(params, w.inp)
        z, info = lib.fixed_point(w.f, params, x, solver=solver, grad_mode=mode, z0=w.z_like(x))
        return F.cross_entropy(w.readout(params, z), w.target), z, info

    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    return workloads.TrainStep(loss_fn, w.clone_params())


def check_same_work(a, b) -> str:
    """Both steps once: same forward iterations, gradients equal to float32 rounding."""
    (_, ia), (_, ib) = a(), b()
    if int(ia.nstep) != int(ib.nstep):
        raise SystemExit(f"the two sides took {int(ia.nstep)} and {int(ib.nstep)} iterations: not the same work")
    ga = [t.grad for t in workloads.flatten(a.params)[0]]
    gb = [t.grad for t in workloads.flatten(b.params)[0]]
    err = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(ga, gb, strict=True))
    if err > 1e-3:  # the solves stop at tol 1e-4: their gradients agree to about that
        raise SystemExit(f"gradients differ by {err:.2e} (relative): not the same computation")
    return f"{int(ia.nstep)} it., grad rel. diff {err:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~3)")
    ap.add_argument("--workload", default="mlp", choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--modes", nargs="+", default=["ift", "jfb"])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--compile", action="store_true", help="compare torch.compile(fullgraph=True) steps")
    ap.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    base = load_revision(args.base)
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], capture_output=True, text=True).stdout.strip()
    w = workloads.WORKLOADS[args.workload]()
    timer = Timer("cpu")
    rows, load_before = [], load_average()
    for mode in args.modes:
        new, old = train_step(now, w, mode, args.compile), train_step(base, w, mode, args.compile)
        work = check_same_work(new, old)
        for _ in range(3):  # warm-up (and compiles) outside the timing
            new(), old()
        ab = Alternating(timer, new, old)
        for _ in range(args.rounds):
            ab.round()
        tn, tb, ratio = stats(ab.ta), stats(ab.tb), stats([x / y for x, y in zip(ab.ta, ab.tb, strict=True)])
        rows.append(
            f"| {mode} | {work} | {tb['min'] * 1e3:.2f} / {tb['median'] * 1e3:.2f} | "
            f"{tn['min'] * 1e3:.2f} / {tn['median'] * 1e3:.2f} | {ratio['median']:.3f} | {min(ab.ta) / min(ab.tb):.3f} |"
        )
    head = [
        f"### {args.workload} training step, {'compiled' if args.compile else 'eager'}: now ÷ {rev} "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load_before} → {load_average()})",
        "",
        f"`python bench/ab_revision.py {' '.join(sys.argv[1:])}` — {args.rounds} A/B rounds, 1 thread, "
        "Anderson(m=5, tol 1e-4, max_iter 30), torch " + torch.__version__,
        "",
        f"| mode | same work | {rev} ms (min / median) | now ms (min / median) "
        f"| now ÷ {rev} (median of rounds) | ratio of minima |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
