"""(8) IFT's adjoint solver: Picard vs Anderson vs GMRES in one training step, one process.

On each workload (``mlp``, ``conv``) the same training step (``workloads.TrainStep`` of
``workloads.ours_loss``, SGD with lr=0) with ``grad_mode=dq.IFT(solver=S)``; the forward solver
is ``Anderson(m=5, tol=1e-6, max_iter=100)`` in every arm, and S is one of ``ADJOINT``:
``Picard(tol=1e-6, max_iter=100)``, ``Anderson(m=5, tol=1e-6, max_iter=100)`` (the same solver
as the forward, what ``IFT()`` without a solver does) and ``GMRES(tol=1e-6, max_iter=100,
restart=20)``. float32, the whole batch one problem (``per_sample=False``).

Before timing, one step per adjoint solver from the same weights (a copy each): the forward
``nstep`` and status must be the same in every arm; the adjoint's ``nstep``, status and relative
residual are read by ``measure.record_solves`` (IFT's adjoint solve has no ``Info`` of its own);
the gradients of every parameter are compared pairwise, max over leaves of
``‖a − b‖∞ / ‖b‖∞``, and must agree to ``GRAD_RTOL`` between the arms whose adjoint converged
(an arm whose adjoint did not converge is reported, not asserted).

Timing (``measure.Rotating``: each round times every arm once, starting one arm later each
round; wall clock, ``measure.Timer``, device-synchronised):

- ``<solver>/backward``: the forward (embed, solve, readout, loss) untimed, then only
  ``loss.backward()`` timed: readout's backward, the adjoint solve, one vjp to the weights
  and the embedding's backward;
- ``<solver>/step``: the whole step (zero_grad, forward, backward, SGD update).
"""

from __future__ import annotations

import measure
import pytest
import torch
import workloads as wl

import deq_functional as dq

TOL, M, MAX_ITER, RESTART = 1e-6, 5, 100, 20
FORWARD = dq.Anderson(m=M, tol=TOL, max_iter=MAX_ITER)
ADJOINT = {
    "picard": dq.Picard(tol=TOL, max_iter=MAX_ITER),
    "anderson": dq.Anderson(m=M, tol=TOL, max_iter=MAX_ITER),
    "gmres": dq.GMRES(tol=TOL, max_iter=MAX_ITER, restart=RESTART),
}
ROUNDS = {"mlp": 40, "conv": 25}
GRAD_RTOL = 1e-4  # float32, tol 1e-6 (measured ~4e-7 mlp, ~4e-6 conv)


def grad_diff(a: dict, b: dict) -> dict:
    """Per leaf ``‖a − b‖∞ / ‖b‖∞``, and the max over leaves."""
    per = {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b}
    return {"max_rel_inf": max(per.values()), "per_leaf_inf": per}


def _backward_arm(loss_fn, params):
    """``(setup, fn)`` for ``measure.Rotating``: the forward untimed, ``loss.backward()`` timed."""
    leaves = list(wl.named_leaves(params).values())

    def forward():
        for p in leaves:
            p.grad = None
        loss, _, _ = loss_fn(params)
        return loss

    return forward, torch.Tensor.backward


@pytest.mark.parametrize("workload", ["mlp", "conv"])
def bench_adjoint(benchmark, make_workload, timer, workload):
    w = make_workload(workload)
    steps, backward, check = {}, {}, {"adjoint": {}, "forward": {}, "loss": {}}
    grads = {}
    for name, solver in ADJOINT.items():
        params = w.clone_params()
        loss_fn = wl.ours_loss(w, FORWARD, dq.IFT(solver=solver))
        step = steps[name] = wl.TrainStep(loss_fn, params)
        with measure.record_solves() as rec:
            step()
        adjoint = rec.adjoint()
        assert adjoint is not None, f"{name}: the adjoint solve was not observed (deq_functional._solve changed?)"
        loss, info = step.last
        check["adjoint"][name] = adjoint
        check["forward"][name] = wl.info_summary(info)
        check["loss"][name] = float(loss)
        grads[name] = {k: v.grad.detach().clone() for k, v in wl.named_leaves(params).items()}
        backward[name] = _backward_arm(loss_fn, params)

    fwd = {name: (f["nstep"], f["status"]) for name, f in check["forward"].items()}
    assert len(set(fwd.values())) == 1, f"forward solves ended differently (nstep, status): {fwd}"
    names = list(ADJOINT)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    check["grad_diff"] = {f"{a}_vs_{b}": grad_diff(grads[a], grads[b]) for a, b in pairs}
    converged = {n for n in names if check["adjoint"][n]["status"] == "CONVERGED"}
    check["adjoint_converged"] = sorted(converged)
    for a, b in pairs:
        if a in converged and b in converged:
            d = check["grad_diff"][f"{a}_vs_{b}"]["max_rel_inf"]
            assert d <= GRAD_RTOL, f"{a} vs {b}: gradients differ by {d:.2e} > {GRAD_RTOL:g}: {check}"

    arms = {}
    for name in names:
        arms[f"{name}/backward"] = backward[name]
        arms[f"{name}/step"] = steps[name]
    for _ in range(2):  # untimed warm-up of every arm
        for arm in arms.values():
            if isinstance(arm, tuple):
                arm[1](arm[0]())
            else:
                arm()

    rot = measure.Rotating(timer, arms)
    load_before = measure.load_average()
    benchmark.group = "adjoint"
    benchmark.pedantic(rot.round, rounds=ROUNDS[workload], iterations=1, warmup_rounds=0)
    s = {arm: measure.stats(v) for arm, v in rot.samples.items()}
    benchmark.extra_info.update({
        "kind": "adjoint", "workload": workload, "workload_source": w.source,
        "forward_solver": f"Anderson(m={M}, tol={TOL:g}, max_iter={MAX_ITER})",
        "adjoint_solvers": {"picard": f"Picard(tol={TOL:g}, max_iter={MAX_ITER})",
                            "anderson": f"Anderson(m={M}, tol={TOL:g}, max_iter={MAX_ITER})",
                            "gmres": f"GMRES(tol={TOL:g}, max_iter={MAX_ITER}, restart={RESTART})"},
        "forward_solver_repr": repr(FORWARD),
        "adjoint_solver_repr": {n: repr(solver) for n, solver in ADJOINT.items()},
        "clock": timer.description,
        "rounds": ROUNDS[workload],
        "arms": {n: {
            "backward_s": s[f"{n}/backward"], "step_s": s[f"{n}/step"],
            "adjoint": check["adjoint"][n], "forward": check["forward"][n],
            # per round, this arm ÷ the Anderson adjoint (IFT's default: the forward solver)
            "backward_ratio_over_anderson": rot.ratio(f"{n}/backward", "anderson/backward"),
            "step_ratio_over_anderson": rot.ratio(f"{n}/step", "anderson/step"),
        } for n in names},
        "check": check,
        "grad_rtol": GRAD_RTOL,
        "load_average": [load_before, measure.load_average()],
    })
