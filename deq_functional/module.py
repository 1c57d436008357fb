"""``DEQ``: a deep equilibrium layer as an ``nn.Module``, for code written with modules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_bool, check_choice
from ._fixed_point import fixed_point
from ._info import Info
from ._module_bridge import module_call
from ._report import ON_NONCONVERGENCE
from ._transforms import is_batch_norm
from ._tree import tree_map
from .gradients import IFT, as_grad_mode
from .solvers import Anderson, as_solver


class DEQ(nn.Module):
    r"""The equilibrium ``z* = cell(z*, x)`` of an ``nn.Module`` cell, as a module.

    ``cell`` is registered as a submodule, so its parameters and buffers are this module's
    (``parameters()``, optimisers, ``state_dict``, ``.to(...)``, DDP, ``torch.compile``
    see them). Each call runs `deq_functional.fixed_point` on the cell's *current*
    parameters through ``torch.func.functional_call``: gradients land in the cell's
    ``.grad`` fields exactly as ``fixed_point`` on the equivalent hand-written f gives them.

    Buffers (batch norm): every application of the cell during the solve, and in the
    backward, works on copies of the buffers, so the solver's iterations never touch them.
    In train mode batch norm normalises with the batch statistics of its input at each
    application (IFT/JFB differentiate through them); then, when ``self.training`` and the
    cell has buffers, one extra application of the cell at ``(z*, x)`` without a graph
    updates the buffers in place exactly once, as one ordinary forward of the cell at
    ``z*`` would (cost: one more evaluation of the cell). In eval mode batch norm uses the
    running statistics and nothing is written. Train-mode batch norm couples the samples of
    a batch, so it cannot be used with ``per_sample=True`` (a ``ValueError`` at call time
    names the layer; use ``GroupNorm``/``LayerNorm``, or batch norm in eval mode).

    Args:
        cell: ``nn.Module`` whose ``forward(z, x)`` returns the next z (same structure,
            shapes, dtypes as z).
        solver: ``Picard`` / ``Anderson`` / ``Broyden`` instance or "picard" | "anderson"
            | "broyden"; default ``Anderson()``.
        grad_mode: ``IFT()`` (default), ``JFB()``, ``Neumann(k)``, ``Phantom(k, damping)``,
            ``Unrolled()`` or their names.
        per_sample: the leading dim of every leaf of z indexes independent problems:
            ``(B,)`` info tensors, converged samples frozen (see ``fixed_point``).
        on_nonconvergence: "ignore" | "warn" | "raise", as in ``fixed_point`` (also for
            IFT's backward solve).

    ``forward(x, z0=None) -> (z_star, info)``: ``x`` a tensor or pytree (e.g. ``(B, ...)``),
    ``z0`` the initial guess (``None``: zeros shaped like ``x``); ``z_star`` has z0's
    structure, ``info`` is an ``Info``. Cost: that of ``fixed_point`` with this solver and
    gradient mode; with buffers, one copy of them per call and per cell application, and in
    train mode one more cell evaluation (without a graph) for their update.

    Raises:
        ValueError: at construction, a bad option (the message names it); at call time,
            ``per_sample=True`` with a batch norm layer that uses batch statistics, or
            anything ``fixed_point`` refuses (f's output not shaped like z).
        FixedPointError: as ``fixed_point`` (non-finite iterates, ``on_nonconvergence="raise"``).

    Examples:
        >>> import torch, deq_functional as dq
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> deq = dq.DEQ(Cell(), dq.Anderson(max_iter=50, tol=1e-6), "jfb")
        >>> z, info = deq(torch.randn(8, 4))
        >>> z.sum().backward()
        >>> z.shape, bool(info.converged), deq.cell.lin.weight.grad.shape
        (torch.Size([8, 4]), True, torch.Size([4, 4]))

    Supports: backward / DDP / compile (``torch.compile(model, fullgraph=True)``) /
    ``torch.func.grad`` and ``vmap`` over ``functional_call(model, ...)``, except for a
    train-mode cell with buffers: its once-per-forward update writes to the module, which
    torch.func forbids (as for any train-mode batch norm); use ``from_module`` there.
    """

    def __init__(
        self,
        cell: nn.Module,
        solver: Any = None,
        grad_mode: Any = None,
        *,
        per_sample: bool = False,
        on_nonconvergence: str = "ignore",
    ):
        super().__init__()
        if not isinstance(cell, nn.Module):
            raise ValueError(f"DEQ: cell must be an nn.Module whose forward(z, x) returns the next z, got {type(cell).__name__}")
        self.cell = cell
        self.solver = Anderson() if solver is None else as_solver(solver, owner="DEQ")
        self.grad_mode = IFT() if grad_mode is None else as_grad_mode(grad_mode, owner="DEQ")
        self.per_sample = check_bool("DEQ", "per_sample", per_sample)
        self.on_nonconvergence = check_choice("DEQ", "on_nonconvergence", on_nonconvergence, ON_NONCONVERGENCE)

    def forward(self, x: Any, z0: Any = None) -> tuple[Any, Info]:
        """``(z_star, info)`` for input ``x`` from the initial guess ``z0`` (see the class docstring)."""
        if self.per_sample:
            self._refuse_batch_statistics()
        # The solve and its backward see a snapshot of the buffers: the update below must not
        # change what IFT's backward (run later) differentiates, nor bump a saved tensor's version.
        buffers = {name: b.detach().clone() for name, b in self.cell.named_buffers()}
        state = {**dict(self.cell.named_parameters()), **buffers}
        z_star, info = fixed_point(
            self._apply_cell, state, x, self.solver, self.grad_mode, z0,
            per_sample=self.per_sample, on_nonconvergence=self.on_nonconvergence,
        )
        if self.training and buffers:
            with torch.no_grad():  # the buffers' one update per forward, at z*
                self.cell(tree_map(torch.Tensor.detach, z_star), tree_map(torch.Tensor.detach, x))
        return z_star, info

    def _apply_cell(self, state: dict[str, torch.Tensor], z: Any, x: Any) -> Any:
        """The pure f handed to ``fixed_point``: the cell on ``state``, buffers copied."""
        return module_call(self.cell, state, z, x)

    def _refuse_batch_statistics(self) -> None:
        for name, m in self.cell.named_modules():
            if is_batch_norm(m) and (m.training or m.running_mean is None):
                raise ValueError(
                    f"DEQ: per_sample=True treats each sample as its own problem, but {'cell.' + name if name else 'cell'} "
                    f"({type(m).__name__}) normalises with batch statistics, which couple the samples; "
                    "use per_sample=False, or GroupNorm/LayerNorm, or put the batch norm in eval mode"
                )

    def extra_repr(self) -> str:
        return (f"solver={self.solver!r}, grad_mode={self.grad_mode!r}, per_sample={self.per_sample}, "
                f"on_nonconvergence={self.on_nonconvergence!r}")
