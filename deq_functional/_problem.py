"""The problem ``z = f(params, z, x)`` as one object: input checks, detached and differentiable maps."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ._info import FixedPointError
from ._loop import values_readable
from ._tree import TreeSpec, describe, dtype_name, flatten, same_layout, unflatten

ON_NONCONVERGENCE = ("ignore", "warn", "raise")


class FixedPointWarning(RuntimeWarning):
    """A fixed-point or adjoint solve stopped before reaching its tolerance."""


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _autocast_dtypes(device_type: str) -> set:
    """The lower-precision dtype autocast may produce on ``device_type`` (empty when it is off)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return {torch.get_autocast_dtype(device_type)}
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 signatures
        pass
    return set()


class Problem:
    """``f``, ``params`` and ``x`` of one ``fixed_point`` call, plus the settings its backward needs.

    Tensor leaves of params and x are kept as flat lists so the adjoint
    ``autograd.Function`` can receive each one as an input (the torch.func rule).
    """

    def __init__(self, f: Callable, params: Any, x: Any, *, solver, per_sample: bool, on_nonconvergence: str):
        self.f, self.solver, self.per_sample = f, solver, per_sample
        self.on_nonconvergence = on_nonconvergence
        self.param_leaves, self.param_spec = flatten(params)
        self.x_leaves, self.x_spec = flatten(x)
        self.z_spec: TreeSpec | None = None
        self.z_spec_size = 0  # number of leaves of z, a Python int (static under compile)

    # -- the maps -----------------------------------------------------------------
    def call(self, param_leaves: list, z: Any, x_leaves: list) -> Any:
        """``f(params, z, x)`` from flat leaves, output cast like z (see :meth:`match_dtypes`)."""
        out = self.f(unflatten(self.param_spec, param_leaves), z, unflatten(self.x_spec, x_leaves))
        return self.match_dtypes(out, z)

    def match_dtypes(self, out: Any, z: Any) -> Any:
        """Cast each leaf of ``out`` to the dtype of the matching z leaf: a no-op except under
        autocast, where f may return the autocast dtype. A single tensor takes a fast path."""
        if isinstance(out, torch.Tensor) and isinstance(z, torch.Tensor) and self.z_spec_size == 1:
            return out if out.dtype == z.dtype else out.to(z.dtype)
        out_leaves, spec = flatten(out)
        if spec != self.z_spec:  # only after check_output: f changed its output between calls
            raise ValueError(f"fixed_point: f returned {describe(out)} on a later call; the structure must not change")
        return unflatten(spec, [o.to(t.dtype) for o, t in zip(out_leaves, flatten(z)[0])])

    def leaves(self, detached: bool) -> tuple[list, list]:
        """Param and x leaves, detached (forward solve: no graph) or as given (gradient path)."""
        if not detached:
            return self.param_leaves, self.x_leaves
        return [_detach(t) for t in self.param_leaves], [_detach(t) for t in self.x_leaves]

    def raw(self, z: Any, detached: bool) -> Any:
        """``f(params, z, x)`` exactly as the user's f returns it (for :meth:`check_output`)."""
        p, x = self.leaves(detached)
        return self.f(unflatten(self.param_spec, p), z, unflatten(self.x_spec, x))

    def map(self, detached: bool) -> Callable[[Any], Any]:
        """``z ↦ f(params, z, x)``; ``detached=True`` detaches params and x (the forward
        solve builds no graph), ``False`` tracks gradients to them."""
        p, x = self.leaves(detached)
        params, inputs = unflatten(self.param_spec, p), unflatten(self.x_spec, x)
        return lambda z: self.match_dtypes(self.f(params, z, inputs), z)

    # -- validation ----------------------------------------------------------------
    def check_output(self, out: Any, z: Any, z0_given: bool, x: Any) -> None:
        """Raise ``ValueError`` unless ``out = f(params, z, x)`` matches ``z`` in structure, shape, dtype."""
        z_leaves, self.z_spec = flatten(z)
        self.z_spec_size = len(z_leaves)
        if not same_layout(out, z):
            if not z0_given:
                raise ValueError(
                    "fixed_point: z0 is None, so z starts as zeros shaped like x, "
                    f"x = {describe(x)}; but f(params, z, x) returned {describe(out)}. "
                    "The structures differ: pass z0=... shaped like f's output."
                )
            raise ValueError(
                "fixed_point: f(params, z, x) must return the structure and shapes of z; "
                f"got {describe(out)} for z = {describe(z)}"
            )
        for o, t in zip(flatten(out)[0], z_leaves):
            if o.dtype != t.dtype and o.dtype not in _autocast_dtypes(t.device.type):
                raise ValueError(
                    f"fixed_point: f(params, z, x) returned dtype {dtype_name(o.dtype)} where z has "
                    f"{dtype_name(t.dtype)}: "
                    f"got {describe(out)} for z = {describe(z)}; cast f's output (or z0) to one dtype"
                )

    # -- reporting -------------------------------------------------------------------
    def report(self, info: tuple, what: str, solver) -> None:
        """Apply ``on_nonconvergence`` to ``info`` (eager only: values cannot be read under compile/vmap)."""
        if self.on_nonconvergence == "ignore" or not values_readable(info.converged):
            return
        ok = info.converged.reshape(-1)
        if bool(ok.all()):
            return
        worst = float(info.rel_residual.reshape(-1)[~ok].max())
        msg = (
            f"fixed_point: {what} did not converge: {int((~ok).sum())} of {ok.numel()} problem(s) "
            f"stopped at rel_residual {worst:.3g} > tol {solver.tol:g} after {solver.max_iter} iterations "
            f"({type(solver).__name__}). Try a larger max_iter, a looser tol, another solver, "
            "or a more contractive f."
        )
        if self.on_nonconvergence == "raise":
            raise FixedPointError(msg)
        warnings.warn(msg, FixedPointWarning, stacklevel=3)
