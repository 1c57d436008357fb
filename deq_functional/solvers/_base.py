"""What every solver shares: the budget/tolerance fields, their validation, and ``__call__``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .._loop import iterate
from .._tree import describe, same_layout


def check_int(owner: str, name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")


def check_real(owner: str, name: str, value: Any, low: float, high: float, *, open_low: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real in ``(low, high]`` / ``[low, high]``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"{owner}: {name} must be a real number in {interval}, got {value!r}")


@dataclass(frozen=True)
class Solver:
    """Base of the fixed-point solvers: a frozen set of hyperparameters, no problem inside.

    Attributes:
        max_iter: iteration budget K_max (>= 1).
        tol: stop when ``rel_residual <= tol``; ``0.0`` runs exactly ``max_iter`` iterations.
        return_best: (keyword only) return the iterate with the lowest residual seen
            (per sample with ``per_sample=True``) instead of the last; ``info.best_step``
            says which iteration it came from.
    """

    max_iter: int = 50
    tol: float = 1e-5
    return_best: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "max_iter", self.max_iter, 1)
        check_real(owner, "tol", self.tol, 0.0, math.inf, open_low=False)
        if not isinstance(self.return_best, bool):
            raise ValueError(f"{owner}: return_best must be a bool, got {self.return_best!r}")

    def __call__(self, g: Callable[[Any], Any], z0: Any, *, per_sample: bool = False, trace: bool = False):
        """Find a fixed point ``z = g(z)`` from ``z0`` (a tensor or pytree of tensors).

        Returns ``(g(z_K), info)``: one more application of ``g`` after the last
        iterate ``z_K`` (see ``Info``). No gradient mode is attached: call it under
        ``torch.no_grad()`` unless you mean to backpropagate through the iterations.
        """
        gz0 = g(z0)
        if not same_layout(gz0, z0):
            raise ValueError(
                f"{type(self).__name__}: g(z) must return the structure and shapes of z; "
                f"got {describe(gz0)} for z0 = {describe(z0)}"
            )
        out = iterate(self, g, z0, gz0, per_sample=per_sample, trace=trace)
        return out.gz, out.info

    # Solver protocol on (B, D) matrices, implemented by subclasses.
    def init(self, z, gz):  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, state, z, gz, k: int):  # pragma: no cover - abstract
        raise NotImplementedError
