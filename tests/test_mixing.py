"""Anderson's mixing system: the elimination used under compile, against LAPACK and against eager."""

import pytest
import torch

from deq_functional.solvers.anderson import gauss_jordan, mixing_coefficients


def _spd_systems(batch, m, decades, seed=0):
    """``(batch, m, m)`` Gram matrices ``Q diag(σ²) Qᵀ`` (Q random orthogonal) of histories whose
    singular values σ span ``decades`` orders of magnitude, in float32 (what the solver keeps)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(batch, m, m, generator=g, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -decades, m, dtype=torch.float64)
    return ((q * sigma**2) @ q.mT).to(torch.float32)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_gauss_jordan_solves_spd_systems_like_lapack(m):
    gram = _spd_systems(200, m, decades=3).double() + 1e-3 * torch.eye(m, dtype=torch.float64)
    rhs = torch.randn(200, m, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(gram, rhs)[..., 0]
    error = (gauss_jordan(gram, rhs) - exact).norm(dim=1) / exact.norm(dim=1)  # ≤ cond(A)·ε₆₄ ≈ 1e-13
    assert float(error.max()) <= 1e-12


def test_gauss_jordan_leaves_padded_identity_rows_alone():
    """Unused slots are identity rows and columns with right-hand side 0: their unknowns are 0
    and the used block is solved as if alone."""
    block = _spd_systems(50, 3, decades=2).double() + 1e-3 * torch.eye(3, dtype=torch.float64)
    system = torch.eye(5, dtype=torch.float64).repeat(50, 1, 1)
    system[:, :3, :3] = block
    rhs = torch.zeros(50, 5, 1, dtype=torch.float64)
    rhs[:, :3] = 1.0
    w = gauss_jordan(system, rhs)
    assert torch.equal(w[:, 3:], torch.zeros(50, 2, dtype=torch.float64))
    torch.testing.assert_close(w[:, :3], torch.linalg.solve(block, rhs[:, :3])[..., 0], rtol=1e-11, atol=0.0)


@pytest.mark.parametrize("decades", [0, 2, 4, 6])
def test_compiled_and_eager_eliminations_give_the_same_float32_coefficients(decades):
    """The float64 solves by LU (eager) and by Gauss–Jordan (compiled) differ far below float32's
    resolution: the coefficients α agree bit for bit but where a float32 rounding boundary falls
    between the two float64 values (rare: at most 1 in 10⁴ here), and then by one rounding step;
    also where the ridge is all that keeps the system invertible (6 decades: Gram condition 1e12)."""
    gram = _spd_systems(4000, 6, decades, seed=decades)
    eager = mixing_coefficients(gram.double(), 6, 1e-4, torch.float32)
    h = gram.double()
    scale = h.diagonal(dim1=1, dim2=2).sum(dim=1) / 6 + torch.finfo(torch.float32).tiny
    system = h / scale[:, None, None] + (1e-4 + torch.finfo(torch.float32).eps) * torch.eye(6, dtype=torch.float64)
    w = gauss_jordan(system, torch.ones(4000, 6, 1, dtype=torch.float64))
    traced = (w / w.sum(dim=1, keepdim=True)).float()
    assert eager.dtype == torch.float32
    assert int((traced != eager).sum()) <= eager.numel() // 10_000
    assert bool(((traced - eager).abs() <= torch.finfo(torch.float32).eps * eager.abs()).all())
    torch.testing.assert_close(eager.sum(dim=1), torch.ones(4000), rtol=0, atol=1e-5)


@pytest.mark.compile
def test_mixing_coefficients_under_compile_equal_eager_for_every_slot_count():
    """Traced (a slot mask, the elimination) and eager (an int, LU) give the same α, with the ring
    filling (padded system) and full; aot_eager runs the traced graph op by op, as written."""
    gram = _spd_systems(64, 5, decades=4)
    compiled = torch.compile(mixing_coefficients, fullgraph=True, backend="aot_eager")
    for n in range(1, 6):
        mask = torch.arange(5) < n
        traced = compiled(gram.double(), mask, 1e-4, torch.float32)
        eager = mixing_coefficients(gram.double(), n, 1e-4, torch.float32)
        assert torch.equal(traced[:, :n], eager[:, :n]) and torch.equal(traced[:, n:], torch.zeros(64, 5 - n))
