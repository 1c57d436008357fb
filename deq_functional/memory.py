"""Measure what autograd keeps for backward: the memory a gradient mode costs."""

from __future__ import annotations

from typing import Any

import torch

from ._tree import flatten


def _key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


class SavedTensorBytes:
    """Context manager counting the bytes autograd saves for backward inside it.

    Each saved tensor's storage is counted once, keyed by ``(device, data_ptr)`` (a
    storage saved by several ops, e.g. a weight used in every unrolled iteration, is
    one allocation). Storages of the tensors in ``exclude`` (typically the parameters,
    which autograd references but never copies) are left out of ``bytes``, so
    ``bytes`` is the activation memory a forward pass adds; ``total_bytes`` counts
    them too. Uses ``torch.autograd.graph.saved_tensors_hooks`` (the pack hook returns
    the tensor itself, nothing is copied); eager mode only. Cost: one dict update per
    saved tensor.

    Args:
        exclude: pytree of tensors whose storages are not counted in ``bytes``.

    Attributes:
        bytes: unique saved bytes so far, storages of ``exclude`` left out.
        total_bytes: unique saved bytes so far, storages of ``exclude`` included.
        count: number of tensors saved (with repeats, excluded ones included).

    Examples:
        >>> import torch, deq_functional as dq
        >>> w = torch.ones(4, requires_grad=True)
        >>> with dq.SavedTensorBytes() as saved:
        ...     y = (w * torch.full((4,), 2.0)).sum()
        >>> saved.bytes  # the float32 (4,) multiplier that w's gradient needs
        16
    """

    def __init__(self, exclude: Any = None) -> None:
        self._excluded = {_key(t) for t in flatten(exclude)[0] if isinstance(t, torch.Tensor)}
        self._storages: dict[tuple, int] = {}
        self.count = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self._storages[_key(t)] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(n for key, n in self._storages.items() if key not in self._excluded)

    @property
    def total_bytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
