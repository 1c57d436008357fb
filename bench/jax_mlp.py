"""The benchmarks' MLP training step written in JAX: the JAX arm of ``bench_vs_jax.py``.

Importing this module does not import jax (``make bench`` runs without it): `load_jax`
imports it single threaded, `make_train_step` builds the jitted step. It computes what
``workloads.TrainStep(workloads.ours_loss(mlp, Anderson(m=5, tol, max_iter), JFB() |
IFT(Anderson(same))))`` computes, on the same weights (B = 128 samples, D = 256 latent):

* ``x = flatten(inp) Uᵀ + b``: ``(B, 784) -> (B, D)``; ``f(W, z, x) = tanh(z Wᵀ + x)`` on ``(B, D)``;
* the forward solve of ``z = f(z)`` by `anderson` from ``z0 = 0``, the whole batch as one
  problem of ``N = B·D`` unknowns (``per_sample=False``: one norm over all entries),
  float32; after ``K = nstep`` iterations ``z* = f(z_K)`` (the counting rule of
  ``fixed_point``: one more application of f after the last iterate);
* ``loss = mean_b CE(z*_b Vᵀ + c, target_b)`` (``F.cross_entropy``);
* JFB: the gradient of the loss with ``z* = f(W, stop_gradient(z_K), x)``;
  IFT: a ``jax.custom_vjp``: ``u = J(z*)ᵀ u + ḡ`` (``ḡ = ∂L/∂z*``, ``J = ∂f/∂z``) by the same
  Anderson on vjps from ``u0 = 0``, ``u = g(u_K)``; then ``(∂f/∂W)ᵀ u`` and ``(∂f/∂x)ᵀ u``,
  both linearised at the output ``z* = f(z_K)``, as the library's ``_implicit.py`` does (the
  ``_adjoint.py`` it replaced linearised both at ``z_K``; in float32 the two gradients differ
  by ~5e-5 relative on this workload at tol 1e-4);
* SGD ``p ← p − lr · ∂L/∂p`` (the benchmark runs ``lr = 0``, as ``TrainStep`` does).

`anderson` is the library's Anderson (``deq_functional/solvers/anderson.py``) with its loop
(``_loop.py``) and stopping rule (``_stopping.py``) for one problem, in ``jax.lax.while_loop``;
the used history slots are a mask, as in the library's ``torch.while_loop`` driver.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

# deq_functional.Status codes, and the stopping rule's progress factor (_stopping.PROGRESS)
RUNNING, CONVERGED, MAX_ITER, DIVERGED, NONFINITE = -1, 0, 1, 2, 3
PROGRESS = 0.5

# Set before jax is first imported (see `load_jax`).
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

INSTALL_HINT = "pip install jax  (CPU wheels; or pip install -e '.[bench]')"


def available() -> bool:
    """Whether jax can be imported (without importing it)."""
    return importlib.util.find_spec("jax") is not None


def load_jax() -> Any:
    """Import jax with one XLA compute thread; return the ``jax`` module.

    Before the first import: ``XLA_FLAGS`` gets `XLA_FLAGS` appended, and ``NPROC=1`` is set
    while the CPU client is created (then restored). Measured with jaxlib 0.10.2 on 2 cores:
    with the flags alone, two pool threads share the work of one ``jit`` call evenly and a
    4096² matmul runs twice as fast as on one core (the word ``intra_op_parallelism_threads=1``
    has no leading ``--``: XLA ignores it); with ``NPROC=1``, which XLA's CPU client reads when
    it sizes its thread pools (else it uses the CPU affinity), one pool thread does 70–90 % of
    the CPU time, another XLA thread the rest, and the matmul runs at one core's speed. The
    benchmark checks the split by per-thread CPU time. A jax imported earlier is returned as it is.
    """
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if XLA_FLAGS not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAGS}".strip()
        saved = os.environ.get("NPROC")
        os.environ["NPROC"] = "1"
        try:
            import jax

            jax.devices("cpu")  # creates the CPU client (and its thread pools) now
        finally:
            if saved is None:
                del os.environ["NPROC"]
            else:
                os.environ["NPROC"] = saved
    import jax

    return jax


# ------------------------------------------------------------------- solver ----


@dataclass(frozen=True)
class Anderson:
    """The library's ``dq.Anderson(max_iter, tol, m, lam)`` with ``beta = 1``, ``atol = 0`` and the
    default divergence rule, for one problem (hashable: a static argument of ``jit``)."""

    max_iter: int
    tol: float = 1e-4
    m: int = 5
    lam: float = 1e-4
    atol: float = 0.0
    divergence_ratio: float = 1e4


class Solved(NamedTuple):
    """A finished solve: the last iterate ``z_K`` (N,), its image ``g(z_K)`` (N,), ``nstep = K``
    (int32), ``status`` (int32, a Status code) and ``rel_residual = ‖g(z_K) − z_K‖ / ‖g(z_K)‖``."""

    z: Any
    gz: Any
    nstep: Any
    status: Any
    rel_residual: Any


class _Carry(NamedTuple):
    k: Any  # () int32: iterations done
    z: Any  # (N,) iterate z_k
    gz: Any  # (N,) g(z_k)
    r: Any  # (N,) g(z_k) − z_k
    res: Any  # () ‖r‖
    scale: Any  # () ‖g(z_k)‖
    res_min: Any  # () smallest residual before this one (the divergence rule)
    status: Any  # () int32
    images: Any  # (m, N) ring buffer of g(zᵢ)
    residuals: Any  # (m, N) ring buffer of rᵢ
    gram: Any  # (m, m) Gram matrix rᵢ · rⱼ of the ring


def _converged(cfg: Anderson, res, scale, res_start=None):
    """``res ≤ atol + tol·scale`` and (after z0) ``res ≤ PROGRESS · res_start``."""
    within = res <= cfg.atol + cfg.tol * scale
    return within if res_start is None else within & (res <= PROGRESS * res_start)


def _update(cfg: Anderson, status, res, scale, res_min, res_start, eps: float):
    """The status after an iteration (``_stopping.Rule.update``): NONFINITE over CONVERGED over
    DIVERGED (``res > ratio·res_min`` and ``res > ratio·ε·scale``); only RUNNING can change."""
    import jax.numpy as jnp

    finite = (res < math.inf) & (scale < math.inf)
    diverged = (res > cfg.divergence_ratio * res_min) & (res > cfg.divergence_ratio * eps * scale)
    code = jnp.where(diverged, DIVERGED, RUNNING)
    if cfg.tol > 0 or cfg.atol > 0:
        code = jnp.where(_converged(cfg, res, scale, res_start), CONVERGED, code)
    code = jnp.where(finite, code, NONFINITE)
    return jnp.where(status == RUNNING, code, status).astype(jnp.int32)


def mixing_coefficients(gram, used, lam: float):
    r"""α minimising ``‖Σ αᵢ rᵢ‖`` s.t. ``Σ αᵢ = 1`` over the used slots (``anderson.mixing_coefficients``).

    ``gram`` (m, m) = ``H``, ``used`` (m,) bool. With ``s`` the mean of ``H``'s used diagonal,
    solve ``(H/s + (λ+ε) I) w = 1`` on the used block (unused rows / columns: the identity,
    right-hand side 0), ``α = w / Σw`` (m,), zero on unused slots.
    """
    import jax.numpy as jnp

    info = jnp.finfo(gram.dtype)
    scale = jnp.sum(jnp.where(used, jnp.diagonal(gram), 0.0)) / jnp.sum(used) + float(info.tiny)
    system = jnp.where(used[:, None] & used[None, :], gram / scale, 0.0)
    system = system + jnp.diag(jnp.where(used, lam + float(info.eps), 1.0).astype(gram.dtype))
    w = jnp.linalg.solve(system, used.astype(gram.dtype))
    return w / jnp.sum(w)


def anderson(g, z0, gz0, cfg: Anderson) -> Solved:
    r"""Anderson acceleration (type II, ``β = 1``) on ``z = g(z)``, ``z0`` and ``gz0 = g(z0)`` of shape (N,).

    Iteration k (slot ``k mod m``): write ``g(z_k)`` and ``r_k = g(z_k) − z_k`` into the rings,
    the new Gram row ``H[slot, i] = H[i, slot] = rᵢ · r_k``, α from `mixing_coefficients` over the
    ``min(k+1, m)`` used slots, ``z_{k+1} = Σ αᵢ g(zᵢ)`` (k = 0: Picard). Stops (``_stopping``)
    when ``‖r‖ ≤ atol + tol·‖g(z)‖`` (after z0 also ``‖r‖ ≤ ‖r_0‖/2``), when the residual
    diverges or is not finite, or after ``max_iter`` iterations. Cost per iteration: one ``g``,
    ``O(m N)`` and an ``m × m`` solve.
    """
    import jax
    import jax.numpy as jnp

    eps = float(jnp.finfo(z0.dtype).eps)
    norm = jnp.linalg.norm
    r0 = gz0 - z0
    res0, scale0 = norm(r0), norm(gz0)
    history = jnp.zeros((cfg.m, z0.shape[0]), z0.dtype)
    start = _Carry(
        jnp.int32(0), z0, gz0, r0, res0, scale0, res0,
        _update(cfg, jnp.int32(RUNNING), res0, scale0, jnp.inf, None, eps),
        history, history, jnp.zeros((cfg.m, cfg.m), z0.dtype),
    )

    def cond(s: _Carry):
        return (s.k < cfg.max_iter) & (s.status == RUNNING)

    def body(s: _Carry) -> _Carry:
        slot = s.k % cfg.m
        images = s.images.at[slot].set(s.gz)
        residuals = s.residuals.at[slot].set(s.r)
        row = residuals @ s.r
        gram = s.gram.at[slot, :].set(row).at[:, slot].set(row)
        alpha = mixing_coefficients(gram, jnp.arange(cfg.m) <= s.k, cfg.lam)
        z = alpha @ images
        gz = g(z)
        r = gz - z
        res, scale = norm(r), norm(gz)
        status = _update(cfg, s.status, res, scale, s.res_min, res0, eps)
        return _Carry(s.k + 1, z, gz, r, res, scale, jnp.minimum(s.res_min, res), status, images, residuals, gram)

    s = jax.lax.while_loop(cond, body, start)
    done = jnp.where(_converged(cfg, s.res, s.scale, res0), CONVERGED, MAX_ITER)
    status = jnp.where(s.status == RUNNING, done, s.status).astype(jnp.int32)
    rel = s.res / (s.scale + float(jnp.finfo(s.scale.dtype).tiny))
    return Solved(s.z, s.gz, s.k, status, rel)


# -------------------------------------------------------------------- model ----


def embed(params: dict, inp):
    """``x = flatten(inp) Uᵀ + b``: ``(B, 1, 28, 28) -> (B, D)`` (``models.mlp.embed``)."""
    return inp.reshape(inp.shape[0], -1) @ params["embed"]["weight"].T + params["embed"]["bias"]


def f(W, z, x):
    """``tanh(z Wᵀ + x)``: ``(B, D) -> (B, D)`` (``models.mlp.apply``)."""
    import jax.numpy as jnp

    return jnp.tanh(z @ W.T + x)


def readout(params: dict, z):
    """Logits ``z Vᵀ + c``: ``(B, D) -> (B, 10)`` (``models.mlp.readout``)."""
    return z @ params["readout"]["weight"].T + params["readout"]["bias"]


def cross_entropy(logits, target):
    """``F.cross_entropy(logits, target)``: mean over the batch of ``−log softmax(logits)[target]``."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))


def forward_solve(W, x, cfg: Anderson) -> Solved:
    """Anderson on ``z = f(W, z, x)`` from ``z0 = 0``, the whole ``(B, D)`` batch as one flat problem."""
    import jax.numpy as jnp

    def g(v):
        return f(W, v.reshape(x.shape), x).reshape(-1)

    z0 = jnp.zeros(x.size, x.dtype)
    return anderson(g, z0, g(z0), cfg)


def _report(sol: Solved):
    """``(nstep, status, rel_residual)`` of a solve, as float32 (3,)."""
    import jax.numpy as jnp

    return jnp.stack([sol.nstep.astype(jnp.float32), sol.status.astype(jnp.float32), sol.rel_residual])


def jfb_fixed_point(cfg: Anderson, W, x, probe):
    """``(z*, forward report)`` with JFB's gradient: ``z* = f(W, stop_gradient(z_K), x)``. ``probe``: unused
    (the IFT version's adjoint report); its gradient is 0."""
    import jax

    sol = forward_solve(jax.lax.stop_gradient(W), jax.lax.stop_gradient(x), cfg)
    z_K = jax.lax.stop_gradient(sol.z.reshape(x.shape))
    return f(W, z_K, x), _report(sol)


@functools.cache
def _ift_fixed_point():
    """Build the ``jax.custom_vjp`` ``ift(cfg, W, x, probe) -> (z*, forward report)`` (once, lazily).

    Forward: ``z* = f(W, z_K, x)``. Backward, for ``ḡ = ∂L/∂z*``: ``u = g(u_K)`` from `anderson` on
    ``u ↦ J(z*)ᵀ u + ḡ`` from ``u0 = 0`` (``g(u0) = ḡ``), then ``(∂f/∂W)ᵀ u``, ``(∂f/∂x)ᵀ u`` at ``z*``.
    ``probe`` (3,) float32 receives the adjoint solve's ``(nstep, status, rel_residual)`` as its
    "gradient": the one way to get numbers out of a backward pass under ``jit``.
    """
    import jax
    import jax.numpy as jnp

    def solve(cfg, W, x):
        sol = forward_solve(W, x, cfg)
        return f(W, sol.z.reshape(x.shape), x), _report(sol)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def ift(cfg, W, x, probe):
        return solve(cfg, W, x)

    def ift_fwd(cfg, W, x, probe):
        z_star, report = solve(cfg, W, x)
        return (z_star, report), (W, x, z_star)

    def ift_bwd(cfg, saved, cotangents):
        W, x, z_star = saved
        gbar = cotangents[0].reshape(-1)
        _, pullback = jax.vjp(f, W, z_star, x)  # f linearised at z*: one forward of f

        def g(u):
            return pullback(u.reshape(x.shape))[1].reshape(-1) + gbar

        sol = anderson(g, jnp.zeros_like(gbar), gbar, cfg)
        dW, _, dx = pullback(sol.gz.reshape(x.shape))
        return dW, dx, _report(sol)

    ift.defvjp(ift_fwd, ift_bwd)
    return ift


def make_train_step(mode: str, cfg: Anderson):
    """The jitted training step ``step(params, inp, target, lr) -> (params', loss, grads, report)``.

    ``params``: the nested dict of ``models.mlp`` (``embed.{weight (D, 784), bias (D,)}``,
    ``latent.weight (D, D)``, ``readout.{weight (10, D), bias (10,)}``), float32; ``inp``
    ``(B, 1, 28, 28)``; ``target`` ``(B,)`` int32; ``lr`` a float32 scalar.
    ``params' = params − lr · grads``; ``report = {"forward": (nstep, status, rel_residual),
    "adjoint": the same for IFT's adjoint solve, zeros for JFB}`` (float32 (3,) each).
    """
    jax = load_jax()
    import jax.numpy as jnp

    if mode not in ("jfb", "ift"):
        raise ValueError(f"make_train_step: mode must be 'jfb' or 'ift', got {mode!r}")
    fixed_point = jfb_fixed_point if mode == "jfb" else _ift_fixed_point()

    def loss_fn(params, probe, inp, target):
        x = embed(params, inp)
        z_star, forward = fixed_point(cfg, params["latent"]["weight"], x, probe)
        return cross_entropy(readout(params, z_star), target), forward

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    @jax.jit
    def step(params, inp, target, lr):
        (loss, forward), (grads, adjoint) = grad_fn(params, jnp.zeros(3, jnp.float32), inp, target)
        new = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        return new, loss, grads, {"forward": forward, "adjoint": adjoint}

    return step
