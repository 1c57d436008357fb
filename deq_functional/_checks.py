"""Option validators: every public option is checked here, with one message format.

Each check raises ``ValueError("<owner>: <name> must be ..., got <value>")`` so the
message names the function or class, the option, and what was passed.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def check_int(owner: str, name: str, value: Any, low: int) -> int:
    """``value`` if it is an int ``>= low`` (bools refused), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return value


def check_real(owner: str, name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """``value`` if it is a real number in ``[low, high]`` (``(low, high]`` with ``open_low``).

    ``high = inf`` admits ``inf`` itself only where it is the documented "off" value, so
    callers that need a finite number pass a finite ``high``. NaN is always refused.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{']' if high != math.inf else ')'}"
        raise ValueError(f"{owner}: {name} must be a real number in {interval}, got {value!r}")
    return value


def check_finite_real(owner: str, name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """Like `check_real`, and ``value`` must be finite."""
    check_real(owner, name, value, low, high, open_low=open_low)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {value!r}")
    return value


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
    return value
