"""``precision="bf16"``: weights stored as bfloat16 for inference, float32 in and out, every
result within the documented bound of the float64 reference (``docs/precision.md``), on every
ISA this CPU runs (AVX512_BF16 multiplies bf16; the others widen the weights to float32)."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fusedae
from _seed import AE as SeedAE
from fusedae import MLP, _reference
from fusedae._ops import PostOp
from fusedae.torch import AE, FusedMLP, accelerate
from fusedae.torch import save as torch_save

BF16_WORST = 1e-2  # the ceiling on the normwise relative error

# (widths, activations): the seed's encoder and AE (h_dim=42), the benchmark suite's other
# models, and odd widths (1, and widths that are not whole registers or pairs).
CHAINS = [
    ((784, 42, 16), ("relu", "identity")),
    ((784, 42, 16, 42, 784), ("relu", "identity", "relu", "identity")),
    ((64, 42, 2), ("relu", "identity")),
    ((1024, 256, 32), ("relu", "identity")),
    ((784, 256, 64, 32, 64, 256, 784), ("relu",) * 5 + ("sigmoid",)),
    ((784, 256, 64, 32, 64, 256, 784), ("gelu_tanh",) * 5 + ("sigmoid",)),
]
# Odd shapes: within the bound, but a normwise error over one or two outputs may be anything
# (a sum that cancels).
ODD_CHAINS = [
    ((33, 17, 9, 1), ("tanh", "silu", "identity")),
    ((1, 1), ("identity",)),
    ((5, 3, 7), (PostOp("leaky_relu", (0.2,)), PostOp("elu", (0.7,)))),
]


def random_layers(rng: np.random.Generator, widths: tuple[int, ...]) -> list:
    return [
        (
            (rng.standard_normal((out, fan_in)) / np.sqrt(fan_in)).astype(np.float32),
            (0.1 * rng.standard_normal(out)).astype(np.float32),
        )
        for fan_in, out in itertools.pairwise(widths)
    ]


def normwise(got: np.ndarray, want: np.ndarray) -> float:
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / scale) if scale > 0 else float(np.linalg.norm(got))


def check_within_bound(
    mlp: MLP, layers: list, activations, x: np.ndarray, ceiling: float = BF16_WORST
) -> float:
    """Runs ``mlp`` on ``x``: float32 out, every value within ``bf16_bound`` of the float64
    reference, the normwise error below ``ceiling``; returns that error."""
    got = mlp(x)
    assert got.dtype == np.float32
    assert got.shape == (*x.shape[:-1], layers[-1][0].shape[0])
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    want, _ = _reference.forward(layers, activations, flat)
    bound = _reference.bf16_bound(layers, activations, flat)
    excess = np.abs(got.reshape(want.shape) - want) - bound
    assert (excess <= 0).all(), f"{excess.max():e} above the bound at {np.argmax(excess)}"
    error = normwise(got.reshape(want.shape), want)
    assert error <= ceiling
    return error


@pytest.mark.parametrize(
    ("widths", "activations", "ceiling"),
    [(*chain, BF16_WORST) for chain in CHAINS] + [(*chain, np.inf) for chain in ODD_CHAINS],
    ids=lambda c: str(c),
)
@pytest.mark.parametrize("rows", [0, 1, 2, 9, 64, 300])
def test_bf16_within_its_bound_on_every_isa(rng, isa, widths, activations, ceiling, rows):
    layers = random_layers(rng, widths)
    mlp = MLP(layers, activations, precision="bf16", isa=isa)
    assert (mlp.precision, mlp.dtype, mlp.isa) == ("bf16", np.float32, isa)
    x = rng.uniform(-2, 2, (rows, widths[0])).astype(np.float32)
    # The ceiling is on a batch's error: one row's two outputs may nearly cancel.
    check_within_bound(mlp, layers, activations, x, ceiling if rows >= 64 else np.inf)


def test_bf16_takes_any_input_fp32_takes(rng, isa):
    layers = random_layers(rng, (784, 42, 16))
    mlp = MLP(layers, precision="bf16", isa=isa)
    x = rng.standard_normal((7, 2 * 784)).astype(np.float32)
    strided = x[:, ::2]  # not contiguous
    check_within_bound(mlp, layers, ("relu", "identity"), strided)
    # float64 is converted (float32 out), a leading shape kept, out= filled.
    x64 = rng.standard_normal((3, 5, 784))
    got = mlp(x64)
    assert got.dtype == np.float32
    assert got.shape == (3, 5, 16)
    np.testing.assert_array_equal(got, mlp(x64.astype(np.float32)))
    out = np.empty((3, 5, 16), np.float32)
    assert mlp(x64.astype(np.float32), out=out) is out
    np.testing.assert_array_equal(out, got)


def test_bf16_is_the_same_on_any_thread_count(rng):
    """The same bits on one thread or two (each row's sums in the same order)."""
    layers = random_layers(rng, (784, 42, 16, 42, 784))
    mlp = MLP(layers, precision="bf16")
    x = rng.uniform(0, 1, (2000, 784)).astype(np.float32)
    fusedae.set_num_threads(1)
    one = mlp(x)
    fusedae.set_num_threads(2)
    np.testing.assert_array_equal(mlp(x), one)


def test_bf16_is_not_the_fp32_kernel(rng):
    """The bf16 result differs from fp32 by about bf16's rounding: weights really are stored so."""
    layers = random_layers(rng, (784, 42, 16))
    x = rng.uniform(0, 1, (64, 784)).astype(np.float32)
    full, bf16 = MLP(layers)(x), MLP(layers, precision="bf16")(x)
    assert 1e-4 < normwise(bf16, full) < BF16_WORST


def test_bf16_beats_torch_bfloat16_on_the_same_weights(rng):
    """On the seed AE, bf16 is no less accurate than PyTorch's ``model.to(torch.bfloat16)``."""
    torch.manual_seed(0)
    model = SeedAE(784, 16).eval()
    layers = [
        (m.weight.detach().numpy(), m.bias.detach().numpy())
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    activations = ("relu", "identity", "relu", "identity")
    x = rng.uniform(0, 1, (1000, 784)).astype(np.float32)
    want, _ = _reference.forward(layers, activations, x)
    ours = normwise(MLP(layers, activations, precision="bf16")(x), want)
    with torch.no_grad():
        theirs = copy.deepcopy(model).to(torch.bfloat16)(torch.from_numpy(x).bfloat16())
    assert ours <= normwise(theirs.float().numpy(), want)


def test_bf16_on_trained_weights_of_the_digits_autoencoder():
    """Trained weights (the digits AE, 300 Adam steps), not just random ones."""
    datasets = pytest.importorskip("sklearn.datasets")
    x = datasets.load_digits().data.astype(np.float32) / 16.0
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 42), nn.ReLU(), nn.Linear(42, 8), nn.Linear(8, 42), nn.ReLU(),
        nn.Linear(42, 64), nn.Sigmoid(),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.from_numpy(x)
    for _ in range(300):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(data), data)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.03  # it learned
    linears = [m for m in model if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears]
    activations = ("relu", "identity", "relu", "sigmoid")
    check_within_bound(MLP(layers, activations, precision="bf16"), layers, activations, x)


def test_precision_arguments_are_checked(rng):
    layers = random_layers(rng, (8, 4))
    with pytest.raises(ValueError, match="precision must be one of"):
        MLP(layers, precision="int4")
    with pytest.raises(TypeError, match="precision 'bf16' takes and gives float32"):
        MLP(layers, precision="bf16", dtype=np.float64)
    with pytest.raises(TypeError, match="precision 'fp32'"):
        MLP(layers, precision="fp32", dtype=np.float64)
    assert MLP(layers, precision="fp64").dtype == np.float64
    f64 = [(w.astype(np.float64), b.astype(np.float64)) for w, b in layers]
    assert MLP(f64, precision="bf16").dtype == np.float32  # the weights are converted
    assert "precision=bf16" in repr(MLP(layers, precision="bf16"))
    assert MLP(layers).precision == "fp32"
    assert MLP(f64).precision == "fp64"


def test_bf16_survives_pickle_save_and_load(rng, tmp_path):
    import pickle

    layers = random_layers(rng, (784, 42, 16, 42, 784))
    mlp = MLP(layers, precision="bf16")
    x = rng.uniform(0, 1, (5, 784)).astype(np.float32)
    again = pickle.loads(pickle.dumps(mlp))
    assert again.precision == "bf16"
    np.testing.assert_array_equal(again(x), mlp(x))
    mlp.save(tmp_path / "m.safetensors", encoder_layers=2)
    loaded = MLP.load(tmp_path / "m.safetensors", precision="bf16")
    np.testing.assert_array_equal(loaded(x), mlp(x))
    assert MLP.load(tmp_path / "m.safetensors").precision == "fp32"  # the file keeps fp32


def test_info_says_how_each_precision_runs():
    precisions = fusedae.info()["precisions"]
    assert precisions["fp32"] == "native"
    assert precisions["bf16"] in ("native", "widened", "emulated")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = fusedae.info()["isa"] == "avx512" and " avx512_bf16" in flags
    assert (precisions["bf16"] == "native") == native
    assert fusedae._native.fma_peak_gflops(0.02, precision="bf16") > 0


def test_torch_modules_at_bf16(rng):
    torch.manual_seed(0)
    seed = SeedAE(784, 16).eval()
    model = AE(784, 16, precision="bf16").eval()
    model.load_state_dict(seed.state_dict())
    x = torch.from_numpy(rng.uniform(0, 1, (64, 784)).astype(np.float32))
    layers = [
        (m.weight.detach().numpy(), m.bias.detach().numpy())
        for m in seed.modules()
        if isinstance(m, nn.Linear)
    ]
    ae = ("relu", "identity", "relu", "identity")
    expected = MLP(layers, ae, precision="bf16")(x.numpy())
    codes = MLP(layers[:2], ae[:2], precision="bf16")(x.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), expected)
        np.testing.assert_array_equal(model.encoder(x).numpy(), codes)
        assert model.precision == "bf16"
        copied = copy.deepcopy(model)
        np.testing.assert_array_equal(copied(x).numpy(), expected)
        # Back to fp32: PyTorch's numbers again.
        model.set_precision("fp32")
        torch.testing.assert_close(model(x), seed(x), rtol=1e-5, atol=1e-6)


def test_torch_bf16_refuses_to_train_and_float64(rng):
    model = AE(20, 3, 7, precision="bf16")
    x = torch.rand(300, 20)
    with pytest.raises(RuntimeError, match="precision 'bf16' is for inference"):
        model(x)  # parameters that need gradients: a training call
    with pytest.raises(TypeError, match="float32"), torch.no_grad():
        model.double()(x.double())


def test_accelerate_at_bf16(rng):
    model = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 4), nn.Sigmoid())
    plain = copy.deepcopy(model)
    fused, report = accelerate(model, precision="bf16")
    assert isinstance(fused, FusedMLP), report
    assert fused.precision == "bf16"
    x = torch.from_numpy(rng.uniform(-1, 1, (50, 30)).astype(np.float32))
    with torch.inference_mode():
        got, want = fused(x), plain(x)
    assert normwise(got.numpy(), want.numpy()) < BF16_WORST
    assert not torch.equal(got, want)
    again, _ = accelerate(fused, precision="fp32")
    assert again.precision == "fp32"
    with torch.no_grad():
        torch.testing.assert_close(again(x), want)
    with pytest.raises(ValueError, match="precision must be one of"):
        accelerate(plain, precision="int3")


def test_cli_encode_at_bf16(tmp_path, rng):
    torch.manual_seed(0)
    model = AE(64, 2).eval()
    torch_save(model, tmp_path / "m.safetensors")
    x = rng.standard_normal((500, 64))  # float64: converted, float32 out
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [sys.executable, "-m", "fusedae", "encode", tmp_path / "m.safetensors",
         tmp_path / "x.npy", "-o", tmp_path / "z.npy", "--precision", "bf16"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    z = np.load(tmp_path / "z.npy")
    assert z.dtype == np.float32
    mlp = MLP.load(tmp_path / "m.safetensors", "encoder", precision="bf16")
    np.testing.assert_array_equal(z, mlp(x.astype(np.float32)))
