"""deq_functional: purely functional deep equilibrium networks on torch.func.

``z_star, info = fixed_point(f, params, x, solver=..., grad_mode=...)``.
"""

from ._fixed_point import fixed_point
from ._info import FixedPointError, Info
from ._module import from_module, to_module
from .memory import SavedTensorBytes
from ._problem import FixedPointWarning
from .gradients import IFT, JFB, Neumann, Phantom, Unrolled
from .solvers import Anderson, Broyden, Picard, Solver

__all__ = [
    "fixed_point",
    "Info",
    "FixedPointError",
    "FixedPointWarning",
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "IFT",
    "JFB",
    "Neumann",
    "Phantom",
    "Unrolled",
    "from_module",
    "to_module",
    "SavedTensorBytes",
]
