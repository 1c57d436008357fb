"""The problem ``z = f(params, z, x)``: its tensors as flat leaves, and calls of f cast to the state's dtypes.

``Problem`` keeps the tensor leaves of ``params`` and ``x`` as flat lists so the implicit
``autograd.Function`` can receive each one as an input (the torch.func rule), and calls
``f`` on leaves with its output cast to the state's dtypes (under ``torch.autocast`` f may
return the autocast dtype). ``check_output`` validates f's first output. Its
Jacobian products live in ``_linearize.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._tree import describe, dtype_name, flatten, same_layout, unflatten
from ._tree import detached as detach_all


class Problem:
    """``f``, ``params`` and ``x`` of one ``fixed_point`` call; ``z0`` fixes the state's structure.

    Args:
        f: ``f(params, z, x) -> z_next``.
        params, x: pytrees of tensors.
        z0: the initial state (its structure and dtypes are the state's).
    """

    def __init__(self, f: Callable[[Any, Any, Any], Any], params: Any, x: Any, z0: Any):
        self.f = f
        self.param_leaves, self.param_spec = flatten(params)
        self.x_leaves, self.x_spec = flatten(x)
        z_leaves, self.z_spec = flatten(z0)
        self.z_dtypes = [t.dtype for t in z_leaves]
        self.batch = z_leaves[0].shape[0] if z_leaves and z_leaves[0].dim() else None  # per_sample: the problems

    @property
    def n_state_leaves(self) -> int:
        """Number of tensor leaves of the state (a Python int: static under compile)."""
        return len(self.z_dtypes)

    def call(self, param_leaves: list, z: Any, x_leaves: list) -> Any:
        """``f(params, z, x)`` on leaves, each output leaf cast to the state's dtype (as `map` and
        `first_call` cast theirs)."""
        return self._cast(self._f(param_leaves, z, x_leaves))

    def first_call(self, z0: Any, *, detached: bool, z0_given: bool) -> Any:
        """``f(params, z0, x)``, checked against ``z0`` (see :func:`check_output`), then cast."""
        params, x = self.leaves(detached)
        out = self._f(params, z0, x)
        check_output(out, z0, z0_given, unflatten(self.x_spec, self.x_leaves))
        return self._cast(out)

    def _f(self, param_leaves: list, z: Any, x_leaves: list) -> Any:
        return self.f(unflatten(self.param_spec, param_leaves), z, unflatten(self.x_spec, x_leaves))

    def _cast(self, out: Any) -> Any:
        """Each leaf of f's output in the state's dtype (a no-op but under autocast)."""
        if isinstance(out, torch.Tensor) and self.z_spec.kind == "leaf":  # fast path, one tensor
            return out if out.dtype == self.z_dtypes[0] else out.to(self.z_dtypes[0])
        leaves, spec = flatten(out)
        if spec != self.z_spec:
            raise ValueError(f"fixed_point: f returned {describe(out)} on a later call; the structure must not change")
        return unflatten(spec, [o.to(d) for o, d in zip(leaves, self.z_dtypes, strict=True)])

    def leaves(self, detached: bool) -> tuple[list, list]:
        """Param and x leaves, detached (no graph: forward solves) or as given (gradient path)."""
        if not detached:
            return self.param_leaves, self.x_leaves
        return detach_all(self.param_leaves), detach_all(self.x_leaves)

    def map(self, detached: bool, rows: torch.Tensor | None = None) -> Callable[[Any], Any]:
        """``z ↦ f(params, z, x)`` (``detached``: params and x detached, see `leaves`); the params
        and x pytrees are built once here, not at every iteration.

        ``rows``: the map of those problems of a per-sample batch only (``z`` holds their rows):
        the leaves of x whose leading dim is the batch are gathered, params are shared."""
        p, x = self.leaves(detached)
        if rows is not None:
            x = [t.index_select(0, rows) if t.dim() and t.shape[0] == self.batch else t for t in x]
        params, inputs = unflatten(self.param_spec, p), unflatten(self.x_spec, x)
        return lambda z: self._cast(self.f(params, z, inputs))


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype autocast may produce on ``device_type`` (None when it is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def check_output(out: Any, z: Any, z0_given: bool, x: Any) -> None:
    """Raise ``ValueError`` unless ``out = f(params, z, x)`` matches ``z`` in structure, shape, dtype."""
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
    for o, t in zip(flatten(out)[0], flatten(z)[0], strict=True):
        if o.dtype != t.dtype and o.dtype != _autocast_dtype(t.device.type):
            raise ValueError(
                f"fixed_point: f(params, z, x) returned dtype {dtype_name(o.dtype)} where z has "
                f"{dtype_name(t.dtype)}: got {describe(out)} for z = {describe(z)}; cast f's output (or z0) to one dtype"
            )
