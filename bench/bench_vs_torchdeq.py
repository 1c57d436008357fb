"""(4) Ours vs torchdeq, one training step, alternating A/B in one process.

Same f, same initial weights (cloned), same solver (Anderson, history m=6,
30 iterations, relative tolerance 1e-6, forward and adjoint), equivalent
gradients: our ``IFT`` vs torchdeq's IFT (autograd.Function variant), our
``JFB`` vs torchdeq's 1-step phantom gradient. Before timing, both run once from
identical weights and the forward fixed point and every parameter gradient
are asserted to agree, so the ratio compares libraries, not problems.
"""

from __future__ import annotations

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

MAX_ITER, TOL, M = 30, 1e-6, 6
# "same-tol": the configuration, each library stops on its own test.
# "same-work": tol=0, both run exactly MAX_ITER iterations (library overhead only).
CONFIGS = {"same-tol": TOL, "same-work": 0.0}
ROUNDS = {"mlp": 15, "conv": 7}
# Agreement required before timing (relative 2-norm errors).
Z_RTOL = {"jfb": 1e-3, "ift": 1e-3}
GRAD_RTOL = {"jfb": 1e-2, "ift": 1e-2}


def ours_grad_mode(mode, tol):
    if mode == "ift":
        return dq.IFT(solver=dq.Anderson(max_iter=MAX_ITER, tol=tol, m=M))
    return dq.JFB()


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def check_agreement(w, mode, tol=TOL):
    """One step each from identical weights: fixed point and gradients must agree."""
    out = {}
    for lib in ("ours", "torchdeq"):
        params = w.clone_params()
        counter = [0]
        if lib == "ours":
            loss_fn = wl.ours_loss(w, dq.Anderson(max_iter=MAX_ITER, tol=tol, m=M), ours_grad_mode(mode, tol),
                                   counter=counter)
        else:
            loss_fn = wl.torchdeq_loss(w, MAX_ITER, tol, M, ift=(mode == "ift"), counter=counter)
        loss, z, info = loss_fn(params)
        forward_nfe = counter[0]
        loss.backward()
        out[lib] = {
            "z": z.detach(), "loss": float(loss.detach()),
            "grads": {k: v.grad.detach().clone() for k, v in wl.named_leaves(params).items()},
            "info": wl.info_summary(info), "forward_f_calls": forward_nfe,
            "total_f_calls": counter[0],
        }
    z_err = _rel(out["ours"]["z"], out["torchdeq"]["z"])
    g_err = {k: _rel(out["ours"]["grads"][k], out["torchdeq"]["grads"][k]) for k in out["ours"]["grads"]}
    check = {
        "z_rel_err": z_err, "grad_rel_err_max": max(g_err.values()), "grad_rel_err": g_err,
        "loss_ours": out["ours"]["loss"], "loss_torchdeq": out["torchdeq"]["loss"],
        "ours_info": out["ours"]["info"], "torchdeq_info": out["torchdeq"]["info"],
        "ours_forward_f_calls": out["ours"]["forward_f_calls"],
        "torchdeq_forward_f_calls": out["torchdeq"]["forward_f_calls"],
        "ours_f_calls_incl_backward": out["ours"]["total_f_calls"],
        "torchdeq_f_calls_incl_backward": out["torchdeq"]["total_f_calls"],
    }
    assert z_err <= Z_RTOL[mode], f"fixed points differ: {check}"
    assert check["grad_rel_err_max"] <= GRAD_RTOL[mode], f"gradients differ: {check}"
    return check


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["ift", "jfb"])
@pytest.mark.parametrize("workload", ["mlp", "conv"])
def bench_vs_torchdeq(benchmark, make_workload, timer, workload, mode, config):
    w = make_workload(workload)
    tol = CONFIGS[config]
    check = check_agreement(w, mode, tol)

    ours = wl.TrainStep(wl.ours_loss(w, dq.Anderson(max_iter=MAX_ITER, tol=tol, m=M), ours_grad_mode(mode, tol)),
                        w.clone_params())
    theirs = wl.TrainStep(wl.torchdeq_loss(w, MAX_ITER, tol, M, ift=(mode == "ift")), w.clone_params())
    for _ in range(2 if workload == "mlp" else 1):  # warm-up, both sides
        ours()
        theirs()

    ab = measure.Alternating(timer, ours, theirs)
    load_before = measure.load_average()
    benchmark.group = "vs_torchdeq"
    benchmark.pedantic(ab.round, rounds=ROUNDS[workload], iterations=1, warmup_rounds=0)

    benchmark.extra_info.update({
        "kind": "vs_torchdeq", "workload": workload, "workload_source": w.source, "mode": mode,
        "pair": f"ours {('IFT' if mode == 'ift' else 'JFB')} vs torchdeq "
                f"{('IFT' if mode == 'ift' else '1-step phantom grad')}",
        "config": f"{config} (tol={tol:g})",
        "solver": f"Anderson(m={M}, max_iter={MAX_ITER}, tol={tol:g}) forward"
                  + (" and adjoint" if mode == "ift" else ""),
        **ab.summary("ours", "torchdeq"),
        "check": check,
        "ours_last": wl.info_summary(ours.last[1]),
        "torchdeq_last": wl.info_summary(theirs.last[1]),
        "load_average": [load_before, measure.load_average()],
    })
