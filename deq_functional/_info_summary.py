"""The solver's report of a timed call as Python numbers (what ``benchmarking`` records):
find the ``dq.Info`` in a result, and summarise it."""

from __future__ import annotations

from typing import Any

from ._info import Info, Status


def find_info(obj: Any, _depth: int = 0) -> Info | None:
    """The first ``dq.Info`` in ``obj``: itself, or inside (nested) tuples, lists and dict values."""
    if isinstance(obj, Info):
        return obj
    if _depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        found = find_info(item, _depth + 1)
        if found is not None:
            return found
    return None


def _status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return str(code)


def summarize_info(info: Info) -> dict:
    """Python numbers from an ``Info`` (reads its tensors: a host sync; call it outside timings).

    One problem: ``nstep`` (int), ``residual``, ``rel_residual`` (floats), ``status`` (the
    code's name, e.g. ``"CONVERGED"``). A batch (``per_sample=True``, shape ``(B,)``):
    ``nstep`` is the largest (the iterations the solve ran), ``nstep_mean`` the mean,
    ``residual``/``rel_residual`` the largest, ``status`` the names present joined by
    ``"+"`` in code order, and ``status_counts`` ``{name: count}``; ``batch`` is B.
    """
    nstep = info.nstep.detach().reshape(-1).cpu()
    codes = info.status.detach().reshape(-1).cpu().tolist()
    residual = info.residual.detach().reshape(-1).float().cpu()
    rel = info.rel_residual.detach().reshape(-1).float().cpu()
    if info.nstep.dim() == 0:
        return {"nstep": int(nstep[0]), "residual": float(residual[0]), "rel_residual": float(rel[0]),
                "status": _status_name(codes[0])}
    if not codes:
        return {"batch": 0, "nstep": 0, "status": "", "status_counts": {}}
    counts = {_status_name(c): codes.count(c) for c in sorted(set(codes))}
    return {
        "batch": len(codes),
        "nstep": int(nstep.max()),
        "nstep_mean": float(nstep.float().mean()),
        "residual": float(residual.max()),
        "rel_residual": float(rel.max()),
        "status": "+".join(counts),
        "status_counts": counts,
    }
