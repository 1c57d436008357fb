"""The documentation: every ```python block in docs/ runs, and the site builds with --strict.

(a) The ```python fenced blocks of one page run in order in one shared namespace, as
    one script (a later block may use names an earlier one defined). A failing block is
    reported with the page and its line number. A block right after the line

        <!-- docs-test: skip -->

    is not run: use it sparingly, for what cannot run here (a GPU, a dataset download,
    a long training run). Blocks fenced as ```text, ```bash etc. are never run.
    The compile guide's blocks call ``torch.compile``; here it defaults to the
    ``aot_eager`` backend (Dynamo's full-graph capture and AOTAutograd's backward, the
    parts this library is responsible for, without inductor's code generation, which
    costs ~30 s per graph on 2 cores and is covered by tests/test_compile.py). Set
    ``DQ_DOCS_COMPILE_BACKEND=inductor`` to run them exactly as written.
(b) ``mkdocs build --strict`` (warnings are errors) into a temporary directory; skipped
    when mkdocs is not installed (``pip install -e '.[docs]'``).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- docs-test: skip -->"
COMPILE_PAGES = {"guides/compile.md"}  # pages whose blocks compile (marked `compile`)
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """``(first line number, source, skipped)`` for each ```python block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m["indent"], i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if m["lang"] == "python":
            previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:end]]
            blocks.append((start + 1, "\n".join(body), previous == SKIP_MARK))
        i = end + 1
    return blocks


def _pages() -> list:
    params = []
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS).as_posix()
        if not any(not skipped for _, _, skipped in python_blocks(path)):
            continue
        marks = [pytest.mark.compile] if rel in COMPILE_PAGES else []
        params.append(pytest.param(rel, id=rel, marks=marks))
    return params


@pytest.fixture
def _isolated(monkeypatch):
    """Fresh seeds, Dynamo caches and warning filters for each page; compile defaults to aot_eager."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    backend = os.environ.get("DQ_DOCS_COMPILE_BACKEND", "aot_eager")
    real_compile = torch.compile

    @functools.wraps(real_compile)
    def compile_with_default_backend(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_default_backend)
    dtype = torch.get_default_dtype()
    with warnings.catch_warnings():
        yield
    torch.set_default_dtype(dtype)
    torch._dynamo.reset()


@pytest.mark.parametrize("page", _pages())
def test_code_blocks_run(page, _isolated):
    path = DOCS / page
    namespace = {"__name__": "__docs__"}
    for line, source, skipped in python_blocks(path):
        if skipped:
            continue
        # Pad so that tracebacks give the line numbers of the Markdown file.
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"{page}: the ```python block at line {line} failed: {e!r}") from e


def test_blocks_are_found():
    """The extractor sees the blocks (and the skip marker) it is meant to see."""
    blocks = python_blocks(DOCS / "index.md")
    assert blocks and not any(skipped for _, _, skipped in blocks)
    assert any(rel == "guides/gradient-modes.md" for rel in (p.values[0] for p in _pages()))


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (tmp_path / "site" / "api" / "fixed_point" / "index.html").is_file()
