"""(2) Training step per grad mode at solver depth 10 / 30 / 100: time, saved bytes, peak memory.

A training step is: zero grads, embed, ``fixed_point``, readout, cross-entropy,
``backward()``, SGD step (lr=0: the update runs, the weights stay, see workloads.TrainStep).
The largest parameter-gradient norm of the first step is recorded: every mode
should agree at depth ≥ 30, where the solve has converged. Depth d means ``Anderson(m=6, max_iter=d, tol=0.0)``:
exactly d forward iterations; IFT's adjoint solve uses the same solver (exactly
d adjoint iterations); ``Neumann(5)``.

Saved bytes: everything autograd saves for backward during the forward (embed,
solve, readout, loss), through ``saved_tensors_hooks``, unique storages only;
parameters saved by their layers count too. The reference is the same loss
with one differentiable application of f at a detached state (what JFB needs
in principle); the ratio to it is reported, with and without the parameters'
storages (a saved reference to a parameter costs no memory: it is alive anyway).
"""

from __future__ import annotations

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

DEPTHS = (10, 30, 100)
MODES = {
    "ift": lambda d: dq.IFT(solver=dq.Anderson(max_iter=d, tol=0.0, m=6)),
    "jfb": lambda d: dq.JFB(),
    "neumann": lambda d: dq.Neumann(5),
    "unrolled": lambda d: dq.Unrolled(),
}
# timed rounds: every MLP config is cheap; conv steps cost seconds each
ROUNDS = {("mlp", 10): 7, ("mlp", 30): 7, ("mlp", 100): 5, ("conv", 10): 3, ("conv", 30): 2, ("conv", 100): 1}


def reference_saved_bytes(w) -> int:
    params = w.clone_params()
    with torch.no_grad():
        x = w.embed(params, w.inp)
        z = w.z_like(x)
    loss_fn = wl.one_f_loss(w)
    loss, nbytes, act, _ = measure.saved_bytes(lambda: loss_fn(params, z), exclude=wl.named_leaves(params).values())
    loss.backward()
    return nbytes, act


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("workload", ["mlp", "conv"])
def bench_train_step(deq_benchmark, make_workload, device, workload, mode, depth):
    w = make_workload(workload)
    solver = dq.Anderson(max_iter=depth, tol=0.0, m=6)
    grad_mode = MODES[mode](depth)
    params = w.clone_params()
    loss_fn = wl.ours_loss(w, solver, grad_mode)
    step = wl.TrainStep(loss_fn, params)

    # saved bytes: forward under the hooks, backward outside them
    leaves = wl.named_leaves(params).values()
    (loss, z, info), nbytes, act, n_saved = measure.saved_bytes(lambda: loss_fn(params), exclude=leaves)
    loss.backward()
    grad_norm = max(float(p.grad.norm()) for p in leaves if p.grad is not None)
    for p in leaves:
        p.grad = None
    ref, ref_act = reference_saved_bytes(w)

    step()  # warm-up (eager: the first step allocates; nothing is compiled here)
    peak = measure.PeakMemory(device)
    peak_bytes = peak(step)

    load_before = measure.load_average()
    deq_benchmark.group = "train_step"
    # one more untimed step, then the timed ones (device-synchronized; the Info each step
    # returns is recorded by the fixture: nstep, residuals, status)
    deq_benchmark.pedantic(step, rounds=ROUNDS[(workload, depth)], warmup=1)
    deq_benchmark.extra_info.update({
        "kind": "train_step", "workload": workload, "workload_source": w.source, "mode": mode,
        "depth": depth, "solver_repr": repr(solver), "grad_mode_repr": repr(grad_mode),
        "step_s": deq_benchmark.extra_info["time_s"],
        "saved_bytes": nbytes, "saved_tensors": n_saved, "one_f_saved_bytes": ref,
        "saved_ratio_to_one_f": nbytes / ref,
        "saved_bytes_excl_params": act, "one_f_saved_bytes_excl_params": ref_act,
        "saved_ratio_to_one_f_excl_params": act / ref_act,
        "grad_norm_max": grad_norm,
        "peak_bytes": peak_bytes, "peak_what": peak.what,
        "info": wl.info_summary(step.last[1]),
        "load_average": [load_before, measure.load_average()],
    })
