"""Reference implicit networks as pure ``init`` / ``embed`` / ``apply`` / ``readout`` functions.

Each model computes the JFB paper's ``N(d) = S(z*)`` with ``z* = R(z*, Q(d))``:
``embed`` is Q, ``apply`` is R (the ``f`` passed to ``fixed_point``), ``readout`` is S.

* `.mlp`: ``tanh(W z + U d + b)`` with spectral rescaling of ``W`` (contraction);
* `.conv`: the paper's ResNet-style convolutional network for 28×28×1 / 32×32×3 images,
  with its Lipschitz rescaling as a pure function (``conv.rescale``);
* `.multiscale`: a two-resolution (MDEQ-style) network whose state is a tuple.
"""

from . import conv, mlp, multiscale
from ._common import count_params, predict

MODELS = {"mlp": mlp, "conv": conv, "multiscale": multiscale}

__all__ = ["mlp", "conv", "multiscale", "predict", "count_params", "MODELS"]
