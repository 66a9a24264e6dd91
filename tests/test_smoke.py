"""A few seconds' check that an installed fusedae picked the right kernel and computes: numpy
only, so it also runs under qemu with a restricted CPU model (``make test-wheel``).

``FUSEDAE_EXPECT_ISA`` names the ISA the kernels must select; unset, the best this CPU has.
The reference is float64 numpy written out here, independent of ``fusedae._reference``.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
from collections.abc import Callable

import numpy as np
import pytest

import fusedae
from fusedae import _native

# Per value, relative to the terms summed into it (as tests/test_mlp.py measures).
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def test_the_expected_isa_is_selected() -> None:
    expected = os.environ.get("FUSEDAE_EXPECT_ISA") or _native.available_isas()[0]
    assert _native.selected_isa() == expected
    assert fusedae.info()["isa"] == expected
    assert fusedae.info()["build_profile"] == "release"
    assert _native.target_arch == platform.machine()


def seed_ae_layers(rng: np.random.Generator, dtype: type[np.floating]) -> list:
    """The seed's AE(784, 16) with PyTorch's default initialization: 784-42-16-42-784."""
    widths = [784, 42, 16, 42, 784]
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        bound = 1 / math.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(dtype)
        layers.append((weight, rng.uniform(-bound, bound, fan_out).astype(dtype)))
    return layers


def reference_chain(layers: list, activations: list[str], x: np.ndarray) -> np.ndarray:
    """The chain in float64 with only ReLU or identity after each layer."""
    y = x.astype(np.float64)
    for (weight, bias), activation in zip(layers, activations, strict=True):
        y = y @ weight.astype(np.float64).T + bias.astype(np.float64)
        if activation == "relu":
            y = np.maximum(y, 0.0)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_seed_autoencoder_forward(rows: int, dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(rows)
    layers = seed_ae_layers(rng, dtype)
    activations = ["relu", "identity", "relu", "identity"]
    ae = fusedae.MLP(layers, activations)
    assert ae.isa == _native.selected_isa()
    x = rng.uniform(0, 1, (rows, 784)).astype(dtype)
    got = ae(x)
    assert got.shape == (rows, 784)
    assert got.dtype == dtype
    # Measured against the chain on absolute values: cancellation cannot hide an error.
    scale = reference_chain([(np.abs(w), np.abs(b)) for w, b in layers], ["identity"] * 4, x)
    error = np.abs(got - reference_chain(layers, activations, x)) / scale
    assert error.max() <= TOLERANCE[dtype]


def _elementwise(function: Callable[[float], float]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.array([function(value) for value in x])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# The C library's float64 functions, one value at a time: numpy's own tanh and exp dispatch to
# AVX2 code that qemu 7.2 emulates wrongly (np.tanh(-10.0) gave -2e12 under -cpu Haswell-v4).
# GELU through erfc, not 1 + erf, keeps float64's precision over the whole grid.
ACTIVATIONS = {
    "relu": _elementwise(lambda x: max(x, 0.0)),
    "sigmoid": _elementwise(_sigmoid),
    "tanh": _elementwise(math.tanh),
    "gelu": _elementwise(lambda x: 0.5 * x * math.erfc(-x / math.sqrt(2.0))),
    "silu": _elementwise(lambda x: x * _sigmoid(x)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_float64(name: str, dtype: type[np.floating]) -> None:
    """The op on a grid through a 1 -> 32 layer of ones: 32 lanes of the vector kernel each."""
    x = np.linspace(-10.0, 10.0, 2001).astype(dtype)
    layer = (np.ones((32, 1), dtype=dtype), np.zeros(32, dtype=dtype))
    got = fusedae.MLP([layer], [name])(x[:, None]).astype(np.float64)
    want = ACTIVATIONS[name](x.astype(np.float64))[:, None]
    bound = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=bound, atol=1e-30)
