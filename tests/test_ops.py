"""The op table (``fusedae._ops``) and the chain representation (``fusedae.chain``): every entry
consistent with PyTorch, the Rust side's list and ONNX Runtime; an unknown op refused by every
entry point."""

from __future__ import annotations

import dataclasses
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fusedae
from fusedae import _native, _ops, _reference, serialization
from fusedae._ops import IDENTITY, OPS, RELU, PostOp, post_op, post_ops
from fusedae.chain import ChainSpec, Layer
from fusedae.state_dict import from_state_dict
from fusedae.torch import AE, FusedMLP, FusedMLPFunction, pack_chain
from fusedae.torch.lower import lower, post_op_module, to_sequential

ALL_OPS = [post_op(name) for name in OPS]
UNKNOWN = "tanh_but_not_in_the_table"


def test_the_table_names_the_ops_the_kernels_know():
    assert sorted(OPS) == sorted(_native.POST_OPS)


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_each_op_agrees_with_its_torch_module_in_value_and_gradient(op: PostOp):
    module = post_op_module(op)
    assert type(module).__name__ in op.op.torch_modules
    pre = torch.randn(50, 7, dtype=torch.float64) * 3
    pre[0, :3] = 0.0  # where ReLU's gradient is defined by convention
    leaf = pre.clone().requires_grad_()
    want = module(leaf)
    grad_out = torch.randn_like(want)
    want.backward(grad_out)
    post = op.torch_function(pre)
    assert torch.equal(post, want.detach())
    # numpy's exp and tanh (and math.erf) may round differently from PyTorch's vectorized ones.
    exact = op.name in ("identity", "relu", "leaky_relu", "hardtanh")
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-13, "atol": 1e-14}
    np.testing.assert_allclose(op.reference(pre.numpy()), want.detach().numpy(), **tolerance)
    np.testing.assert_allclose(
        op.reference_gradient(grad_out.numpy(), pre.numpy(), post.numpy()),
        leaf.grad.numpy(),
        **tolerance,
    )


@pytest.mark.parametrize("op", ALL_OPS, ids=str)
def test_each_op_lowers_from_its_module_and_runs_fused(op: PostOp):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), post_op_module(op), nn.Linear(5, 3)).double()
    lowered = lower(plain)
    assert lowered is not None
    assert lowered.post_ops == (op, IDENTITY)
    fused = FusedMLP.from_sequential(plain)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)
    spec = ChainSpec.from_pairs(
        [(layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in plain[::2]],
        [op, IDENTITY],
    )
    rebuilt = to_sequential(spec)  # the same modules, less an nn.Identity
    if op != IDENTITY:
        assert repr(rebuilt) == repr(plain)
    assert lower(rebuilt).post_ops == (op, IDENTITY)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), plain(x))


# Beside the defaults: parameters that take other ONNX nodes (Softplus's scaling) or attributes.
WITH_PARAMETERS = [
    PostOp("leaky_relu", (0.2,)),
    PostOp("elu", (0.5,)),
    PostOp("hardtanh", (0.0, 6.0)),
    PostOp("softplus", (2.0, 5.0)),
]


@pytest.mark.parametrize("op", ALL_OPS + WITH_PARAMETERS, ids=str)
def test_each_op_has_the_onnx_operator_of_its_reference(op: PostOp):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fusedae.cli.bench import onnx_session

    # float32, which ONNX Runtime's CPU kernels all take (Erf, Elu, Softplus lack float64).
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((5, 6)), rng.standard_normal(5)) for _ in range(1)]
    layers32 = [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]
    x = (rng.standard_normal((64, 6)) * 4).astype(np.float32)
    got = onnx_session(layers32, [op], threads=1).run(None, {"x": x})[0]
    want, _ = _reference.forward(layers32, [op], x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class TestUnknownOpsAreErrors:
    """A name that is not in the table is refused wherever it can enter, never read as
    identity."""

    message = f"activation must be {_ops._choices()}, got '{UNKNOWN}'"

    def layers(self):
        return [(np.ones((3, 4), np.float32), np.zeros(3, np.float32))]

    def test_post_ops(self):
        with pytest.raises(ValueError, match=self.message):
            PostOp(UNKNOWN)
        with pytest.raises(ValueError, match=f"layer 1: {self.message}"):
            post_ops(["relu", UNKNOWN])
        with pytest.raises(TypeError, match="a name or a PostOp, got int"):
            post_op(3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"relu takes 0 parameters \(none\), got \(0.1,\)"):
            PostOp("relu", (0.1,))
        for params in (("0.5",), 0.5, [0.5], (None,)):
            with pytest.raises(TypeError, match="'leaky_relu': params must be a tuple of numbers"):
                PostOp("leaky_relu", params)  # type: ignore[arg-type]

    def test_chain_spec_and_mlp(self):
        with pytest.raises(ValueError, match=self.message):
            ChainSpec.from_pairs(self.layers(), [UNKNOWN])
        with pytest.raises(TypeError, match="post_op must be a PostOp"):
            ChainSpec((Layer(np.ones((3, 4)), None, "relu"),), 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=self.message):
            fusedae.MLP(self.layers(), [UNKNOWN])

    def test_reference(self):
        with pytest.raises(ValueError, match=self.message):
            _reference.forward(self.layers(), [UNKNOWN], np.ones((1, 4)))

    def test_serialization_write_and_read(self, tmp_path: Path):
        path = tmp_path / "model.safetensors"
        with pytest.raises(ValueError, match=self.message):
            serialization.write(path, self.layers(), [UNKNOWN])
        assert not path.exists()
        serialization.write(path, self.layers(), ["relu"])
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        layers = json.loads(header["__metadata__"]["layers"])
        layers[0]["post_op"] = UNKNOWN
        header["__metadata__"]["layers"] = json.dumps(layers)
        encoded = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])
        with pytest.raises(ValueError, match=self.message):
            serialization.read(path)

    def test_torch_function_and_its_backward(self):
        weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        chain = pack_chain([weight], [None], ["relu"])
        x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=self.message):
                FusedMLPFunction.apply(x, chain, (UNKNOWN,), weight, None)
        with pytest.raises(ValueError, match=self.message):
            pack_chain([weight], [None], [UNKNOWN])
        with pytest.raises(ValueError, match=r"a weight and a bias .* 1 layers, got 1 tensors"):
            FusedMLPFunction.apply(x, chain, ("relu",), weight)

    def test_lowering_leaves_unknown_modules_to_pytorch(self):
        class Relu(nn.ReLU):  # a subclass may compute anything
            pass

        for unknown in (nn.Softsign(), Relu(), nn.LayerNorm(3)):
            plain = nn.Sequential(nn.Linear(4, 3), unknown, nn.Linear(3, 2))
            assert lower(plain) is None
        # Two post-ops in a row are one layer's only where they are the same idempotent op.
        assert lower([nn.Linear(4, 3), nn.ReLU(), nn.ReLU()]) is not None
        assert lower([nn.ReLU(), nn.Linear(4, 3)]) is None


def test_the_reference_backward_applies_the_tables_gradient(monkeypatch: pytest.MonkeyPatch):
    """`_reference.backward` takes each post-op's gradient rule from the table, and the native
    backward of `FusedMLPFunction` matches it, identity and ReLU alike."""
    calls: list[str] = []
    for name, op in list(OPS.items()):

        def spy(grad, pre, post, params, rule=op.reference_gradient, name=name):
            calls.append(name)
            return rule(grad, pre, post, params)

        monkeypatch.setitem(OPS, name, dataclasses.replace(op, reference_gradient=spy))
    rng = np.random.default_rng()
    widths = [7, 6, 5, 4, 3]
    activations = ["relu", "identity", "identity", "relu"]
    layers = [
        (rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out))
        for n_in, n_out in itertools.pairwise(widths)
    ]
    params = [torch.tensor(array, requires_grad=True) for layer in layers for array in layer]
    x = torch.tensor(rng.standard_normal((11, widths[0])), requires_grad=True)
    chain = pack_chain(params[0::2], params[1::2], activations)
    y = FusedMLPFunction.apply(x, chain, tuple(activations), *params)
    grad_out = rng.standard_normal(y.shape)
    y.backward(torch.from_numpy(grad_out))
    want_x, want_layers = _reference.backward(layers, activations, x.detach().numpy(), grad_out)
    assert calls == activations[::-1]
    np.testing.assert_allclose(x.grad.numpy(), want_x, rtol=1e-10, atol=1e-12)
    for (want_w, want_b), w, b in zip(want_layers, params[0::2], params[1::2], strict=True):
        np.testing.assert_allclose(w.grad.numpy(), want_w, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(b.grad.numpy(), want_b, rtol=1e-10, atol=1e-12)


class TestChainSpec:
    def test_every_entry_point_gives_the_same_spec(self, tmp_path: Path):
        model = AE(12, 2, 5).double()
        state = {key: value.numpy() for key, value in model.state_dict().items()}
        path = tmp_path / "ae.safetensors"
        fusedae.torch.save(model, path)
        from_file = serialization.read(path)
        from_state = from_state_dict(state, "linear,relu,linear,linear,relu,linear")
        from_mlp = fusedae.MLP.load(path).spec
        for spec in (from_file, from_state, from_mlp):
            assert spec.post_ops == (RELU, IDENTITY, RELU, IDENTITY)
            assert spec.encoder_layers == 2
            assert spec.widths == [12, 5, 2, 5, 12]
            assert spec.precision == "full"
            assert all(layer.normalization == () for layer in spec.layers)
            for layer, want in zip(spec.layers, from_state.layers, strict=True):
                np.testing.assert_array_equal(layer.weight, want.weight)
                np.testing.assert_array_equal(layer.bias, want.bias)

    def test_parts_and_the_pairs_view(self):
        rng = np.random.default_rng(0)
        pairs = [(rng.standard_normal((n, m)), None) for m, n in ((8, 4), (4, 2), (2, 8))]
        spec = ChainSpec.from_pairs(pairs, ["relu", "identity", "relu"])
        assert spec.encoder_layers == 2  # the narrowest inner layer of an autoencoder
        assert spec.select("encoder").widths == [8, 4, 2]
        assert spec.select("decoder").post_ops == (RELU,)
        assert spec.select("all") is spec
        layers, names = spec.part("encoder")
        assert [weight.shape for weight, _ in layers] == [(4, 8), (2, 4)]
        assert names == ["relu", "identity"]
        weight, bias = spec.layers[0]  # a layer unpacks as its (weight, bias) pair
        assert weight is pairs[0][0]
        assert bias is None
        with pytest.raises(ValueError, match="encoder_layers must be between 0 and 3, got 4"):
            ChainSpec(spec.layers, 4)
        with pytest.raises(ValueError, match="precision must be one of"):
            ChainSpec(spec.layers, 2, "int4")  # type: ignore[arg-type]

    def test_mlp_pickles_its_post_ops(self):
        import pickle

        mlp = fusedae.MLP([(np.eye(3), None), (np.eye(3), np.ones(3))], [RELU, "identity"])
        clone = pickle.loads(pickle.dumps(mlp))
        assert clone.spec.post_ops == mlp.spec.post_ops == (RELU, IDENTITY)
        assert repr(clone) == repr(mlp)


def test_post_op_text():
    assert str(RELU) == "relu"
    assert _ops.IDENTITY.keyword_params() == {}
