"""(9) The MLP's float32 GEMMs on this CPU: which path runs them fastest, and at what error.

Two shapes from ``workloads.make_mlp`` (batch 128, latent 256, inputs 784), with its weights:

* ``latent``: ``z Wᵀ``, (128×256)·(256×256)ᵀ, the GEMM of every ``f`` call (``mlp.apply``),
  ``z`` near the fixed point (``Workload.f_bare_args``);
* ``embed``: ``flatten(inp) Uᵀ``, (128×784)·(784×256)ᵀ, ``mlp.embed`` without its bias.

Paths (arms), each timed per GEMM:

* ``x @ W.T``: what the model does (``aten.mm`` on a transposed view → MKL sgemm);
* ``mm(x, Wt)``: ``torch.mm`` with ``Wt = W.T.contiguous()`` made once, outside the timing;
* ``eager x10``: 10 GEMMs in one Python call (``latent``: chained, ``z ← z Wᵀ`` ten times;
  ``embed``, whose shape cannot chain: 10 inputs, the batch rolled by 0..9 rows, against the
  same ``U``), the eager counterpart of the next arm;
* ``inductor``: ``torch.compile(lambda x: x @ W.T, fullgraph=True)``, inductor's defaults, one
  GEMM per call; ``inductor x10``: the ``eager x10`` function compiled (one graph, per GEMM).
  The number and kind of GEMM calls in inductor's generated code is recorded
  (``torch._inductor.utils.run_and_get_code`` on the first call);
* ``bf16 matmul``: ``x @ W.T`` with ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``
  (oneDNN rounds the float32 operands to bfloat16: **not float32 arithmetic**; its error is in
  the table), set inside the timed call and restored right after it (one set and restore per
  sample of ``CALLS`` GEMMs); only where this torch has the attribute;
* ``jax.jit``: ``jax.jit(lambda x, W: x @ W.T)`` and (latent only) the chained ``x10`` function
  under one ``jax.jit`` (on embed's 10 independent dots XLA used two threads at once, so that
  arm is left out),
  ``block_until_ready``, XLA single threaded as in ``bench_vs_jax.py`` (``jax_mlp.load_jax``);
  the number of ``dot`` ops in XLA's optimised HLO is recorded. Without jax the arm is left out
  with a note.

Timing: ``measure.Rotating`` over all arms of a shape in one process (each round times every
arm once, starting one arm later each round), wall clock; one sample = ``CALLS`` back-to-back
calls of the arm (the operands stay in cache, as in a DEQ's iterations), divided by the GEMMs
they ran. µs per GEMM min / median over rounds; per round, each arm ÷ ``x @ W.T``.

Error: ``‖y − y₆₄‖∞ / ‖y₆₄‖∞`` against the same product in float64 from the same float32
operands (x10 arms: the 10th output of the chain, or the worst of the 10 outputs).

Threads: ``torch.set_num_threads(1)`` (bench/conftest.py); per arm the per-thread CPU time of
``bench_vs_jax.threads_used``: the second busiest thread ÷ the busiest must be ≤ 0.7, or, for the
jax x10 arm, whose GEMMs are chained by data dependence (XLA may run consecutive dots on
different pool threads), process CPU time ÷ wall time ≤ 1.1 (no two threads at once).

Recorded with the numbers: the BLAS / LAPACK / oneDNN lines of ``torch.__config__.show()``,
the CPU model and its AVX-512 / AMX flags, and the load average before and after.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import jax_mlp
import measure
import numpy as np
import pytest
import torch
from bench_vs_jax import MAX_SECOND_OVER_TOP, threads_used

ROUNDS = 60
CALLS = 20  # calls of an arm per timed sample
CHAIN = 10  # GEMMs per call of the x10 arms
MAX_CPU_OVER_WALL = 1.1
REFERENCE = "x @ W.T"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def operands(w, shape: str):
    """(x, W, xs): float32, detached; ``x @ W.T`` is the GEMM, ``xs`` the input of the x10 arms."""
    if shape == "latent":
        params, z, _ = w.f_bare_args()
        return z.contiguous(), params["latent"]["weight"].contiguous(), z.contiguous()
    flat = w.inp.detach().flatten(1).contiguous()
    U = w.params["embed"]["weight"].detach().contiguous()
    return flat, U, torch.stack([flat.roll(i, 0) for i in range(CHAIN)])


def x10(shape: str, matmul_t):
    """The 10-GEMM function of a shape: chained (latent) or on 10 inputs (embed)."""
    if shape == "latent":
        def chain(x, W):
            for _ in range(CHAIN):
                x = matmul_t(x, W)
            return x

        return chain

    def many(xs, W):
        return tuple(matmul_t(xs[i], W) for i in range(CHAIN))

    return many


def rel_err(y, ref: torch.Tensor) -> float:
    """‖y − ref‖∞ / ‖ref‖∞ (y a tensor, array, or a tuple of them against a stacked ref)."""
    if isinstance(y, (tuple, list)):
        return max(rel_err(a, r) for a, r in zip(y, ref, strict=True))
    y = torch.from_numpy(np.array(y)) if not isinstance(y, torch.Tensor) else y
    return float((y.double() - ref).abs().max() / ref.abs().max())


def repeat(fn, *args):
    def run():
        for _ in range(CALLS):
            fn(*args)

    return run


def blas_info() -> list[str]:
    """The BLAS / LAPACK / MKL / oneDNN lines of ``torch.__config__.show()`` (and such build settings)."""
    out = []
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if line.startswith("Build settings:"):
            out += [s.strip() for s in line.split(":", 1)[1].split(",")
                    if re.match(r"(BLAS|LAPACK|USE_MKL|USE_MKLDNN)", s.strip())]
        elif re.search(r"BLAS|LAPACK|MKL|Math Kernel|oneDNN|DNNL|CPU capability", line):
            out.append(line)
    return out


def cpu_info() -> tuple[str, list[str]]:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in CPU_FLAGS if f in flags]


def inductor_gemms(fn, *args):
    """(first call s, output, {kernel: calls}) of a compiled ``fn``: the extern kernels
    (``mm``, ``addmm``, ``_mkl_linear``…) its generated code calls; ``None`` if unreadable."""
    try:
        from torch._inductor.utils import run_and_get_code
    except ImportError:
        t0 = time.perf_counter()
        out = fn(*args)
        return time.perf_counter() - t0, out, None
    t0 = time.perf_counter()
    out, codes = run_and_get_code(fn, *args)
    first = time.perf_counter() - t0
    code = "\n".join(codes)
    kernels = Counter(re.findall(r"extern_kernels\.(\w+)\(", code))
    kernels.update({"cpp GEMM template": len(re.findall(r"CppMicroGemm\w*\s*\(", code))} if "CppMicroGemm" in code else {})
    return first, out, dict(kernels)


@pytest.mark.compile
@pytest.mark.parametrize("shape", ["latent", "embed"])
def bench_gemm(benchmark, make_workload, timer, device, shape):
    if device.type != "cpu":
        pytest.skip("this compares CPU GEMM paths (MKL, oneDNN, XLA:CPU)")
    w = make_workload("mlp")
    x, W, xs = operands(w, shape)
    m, k = x.shape
    n = W.shape[0]
    ref = x.double() @ W.double().T
    ref10 = x10(shape, lambda a, b: a @ b.T)(xs.double(), W.double())
    ref10 = torch.stack(ref10) if isinstance(ref10, tuple) else ref10

    arms: dict = {}  # name -> (callable timed whole, GEMMs per sample, output of one call, meta)
    notes: list[str] = []

    def add(name, fn, args, gemms, meta=None):
        out = fn(*args)
        arms[name] = (repeat(fn, *args), CALLS * gemms, out, meta or {})

    mm_t = lambda a, b: a @ b.T  # noqa: E731 - the model's expression
    add(REFERENCE, mm_t, (x, W), 1)
    Wt = W.T.contiguous()
    add("mm(x, Wt), Wt = W.T.contiguous()", torch.mm, (x, Wt), 1)
    eager10 = x10(shape, mm_t)
    add("eager x10", eager10, (xs, W), CHAIN)

    torch._dynamo.reset()
    one = torch.compile(lambda a: a @ W.T, fullgraph=True)
    first, _, kern = inductor_gemms(one, x)
    add("inductor", one, (x,), 1, {"first_call_s": first, "gemm_kernels": kern})
    ten = torch.compile(eager10, fullgraph=True)
    first, _, kern = inductor_gemms(ten, xs, W)
    add("inductor x10", ten, (xs, W), CHAIN, {"first_call_s": first, "gemm_kernels": kern})

    matmul_flags: Any = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision_before = getattr(matmul_flags, "fp32_precision", None)
    if precision_before is not None:
        def bf16_calls(calls: int):
            """``calls`` × ``x @ W.T`` with fp32_precision = "bf16", restored after (once per sample)."""
            matmul_flags.fp32_precision = "bf16"
            try:
                for _ in range(calls):
                    y = x @ W.T
            finally:
                matmul_flags.fp32_precision = precision_before
            return y

        arms["bf16 matmul"] = (lambda: bf16_calls(CALLS), CALLS, bf16_calls(1),
                               {"setting": f'torch.backends.mkldnn.matmul.fp32_precision = "bf16" '
                                           f'(restored to {precision_before!r})'})
    else:
        notes.append("bf16 matmul arm left out: this torch has no torch.backends.mkldnn.matmul.fp32_precision")

    jax_version = None
    if jax_mlp.available():
        jax = jax_mlp.load_jax()
        import jax.numpy as jnp

        jax_version = jax.__version__
        xj, Wj, xsj = (jnp.asarray(t.numpy().copy()) for t in (x, W, xs))
        j1 = jax.jit(lambda a, b: a @ b.T)
        j10 = jax.jit(x10(shape, lambda a, b: a @ b.T))
        jax_arms = [("jax.jit", j1, (xj, Wj), 1)]
        if shape == "latent":  # a chain: XLA runs the dots one after another
            jax_arms.append(("jax.jit x10", j10, (xsj, Wj), CHAIN))
        else:  # independent dots: XLA ran them on two threads at once (make bench, 2026-12-02)
            notes.append("jax.jit x10 left out for embed: XLA runs its 10 independent dots on two threads at once")
        for name, fn, args, gemms in jax_arms:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            first = time.perf_counter() - t0
            dots = fn.lower(*args).compile().as_text().count(" dot(")
            meta = {"first_call_s": first, "hlo_dots": dots}
            if gemms > 1:
                meta["sequenced"] = "chained"
            add(name, lambda *a, fn=fn: jax.block_until_ready(fn(*a)), args, gemms, meta)
    else:
        notes.append(f"jax arms left out: jax is not installed ({jax_mlp.INSTALL_HINT})")

    errors = {name: rel_err(out, ref10 if name.endswith("x10") else ref) for name, (_, _, out, _) in arms.items()}
    for fn, _, _, _ in arms.values():  # one more untimed sample each
        fn()
    threads = {name: threads_used(fn) for name, (fn, _, _, _) in arms.items()}
    for name, t in threads.items():
        one_thread = t["second_over_top"] is None or t["second_over_top"] <= MAX_SECOND_OVER_TOP
        # GEMMs sequenced by data dependence may be handed from one XLA thread to another, never
        # run at once: there, process CPU time ÷ wall time must stay ≤ MAX_CPU_OVER_WALL
        one_at_a_time = "sequenced" in arms[name][3] and t["cpu_over_wall"] <= MAX_CPU_OVER_WALL
        assert one_thread or one_at_a_time, f"{name}: not one thread did the work: {t}"

    rot = measure.Rotating(timer, {name: fn for name, (fn, _, _, _) in arms.items()})
    load_before = measure.load_average()
    benchmark.group = "gemm"
    benchmark.pedantic(rot.round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    load_after = measure.load_average()
    assert precision_before is None or matmul_flags.fp32_precision == precision_before, "fp32_precision not restored"

    per_gemm = {name: [s / arms[name][1] for s in rot.samples[name]] for name in arms}
    flop = 2 * m * k * n
    cpu_model, cpu_flags = cpu_info()
    result = {}
    for name, (_, gemms, _, meta) in arms.items():
        us = measure.stats([s * 1e6 for s in per_gemm[name]])
        result[name] = {
            "us_per_gemm": us,
            "gflops_at_min": flop / (us["min"] * 1e-6) / 1e9,
            "ratio_over_reference": measure.stats(
                [a / b for a, b in zip(per_gemm[name], per_gemm[REFERENCE], strict=True)]),
            "max_rel_err": errors[name],
            "gemms_per_sample": gemms,
            "second_over_top_thread": threads[name]["second_over_top"],
            **meta,
        }
    benchmark.extra_info.update({
        "kind": "gemm", "workload": "mlp", "workload_source": w.source, "shape": shape,
        "gemm": f"({m}×{k})·({n}×{k})ᵀ float32", "m": m, "k": k, "n": n,
        "x10": "chained z ← z Wᵀ" if shape == "latent" else "10 inputs (the batch rolled by 0..9 rows), same U",
        "rounds": ROUNDS, "calls_per_sample": CALLS, "reference": REFERENCE,
        "error": "‖y − y64‖∞ / ‖y64‖∞ vs the float64 product of the same float32 operands",
        "arms": result, "notes": notes, "threads": threads,
        "blas": blas_info(), "cpu_model": cpu_model, "cpu_flags": cpu_flags,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax_version,
        "mkldnn_matmul_fp32_precision": precision_before, "timer": timer.description,
        "load_average": [load_before, load_after],
    })
