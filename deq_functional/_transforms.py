"""Where a solve runs: eagerly, traced by ``torch.compile``, or mapped by ``torch.func.vmap``.

The answer picks the iteration driver (see ``_drivers.py``): values can be read on
the host only eagerly. This is the one module that touches a private torch API:
telling "inside vmap" apart needs functorch's interpreter stack
(``torch._functorch.pyfunctorch``), because a vmapped solve must treat each mapped
row as its own problem and must not read values. Where that API is missing (another
torch version), a probing read answers the same question more slowly.
"""

from __future__ import annotations

import enum

import torch


class Regime(enum.Enum):
    EAGER = "eager"  # values readable: exit early, raise on failures
    COMPILED = "compiled"  # traced by Dynamo: torch.while_loop, nothing read
    MAPPED = "mapped"  # inside vmap: fixed masked budget, nothing read


def is_compiling() -> bool:
    """True while Dynamo traces the caller (public API)."""
    return torch.compiler.is_compiling()


def inside_vmap(sample: torch.Tensor | None = None) -> bool:
    """True inside ``torch.func.vmap`` (each mapped problem is one problem of its own).

    ``sample``: a tensor of the computation that vmap batches when it maps anything the
    solve depends on (e.g. ``f(z0)``). Under ``torch.compile`` it is the only evidence
    (tested for being batched); elsewhere it is probed with a read where functorch's
    interpreter stack is not importable (a fresh tensor would read fine inside vmap).
    """
    if is_compiling():
        # Dynamo cannot walk functorch's interpreter stack, but it traces this test of the
        # tensor itself (True for a tensor vmap has batched, torch 2.13 and 2.14.1)
        from torch._C._functorch import is_batchedtensor

        return sample is not None and is_batchedtensor(sample)
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # pragma: no cover - other torch versions
        return sample is not None and _read_refused(sample)
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _read_refused(t: torch.Tensor) -> bool:  # pragma: no cover - fallback only
    try:
        t.reshape(-1)[:1].tolist()
    except RuntimeError:  # vmap refuses data-dependent reads
        return True
    return False


def regime(sample: torch.Tensor | None = None) -> Regime:
    """The regime of the code running now (``sample``: see `inside_vmap`)."""
    if inside_vmap(sample):  # first: vmap under compile is MAPPED (while_loop has no vmap rule)
        return Regime.MAPPED
    if is_compiling():
        return Regime.COMPILED
    return Regime.EAGER
