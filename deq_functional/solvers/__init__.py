"""Fixed-point solvers: frozen dataclasses callable as ``solver(g, z0) -> (z, info)``."""

from ._base import Solver, StepOptions
from .anderson import Anderson
from .broyden import Broyden
from .picard import Picard

__all__ = ["Solver", "StepOptions", "Picard", "Anderson", "Broyden", "SOLVERS", "as_solver"]

SOLVERS = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}


def as_solver(solver, owner: str = "fixed_point") -> Solver:
    """A solver instance from an instance or a name in ``SOLVERS`` (``ValueError`` otherwise)."""
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver.lower() in SOLVERS:
        return SOLVERS[solver.lower()]()
    raise ValueError(f"{owner}: unknown solver {solver!r}; use one of {sorted(SOLVERS)} or a Solver instance")
