"""The stopping rule: when a problem has converged, run away, or gone non-finite.

With ``r = ‖f(z) − z‖`` and ``s = ‖f(z)‖`` (row norms of the ``(B, D)`` state, in
float32 for half-precision states), checked after every iteration, per problem:

* NONFINITE when ``r`` or ``s`` is NaN/Inf (a non-finite iterate, or a norm that
  overflowed: overflow never passes for convergence);
* DIVERGED when ``r > divergence_ratio · max(r_min, ε·s)``, ``r_min`` the smallest
  residual seen so far and ε the dtype's epsilon (the floor keeps rounding noise around
  an exact fixed point, where ``r_min = 0``, from counting as growth). A residual that
  grows geometrically by a factor ``q`` per iteration is stopped after
  ``log(divergence_ratio) / log(q)`` iterations: 14 for ``q = 2`` with the default 1e4.
  For float16 iterates the ratio is capped at ``√65504 ≈ 256`` (`Rule.for_state`): from
  O(1) values float16 overflows after ~16 doublings, so 1e4 would stop too late; 256 stops
  a doubling residual at step 8, 3–4 doublings before the overflow;
* CONVERGED when ``r <= atol + tol · s`` and, after iteration 0, ``r <= r₀ / 2`` with
  ``r₀`` the residual of ``z0`` (only checked while iterating when ``tol > 0`` or
  ``atol > 0``; ``tol = atol = 0`` runs the whole budget). The second condition keeps a
  relative residual that shrank only because ``‖f(z)‖`` grew from counting:
  ``f(z) = z + 1`` keeps ``r = r₀`` however large the solver makes ``|z|``;
* otherwise it keeps running; when the budget ends it is MAX_ITER (or CONVERGED if
  the rule holds at the last iterate, e.g. an exact fixed point with ``tol = 0``).

A problem that stops is frozen: its iterate, residual and ``nstep`` no longer change.
So a map with no fixed point (``f(z) = z + 1``) is never CONVERGED: its residual never
halves. (A ``z0`` that already meets the tolerance is accepted at iteration 0.) A problem
that converges only after its residual halved needs nothing more: from ``z0 = 0`` that
is every ordinary solve; a warm start whose residual is already within 2× of the
tolerance may take a few iterations more than the relative test alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._info import Status

RUNNING = -1  # internal status code of a problem still iterating


class Rule(NamedTuple):
    """The static numbers of the stopping rule (Python floats: constants under compile)."""

    tol: float
    atol: float
    divergence_ratio: float

    def for_state(self, dtype: torch.dtype) -> Rule:
        """This rule for iterates of ``dtype``: a finite ``divergence_ratio`` is capped at the
        square root of the dtype's largest value (binding for float16 only: 256), so that a
        residual growing from O(1) is stopped well before the iterates overflow."""
        if math.isinf(self.divergence_ratio):
            return self
        return self._replace(divergence_ratio=min(self.divergence_ratio, math.sqrt(torch.finfo(dtype).max)))

    @property
    def stops_early(self) -> bool:
        """False for ``tol = atol = 0``: run exactly ``max_iter`` iterations."""
        return self.tol > 0 or self.atol > 0

    def converged(self, res, scale, res_start=None):
        """``res <= atol + tol · scale`` and, given the first residual ``res_start`` (any iterate
        after ``z0``), ``res <= res_start / 2``; False for non-finite inputs. Tensors or Python floats."""
        within = res <= self.atol + self.tol * scale
        # the 0.5 is a literal, not a module constant: Dynamo with dynamic=True turns a global
        # float into a graph input, which it then fails to lift into a while_loop body
        return within if res_start is None else within & (res <= 0.5 * res_start)

    def _verdict(self, res, scale, res_min, eps: float):
        """``(finite, diverged)`` after an iteration; tensors, or Python floats for the eager
        single-problem driver, which classifies on the host (same tests, one definition)."""
        finite = (res < math.inf) & (scale < math.inf)  # NaN compares False too
        diverged = (res > self.divergence_ratio * res_min) & (res > self.divergence_ratio * eps * scale)
        return finite, diverged

    def update(
        self, status: torch.Tensor, res: torch.Tensor, scale: torch.Tensor, res_min: torch.Tensor,
        res_start: torch.Tensor | None,
    ) -> torch.Tensor:
        """New status codes after an iteration (``res_start`` None: the status of ``z0`` itself);
        only problems still RUNNING can change."""
        finite, diverged = self._verdict(res, scale, res_min, torch.finfo(res.dtype).eps)
        code = torch.where(diverged, int(Status.DIVERGED), RUNNING)
        if self.stops_early:
            code = torch.where(self.converged(res, scale, res_start), int(Status.CONVERGED), code)
        code = torch.where(finite, code, int(Status.NONFINITE))
        return torch.where(status == RUNNING, code, status)

    def update_host(self, status: int, res: float, scale: float, res_min: float, res_start: float | None,
                    eps: float) -> int:
        """`update` for one problem whose numbers were read on the host."""
        if status != RUNNING:
            return status
        finite, diverged = self._verdict(res, scale, res_min, eps)
        if not finite:
            return int(Status.NONFINITE)
        if self.stops_early and self.converged(res, scale, res_start):
            return int(Status.CONVERGED)
        return int(Status.DIVERGED) if diverged else RUNNING

    def initial(self, res: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Status of ``z0`` itself (it may already be converged, or non-finite)."""
        status = torch.full(res.shape, RUNNING, dtype=torch.int64, device=res.device)
        return self.update(status, res, scale, torch.full_like(res, torch.inf), None)

    def final(self, status: torch.Tensor, res: torch.Tensor, scale: torch.Tensor, res_start: torch.Tensor) -> torch.Tensor:
        """Status when the loop ends: problems still RUNNING become CONVERGED or MAX_ITER."""
        done = torch.where(self.converged(res, scale, res_start), int(Status.CONVERGED), int(Status.MAX_ITER))
        return torch.where(status == RUNNING, done, status)
