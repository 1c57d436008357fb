"""deq_functional: purely functional deep equilibrium networks on torch.func.

``z_star, info = fixed_point(f, params, x, solver=..., grad_mode=...)``.
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # imported on first use (module __getattr__ below)
    from .loop_hoisting import hoist_loop_invariants
    from .mask_recompute import recompute_masks

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
    "hoist_loop_invariants",
    "recompute_masks",
]

# the opt-in inductor passes, each imported on first use: they import inductor (about 1 s),
# which ``import deq_functional`` does not
_INDUCTOR_PASSES = {"hoist_loop_invariants": "loop_hoisting", "recompute_masks": "mask_recompute"}


def __getattr__(name: str):
    """The inductor graph passes (``loop_hoisting.py``, ``mask_recompute.py``), imported on first use."""
    if name in _INDUCTOR_PASSES:
        import importlib

        return getattr(importlib.import_module(f".{_INDUCTOR_PASSES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
