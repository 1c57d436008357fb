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
    """Inverse of `flatten`."""
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
        return dict(zip(spec.meta, children, strict=True))
    if spec.kind == "list":
        return children
    if spec.kind == "namedtuple":
        return spec.meta(*children)
    return tuple(children)


def leaf_count(spec: TreeSpec) -> int:
    """Number of leaves of a structure."""
    return 1 if spec.kind == "leaf" else sum(leaf_count(c) for c in spec.children)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leafwise to ``tree`` (and trees of the same structure in ``rest``)."""
    leaves, spec = flatten(tree)
    others = [flatten(r)[0] for r in rest]
    return unflatten(spec, [fn(*args) for args in zip(leaves, *others, strict=True)])


def detached(tree: Any) -> Any:
    """Every tensor leaf of ``tree`` detached: no autograd history, no forward-mode tangent."""
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def tree_add(a: Any, b: Any) -> Any:
    """Leafwise ``a + b`` of two trees of the same structure."""
    return tree_map(torch.add, a, b)


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
        inner = ", ".join(f"{n}={describe(c)}" for n, c in zip(getattr(tree, "_fields", ()), tree, strict=True))
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
        isinstance(o, torch.Tensor) and o.shape == t.shape for o, t in zip(out_leaves, like_leaves, strict=True)
    )


# ----------------------------------------------------------------------------- dotted key paths
# A key path names one node of a tree by its dict keys and list/tuple indices joined with
# dots: ``"latent.block0.conv1.weight"``, ``"convs.0.weight"``. Keys that contain a dot
# cannot be addressed this way.


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[(key path, leaf)]`` in `flatten`'s order (sorted string keys, depth first).

    Dict keys are written with ``str``; list, tuple and namedtuple children by index;
    ``None`` nodes hold no leaf and are skipped. A bare leaf gets the path ``""``.
    Cost: one walk of the tree.

    Examples:
        >>> named_leaves({"b": [torch.zeros(1)], "a": {"w": torch.ones(2)}})
        [('a.w', tensor([1., 1.])), ('b.0', tensor([0.]))]
    """
    out: list[tuple[str, Any]] = []
    _named_into(tree, "", out)
    return out


def _named_into(tree: Any, prefix: str, out: list) -> None:
    if tree is None:
        return
    if isinstance(tree, dict):
        children = [(str(k), tree[k]) for k in _dict_keys(tree)]
    elif isinstance(tree, (list, tuple)):
        children = [(str(i), c) for i, c in enumerate(tree)]
    else:
        out.append((prefix, tree))
        return
    for name, child in children:
        _named_into(child, f"{prefix}.{name}" if prefix else name, out)


def _child(node: Any, part: str, path: str, owner: str) -> Any:
    """The child of ``node`` named ``part``; ``ValueError`` naming ``path`` when there is none."""
    if isinstance(node, dict):
        for key in node:
            if key == part or str(key) == part:
                return node[key]
        raise ValueError(f"{owner}: unknown key path {path!r}: no {part!r} among {sorted(map(str, node))}")
    if isinstance(node, (list, tuple)):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        raise ValueError(f"{owner}: unknown key path {path!r}: {part!r} is not an index below {len(node)}")
    raise ValueError(f"{owner}: unknown key path {path!r}: cannot index a {type(node).__name__} with {part!r}")


def get_path(tree: Any, path: str, owner: str = "get_path") -> Any:
    """The node of ``tree`` at the dotted ``path`` (a leaf or a whole subtree).

    Raises:
        ValueError: ``"<owner>: unknown key path '<path>': ..."`` naming the part that
            does not exist and what is there instead.

    Examples:
        >>> get_path({"convs": [{"weight": 1.0}]}, "convs.0.weight")
        1.0
    """
    node = tree
    for part in path.split("."):
        node = _child(node, part, path, owner)
    return node


def set_path(tree: Any, path: str, value: Any, owner: str = "set_path") -> Any:
    """A copy of ``tree`` with the node at ``path`` replaced by ``value``; ``tree`` is not modified.

    Only the containers on the path are copied (cost: their sizes); every node off the
    path is shared with ``tree``, so untouched leaves keep their identity.

    Raises:
        ValueError: as `get_path`, when ``path`` does not exist in ``tree``.

    Examples:
        >>> t = {"a": {"w": 1.0}, "b": 2.0}
        >>> set_path(t, "a.w", 5.0), t
        ({'a': {'w': 5.0}, 'b': 2.0}, {'a': {'w': 1.0}, 'b': 2.0})
    """
    return _set(tree, path.split("."), value, path, owner)


def _set(node: Any, parts: list[str], value: Any, path: str, owner: str) -> Any:
    if not parts:
        return value
    head, rest = parts[0], parts[1:]
    child = _child(node, head, path, owner)  # validates head
    if isinstance(node, dict):
        key = next(k for k in node if k == head or str(k) == head)
        return {**node, key: _set(child, rest, value, path, owner)}
    items = list(node)
    items[int(head)] = _set(child, rest, value, path, owner)
    if isinstance(node, list):
        return items
    return type(node)(*items) if hasattr(node, "_fields") else tuple(items)
