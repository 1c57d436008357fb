"""(11) One Anderson iteration on the MLP, ours (eager, compiled) vs JAX's jitted loop, one process.

What a solver iteration costs beyond its call of f, against the best peer on the same work:
the JAX arm is ``jax_mlp.forward_solve`` (the library's Anderson in ``jax.lax.while_loop``, see
``bench/jax_mlp.py``) under ``jax.jit``; ours is the no-grad ``fixed_point`` with the same
``Anderson(m=5)``, eagerly and under ``torch.compile(fullgraph=True)``; a third torch arm compiles
with ``options={"cpp.use_decompose_tanh": True}`` (inductor's tanh as ``2/(1+exp(−2x)) − 1``:
a user's choice, never the library's). Same f = tanh(z Wᵀ + x), same W and x (torch → numpy →
jax), float32, the batch one problem, ``tol = 0`` so every arm runs exactly K iterations.

Per iteration = ``(T(K2) − T(K1)) / (K2 − K1)``: the fixed costs of a call (the first f, the
final f, wrappers, JAX's dispatch to its compute thread, Dynamo's guards) cancel. Each side's f
is timed in the same rounds the same way: ``F_CHAIN`` applications ``z ← f(z)`` in one call
(a ``lax.fori_loop`` under ``jax.jit``; a Python loop eagerly; unrolled in one compiled graph),
per application, so "÷ own f" says how far each loop body is from the f it calls.
Before timing, the K2 iterates of the three arms must agree (relative difference ≤ 1e-4).
Threads: one per side (bench/conftest.py, ``jax_mlp.load_jax``). ``measure.Rotating``, wall clock.
"""

from __future__ import annotations

import jax_mlp
import measure
import numpy as np
import pytest
import torch

import deq_functional as dq

K1, K2 = 10, 30
M = 5
ROUNDS = 60
F_CHAIN = 10
FAST_TANH = {"cpp.use_decompose_tanh": True}


def _ours(w, k):
    solver = dq.Anderson(max_iter=k, tol=0.0, m=M)

    def solve(params, x):
        with torch.no_grad():
            return dq.fixed_point(w.f, params, x, solver=solver, grad_mode=dq.JFB())[0]

    return solve


@pytest.mark.compile
def bench_iteration_vs_jax(benchmark, make_workload, timer, jax):
    w = make_workload("mlp")
    if w.inp.device.type != "cpu":
        pytest.skip("the JAX arm runs on CPU only")
    params, z, x = w.f_bare_args()
    jnp = jax.numpy
    Wj, xj, zj = (jnp.asarray(np.array(t.numpy(), copy=True)) for t in (params["latent"]["weight"], x, z))

    torch._dynamo.reset()
    sides = {"eager": {}, "compiled": {}, "compiled, fast tanh": {}}
    for k in (K1, K2):
        sides["eager"][k] = _ours(w, k)
        sides["compiled"][k] = torch.compile(_ours(w, k), fullgraph=True)
        sides["compiled, fast tanh"][k] = torch.compile(_ours(w, k), fullgraph=True, options=FAST_TANH)

    def chain(p, z, x):
        with torch.no_grad():
            for _ in range(F_CHAIN):
                z = w.f(p, z, x)
            return z

    chains = {"eager": chain, "compiled": torch.compile(chain, fullgraph=True),
              "compiled, fast tanh": torch.compile(chain, fullgraph=True, options=FAST_TANH)}
    jax_solve = {k: jax.jit(lambda W, x, k=k: jax_mlp.forward_solve(W, x, jax_mlp.Anderson(max_iter=k, tol=0.0, m=M)).z)
                 for k in (K1, K2)}
    jax_chain = jax.jit(lambda W, z, x: jax.lax.fori_loop(0, F_CHAIN, lambda i, z: jax_mlp.f(W, z, x), z))

    arms = {"jax f": lambda: jax_chain(Wj, zj, xj).block_until_ready()}
    arms.update({f"jax K={k}": (lambda k=k: jax_solve[k](Wj, xj).block_until_ready()) for k in (K1, K2)})
    for side, solves in sides.items():
        arms[f"{side} f"] = lambda side=side: chains[side](params, z, x)
        arms.update({f"{side} K={k}": (lambda s=solves[k]: s(params, x)) for k in (K1, K2)})

    compile_s = {}
    for name, arm in arms.items():  # compiles, then one more untimed call each
        compile_s[name] = timer(arm)
        arm()
    reference = np.asarray(jax_solve[K2](Wj, xj)).reshape(-1)
    agreement = {side: float(np.abs(solves[K2](params, x).reshape(-1).numpy() - reference).max() / np.abs(reference).max())
                 for side, solves in sides.items()}
    assert max(agreement.values()) <= 1e-4, f"the iterates disagree with JAX's after {K2} iterations: {agreement}"

    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    benchmark.group = "iteration_vs_jax"
    benchmark.pedantic(rot.round, rounds=ROUNDS, iterations=1, warmup_rounds=0)

    def per_iteration(side):
        return [(t2 - t1) / (K2 - K1) for t1, t2 in zip(rot.samples[f"{side} K={K1}"], rot.samples[f"{side} K={K2}"],
                                                        strict=True)]

    def bare_s(side):
        return [t / F_CHAIN for t in rot.samples[f"{side} f"]]

    result = {}
    for side in ("jax", *sides):
        it, f = per_iteration(side), bare_s(side)
        result[side] = {"per_iteration_s": measure.stats(it), "bare_f_s": measure.stats(f),
                        "per_iteration_over_own_f": measure.stats([a / b for a, b in zip(it, f, strict=True)])}
    jax_it = per_iteration("jax")
    for side in sides:
        result[side]["per_iteration_over_jax"] = measure.stats(
            [a / b for a, b in zip(per_iteration(side), jax_it, strict=True)])
        result[side]["per_iteration_over_jax_of_minima"] = (
            result[side]["per_iteration_s"]["min"] / result["jax"]["per_iteration_s"]["min"])
    benchmark.extra_info.update({
        "kind": "iteration_vs_jax", "workload": "mlp", "workload_source": w.source,
        "solver": f"Anderson(m={M}, tol=0) for K = {K1} and {K2}", "K": [K1, K2], "f_chain": F_CHAIN,
        "sides": result, "agreement_vs_jax": agreement, "first_call_s": compile_s,
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "load_average": [load_before, measure.load_average()],
    })
