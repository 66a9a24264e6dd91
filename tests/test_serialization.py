"""Saving models to ``.safetensors`` (``fusedae.torch.save``, ``MLP.save``) and loading them with
numpy alone (``MLP.load``), including in a process where torch cannot be imported."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fusedae.torch as ft
from _seed import AE, AENetwork
from fusedae import MLP, serialization


def torch_forward(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def test_seed_ae_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    model = AE(64, 2)
    path = tmp_path / "ae.safetensors"
    ft.save(model, path)
    x = rng.standard_normal((50, 64)).astype(np.float32)
    codes = MLP.load(path, "encoder")(x)
    np.testing.assert_allclose(codes, torch_forward(model.encoder, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        MLP.load(path, "decoder")(codes), torch_forward(model.decoder, codes), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(MLP.load(path)(x), torch_forward(model, x), rtol=1e-5, atol=1e-6)
    spec = serialization.read(path)
    assert spec.encoder_layers == 2
    assert spec.activations == ("relu", "identity", "relu", "identity")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for (weight, bias), linear in zip(spec.layers, linears, strict=True):
        np.testing.assert_array_equal(weight, linear.weight.detach().numpy())
        np.testing.assert_array_equal(bias, linear.bias.detach().numpy())


@pytest.mark.parametrize(
    ("build", "encoder_widths"),
    [
        pytest.param(lambda: AENetwork(64, 2).network, (64, 42, 2), id="single Sequential"),
        pytest.param(lambda: ft.AE(64, 2), (64, 42, 2), id="fusedae AE"),
        pytest.param(lambda: ft.AE(64, 2).encoder, (64, 42, 2), id="encoder alone"),
        pytest.param(
            lambda: nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5), nn.ReLU()),
            (30, 20, 5),
            id="ends in ReLU",
        ),
    ],
)
def test_save_modules(
    tmp_path: Path, rng: np.random.Generator, build: Callable[[], nn.Module], encoder_widths
) -> None:
    module = build()
    path = tmp_path / "model.safetensors"
    ft.save(module, path)
    encoder = MLP.load(path, "encoder")
    assert (encoder.in_features, encoder.out_features) == (encoder_widths[0], encoder_widths[-1])
    x = rng.standard_normal((20, encoder_widths[0])).astype(np.float32)
    np.testing.assert_allclose(MLP.load(path)(x), torch_forward(module, x), rtol=1e-5, atol=1e-6)


def test_encoder_alone_has_no_decoder(tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    ft.save(AE(64, 2).encoder, path)
    with pytest.raises(ValueError, match="this model has no decoder: its encoder is 2 of its 2"):
        MLP.load(path, "decoder")


def test_save_refuses_other_modules(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"module is not an nn\.Sequential of Linear/ReLU/Identity"):
        ft.save(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="got Linear with children"):
        ft.save(nn.Linear(3, 3), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_float64_and_missing_biases_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    layers = [(rng.standard_normal((7, 5)), None), (rng.standard_normal((5, 7)), rng.random(5))]
    mlp = MLP(layers, ["relu", "identity"])
    path = tmp_path / "mlp.safetensors"
    mlp.save(path, encoder_layers=1)
    loaded = MLP.load(path)
    assert loaded.dtype == np.float64
    assert loaded.activations == ("relu", "identity")
    for (weight, bias), (weight_in, bias_in) in zip(loaded.layers, layers, strict=True):
        np.testing.assert_array_equal(weight, weight_in)
        assert (bias is None) == (bias_in is None)
    assert MLP.load(path, "encoder").out_features == 7
    assert MLP.load(path, dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize(
    ("widths", "expected"),
    [
        ((64, 42, 2, 42, 64), 2),  # the seed's single Sequential: ends at the code
        ((10, 8, 3, 3, 8, 10), 2),  # the first of two narrowest layers
        ((784, 42, 16), 2),  # output narrower than input: all encoder
        ((5, 5), 1),
        ((5, 9, 5), 1),
    ],
)
def test_default_encoder_layers(widths: tuple[int, ...], expected: int) -> None:
    assert serialization.default_encoder_layers(widths) == expected


def test_encoder_layers_is_checked(tmp_path: Path) -> None:
    mlp = MLP([(np.ones((3, 4)), None)])
    with pytest.raises(ValueError, match="encoder_layers must be between 0 and 1, got 2"):
        mlp.save(tmp_path / "m.safetensors", encoder_layers=2)
    mlp.save(tmp_path / "m.safetensors", encoder_layers=0)
    with pytest.raises(ValueError, match="no encoder"):
        MLP.load(tmp_path / "m.safetensors", "encoder")


def test_interoperates_with_the_safetensors_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "ours.safetensors"
    ft.save(AE(8, 2), path)
    tensors = load_file(path)
    assert sorted(tensors) == [
        f"layers.{i}.{kind}" for i in range(4) for kind in ("bias", "weight")
    ]
    with st.safe_open(path, "np") as file:
        metadata = file.metadata()
    assert metadata["format"] == "fusedae.chain"
    assert json.loads(metadata["activations"]) == ["relu", "identity", "relu", "identity"]
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata=metadata)
    assert MLP.load(theirs).layers[3][0].shape == (8, 42)


def valid_file(tmp_path: Path) -> bytes:
    path = tmp_path / "valid.safetensors"
    MLP([(np.ones((3, 4), np.float32), np.zeros(3, np.float32)), (np.ones((2, 3)), None)]).save(
        path
    )
    return path.read_bytes()


def with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    """``data`` with its JSON header edited (tensor bytes unchanged)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    edit(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + size :]


def set_metadata(key: str, value: str) -> Callable[[dict], None]:
    return lambda header: header["__metadata__"].__setitem__(key, value)


CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda d: b"", "0 bytes is too short for a safetensors file"),
    "truncated data": (
        lambda d: d[:-4],
        "the file is truncated: tensor 'layers.1.weight' ends at byte 84 of the data, but the "
        "file holds 80",
    ),
    "truncated header": (lambda d: d[:40], "the header claims"),
    "huge header size": (lambda d: struct.pack("<Q", 1 << 62) + d[8:], "the header claims"),
    "not JSON": (lambda d: d[:8] + b"?" * (len(d) - 8), "the header is not valid JSON"),
    "JSON list": (
        lambda d: struct.pack("<Q", 2) + b"[]",
        "the header is not a JSON object",
    ),
    "no metadata": (
        lambda d: with_header(d, lambda h: h.pop("__metadata__")),
        "no 'fusedae.chain' metadata",
    ),
    "future version": (
        lambda d: with_header(d, set_metadata("format_version", "2")),
        "format_version '2' is not supported",
    ),
    "bad activation": (
        lambda d: with_header(d, set_metadata("activations", '["relu", "gelu"]')),
        "layer 1: activation must be 'relu' or 'identity', got 'gelu'",
    ),
    "activations not JSON": (
        lambda d: with_header(d, set_metadata("activations", "relu")),
        "bad activations or encoder_layers metadata",
    ),
    "encoder_layers out of range": (
        lambda d: with_header(d, set_metadata("encoder_layers", "3")),
        "encoder_layers must be between 0 and 2, got 3",
    ),
    "float16": (
        lambda d: with_header(d, lambda h: h["layers.1.weight"].__setitem__("dtype", "F16")),
        "dtype must be F32 or F64, got 'F16'",
    ),
    "wrong shape": (
        lambda d: with_header(d, lambda h: h["layers.1.weight"].__setitem__("shape", [3, 2])),
        "layer 1 takes 2 features, but layer 0 gives 3",
    ),
    "size mismatch": (
        lambda d: with_header(d, lambda h: h["layers.1.weight"].__setitem__("shape", [2, 2])),
        r"shape \(2, 2\) of float32 needs 16 bytes, but its data_offsets span 24",
    ),
    "overlapping": (
        lambda d: with_header(
            d, lambda h: h["layers.1.weight"].__setitem__("data_offsets", [0, 24])
        ),
        "starts at byte 0 of the data, not at",
    ),
    "missing weight": (
        lambda d: with_header(d, lambda h: h.update({"layers.2.bias": h.pop("layers.1.weight")})),
        "tensor 'layers.1.weight' is missing",
    ),
    "foreign tensor": (
        lambda d: with_header(d, lambda h: h.update({"embedding": h.pop("layers.1.weight")})),
        "unexpected tensor 'embedding'",
    ),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_malformed_file_is_a_clear_value_error(tmp_path: Path, name: str) -> None:
    corrupt, message = CORRUPTIONS[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt(valid_file(tmp_path)))
    prefix = re.escape(f"{path}: not a valid fusedae model file: ")
    with pytest.raises(ValueError, match=prefix) as error:
        MLP.load(path)
    assert re.search(message, str(error.value)), str(error.value)


def test_from_state_dict_reads_the_seed_layouts() -> None:
    seed = {k: v.numpy() for k, v in AE(64, 2).state_dict().items()}
    spec = serialization.from_state_dict(seed)
    assert spec.activations == ("relu", "identity", "relu", "identity")
    assert spec.encoder_layers == 2
    single = {k: v.numpy() for k, v in AENetwork(64, 2).state_dict().items()}
    spec = serialization.from_state_dict(single)
    assert spec.activations == ("relu", "identity", "relu", "identity")
    assert spec.encoder_layers == 2
    bare = {k.removeprefix("network."): v for k, v in single.items()}
    assert serialization.from_state_dict(bare).encoder_layers == 2


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"conv.weight": np.ones((3, 3, 3, 3))}, "'conv.weight' is not the weight or bias"),
        ({"0.weight": np.ones((3, 4)), "3.weight": np.ones((3, 3))}, "2 modules between 0 and"),
        ({"0.bias": np.ones(3)}, "0 has a bias but no weight"),
        ({"0.weight": np.ones((3, 4)), "1.weight": np.ones((3, 2))}, "layer 1 takes 2 features"),
        ({}, "it holds no layers"),
    ],
)
def test_from_state_dict_refuses_other_layouts(state: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serialization.from_state_dict(state)


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any "import torch" now fails
import numpy as np
import fusedae
from fusedae.cli import main

try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("torch imported")
model, x, expected, out = sys.argv[1:]
codes = fusedae.MLP.load(model, "encoder")(np.load(x))
np.testing.assert_allclose(codes, np.load(expected), rtol=1e-5, atol=1e-6)
assert main(["encode", model, x, "-o", out]) == 0
np.testing.assert_array_equal(np.load(out), codes)
assert main(["info"]) == 0
print("torch-free OK")
"""


def test_load_and_encode_without_torch(tmp_path: Path, rng: np.random.Generator) -> None:
    model = AE(64, 2)
    ft.save(model, tmp_path / "ae.safetensors")
    x = rng.standard_normal((300, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", torch_forward(model.encoder, x))
    args = ["ae.safetensors", "x.npy", "expected.npy", "codes.npy"]
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "torch-free OK" in result.stdout
