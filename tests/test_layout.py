"""The house: no import circle in deq_functional/, modules of at most 300 lines, and private
torch API in one module only (_transforms.py)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deq_functional"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Modules of the package that ``name`` imports, anywhere in the file (also inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (base + "." + node.module if node.module else base) if node.level else (node.module or "")
            found |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules and t != name}
    return found


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_every_module_is_at_most_300_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long


def test_private_torch_api_only_in_transforms():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _private_torch_names(p))
    assert users == ["_transforms.py"], {u: _private_torch_names(PACKAGE / u) for u in users}


def _private_torch_names(path: Path) -> list[str]:
    """Private torch names a module uses: an import from a ``torch`` module path with a ``_``
    segment or of a ``_`` name, or an attribute chain through a ``_`` name rooted at a name
    bound to torch or one of its modules (``torch._dynamo``, ``nn.modules.batchnorm._BatchNorm``)."""
    tree = ast.parse(path.read_text())
    torch_names, found = {"torch"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    torch_names.add((a.asname or a.name).split(".")[0])
                    found += [a.name] if any(part.startswith("_") for part in a.name.split(".")) else []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            private_module = any(part.startswith("_") for part in node.module.split("."))
            for a in node.names:
                torch_names.add(a.asname or a.name)
                if private_module or (a.name.startswith("_") and a.name != "__future__"):
                    found.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in torch_names and any(
                part.startswith("_") and not part.startswith("__") for part in chain
            ):
                found.append(".".join([base.id, *reversed(chain)]))
    return found
