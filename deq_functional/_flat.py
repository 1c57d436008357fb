"""View a pytree state as one ``(B, D)`` matrix, so solvers are written once for all states.

``B`` is the batch (leading dim of every leaf) with ``per_sample=True`` and 1
otherwise; ``D`` is everything else, concatenated across leaves. A single-leaf
state is a free reshape; several leaves cost one concatenation per call.
"""

from __future__ import annotations

from typing import Any

import torch

from ._tree import describe, flatten, unflatten


class FlatView:
    """Maps pytrees shaped like ``z`` to ``(B, D)`` matrices and back.

    Args:
        z: example state (pytree of tensors).
        per_sample: treat the leading dim of every leaf as independent problems.
    """

    def __init__(self, z: Any, per_sample: bool):
        leaves, self.spec = flatten(z)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise ValueError(f"fixed_point: the state must be a pytree of tensors, got {describe(z)}")
        self.shapes = [t.shape for t in leaves]
        self.dtypes = [t.dtype for t in leaves]
        self.dtype = leaves[0].dtype
        for t in leaves[1:]:
            self.dtype = torch.promote_types(self.dtype, t.dtype)
        if not self.dtype.is_floating_point and not self.dtype.is_complex:
            raise ValueError(f"fixed_point: the state must be floating point, got {describe(z)}")
        if per_sample:
            sizes = {t.shape[0] if t.dim() else None for t in leaves}
            if len(sizes) != 1 or None in sizes:
                raise ValueError(
                    "fixed_point(per_sample=True): every leaf of the state needs the same leading "
                    f"(batch) dim, got {describe(z)}"
                )
            self.batch = sizes.pop()
        else:
            self.batch = 1
        self.sizes = [t.numel() // self.batch for t in leaves]

    def to_flat(self, tree: Any) -> torch.Tensor:
        """Pytree shaped like ``z`` -> ``(B, D)`` tensor in the common dtype."""
        leaves = flatten(tree)[0]
        parts = [t.reshape(self.batch, -1).to(self.dtype) for t in leaves]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def from_flat(self, flat: torch.Tensor) -> Any:
        """``(B, D)`` tensor -> pytree shaped like ``z`` (each leaf back in its own dtype)."""
        parts = (flat,) if len(self.sizes) == 1 else torch.split(flat, self.sizes, dim=1)
        leaves = [p.reshape(s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]
        return unflatten(self.spec, leaves)
