r"""A fully connected implicit network: ``z* = tanh(W z* + U d + b)``, logits ``= V z* + c``.

In the JFB paper's notation ``N(d) = S(z*)`` with ``z* = R(z*, Q(d))``:

* ``Q(d) = U · flatten(d) + b``           (``embed``;  ``(B, ...) -> (B, hidden)``)
* ``R(z, x) = tanh(W z + x)``             (``apply``;  ``(B, hidden) -> (B, hidden)``)
* ``S(z) = V z + c``                      (``readout``; ``(B, hidden) -> (B, num_classes)``)

so ``R(z, Q(d)) = tanh(W z + U d + b)``. ``tanh`` is 1-Lipschitz, hence
``Lip_z(R) ≤ ‖W‖₂``: keeping ``‖W‖₂ < 1`` (``contraction`` at init, `rescale`
during training) makes ``R`` a contraction and the fixed point unique
(Banach), which is the setting where JFB's gradient is a descent direction.

Params (nested dict of tensors):

    {"embed":   {"weight": (hidden, in_features), "bias": (hidden,)},
     "latent":  {"weight": (hidden, hidden)},
     "readout": {"weight": (num_classes, hidden), "bias": (num_classes,)}}

Examples:
    >>> import torch, deq_functional as dq
    >>> from deq_functional.models import mlp
    >>> p = mlp.init(0, in_features=64, hidden=32, num_classes=10, contraction=0.5)
    >>> x = mlp.embed(p, torch.randn(5, 64))
    >>> z, info = dq.fixed_point(mlp.apply, p, x, grad_mode="jfb")
    >>> mlp.readout(p, z).shape
    torch.Size([5, 10])

Supports: backward / grad / vmap / compile (plain tensor ops).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .._checks import check_int, check_real
from ..normalization import spectral_normalize
from ._common import check_generator, linear

__all__ = ["init", "embed", "apply", "readout", "rescale", "lipschitz_bound"]


def init(
    generator: torch.Generator | int,
    in_features: int,
    hidden: int,
    num_classes: int,
    *,
    contraction: float | None = 0.9,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Fresh parameters (torch's default ``nn.Linear`` initialisation).

    Args:
        generator: ``torch.Generator`` (or an int seed) for every random draw.
        in_features: size of a flattened input ``d``.
        hidden: width of the latent state ``z``.
        num_classes: number of logits.
        contraction: if not None, ``W`` is scaled so that ``‖W‖₂ ≤ contraction``
            (exact, by an SVD at init), making ``R`` a contraction in ``z``.
        dtype: floating dtype of every tensor.

    Returns:
        The params dict described in the module docstring (no ``requires_grad``).

    Raises:
        ValueError: a non-positive size, a bad generator, or ``contraction <= 0``.
    """
    fn = "mlp.init"
    g = check_generator(generator, fn)
    for name, value in (("in_features", in_features), ("hidden", hidden), ("num_classes", num_classes)):
        check_int(fn, name, value, 1)
    if contraction is not None:
        check_real(fn, "contraction", contraction, 0.0, open_low=True)
    W = linear(hidden, hidden, g, dtype, bias=False)["weight"]
    if contraction is not None:
        sigma = torch.linalg.matrix_norm(W.double(), ord=2).to(dtype)
        W = W * torch.clamp(contraction / sigma, max=1.0)
    return {
        "embed": linear(hidden, in_features, g, dtype),
        "latent": {"weight": W},
        "readout": linear(num_classes, hidden, g, dtype),
    }


def embed(params: dict, d: torch.Tensor) -> torch.Tensor:
    """``Q(d) = U · flatten(d) + b``: ``(B, *in_shape) -> (B, hidden)``.

    Raises:
        ValueError: the flattened input size is not ``in_features``.
    """
    U = params["embed"]["weight"]
    flat = rearrange(d, "b ... -> b (...)")
    if flat.shape[1] != U.shape[1]:
        raise ValueError(
            f"mlp.embed: expected inputs with {U.shape[1]} features per sample, got shape {tuple(d.shape)}"
        )
    return flat @ U.T + params["embed"]["bias"]


def apply(params: dict, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``R(z, x) = tanh(W z + x)``, row-wise on ``(B, hidden)`` (the ``f`` of ``fixed_point``)."""
    return torch.tanh(z @ params["latent"]["weight"].T + x)


def readout(params: dict, z: torch.Tensor) -> torch.Tensor:
    """``S(z) = V z + c``: ``(B, hidden) -> (B, num_classes)``."""
    return z @ params["readout"]["weight"].T + params["readout"]["bias"]


def lipschitz_bound(params: dict) -> torch.Tensor:
    """``‖W‖₂`` (exact, by SVD): an upper bound on ``Lip_z(R)``; below 1 means contraction."""
    return torch.linalg.matrix_norm(params["latent"]["weight"].detach(), ord=2)


def rescale(
    params: dict,
    bound: float = 0.9,
    *,
    n_iter: int = 1,
    state: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict, dict]:
    """Keep ``R`` a contraction: ``W ← W · min(1, bound / σ̂(W))`` (spectral rescaling).

    A pure function on the params pytree, built on
    `deq_functional.normalization.spectral_normalize` (power iteration; pass the
    returned ``state`` back each step so one iteration per step tracks ``σ_max``).
    Use it inside the loss (reparametrisation: gradients flow to the raw ``W``) or
    after each optimiser step under ``torch.no_grad()`` (projection, as the JFB paper does).

    Args:
        params: this model's params (not modified).
        bound: target bound on ``‖W‖₂`` (> 0).
        n_iter: power-iteration steps (see ``spectral_normalize``).
        state: the power-iteration state a previous call returned, or None.
        generator: seeds the start vector when ``state`` is None.

    Returns:
        ``(new_params, state)``; ``new_params`` shares every other leaf with ``params``.
    """
    return spectral_normalize(params, ["latent.weight"], bound=bound, n_iter=n_iter, state=state, generator=generator)
