"""The ``(B, D)`` matrix form that the loop and the solvers work on.

``FlatView`` maps a pytree state to one ``(B, D)`` matrix and back: ``B`` is the batch
(the leading dim of every leaf) with ``per_sample=True`` and 1 otherwise, ``D`` is
everything else, concatenated across leaves. A single-leaf state is a free reshape;
several leaves cost one concatenation per call. The helpers below are the few array
operations every solver and the loop share.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch

from ._tree import describe, flatten, unflatten

_HALF = (torch.float16, torch.bfloat16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for norms and solver internals: float32 for half-precision states, else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """``‖t_b‖₂`` per row of a ``(B, D)`` matrix, accumulated in `work_dtype` (no fp16 overflow)."""
    return torch.linalg.vector_norm(t, dim=1, dtype=work_dtype(t.dtype))


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` dot products ``a_b · b_b`` of two ``(B, D)`` matrices: one pass (a ``bmm``)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2)


def combine(coef: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``Σᵢ coefᵢ stackᵢ``: ``(B, n)`` coefficients times a ``(B, n, D)`` stack -> ``(B, D)``, one ``bmm``.

    (Not ``mm`` for ``B = 1``: inside a ``torch.while_loop`` body compiled by inductor,
    torch 2.14.1, that gave a training step whose gradients were 1 % off.)
    """
    return torch.bmm(coef.unsqueeze(1), stack).squeeze(1)


def project(stack: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(stackᵢ · w)ᵢ``: a ``(B, n, D)`` stack against ``(B, D)`` -> ``(B, n)``, one ``bmm``."""
    return torch.bmm(stack, w.unsqueeze(2)).squeeze(2)


def write_slot(buffer: torch.Tensor, dim: int, index: Any, item: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``buffer`` with ``buffer.select(dim, index) = item``; ``index`` an int or a 0-dim tensor.

    In place when ``inplace`` (no copy): eagerly without a graph, and inside a no-grad
    ``torch.while_loop`` body on a buffer the body closes over (``index_copy_``: the one in-place
    form torch 2.13 and 2.14.1 trace there with a tensor index). Otherwise out of place with
    ``index_copy`` (copies the buffer): what ``torch.while_loop`` carries, ``vmap`` with
    unbatched buffers and backprop through the iterations need.
    """
    if inplace and isinstance(index, int):
        buffer.select(dim, index).copy_(item)
        return buffer
    index = torch.as_tensor(index, device=buffer.device).reshape(1)
    item = item.unsqueeze(dim).to(buffer.dtype)
    return buffer.index_copy_(dim, index, item) if inplace else buffer.index_copy(dim, index, item)


def common_batch(leaves: list, owner: str, what: str) -> int:
    """The leading (batch) dim every leaf shares; ``ValueError`` naming ``owner`` and ``what`` otherwise.

    (No set of sizes: hashing a symbolic size would make torch.compile specialise on it.)
    """
    if not leaves or not all(t.dim() for t in leaves) or any(t.shape[0] != leaves[0].shape[0] for t in leaves):
        shapes = [tuple(t.shape) for t in leaves]
        raise ValueError(f"{owner}: every leaf of {what} needs the same leading (batch) dim, got shapes {shapes}")
    return leaves[0].shape[0]


class FlatView:
    """Maps pytrees shaped like ``z`` to ``(B, D)`` matrices and back.

    Args:
        z: example state (pytree of floating-point tensors).
        per_sample: treat the leading dim of every leaf as independent problems.
        owner: name used in error messages.

    Raises:
        ValueError: a leaf is not a floating-point tensor, or (``per_sample``) the
            leaves do not share a leading batch dim.
    """

    def __init__(self, z: Any, per_sample: bool, owner: str = "fixed_point"):
        leaves, self.spec = flatten(z)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise ValueError(f"{owner}: the state must be a pytree of tensors, got {describe(z)}")
        self.shapes = [tuple(t.shape) for t in leaves]  # tuples: a torch.Size of SymInts cannot be lifted into while_loop
        self.single = self.spec.kind == "leaf"  # one tensor: to_flat/from_flat are reshapes
        self.dtypes = [t.dtype for t in leaves]
        self.dtype = leaves[0].dtype
        for t in leaves[1:]:
            self.dtype = torch.promote_types(self.dtype, t.dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"{owner}: the state must be floating point, got {describe(z)}")
        if per_sample:
            self.batch = common_batch(leaves, f"{owner}(per_sample=True)", "the state")
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.batch = 1
            self.sizes = [math.prod(s) for s in self.shapes]

    def rows(self, n: int) -> FlatView:
        """This view for ``n`` of its problems (``per_sample``: a subset of the batch rows)."""
        other = copy.copy(self)
        other.batch = n
        other.shapes = [(n, *shape[1:]) for shape in self.shapes]
        return other

    def to_flat(self, tree: Any) -> torch.Tensor:
        """Pytree shaped like ``z`` -> ``(B, D)`` tensor in the common dtype."""
        if self.single and isinstance(tree, torch.Tensor) and tree.dtype == self.dtype:  # a free reshape
            return tree.reshape(self.batch, self.sizes[0])
        leaves = flatten(tree)[0]
        parts = [t.reshape(self.batch, n).to(self.dtype) for t, n in zip(leaves, self.sizes, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def from_flat(self, flat: torch.Tensor) -> Any:
        """``(B, D)`` tensor -> pytree shaped like ``z`` (each leaf back in its own dtype)."""
        if self.single and flat.dtype == self.dtypes[0]:  # a free reshape
            return flat.reshape(self.shapes[0])
        parts = (flat,) if len(self.sizes) == 1 else torch.split(flat, self.sizes, dim=1)
        leaves = [p.reshape(s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)]
        return unflatten(self.spec, leaves)


def select(cond: Any, a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``torch.where(cond, a(), b())``; a Python bool ``cond`` (eager counters are ints) computes
    only the branch it picks."""
    if isinstance(cond, bool):
        return a() if cond else b()
    return torch.where(cond, a(), b())


def first_slots(n: Any, size: int, device: torch.device) -> Any:
    """The slots ``0..min(n, size)-1`` of a ring of ``size``: an int when ``n`` is one (eager: the
    buffers are sliced, no mask), else a ``(size,)`` bool mask (``n`` a 0-dim tensor inside
    ``torch.while_loop``, where shapes cannot change with the iteration)."""
    if isinstance(n, int):
        return min(n, size)
    return torch.arange(size, device=device) < n


def slot_mask(slots: Any, size: int, device: torch.device) -> torch.Tensor:
    """The ``(size,)`` bool mask of `first_slots`' slots (itself when it already is one)."""
    return torch.arange(size, device=device) < slots if isinstance(slots, int) else slots


def used_slots(buffer: torch.Tensor, slots: Any) -> torch.Tensor:
    """``buffer[:, :slots]`` for an int from `first_slots`, else the whole ``(B, size, ...)`` buffer."""
    return buffer[:, :slots] if isinstance(slots, int) else buffer
