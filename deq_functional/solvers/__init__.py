"""Fixed-point solvers: frozen dataclasses callable as ``solver(g, z0) -> (z, info)``."""

from .._loop import StepOptions
from ._base import Solver
from .anderson import Anderson
from .broyden import Broyden
from .gmres import GMRES
from .picard import Picard

__all__ = ["Solver", "StepOptions", "Picard", "Anderson", "Broyden", "GMRES", "SOLVERS", "LINEAR_SOLVERS", "as_solver"]

SOLVERS = {"picard": Picard, "anderson": Anderson, "broyden": Broyden}  # fixed points of any map
LINEAR_SOLVERS = {"gmres": GMRES}  # affine maps only: IFT's adjoint, or standalone


def as_solver(solver, owner: str = "fixed_point", *, affine_ok: bool = False) -> Solver:
    """A solver instance from an instance or a name in ``SOLVERS`` / ``LINEAR_SOLVERS``.

    Raises ``ValueError`` for anything else, and, unless ``affine_ok`` (IFT's adjoint), for a
    solver of affine maps only (GMRES) as the solver of f's nonlinear map, naming where it belongs.
    """
    names = {**SOLVERS, **LINEAR_SOLVERS}
    if isinstance(solver, str) and solver.lower() in names:
        solver = names[solver.lower()]()
    if not isinstance(solver, Solver):
        raise ValueError(f"{owner}: unknown solver {solver!r}; use one of {sorted(names)} or a Solver instance")
    if solver.affine_only and not affine_ok:
        raise ValueError(
            f"{owner}: {type(solver).__name__} solves affine fixed points u = A u + b (linear systems), "
            f"not f's nonlinear map; use it for IFT's adjoint, grad_mode=dq.IFT(solver=dq.{type(solver).__name__}(...)), "
            f"or call it on an affine g; pass one of {sorted(SOLVERS)} as the solver"
        )
    return solver
