"""Griffe extension for the documentation build: read the package's docstrings as Google style.

A few docstrings use spellings that griffe's Google parser does not read as intended:

* ``Example:`` (singular) opens a generic admonition, so its ``>>>`` lines render as
  nested block quotes; griffe reads ``Examples:`` as a code example section;
* Sphinx roles (``:func:`x```, ``:mod:``, ``:class:``, ``:meth:``) show up literally;
* reST literal-block markers (``Params::``) show a double colon.

This rewrites them in the docstring text before griffe parses it. It changes nothing
in the package; once the docstrings use ``Examples:`` and plain backticks it does nothing.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj):(`+)")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def normalize(text: str) -> str:
    """The docstring ``text`` with the spellings above replaced."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(r"\1", text)
    return _LITERAL.sub(r"\1:", text)


class DocstringCompat(griffe.Extension):
    """Normalise each object's docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = normalize(obj.docstring.value)
