"""Saving models to ``.safetensors`` (``fusedae.torch.save``, ``MLP.save``) and loading them with
numpy alone (``MLP.load``), including in a process where torch cannot be imported."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
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
from fusedae._ops import IDENTITY, OPS, RELU, PostOp
from fusedae.chain import ChainSpec, Layer, Normalization, Position
from fusedae.torch.lower import post_op_module


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
            lambda: nn.Sequential(AE(64, 2).encoder, AE(64, 2).decoder),
            (64, 42, 2),
            id="Sequential(encoder, decoder)",
        ),
        pytest.param(
            lambda: ft.accelerate(nn.Sequential(AE(64, 3).encoder, AE(64, 3).decoder))[0],
            (64, 42, 3),
            id="Sequential(encoder, decoder) accelerated",
        ),
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


def test_save_refuses_other_modules_naming_them(tmp_path: Path) -> None:
    softmax = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Softmax(dim=1))
    with pytest.raises(
        TypeError, match=r"the model is not one chain: fusedae cannot fuse 3 \(Softmax"
    ):
        ft.save(softmax, tmp_path / "m.safetensors")
    tiny_beta = nn.Sequential(nn.Linear(3, 3), nn.Softplus(beta=1e-9))  # and says why
    with pytest.raises(TypeError, match=r"1 \(Softplus\) into it: .* beta must be at least 2\^-24"):
        ft.save(tiny_beta, tmp_path / "m.safetensors")
    ae = ft.AE(6, 2)
    ae.decoder.append(nn.Softmax(dim=1))
    with pytest.raises(TypeError, match=r"decoder is not one chain: .* fuse decoder.3 \(Softmax\)"):
        ft.save(ae, tmp_path / "m.safetensors")
    halves = nn.Sequential(AE(6, 2).encoder, nn.Sequential(nn.Linear(2, 6), nn.Softmax(dim=1)))
    with pytest.raises(TypeError, match=r"1 is not one chain: .* fuse 1.1 \(Softmax\)"):
        ft.save(halves, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="got Linear with children"):
        ft.save(nn.Linear(3, 3), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match=r"got AENetwork with children \['network'\]"):
        ft.save(AENetwork(6, 2), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_big_endian_float64_layers_are_written_as_float64(tmp_path: Path) -> None:
    """``write`` keeps float64 of either byte order (``>f8 == float64`` is False: written as
    float32)."""
    rng = np.random.default_rng(7)
    layers = [(rng.standard_normal((3, 5)).astype(">f8"), rng.standard_normal(3).astype(">f8"))]
    serialization.write(tmp_path / "m.safetensors", layers, ["identity"])
    loaded = MLP.load(tmp_path / "m.safetensors")
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded.spec.layers[0].weight, layers[0][0])


def test_save_refuses_a_class_whose_forward_adds_to_its_halves(tmp_path: Path) -> None:
    """A class with children ``encoder`` and ``decoder`` whose ``forward`` scales (or squashes)
    their result: saved as the two chains alone, it encoded 2.18 off, status 0."""

    class ScaledAE(AE):
        def __init__(self) -> None:
            super().__init__(6, 2)
            self.register_buffer("scale", torch.tensor(3.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.scale

    model = ScaledAE().train()
    with pytest.raises(TypeError, match=r"ScaledAE's forward computes other than decoder\(enc"):
        ft.save(model, tmp_path / "m.safetensors")
    assert all(child.training for child in model.modules())  # its modes put back
    ft.save(AE(6, 2), tmp_path / "m.safetensors")  # the seed's class: its forward is the halves

    class CleanedAE(AE):  # an input clean-up rows of unit scale do not reach (it saved)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(torch.nan_to_num(x).clamp(-5, 5))

    class ClampedAE(AE):  # an output clamp (it saved)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).clamp(-3, 3)

    for module in (CleanedAE(6, 2), ClampedAE(6, 2)):
        with pytest.raises(TypeError, match="forward computes other than decoder"):
            ft.save(module, tmp_path / "m.safetensors")


class _WithCodes(AE):
    """The seed's class returning ``(reconstruction, codes)``, as many AEs do."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encoder(x)
        return self.decoder(codes), codes


class _WithNoise(AE):
    """A forward of two arguments, which the probe cannot call."""

    def forward(self, x: torch.Tensor, noise: float) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x + noise)


def test_the_forward_probe_takes_what_computes_the_chain(tmp_path: Path) -> None:
    """Models whose forward is their halves, in another precision or returning their codes
    too, save (the probe runs a float64 copy: a bf16 model was 0.002 off its float32 chain); a
    forward the probe cannot call saves with a warning that it was not checked."""
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    ft.save(AE(784, 16).to(torch.bfloat16), path)
    ft.save(_WithCodes(6, 2), path)
    accelerated, _ = ft.accelerate(AE(784, 16), precision="bf16")
    ft.save(accelerated, path)
    with pytest.warns(UserWarning, match=r"saves _WithNoise as decoder\(encoder\(x\)\), without"):
        ft.save(_WithNoise(6, 2), path)
    assert MLP.load(path).spec.widths == [6, 42, 2, 42, 6]


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


def test_a_loaded_chain_saved_again_keeps_its_encoder(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """``MLP.load(path).save(copy)``: the file's encoder boundary, not the default guess (the
    encoder 8-4-4 of an 8-4-4-8 AE came back as 8-4, and `encode` gave codes 0.95 off)."""
    layers = [
        (rng.standard_normal((out, fan_in)), rng.standard_normal(out))
        for fan_in, out in itertools.pairwise((8, 4, 4, 8))
    ]
    original, copy = tmp_path / "ae.safetensors", tmp_path / "copy.safetensors"
    MLP(layers, ["relu", "identity", "identity"]).save(original, encoder_layers=2)
    MLP.load(original).save(copy)
    for path in (original, copy):
        assert MLP.load(path, "encoder").spec.widths == [8, 4, 4]


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
    # True and 1.5 passed the range check and wrote files `load` refuses ("1.5" is no count).
    for count in (True, 1.5, np.float64(1.0), "1"):
        with pytest.raises(TypeError, match=r"encoder_layers must be an int, got"):
            mlp.save(tmp_path / "other.safetensors", encoder_layers=count)
    assert not (tmp_path / "other.safetensors").exists()
    mlp.save(tmp_path / "m.safetensors", encoder_layers=np.int64(1))
    assert MLP.load(tmp_path / "m.safetensors", "encoder").out_features == 3


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
    assert metadata["format_version"] == "2"
    layers = json.loads(metadata["layers"])
    assert [layer["post_op"] for layer in layers] == ["relu", "identity", "relu", "identity"]
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata=metadata)
    assert MLP.load(theirs).layers[3][0].shape == (8, 42)


def every_op_spec(dtype: type, rng: np.random.Generator) -> ChainSpec:
    """A chain with one layer per op of the table, each with parameters off their defaults, and
    BatchNorms before and after layers, affine or not, in ``dtype``."""

    def array(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(dtype)

    def norm(position: Position, features: int, affine: bool) -> Normalization:
        var = rng.uniform(0.5, 2.0, features).astype(dtype)
        weight, bias = (array(features), array(features)) if affine else (None, None)
        return Normalization(position, array(features), var, 1e-3 * rng.random(), weight, bias)

    layers = []
    width = 5
    for index, op in enumerate(OPS.values()):
        out = 3 + index % 4
        params = tuple(default * 0.5 + 0.25 for _, default in op.params)
        norms = {
            0: (norm("before", width, True),),
            1: (norm("after", out, False),),
            2: (norm("before", width, False), norm("after", out, True)),
        }.get(index % 4, ())
        bias = None if index == 3 else array(out)
        layers.append(Layer(array(out, width), bias, PostOp(op.name, params), norms))
        width = out
    return ChainSpec(tuple(layers), 2)


def assert_same_spec(got: ChainSpec, want: ChainSpec) -> None:
    """Equal structure and bit-identical arrays (of the same dtype)."""

    def same(a: np.ndarray | None, b: np.ndarray | None) -> None:
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))

    assert got.encoder_layers == want.encoder_layers
    assert got.post_ops == want.post_ops
    for layer, expected in zip(got.layers, want.layers, strict=True):
        same(layer.weight, expected.weight)
        same(layer.bias, expected.bias)
        assert len(layer.normalization) == len(expected.normalization)
        for norm, expected_norm in zip(layer.normalization, expected.normalization, strict=True):
            assert (norm.position, norm.eps) == (expected_norm.position, expected_norm.eps)
            for kind in ("mean", "var", "weight", "bias"):
                same(getattr(norm, kind), getattr(expected_norm, kind))


@pytest.mark.parametrize("eps", [math.nan, math.inf])
def test_an_eps_the_reader_refuses_is_not_saved(tmp_path: Path, eps: float) -> None:
    spec = every_op_spec(np.float32, np.random.default_rng(7))
    norm = spec.layers[0].normalization[0]
    layers = (
        dataclasses.replace(spec.layers[0], normalization=(dataclasses.replace(norm, eps=eps),)),
    )
    spec = dataclasses.replace(spec, layers=layers + spec.layers[1:])
    with pytest.raises(
        ValueError, match=f"layer 0: a normalization's eps of {eps} cannot be saved"
    ):
        serialization.write_spec(tmp_path / "chain.safetensors", spec)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_and_batchnorm_round_trip(tmp_path: Path, dtype: type) -> None:
    spec = every_op_spec(dtype, np.random.default_rng(7))
    path = tmp_path / "chain.safetensors"
    serialization.write_spec(path, spec)
    assert_same_spec(serialization.read(path), spec)


def test_saved_module_with_every_op_and_batchnorm(tmp_path: Path, rng: np.random.Generator) -> None:
    modules: list[nn.Module] = [nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6)]
    for op in OPS.values():
        post_op = PostOp(op.name, tuple(default * 0.5 + 0.25 for _, default in op.params))
        modules += [post_op_module(post_op), nn.Linear(6, 6)]
    model = nn.Sequential(*modules).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
    path = tmp_path / "model.safetensors"
    ft.save(model, path)
    assert_same_spec(serialization.read(path), ft.saving.chain_spec(model))
    x = rng.standard_normal((40, 6)).astype(np.float32)
    np.testing.assert_allclose(MLP.load(path)(x), torch_forward(model, x), rtol=1e-4, atol=1e-5)


FORMAT_1 = Path(__file__).parent / "data" / "format-1-ae.safetensors"


def test_format_1_files_still_load() -> None:
    """``format-1-ae.safetensors`` was written by ``serialization.write`` of format version 1:
    ``write(path, layers, ["relu", "identity", "relu", "identity"], encoder_layers=2)`` with
    the float32 layers below (the third without a bias)."""
    widths = [4, 3, 2, 3, 4]
    spec = serialization.read(FORMAT_1)
    assert spec.post_ops == (RELU, IDENTITY, RELU, IDENTITY)
    assert spec.encoder_layers == 2
    for index, layer in enumerate(spec.layers):
        n_in, n_out = widths[index], widths[index + 1]
        want = (np.arange(n_out * n_in, dtype=np.float32).reshape(n_out, n_in) - index) / 8
        np.testing.assert_array_equal(layer.weight, want)
        assert layer.weight.dtype == np.float32
        if index == 2:
            assert layer.bias is None
        else:
            np.testing.assert_array_equal(layer.bias, np.arange(n_out, dtype=np.float32) / 4)
        assert layer.normalization == ()
    x = np.ones((2, 4), np.float32)
    assert MLP.load(FORMAT_1, "encoder")(x).shape == (2, 2)


def test_format_1_with_an_op_that_has_parameters_is_refused(tmp_path: Path) -> None:
    data = FORMAT_1.read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(
        with_header(data, set_metadata("activations", '["elu", "relu", "relu", "relu"]'))
    )
    with pytest.raises(ValueError, match="layer 0: elu has parameters, which version 1 lacks"):
        serialization.read(path)


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


def set_metadata(key: str, value: object) -> Callable[[dict], None]:
    return lambda header: header["__metadata__"].__setitem__(key, value)


def edit_layer(index: int, **entries: object) -> Callable[[dict], None]:
    """Sets ``entries`` in the ``layers`` metadata's object for layer ``index``."""

    def edit(header: dict) -> None:
        layers = json.loads(header["__metadata__"]["layers"])
        layers[index].update(entries)
        header["__metadata__"]["layers"] = json.dumps(layers)

    return edit


def drop_layer_key(index: int, key: str) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        layers = json.loads(header["__metadata__"]["layers"])
        del layers[index][key]
        header["__metadata__"]["layers"] = json.dumps(layers)

    return edit


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
        lambda d: with_header(d, set_metadata("format_version", "3")),
        "format_version '3' is not supported",
    ),
    "no version": (
        lambda d: with_header(d, lambda h: h["__metadata__"].pop("format_version")),
        "bad format_version metadata None: expected a version number",
    ),
    "version as a number": (
        lambda d: with_header(d, set_metadata("format_version", 2)),
        "bad format_version metadata 2: expected a version number",
    ),
    "bad activation": (
        lambda d: with_header(d, edit_layer(1, post_op="swish")),
        "layer 1: activation must be .* got 'swish'",
    ),
    "layers not JSON": (
        lambda d: with_header(d, set_metadata("layers", "relu")),
        "bad layers metadata",
    ),
    "layers not a list": (
        lambda d: with_header(d, set_metadata("layers", "{}")),
        "the layers metadata is not a JSON list",
    ),
    "layer key missing": (
        lambda d: with_header(d, drop_layer_key(0, "normalization")),
        r"layer 0: expected an object with keys \['normalization', 'params', 'post_op'\]",
    ),
    "params missing": (
        lambda d: with_header(d, edit_layer(0, post_op="leaky_relu")),
        r"layer 0: leaky_relu takes parameters \['negative_slope'\] by name, got \{\}",
    ),
    "unknown param": (
        lambda d: with_header(d, edit_layer(0, post_op="elu", params={"beta": 1.0})),
        r"elu takes parameters \['alpha'\] by name, got \{'beta': 1.0\}",
    ),
    "param not a number": (
        lambda d: with_header(d, edit_layer(0, post_op="elu", params={"alpha": "1"})),
        "elu: parameters must be finite numbers",
    ),
    "param not finite": (
        lambda d: with_header(d, edit_layer(0, post_op="elu", params={"alpha": float("nan")})),
        "elu: parameters must be finite numbers",
    ),
    "param the kernel refuses": (
        lambda d: with_header(
            d, edit_layer(0, post_op="softplus", params={"beta": -1.0, "threshold": 20.0})
        ),
        "layer 0: post-op 'softplus': beta must be positive, got -1.0",
    ),
    "hardtanh bounds crossed": (
        lambda d: with_header(
            d, edit_layer(1, post_op="hardtanh", params={"min_val": 1.0, "max_val": 1.0})
        ),
        r"layer 1: post-op 'hardtanh': min_val \(1.0\) must be below max_val \(1.0\)",
    ),
    "bad position": (
        lambda d: with_header(
            d, edit_layer(0, normalization=[{"position": "inside", "eps": 1e-5}])
        ),
        "layer 0: a normalization is an object with a position",
    ),
    "normalization tensors missing": (
        lambda d: with_header(d, edit_layer(0, normalization=[{"position": "after", "eps": 0.1}])),
        "tensor 'layers.0.normalization.0.mean' is missing",
    ),
    "encoder_layers out of range": (
        lambda d: with_header(d, set_metadata("encoder_layers", "3")),
        "encoder_layers must be between 0 and 2, got 3",
    ),
    # Metadata values are strings, written as a count: `int` took the number 1.7 as 1.
    "encoder_layers a float": (
        lambda d: with_header(d, set_metadata("encoder_layers", 1.7)),  # type: ignore[arg-type]
        "bad encoder_layers metadata 1.7: expected a count",
    ),
    "encoder_layers padded": (
        lambda d: with_header(d, set_metadata("encoder_layers", " 1 ")),
        "bad encoder_layers metadata ' 1 ': expected a count",
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


def test_a_file_of_two_dtypes_is_refused(tmp_path: Path) -> None:
    """A float64 layer after a float32 one (no fusedae wrote it) ran in float32, without a
    word: a file holds one dtype."""
    arrays = {"layers.0.weight": np.ones((4, 6), np.float32), "layers.1.weight": np.ones((6, 4))}
    header: dict[str, object] = {
        "__metadata__": {
            "format": "fusedae.chain",
            "format_version": "2",
            "layers": json.dumps([{"post_op": "identity", "params": {}, "normalization": []}] * 2),
            "encoder_layers": "1",
        }
    }
    body = b""
    for name, array in arrays.items():
        dtype = {"float32": "F32", "float64": "F64"}[array.dtype.name]
        span = [len(body), len(body) + array.nbytes]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": span}
        body += array.tobytes()
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    with pytest.raises(ValueError, match=r"layers of \['float32', 'float64'\]: a model file holds"):
        MLP.load(path)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_malformed_file_is_a_clear_value_error(tmp_path: Path, name: str) -> None:
    corrupt, message = CORRUPTIONS[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(corrupt(valid_file(tmp_path)))
    prefix = re.escape(f"{path}: not a valid fusedae model file: ")
    with pytest.raises(ValueError, match=prefix) as error:
        MLP.load(path)
    assert re.search(message, str(error.value)), str(error.value)


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


FUZZ_FINDINGS = Path(__file__).parent / "data" / "fuzz_findings" / "safetensors"


@pytest.mark.parametrize("finding", sorted(FUZZ_FINDINGS.iterdir()), ids=lambda path: path.name)
def test_files_the_fuzzer_found_give_value_errors(tmp_path: Path, finding: Path) -> None:
    """Each once let RecursionError (JSON nested 1,200 deep) or OverflowError (Infinity, or an
    integer beyond float range, as a parameter) escape the reader."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(finding.read_bytes())
    with pytest.raises(ValueError, match="not a valid fusedae model file"):
        serialization.read(path)
    with pytest.raises(ValueError, match="not a valid fusedae model file"):
        MLP.load(path)
