"""The README's bad-input table, row by row: each input class gets exactly what the table says.

``ROWS`` holds, for each row of the table in README.md ("What bad input gets"), the input
class as written there, a call that makes it, and the expected outcome: an exception type
with the first words of its message, or a status. A last test checks that the README's
table lists exactly these rows, so the table cannot drift from the code.
"""

import math
import re
from pathlib import Path

import pytest
import torch

import deq_functional as dq

X = torch.ones(2, 3, dtype=torch.float64)
Z0 = torch.zeros(2, 3, dtype=torch.float64)


def fp(f, **kwargs):
    return lambda: dq.fixed_point(f, {}, kwargs.pop("x", X), **kwargs)


def vmapped(f, **kwargs):
    return lambda: torch.func.vmap(lambda xi: dq.fixed_point(f, {}, xi, **kwargs))(X)


def compiled(f, **kwargs):
    return lambda: torch.compile(lambda x: dq.fixed_point(f, {}, x, **kwargs), fullgraph=True, backend="eager")(X)


def adjoint_failure():
    A = (0.99 * torch.eye(3, dtype=torch.float64)).requires_grad_()
    z, _ = dq.fixed_point(
        lambda p, z, x: z @ p["A"] + x, {"A": A}, X, solver=dq.Anderson(max_iter=500, tol=1e-12),
        grad_mode=dq.IFT(solver=dq.Picard(max_iter=2, tol=1e-12)), on_nonconvergence="raise",
    )
    z.sum().backward()


def bn_per_sample():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, z, x):
            return self.bn(z) * 0.1 + x

    dq.DEQ(Cell(), per_sample=True)(torch.ones(4, 3))


def RUNAWAY(p, z, x):
    """Picard runs away; Anderson and Broyden solve it: -x/2."""
    return 3 * z + x


def NAN(p, z, x):
    return z * math.nan + x


LAYOUT = "fixed_point: f(params, z, x) must return the structure and shapes of z"
BATCH_DIM = "fixed_point(per_sample=True): every leaf of the state needs the same leading (batch) dim"

# (input class as in the README, call, expected: (exception type, first words) or a Status)
ROWS = [
    ("f returns another structure than z", fp(lambda p, z, x: (z, z), z0=Z0), (ValueError, LAYOUT)),
    ("f returns another shape than z", fp(lambda p, z, x: torch.cat([z, z], 1), z0=Z0), (ValueError, LAYOUT)),
    (
        "f returns another dtype than z",
        fp(lambda p, z, x: (z + x).float(), z0=Z0),
        (ValueError, "fixed_point: f(params, z, x) returned dtype float32 where z has float64"),
    ),
    (
        "z0=None and f's output is not shaped like x",
        fp(lambda p, z, x: x[:, :2]),
        (ValueError, "fixed_point: z0 is None, so z starts as zeros shaped like x"),
    ),
    (
        "an integer state",
        fp(lambda p, z, x: z, x=torch.ones(2, dtype=torch.long)),
        (ValueError, "fixed_point: the state must be floating point"),
    ),
    (
        "per_sample=True, leaves without a common batch dim",
        fp(lambda p, z, x: z, z0=(Z0, torch.zeros(4)), per_sample=True),
        (ValueError, BATCH_DIM),
    ),
    ("per_sample=True with an empty batch", fp(lambda p, z, x: 0.5 * z + x, x=torch.zeros(0, 3), per_sample=True), "empty"),
    ("an unknown solver or grad-mode name", fp(RUNAWAY, solver="newton"), (ValueError, "fixed_point: unknown solver 'newton'")),
    ("a bad solver option", lambda: dq.Anderson(m=0), (ValueError, "Anderson: m must be an integer >= 1, got 0")),
    (
        "GMRES (a linear solver) as the solver of f",
        fp(RUNAWAY, solver=dq.GMRES()),
        (ValueError, "fixed_point: GMRES solves affine fixed points u = A u + b (linear systems), not f's nonlinear map"),
    ),
    ("a bad grad-mode option", lambda: dq.Neumann(k=-1), (ValueError, "Neumann: k must be an integer >= 0, got -1")),
    (
        "a bad fixed_point option",
        fp(RUNAWAY, on_nonconvergence="explode"),
        (ValueError, "fixed_point: on_nonconvergence must be one of"),
    ),
    (
        "NaN/Inf from f, eager",
        fp(NAN),
        (dq.FixedPointError, "fixed_point: the forward solve: non-finite iterate at step 0: residual"),
    ),
    ("NaN/Inf from f, under vmap or compile", vmapped(NAN), dq.Status.NONFINITE),
    ("iterates that run away", fp(RUNAWAY, solver=dq.Picard()), dq.Status.DIVERGED),
    ("iterates that run away, under vmap or compile", compiled(RUNAWAY, solver=dq.Picard(), grad_mode="jfb"), dq.Status.DIVERGED),
    ("a budget too small", fp(lambda p, z, x: 0.9 * z + x, solver=dq.Picard(max_iter=3)), dq.Status.MAX_ITER),
    (
        "MAX_ITER or DIVERGED with on_nonconvergence=\"raise\"",
        fp(RUNAWAY, solver=dq.Picard(), on_nonconvergence="raise"),
        (dq.FixedPointError, "fixed_point: the forward solve did not converge"),
    ),
    (
        "an IFT adjoint that fails, with on_nonconvergence=\"raise\"",
        adjoint_failure,
        (dq.FixedPointError, "fixed_point: the IFT adjoint (backward) solve did not converge"),
    ),
    (
        "tol below the resolution of half precision or autocast",
        fp(lambda p, z, x: 0.5 * z + x, x=X.bfloat16()),
        (dq.FixedPointWarning, "fixed_point: the forward solve: tol=1e-05 is below the resolution"),
    ),
    (
        "a standalone solver's g returns another layout",
        lambda: dq.Picard()(lambda z: z[:2], torch.zeros(3)),
        (ValueError, "Picard: g(z) must return the structure and shapes of z"),
    ),
    (
        "DEQ with per_sample=True around train-mode batch norm",
        bn_per_sample,
        (ValueError, "DEQ: per_sample=True treats each sample as its own problem"),
    ),
]


@pytest.mark.parametrize("row, call, expected", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(row, call, expected):
    if expected == "empty":
        z, info = call()
        assert z.shape == (0, 3) and all(t.shape == (0,) for t in info)
    elif isinstance(expected, dq.Status):
        _, info = call()
        assert bool((info.status == int(expected)).all()) and not bool(info.converged.any())
    elif issubclass(expected[0], Warning):
        with pytest.warns(expected[0], match="^" + re.escape(expected[1])):
            call()
    else:
        with pytest.raises(expected[0], match="^" + re.escape(expected[1])):
            call()


def test_the_readme_table_lists_exactly_these_rows():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## What bad input gets", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [r[0] for r in ROWS]  # rows[0] is the header
