"""Property-based: random contractive maps, shapes, pytree structures, dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deq_functional as dq
from helpers import SOLVER_CLASSES, contractive_matrix

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def _structure(kind, leaves):
    if kind == "tensor":
        return leaves[0]
    if kind == "tuple":
        return tuple(leaves)
    if kind == "dict":
        return {f"k{i}": t for i, t in enumerate(leaves)}
    return [leaves[0], {"inner": tuple(leaves[1:])}]


def _leaves(kind, tree):
    return dq._tree.flatten(tree)[0]


@SETTINGS
@given(
    solver=st.sampled_from(sorted(SOLVER_CLASSES)),
    kind=st.sampled_from(["tensor", "tuple", "dict", "nested"]),
    sizes=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    batch=st.integers(1, 3),
    rho=st.floats(0.1, 0.8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 1000),
    per_sample=st.booleans(),
)
def test_linear_pytree_problems_converge_and_ift_matches_the_closed_form(solver, kind, sizes, batch, rho, dtype, seed, per_sample):
    if kind == "tensor":
        sizes = sizes[:1]
    n = sum(sizes)
    A = contractive_matrix(n, rho, dtype=torch.float64, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x_flat = torch.randn(batch, n, generator=g, dtype=dtype)
    c_flat = torch.randn(batch, n, generator=g, dtype=dtype)
    split = lambda t: list(torch.split(t, sizes, dim=1))  # noqa: E731
    x = _structure(kind, split(x_flat))

    def f(p, z, x):  # z ← A z + x on the concatenation of the leaves
        zc = torch.cat(_leaves(kind, z), dim=1)
        return _structure(kind, split(zc @ p["A"].T + torch.cat(_leaves(kind, x), dim=1)))

    tol = 1e-5 if dtype == torch.float32 else 1e-11
    A_ = A.clone().requires_grad_()
    z, info = dq.fixed_point(f, {"A": A_}, x, solver=SOLVER_CLASSES[solver](max_iter=500, tol=tol), per_sample=per_sample)
    assert bool(info.converged.all())
    assert info.nstep.shape == ((batch,) if per_sample else ())
    z_flat = torch.cat(_leaves(kind, z), dim=1)
    assert z_flat.dtype == dtype
    eye = torch.eye(n, dtype=torch.float64)
    exact = torch.linalg.solve(eye - A.double(), x_flat.double().T).T
    scale = 50 * tol * (1 + exact.abs().max())
    torch.testing.assert_close(z_flat.double(), exact, atol=scale, rtol=0)
    (z_flat * c_flat).sum().backward()
    # IFT closed form: dL/dA = uᵀ z* with u = c (I − A)⁻¹
    u = torch.linalg.solve(eye - A.double().T, c_flat.double().T).T
    expected = u.T @ exact
    torch.testing.assert_close(A_.grad.double(), expected, atol=100 * tol * (1 + expected.abs().max()), rtol=0)


@SETTINGS
@given(n=st.integers(1, 6), m=st.integers(1, 6), seed=st.integers(0, 100), rho=st.floats(0.0, 0.9))
def test_anderson_never_produces_nan_from_an_exact_fixed_point(n, m, seed, rho):
    A = contractive_matrix(n, rho, seed=seed) if rho > 0 else torch.zeros(n, n, dtype=torch.float64)
    x = torch.zeros(2, n, dtype=torch.float64)
    f = lambda p, z, x: z @ p["A"].T + x  # noqa: E731  (z* = 0 = z0: zero residual throughout)
    z, info = dq.fixed_point(f, {"A": A}, x, solver=dq.Anderson(m=m, max_iter=5, tol=0.0))
    assert torch.equal(z, torch.zeros_like(z)) and int(info.nstep) == 5
