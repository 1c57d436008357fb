"""The house: no import circle in deq_functional/, modules of at most 300 lines, and private
torch API in one module only (_transforms.py)."""

import ast
import re
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
    private = re.compile(r"\btorch(\.\w+)*\._\w+")
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
        if any(private.search(line) and not line.lstrip().startswith("#") for line in _code_lines(p))
    )
    assert users == ["_transforms.py"]


def _code_lines(path: Path) -> list[str]:
    """The file's lines outside docstrings."""
    tree = ast.parse(path.read_text())
    doc_lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            doc_lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return [line for i, line in enumerate(path.read_text().splitlines(), 1) if i not in doc_lines]
