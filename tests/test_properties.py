"""Property-based: random affine maps, pytree states, dtypes, per-sample and vmap solves.

For ``f(z) = A z + b`` the fixed point is ``z* = (I − A)⁻¹ b`` and, for any iterate,
``z − z* = −(I − A)⁻¹ (f(z) − z)``. So after K iterations the returned ``z_star = f(z_K)``
satisfies ``‖z_star − z*‖ ≤ ‖A‖₂ ‖(I − A)⁻¹‖₂ · residual`` — an independent oracle that
holds for contractive and expansive maps alike. Every case checks: a problem labelled
CONVERGED is at the right point (within that bound) and passes the stopping rule; a
contractive one is CONVERGED or MAX_ITER, never DIVERGED or NONFINITE.
"""

import torch
from helpers import SOLVER_CLASSES, contractive_matrix
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import deq_functional as dq

S = dq.Status
KINDS = ("tensor", "tuple", "dict")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
CASES = settings(max_examples=700, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def build(kind, leaves):
    """The state pytree of ``kind`` from a list of leaves."""
    if kind == "tensor":
        return leaves[0]
    if kind == "tuple":
        return tuple(leaves)
    return {f"part{i}": t for i, t in enumerate(leaves)}


def leaves_of(kind, tree):
    """Inverse of :func:`build` (written out, not through the library's pytree helpers)."""
    if kind == "tensor":
        return [tree]
    if kind == "tuple":
        return list(tree)
    return [tree[f"part{i}"] for i in range(len(tree))]


def affine_map(kind, sizes):
    """``f(p, z, x) = A z + x`` row-wise on the concatenation of the state's leaves."""

    def f(p, z, x):
        zc = torch.cat(leaves_of(kind, z), dim=-1)
        out = zc @ p["A"].T + torch.cat(leaves_of(kind, x), dim=-1)
        return build(kind, list(torch.split(out, sizes, dim=-1)))

    return f


@CASES
@given(
    solver=st.sampled_from(sorted(SOLVER_CLASSES)),
    kind=st.sampled_from(KINDS),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    batch=st.integers(1, 3),
    rho=st.floats(0.05, 1.6),
    dtype=st.sampled_from(DTYPES),
    per_sample=st.booleans(),
    mapped=st.sampled_from(["no", "z0 batched", "z0 unbatched"]),
    max_iter=st.integers(1, 40),
    seed=st.integers(0, 10_000),
)
def test_affine_maps_are_labelled_truthfully(solver, kind, sizes, batch, rho, dtype, per_sample, mapped, max_iter, seed):
    sizes = sizes[:1] if kind == "tensor" else sizes
    n = sum(sizes)
    A64 = contractive_matrix(n, rho, seed=seed)  # spectral norm rho (> 1: expansive)
    assume(float(torch.linalg.cond(torch.eye(n, dtype=torch.float64) - A64)) < 1e8)  # a unique fixed point
    inv = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - A64)
    bound = float(torch.linalg.matrix_norm(A64, ord=2) * torch.linalg.matrix_norm(inv, ord=2))
    b64 = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    exact = b64 @ inv.T
    f = affine_map(kind, sizes)
    split = lambda t: build(kind, list(torch.split(t.to(dtype), sizes, dim=-1)))  # noqa: E731
    x, z0 = split(b64), split(torch.zeros(batch, n, dtype=torch.float64))
    options = dict(solver=SOLVER_CLASSES[solver](max_iter=max_iter, tol=TOL[dtype]), grad_mode="jfb")
    params = {"A": A64.to(dtype)}

    if mapped == "no":
        z, info = dq.fixed_point(f, params, x, z0=z0, per_sample=per_sample, **options)
    elif mapped == "z0 batched":
        z, info = torch.func.vmap(lambda xi, zi: dq.fixed_point(f, params, xi, z0=zi, per_sample=per_sample, **options))(x, z0)
    else:
        z0_one = split(torch.zeros(n, dtype=torch.float64))
        z, info = torch.func.vmap(lambda xi: dq.fixed_point(f, params, xi, z0=z0_one, per_sample=per_sample, **options))(x)

    problems = batch if (per_sample or mapped != "no") else 1
    assert info.status.shape == ((problems,) if problems > 1 or per_sample or mapped != "no" else ())
    assert torch.equal(info.converged, info.status == int(S.CONVERGED))
    z_flat = torch.cat([t.double() for t in leaves_of(kind, z)], dim=-1).reshape(problems, -1)
    err = (z_flat - exact.reshape(problems, -1)).norm(dim=1)
    status = info.status.reshape(-1).tolist()
    residual = info.residual.double().reshape(-1)
    rounding = 200 * torch.finfo(dtype).eps * (1 + bound) * (1 + exact.reshape(problems, -1).norm(dim=1))
    for i, code in enumerate(status):
        if rho < 0.999:
            assert code in (S.CONVERGED, S.MAX_ITER), (i, code)
        if code == S.CONVERGED:
            assert float(info.rel_residual.reshape(-1)[i]) <= TOL[dtype] * (1 + 1e-3)
            assert float(err[i]) <= bound * float(residual[i]) * 1.01 + float(rounding[i]), (i, float(err[i]))
        elif code == S.MAX_ITER:
            assert int(info.nstep.reshape(-1)[i]) == max_iter


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    solver=st.sampled_from(sorted(SOLVER_CLASSES)),
    growth=st.floats(1.5, 4.0),
    batch=st.integers(1, 4),
    per_sample=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_maps_without_a_fixed_point_are_never_converged(solver, growth, batch, per_sample, dtype, seed):
    """``z ← growth·z + 1 + z²/10`` on positive iterates has no real fixed point for growth ≥ 1.5:
    whatever the solver does, the answer is DIVERGED, NONFINITE (raised eagerly) or MAX_ITER."""
    x = 1.0 + torch.rand(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def f(p, z, x):
        return growth * z.abs() + x + 0.1 * z * z

    try:
        _, info = dq.fixed_point(f, {}, x, solver=SOLVER_CLASSES[solver](max_iter=60), per_sample=per_sample)
    except dq.FixedPointError as err:
        assert "non-finite" in str(err)
        return
    assert not bool(info.converged.any())
    assert set(info.status.reshape(-1).tolist()) <= {int(S.DIVERGED), int(S.MAX_ITER)}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), m=st.integers(1, 6), seed=st.integers(0, 100), rho=st.floats(0.0, 0.9))
def test_anderson_never_produces_nan_from_an_exact_fixed_point(n, m, seed, rho):
    A = contractive_matrix(n, rho, seed=seed) if rho > 0 else torch.zeros(n, n, dtype=torch.float64)
    x = torch.zeros(2, n, dtype=torch.float64)
    f = lambda p, z, x: z @ p["A"].T + x  # noqa: E731  (z* = 0 = z0: zero residual throughout)
    z, info = dq.fixed_point(f, {"A": A}, x, solver=dq.Anderson(m=m, max_iter=5, tol=0.0))
    assert torch.equal(z, torch.zeros_like(z)) and int(info.nstep) == 5
