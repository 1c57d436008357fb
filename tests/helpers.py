"""Problem zoo with known answers, shared by the tests."""

from __future__ import annotations

import torch

from deq_functional.solvers import SOLVERS

SOLVER_CLASSES = SOLVERS  # name -> solver class: the library's registry, so every solver it lists is tested


def contractive_matrix(
    n: int, rho: float, *, dtype=torch.float64, seed: int = 0, symmetric: bool = False
) -> torch.Tensor:
    """Random ``(n, n)`` matrix with spectral norm ``rho`` (spectral radius ``rho`` if symmetric)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    if symmetric:
        A = A + A.T
    return rho * A / torch.linalg.matrix_norm(A, ord=2)


def linear_f(p, z, x):
    """``f(z) = z Aᵀ + x`` row-wise: the fixed point is ``z* = (I − A)⁻¹ x`` per row."""
    return z @ p["A"].T + x


def linear_solution(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Closed form ``z* = x (I − A)⁻ᵀ`` for :func:`linear_f` (differentiable in A and x)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(eye - A, x.T).T


def quintic_f(p, y, d):
    """The JFB paper's toy ``y = d + y⁵`` (contractive for |d| ≤ 0.4 near its small root)."""
    return d + y**5


def tanh_params(n: int, m: int, *, dtype=torch.float64, seed: int = 0, rho: float = 0.6) -> dict:
    """Parameters of :func:`tanh_f`: a contractive ``W (n,n)``, ``U (n,m)``, ``b (n,)``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W": contractive_matrix(n, rho, dtype=dtype, seed=seed),
        "U": torch.randn(n, m, generator=g, dtype=dtype) / m**0.5,
        "b": 0.1 * torch.randn(n, generator=g, dtype=dtype),
    }


def tanh_f(p, z, x):
    """A tanh DEQ layer ``z ← tanh(z Wᵀ + x Uᵀ + b)``."""
    return torch.tanh(z @ p["W"].T + x @ p["U"].T + p["b"])


def tuple_f(p, z, x):
    """Two-resolution state ``(z1 (B,n), z2 (B,n/2))`` coupled through pooling/upsampling."""
    z1, z2 = z
    up = z2.repeat_interleave(2, dim=1)
    down = 0.5 * (z1[:, ::2] + z1[:, 1::2])
    return torch.tanh(z1 @ p["W1"].T + 0.3 * up + x), torch.tanh(z2 @ p["W2"].T + 0.3 * down)


def tuple_params(n: int, *, dtype=torch.float64, seed: int = 0) -> dict:
    return {
        "W1": contractive_matrix(n, 0.4, dtype=dtype, seed=seed),
        "W2": contractive_matrix(n // 2, 0.4, dtype=dtype, seed=seed + 1),
    }


def hard_sample_f(p, z, x):
    """Per-sample contraction ``z_i ← a_i tanh(z_i) + x_i``; ``a = p["a"]`` of shape ``(B, 1)``.
    Samples with ``a_i`` near 1 converge slowly."""
    return p["a"] * torch.tanh(z) + x


def loss_weights(shape, *, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """A fixed random cotangent so losses ``(z * c).sum()`` probe every output."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


EXAMPLES_EXTRA = ("torchvision", "matplotlib", "tqdm", "sklearn", "mlxtend")


def examples_extra_missing() -> list[str]:
    """The modules of the ``examples`` extra that are not installed."""
    import importlib.util

    return [m for m in EXAMPLES_EXTRA if importlib.util.find_spec(m) is None]


def require_examples_extra() -> None:
    """Skip the calling test module (at collection) unless the ``examples`` extra is installed."""
    import pytest

    missing = examples_extra_missing()
    if missing:
        reason = f"needs the examples extra ({', '.join(missing)} missing): pip install -e '.[examples]'"
        pytest.skip(reason, allow_module_level=True)
