"""deq_functional: purely functional deep equilibrium networks on torch.func.

``z_star, info = fixed_point(f, params, x, solver=..., grad_mode=...)``.
"""

from . import models  # the reference models: dq.models.mlp / conv / multiscale
from ._fixed_point import fixed_point
from ._info import FixedPointError, FixedPointWarning, Info, Status
from ._module_bridge import from_module, to_module
from .correction import correction_loss, correction_weights
from .gradients import IFT, JFB, GradMode, Neumann, Phantom, Unrolled
from .memory import SavedTensorBytes
from .module import DEQ
from .normalization import conv_lipschitz_rescale, spectral_normalize
from .regularizers import jacobian_frobenius, spectral_radius
from .solvers import GMRES, Anderson, Broyden, Picard, Solver

__all__ = [
    "fixed_point",
    "Info",
    "Status",
    "FixedPointError",
    "FixedPointWarning",
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "GMRES",
    "GradMode",
    "IFT",
    "JFB",
    "Neumann",
    "Phantom",
    "Unrolled",
    "from_module",
    "to_module",
    "DEQ",
    "SavedTensorBytes",
    "spectral_normalize",
    "conv_lipschitz_rescale",
    "jacobian_frobenius",
    "spectral_radius",
    "correction_loss",
    "correction_weights",
    "models",
]
