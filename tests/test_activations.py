"""Every post-op alone, through the native chain, against its exact value (mpmath) and against
PyTorch, on dense grids across the range, the saturated tails and the special values.

A 1 -> width layer of weights 1 and biases -0 makes each output `op(input)` exactly (`x + -0`
is `x`, signed zeros included): width 1 runs the dot form, 32 the panels.
"""

from __future__ import annotations

import functools

import mpmath as mp
import numpy as np
import numpy.typing as npt
import pytest

from fusedae import _native

mp.mp.dps = 60

# Within this of the exact value, relative, or TINY absolute where the exact value is smaller.
RELATIVE = {np.float32: 1e-6, np.float64: 1e-13}
TINY = 1e-30

OPS: list[tuple[str, ...] | tuple[str, float] | tuple[str, float, float]] = [
    ("identity",),
    ("relu",),
    ("leaky_relu", 0.1),
    ("sigmoid",),
    ("tanh",),
    ("gelu",),
    ("gelu_tanh",),
    ("silu",),
    ("elu", 0.7),
    ("hardtanh", -0.5, 0.8),
    ("softplus", 1.5, 20.0),
    ("softplus", 1.0, 20.0),
]
DTYPES = [np.float32, np.float64]


def grid(dtype: type[np.floating]) -> npt.NDArray[np.floating]:
    """A dense grid over the bends and tails, a geometric one out to the largest values, and the
    special values."""
    info = np.finfo(dtype)
    limit = 20.0 if dtype == np.float32 else 40.0
    dense = np.linspace(-limit, limit, 1601)
    magnitudes = np.geomspace(1e-30, float(info.max), 300)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.tiny), -float(info.tiny)]
    return np.concatenate([dense, magnitudes, -magnitudes, specials]).astype(dtype)


def exact(name: str, params: tuple[float, ...], x: float, dtype: type[np.floating]) -> mp.mpf:
    """The op's exact value at the float `x` (parameters rounded to `dtype`, as PyTorch and the
    kernels use them)."""
    p = [float(dtype(v)) for v in params]
    v = mp.mpf(x)

    def sigmoid(u: mp.mpf) -> mp.mpf:
        return 1 / (1 + mp.exp(-u))

    if name == "identity":
        return v
    if name == "relu":
        return max(v, mp.mpf(0))
    if name == "leaky_relu":
        return v if v > 0 else p[0] * v
    if name == "sigmoid":
        return sigmoid(v)
    if name == "tanh":
        return mp.tanh(v)
    if name == "gelu":
        # Beyond 50, Phi is 1 or below 1e-500 (and mpmath's erfc overflows past 1e300).
        return v * mp.ncdf(v) if abs(v) < 50 else max(v, mp.mpf(0))
    if name == "gelu_tanh":
        # x/2 (1 + tanh(u)) = x sigmoid(2u), without the cancellation of 1 + tanh(u).
        u = mp.sqrt(2 / mp.pi) * (v + mp.mpf("0.044715") * v**3)
        return v * sigmoid(2 * u)
    if name == "silu":
        return v * sigmoid(v)
    if name == "elu":
        return v if v > 0 else p[0] * mp.expm1(v)
    if name == "hardtanh":
        return min(mp.mpf(p[1]), max(mp.mpf(p[0]), v))
    if name == "softplus":
        beta, threshold = p
        # The branch is taken on the rounded product, as PyTorch and the kernels take it.
        if float(dtype(dtype(beta) * dtype(x))) > threshold:
            return v
        return mp.log1p(mp.exp(beta * v)) / beta
    raise ValueError(name)


def _elu(t, alpha: float = 1.0):
    """PyTorch's ELU, its zeros as current torch gives them and the kernels keep them: ``x``
    itself (torch 2.1 gave ``+0`` at ``-0``)."""
    import torch
    import torch.nn.functional as F

    return torch.where(t == 0, t, F.elu(t, alpha))


def torch_op(name: str, params: tuple[float, ...], x: npt.NDArray[np.floating]):
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    functions = {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, *params),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "elu": lambda t: _elu(t, *params),
        "hardtanh": lambda t: F.hardtanh(t, *params),
        "softplus": lambda t: F.softplus(t, *params),
    }
    return functions[name](t).numpy()


@functools.cache
def expected(op: tuple, dtype: type[np.floating]) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs, exact values as float64)`: non-finite inputs and zeros take PyTorch float64's
    value (IEEE evaluation of the formula; mpmath has no signed zero), the rest mpmath's,
    rounded to float64 (exact to far below the tolerances)."""
    name, params = op[0], tuple(op[1:])
    x = grid(dtype)
    rounded = tuple(float(dtype(p)) for p in params)
    want = torch_op(name, rounded, x.astype(np.float64))
    for i, value in enumerate(x):
        if np.isfinite(value) and value != 0:
            want[i] = float(exact(name, params, float(value), dtype))
    return x, want


def run(op: tuple, x: npt.NDArray[np.floating], width: int, isa: str) -> np.ndarray:
    dtype = x.dtype
    weight = np.ones((width, 1), dtype=dtype)
    bias = np.full(width, -0.0, dtype=dtype)
    chain = _native.Chain([weight], [bias], [op if len(op) > 1 else op[0]], isa=isa)
    return chain(np.ascontiguousarray(x.reshape(-1, 1)))


def relative_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per value: the relative error, 0 where both are below TINY apart from each other and
    the exact value is below TINY, inf where specials differ."""
    got = got.astype(np.float64)
    finite = np.isfinite(want) & np.isfinite(got)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.abs(got - want) / np.abs(want)
        tiny = np.abs(want) < TINY
        error = np.where(tiny, np.where(np.abs(got - want) < TINY, 0.0, np.inf), error)
    same_special = (np.isnan(want) & np.isnan(got)) | (want == got)
    return np.where(finite, error, np.where(same_special, 0.0, np.inf))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("op", OPS, ids=lambda op: "-".join(map(str, op)))
def test_op_matches_the_exact_value(op: tuple, dtype: type[np.floating], isa: str) -> None:
    x, want = expected(op, dtype)
    # What the dtype can hold of the exact value (float32 overflows to infinity).
    want = want.astype(dtype).astype(np.float64) if dtype == np.float32 else want
    bound = RELATIVE[dtype]
    for width in (1, 32):
        got = run(op, x, width, isa)
        errors = np.max(relative_errors(got, want[:, None]), axis=1)
        worst = int(np.argmax(errors))
        assert errors[worst] <= bound, (
            f"width {width} at x={x[worst]!r}: {got[worst, 0]!r} vs exact {want[worst]!r}"
        )
        # The dot form's horizontal sum adds +0 lanes to a -0 product: signs of zero are the
        # panels' to keep.
        zeros = (x == 0) & (width > 1)
        assert (np.signbit(got[zeros]) == np.signbit(want[zeros])[:, None]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("op", OPS, ids=lambda op: "-".join(map(str, op)))
def test_op_is_as_close_as_pytorch_or_closer(op: tuple, dtype: type[np.floating], isa: str) -> None:
    """PyTorch in the same dtype, within PyTorch's own error (measured against the exact value)
    plus ours; at infinities and NaN the same values as PyTorch float64 (IEEE evaluation of the
    formula), at zeros the same signs."""
    x, want = expected(op, dtype)
    name, params = op[0], tuple(op[1:])
    ours = run(op, x, 32, isa)[:, 0].astype(np.float64)
    theirs = torch_op(name, params, x).astype(np.float64)
    with np.errstate(invalid="ignore"):
        their_error = np.abs(theirs - want)
    finite = np.isfinite(want) & np.isfinite(theirs)
    allowed = their_error + RELATIVE[dtype] * np.abs(want) + TINY
    assert (np.abs(ours - theirs)[finite] <= allowed[finite]).all()
    # PyTorch float64 on the same inputs, parameters rounded to the dtype as both use them.
    rounded = tuple(float(dtype(p)) for p in params)
    reference64 = torch_op(name, rounded, x.astype(np.float64))
    infinite = ~np.isfinite(x)
    np.testing.assert_array_equal(ours[infinite], reference64[infinite].astype(dtype))
    zeros = x == 0
    np.testing.assert_allclose(ours[zeros], reference64[zeros], rtol=RELATIVE[dtype])
    assert (np.signbit(ours[zeros]) == np.signbit(reference64[zeros])).all()


def test_softplus_betas_below_the_kernels_floor_are_refused() -> None:
    """Below ``beta = 2^-24`` the kernels' exponential, flushed to 0 under ``exp(-87)``, divided
    by ``beta`` made whole results 0 (``beta = 1e-20``, ``beta x = -90``: 8e-20 exact), on every
    ISA; the op table and the native chain both refuse such a beta (the torch modules run it as
    plain PyTorch: ``test_activation_parameters_the_kernel_does_not_take_run_plain``)."""
    from fusedae._ops import SOFTPLUS_MIN_BETA, PostOp

    weight = np.ones((1, 1), np.float32)
    for beta in (1e-20, SOFTPLUS_MIN_BETA / 2):
        with pytest.raises(ValueError, match=r"beta must be at least 2\^-24"):
            PostOp("softplus", (beta, 20.0))
        with pytest.raises(ValueError, match=r"beta must be at least 2\^-24"):
            _native.Chain([weight], [None], [("softplus", beta, 20.0)])
    chain = _native.Chain([weight], [None], [("softplus", SOFTPLUS_MIN_BETA, 20.0)])
    x = np.array([[-87.5 / SOFTPLUS_MIN_BETA]], np.float32)  # beta x = -87.5
    exact = float(mp.exp(-87.5)) / SOFTPLUS_MIN_BETA  # 1.7e-31: flushed, within the 1e-30 floor
    assert abs(float(chain(x)[0, 0]) - exact) <= 1e-30
