"""Minimal pytree helpers: dict / list / tuple / namedtuple of tensors.

Written here (not ``torch.utils._pytree``) so the library uses no private torch
API; torch.compile traces these plain-Python functions without graph breaks.
Dicts with string keys are flattened in sorted key order, so two dicts with the
same keys in a different order have the same structure.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch


class TreeSpec(NamedTuple):
    """Structure of a pytree: ``kind`` in {"leaf", "none", "dict", "list", "tuple", "namedtuple"}."""

    kind: str
    meta: Any
    children: tuple


_LEAF = TreeSpec("leaf", None, ())
_NONE = TreeSpec("none", None, ())


def _dict_keys(d: dict) -> list:
    keys = list(d.keys())
    return sorted(keys) if all(isinstance(k, str) for k in keys) else keys


def flatten(tree: Any) -> tuple[list, TreeSpec]:
    """Return ``(leaves, spec)``; leaves are the non-container values, depth first."""
    leaves: list = []
    return leaves, _flatten_into(tree, leaves)


def _flatten_into(tree: Any, leaves: list) -> TreeSpec:
    if tree is None:
        return _NONE
    if isinstance(tree, dict):
        keys = _dict_keys(tree)
        return TreeSpec("dict", tuple(keys), tuple(_flatten_into(tree[k], leaves) for k in keys))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return TreeSpec("namedtuple", type(tree), tuple(_flatten_into(c, leaves) for c in tree))
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return TreeSpec(kind, None, tuple(_flatten_into(c, leaves) for c in tree))
    leaves.append(tree)
    return _LEAF


def unflatten(spec: TreeSpec, leaves: list | tuple) -> Any:
    """Inverse of :func:`flatten`."""
    it = iter(leaves)
    out = _build(spec, it)
    if next(it, _NONE) is not _NONE:
        raise ValueError("unflatten: more leaves than the structure holds")
    return out


def _build(spec: TreeSpec, it) -> Any:
    if spec.kind == "leaf":
        return next(it)
    if spec.kind == "none":
        return None
    children = [_build(c, it) for c in spec.children]
    if spec.kind == "dict":
        return dict(zip(spec.meta, children))
    if spec.kind == "list":
        return children
    if spec.kind == "namedtuple":
        return spec.meta(*children)
    return tuple(children)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leafwise to ``tree`` (and trees of the same structure in ``rest``)."""
    leaves, spec = flatten(tree)
    others = [flatten(r)[0] for r in rest]
    return unflatten(spec, [fn(*args) for args in zip(leaves, *others)])


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


def describe(tree: Any) -> str:
    """Human-readable structure with shapes and dtypes, for error messages."""
    if tree is None:
        return "None"
    if isinstance(tree, torch.Tensor):
        return f"Tensor(shape={tuple(tree.shape)}, dtype={dtype_name(tree.dtype)})"
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {describe(tree[k])}" for k in _dict_keys(tree)) + "}"
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        inner = ", ".join(f"{n}={describe(c)}" for n, c in zip(tree._fields, tree))
        return f"{type(tree).__name__}({inner})"
    if isinstance(tree, list):
        return "[" + ", ".join(describe(c) for c in tree) + "]"
    if isinstance(tree, tuple):
        return "(" + ", ".join(describe(c) for c in tree) + ("," if len(tree) == 1 else "") + ")"
    return type(tree).__name__


def same_layout(out: Any, like: Any) -> bool:
    """True when ``out`` has the structure of ``like`` with tensor leaves of the same shapes."""
    out_leaves, out_spec = flatten(out)
    like_leaves, like_spec = flatten(like)
    return out_spec == like_spec and all(
        isinstance(o, torch.Tensor) and o.shape == t.shape for o, t in zip(out_leaves, like_leaves)
    )
