"""``precision="bf16"`` and ``"int8"``: weights stored narrower for inference, float32 in and
out, every result within its documented bound of the float64 reference (``docs/precision.md``),
on every ISA this CPU runs (AVX512_BF16 multiplies bf16 on AMD and AVX512_VNNI int8; the others
run the float32 kernel on the rounded weights, or widen bf16 where ``FUSEDAE_BF16`` says so)."""

from __future__ import annotations

import copy
import itertools
import os
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
from fusedae.chain import ChainSpec
from fusedae.torch import AE, FusedMLP, accelerate
from fusedae.torch import cache as torch_cache
from fusedae.torch import save as torch_save

# The ceilings on the normwise relative error, and each precision's bound.
WORST = {"bf16": 1e-2, "int8": 3e-2}
BOUNDS = {"bf16": _reference.bf16_bound, "int8": _reference.int8_bound}
NARROW = ("bf16", "int8")

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
    mlp: MLP, layers: list, activations, x: np.ndarray, ceiling: float | None = None
) -> float:
    """Runs ``mlp`` on ``x``: float32 out, every value within its precision's bound of the
    float64 reference, the normwise error below ``ceiling`` (default: the precision's
    ``WORST``); returns that error."""
    got = mlp(x)
    assert got.dtype == np.float32
    assert got.shape == (*x.shape[:-1], layers[-1][0].shape[0])
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    want, _ = _reference.forward(layers, activations, flat)
    bound = BOUNDS[mlp.precision](layers, activations, flat)
    ceiling = WORST[mlp.precision] if ceiling is None else ceiling
    excess = np.abs(got.reshape(want.shape) - want) - bound
    assert (excess <= 0).all(), f"{excess.max():e} above the bound at {np.argmax(excess)}"
    error = normwise(got.reshape(want.shape), want)
    assert error <= ceiling
    return error


@pytest.mark.parametrize(
    ("widths", "activations", "odd"),
    [(*chain, False) for chain in CHAINS] + [(*chain, True) for chain in ODD_CHAINS],
    ids=lambda c: str(c),
)
@pytest.mark.parametrize("rows", [0, 1, 2, 9, 64, 300])
@pytest.mark.parametrize("precision", NARROW)
def test_within_its_bound_on_every_isa(rng, isa, precision, widths, activations, odd, rows):
    layers = random_layers(rng, widths)
    mlp = MLP(layers, activations, precision=precision, isa=isa)
    assert (mlp.precision, mlp.dtype, mlp.isa) == (precision, np.float32, isa)
    x = rng.uniform(-2, 2, (rows, widths[0])).astype(np.float32)
    # The ceiling is on a batch's error: one row's two outputs may nearly cancel.
    ceiling = WORST[precision] if rows >= 64 and not odd else np.inf
    check_within_bound(mlp, layers, activations, x, ceiling)


@pytest.mark.parametrize("precision", NARROW)
def test_rows_spanning_more_than_float32_holds(isa, precision):
    """Finite inputs of both signs near float32's largest, whose range (max - min) float32
    cannot hold: finite outputs within their bound (int8 quantized such rows to NaN)."""
    layers = [(np.full((2, 4), 1e-3, np.float32), None)]
    x = np.array([[1.8e38, -1.8e38, 1.0, 2.0], [3e38, -3e38, 0.0, 1.0]], np.float32)
    mlp = MLP(layers, ["identity"], precision=precision, isa=isa)
    assert np.isfinite(mlp(x)).all()
    check_within_bound(mlp, layers, ["identity"], x, ceiling=np.inf)


@pytest.mark.parametrize("precision", NARROW)
def test_bound_covers_softplus_switch(isa, precision):
    """Softplus jumps by 3.13 where ``beta x`` passes ``threshold`` (``beta=0.1,
    threshold=1``): a pre-activation of 10.03 that the weights' rounding takes below 10 lands
    on the other side, and the bound (0.09 before it counted the jump) holds it. int8: the
    second weight sets the scale, 10.03 rounds to 10.0."""
    softplus = [PostOp("softplus", (0.1, 1.0))]
    if precision == "bf16":
        layers, x = [(np.array([[10.03]], np.float32), None)], np.array([[1.0]], np.float32)
    else:
        layers = [(np.array([[10.03, 12.7]], np.float32), None)]
        x = np.array([[1.0, 0.0]], np.float32)
    mlp = MLP(layers, softplus, precision=precision, isa=isa)
    check_within_bound(mlp, layers, softplus, x, ceiling=np.inf)
    # Away from the switch the jump is not added.
    assert BOUNDS[precision](layers, softplus, x / 2)[0, 0] < 0.1


def test_bf16_refuses_weights_beyond_its_range(isa):
    """A finite float32 weight from 3.3961e38 up rounds to bf16's infinity (a tester's 3.4e38
    gave inf for 1.7e38): refused; bf16's largest value is taken, and within the bound."""
    refused = r"layer 0: weight \[0, 1\] is -3.4e38; precision bf16 holds at most 3.39e38"
    with pytest.raises(ValueError, match=refused):
        MLP(
            [(np.array([[1.0, -3.4e38]], np.float32), None)],
            ["identity"],
            precision="bf16",
            isa=isa,
        )
    layers = [(np.array([[3.3895e38]], np.float32), None)]
    x = np.array([[0.5]], np.float32)
    check_within_bound(
        MLP(layers, ["identity"], precision="bf16", isa=isa), layers, ["identity"], x
    )


INT8_MAX_IN_FEATURES = 66_311  # (2^31 - 1) // (255 * 127)


def test_int8_sums_exactly_as_wide_as_it_takes(isa):
    """A layer of all-ones weights on rows of ones, the int32 sums' worst case: exact at the
    widest layer int8 takes (at 66,400 inputs the VNNI kernel gave -66,222), and one input more
    a clear error on every ISA (a chain that runs on one CPU runs on all)."""
    for width in (INT8_MAX_IN_FEATURES - 1, INT8_MAX_IN_FEATURES):
        layers = [(np.ones((3, width), np.float32), None)]
        mlp = MLP(layers, ["identity"], precision="int8", isa=isa)
        x = np.ones((5, width), np.float32)
        check_within_bound(mlp, layers, ["identity"], x)
        np.testing.assert_array_equal(mlp(x), np.full((5, 3), width, np.float32))
    wide = INT8_MAX_IN_FEATURES + 1
    layers = [(np.ones((wide, 4), np.float32), None), (np.ones((2, wide), np.float32), None)]
    with pytest.raises(ValueError, match="layer 1: 66312 inputs; precision int8 sums at most"):
        MLP(layers, ["relu", "identity"], precision="int8", isa=isa)
    MLP(layers, ["relu", "identity"], precision="bf16", isa=isa)


@pytest.mark.parametrize("precision", NARROW)
def test_takes_any_input_fp32_takes(rng, isa, precision):
    layers = random_layers(rng, (784, 42, 16))
    mlp = MLP(layers, precision=precision, isa=isa)
    x = rng.standard_normal((7, 2 * 784)).astype(np.float32)
    strided = x[:, ::2]  # not contiguous
    check_within_bound(mlp, layers, ("relu", "identity"), strided)
    # float64 is converted (float32 out), a leading shape kept, out= filled.
    x64 = rng.standard_normal((3, 5, 784))
    got = mlp(x64)
    assert got.dtype == np.float32
    assert got.shape == (3, 5, 16)
    np.testing.assert_array_equal(got, mlp(x64.astype(np.float32)))
    np.testing.assert_array_equal(mlp(x64.astype(">f8")), got)  # either byte order
    out = np.empty((3, 5, 16), np.float32)
    assert mlp(x64.astype(np.float32), out=out) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("precision", NARROW)
def test_the_same_on_any_thread_count(rng, precision):
    """The same bits on one thread or two (each row's sums in the same order)."""
    layers = random_layers(rng, (784, 42, 16, 42, 784))
    mlp = MLP(layers, precision=precision)
    x = rng.uniform(0, 1, (2000, 784)).astype(np.float32)
    fusedae.set_num_threads(1)
    one = mlp(x)
    fusedae.set_num_threads(2)
    np.testing.assert_array_equal(mlp(x), one)


@pytest.mark.parametrize("precision", NARROW)
@pytest.mark.parametrize("last", ["identity", "relu", "sigmoid"])
def test_outputs_stored_past_the_caches_are_the_same_bits(rng, isa, precision, last):
    """A large output that starts on a cache line (fusedae allocates it so) is stored past the
    caches where the kernel can (non-temporal stores, when the last op runs on the
    accumulators); into a buffer 16 bytes off a line, the same kernel stores it normally."""
    layers = random_layers(rng, (784, 42, 16, 42, 784))
    activations = ("relu", "identity", "relu", last)
    mlp = MLP(layers, activations, precision=precision, isa=isa)
    x = rng.uniform(-2, 2, (700, 784)).astype(np.float32)
    fusedae.set_num_threads(1)  # one chunk of 2.2 MB
    streamed = mlp(x)
    assert streamed.ctypes.data % 64 == 0
    block = np.empty(x.shape[0] * 784 + 16, np.float32)
    start = (-block.ctypes.data % 64 + 16) // 4
    off_line = block[start : start + x.shape[0] * 784].reshape(x.shape[0], 784)
    assert off_line.ctypes.data % 64 == 16
    np.testing.assert_array_equal(mlp(x, out=off_line), streamed)
    check_within_bound(mlp, layers, activations, x)


@pytest.mark.parametrize("precision", NARROW)
def test_is_not_the_fp32_kernel(rng, precision):
    """The result differs from fp32 by about the precision's rounding: the weights really are
    stored so."""
    layers = random_layers(rng, (784, 42, 16))
    x = rng.uniform(0, 1, (64, 784)).astype(np.float32)
    full, narrow = MLP(layers)(x), MLP(layers, precision=precision)(x)
    assert 1e-4 < normwise(narrow, full) < WORST[precision]


def seed_ae_against_float64(
    rng: np.random.Generator, precision: str
) -> tuple[nn.Module, np.ndarray, np.ndarray, float]:
    """The seed AE (seeded weights), 1000 input rows, their float64 reference outputs, and our
    normwise error at ``precision`` on them."""
    torch.manual_seed(0)
    model = SeedAE(784, 16).eval()
    layers = seed_ae_layers(model)
    x = rng.uniform(0, 1, (1000, 784)).astype(np.float32)
    want, _ = _reference.forward(layers, SEED_AE_ACTIVATIONS, x)
    return model, x, want, normwise(MLP(layers, SEED_AE_ACTIVATIONS, precision=precision)(x), want)


SEED_AE_ACTIVATIONS = ("relu", "identity", "relu", "identity")


def seed_ae_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (m.weight.detach().numpy(), m.bias.detach().numpy())
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]


def test_bf16_beats_torch_bfloat16_on_the_same_weights(rng):
    """On the seed AE, bf16 is no less accurate than PyTorch's ``model.to(torch.bfloat16)``."""
    model, x, want, ours = seed_ae_against_float64(rng, "bf16")
    with torch.no_grad():
        theirs = copy.deepcopy(model).to(torch.bfloat16)(torch.from_numpy(x).bfloat16())
    assert ours <= normwise(theirs.float().numpy(), want)


@pytest.mark.parametrize("rows_per_call", [1000, 1])
def test_int8_beats_torch_quantize_dynamic_on_the_same_weights(rng, rows_per_call):
    """On the seed AE, int8 is no less accurate than PyTorch's ``quantize_dynamic`` (per-tensor
    and per-channel weights, the default 7-bit activations: what users reach for), in one call
    and in calls of one row (where its per-tensor input scale is per row, as ours is)."""
    from torch.ao.quantization import quantize_dynamic
    from torch.ao.quantization.qconfig import per_channel_dynamic_qconfig

    model, x, want, _ = seed_ae_against_float64(rng, "int8")
    calls = np.split(x, len(x) // rows_per_call)
    mlp = MLP(seed_ae_layers(model), SEED_AE_ACTIVATIONS, precision="int8")
    ours = normwise(np.concatenate([mlp(rows) for rows in calls]), want)
    assert ours <= WORST["int8"]
    for qconfig in (None, per_channel_dynamic_qconfig):
        spec = {nn.Linear} if qconfig is None else {nn.Linear: qconfig}
        quantized = quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
        with torch.no_grad():
            theirs = np.concatenate([quantized(torch.from_numpy(rows)).numpy() for rows in calls])
        assert ours <= normwise(theirs, want), qconfig


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
    for precision in NARROW:
        check_within_bound(MLP(layers, activations, precision=precision), layers, activations, x)


def test_precision_arguments_are_checked(rng):
    layers = random_layers(rng, (8, 4))
    with pytest.raises(ValueError, match="precision must be one of"):
        MLP(layers, precision="int4")
    with pytest.raises(TypeError, match="precision 'bf16' takes and gives float32"):
        MLP(layers, precision="bf16", dtype=np.float64)
    with pytest.raises(TypeError, match="precision 'int8' takes and gives float32"):
        MLP(layers, precision="int8", dtype=np.float64)
    bad = [(w.copy(), b) for w, b in layers]
    bad[0][0][2, 1] = np.inf
    with pytest.raises(ValueError, match=r"layer 0: weight \[2, 1\] is inf; precision int8"):
        MLP(bad, precision="int8")
    with pytest.raises(TypeError, match="precision 'fp32'"):
        MLP(layers, precision="fp32", dtype=np.float64)
    assert MLP(layers, precision="fp64").dtype == np.float64
    f64 = [(w.astype(np.float64), b.astype(np.float64)) for w, b in layers]
    assert MLP(f64, precision="bf16").dtype == np.float32  # the weights are converted
    assert "precision=bf16" in repr(MLP(layers, precision="bf16"))
    assert MLP(f64, precision="int8").precision == "int8"
    assert MLP(layers).precision == "fp32"
    assert MLP(f64).precision == "fp64"
    big_endian = [(w.astype(">f8"), b.astype(">f8")) for w, b in layers]
    assert MLP(big_endian).dtype == np.float64  # float64 in either byte order
    assert MLP(layers, dtype=">f8").dtype == np.float64
    assert MLP.from_spec(ChainSpec.from_pairs(big_endian, ["identity"])).dtype == np.float64


@pytest.mark.parametrize("precision", NARROW)
def test_survives_pickle_save_and_load(rng, tmp_path, precision):
    import pickle

    layers = random_layers(rng, (784, 42, 16, 42, 784))
    mlp = MLP(layers, precision=precision)
    x = rng.uniform(0, 1, (5, 784)).astype(np.float32)
    again = pickle.loads(pickle.dumps(mlp))
    assert again.precision == precision
    np.testing.assert_array_equal(again(x), mlp(x))
    mlp.save(tmp_path / "m.safetensors", encoder_layers=2)
    loaded = MLP.load(tmp_path / "m.safetensors", precision=precision)
    np.testing.assert_array_equal(loaded(x), mlp(x))
    assert MLP.load(tmp_path / "m.safetensors").precision == "fp32"  # the file keeps fp32


@pytest.mark.skipif(fusedae.info()["isa"] != "avx512", reason="the bf16 forms are AVX-512's")
def test_fusedae_bf16_forces_how_bf16_runs():
    """``FUSEDAE_BF16=native|widen|emulate`` picks the form (native only with AVX512_BF16), an
    unknown value is ignored with a warning; each form stays within the bound on the same
    weights."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_pairs = " avx512_bf16" in flags
    by_cpu = fusedae.info()["precisions"]["bf16"]
    script = (
        "import numpy as np, fusedae; from fusedae import _reference;"
        "rng = np.random.default_rng(3);"
        "layers = [(rng.standard_normal((42, 784), dtype=np.float32) / 28, None),"
        " (rng.standard_normal((16, 42), dtype=np.float32) / 6.5, None)];"
        "ops = ['relu', 'identity'];"
        "x = rng.standard_normal((70, 784), dtype=np.float32);"
        "got = fusedae.MLP(layers, ops, precision='bf16')(x);"
        "want, _ = _reference.forward(layers, ops, x);"
        "bound = _reference.bf16_bound(layers, ops, x);"
        "assert (np.abs(got - want) <= bound).all(), 'outside the bound';"
        "print(fusedae.info()['precisions']['bf16'])"
    )
    expected = {
        "native": "native" if has_pairs else by_cpu,
        "widen": "widened",
        "emulate": "emulated",
        "bogus": by_cpu,
    }
    for value, form in expected.items():
        env = {**os.environ, "FUSEDAE_BF16": value}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert run.stdout.strip() == form, (value, run.stdout, run.stderr)
        warned = value == "bogus" or (value == "native" and not has_pairs)
        assert ("FUSEDAE_BF16" in run.stderr) == warned, (value, run.stderr)


def test_info_says_how_each_precision_runs():
    precisions = fusedae.info()["precisions"]
    assert precisions["fp32"] == "native"
    assert precisions["bf16"] in ("native", "mixed", "widened", "emulated")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    amd = "AuthenticAMD" in flags
    has_pairs = fusedae.info()["isa"] == "avx512" and " avx512_bf16" in flags
    assert (precisions["bf16"] == "native") == (has_pairs and amd)
    assert (precisions["bf16"] == "mixed") == (has_pairs and not amd)
    assert fusedae._native.fma_peak_gflops(0.02, precision="bf16") > 0
    vnni = fusedae.info()["isa"] == "avx512" and " avx512_vnni" in flags
    assert precisions["int8"] == ("native" if vnni else "emulated")
    assert fusedae._native.fma_peak_gflops(0.02, precision="int8") > 0


@pytest.mark.parametrize("precision", NARROW)
def test_torch_modules_at_narrow_precision(rng, precision):
    torch.manual_seed(0)
    seed = SeedAE(784, 16).eval()
    model = AE(784, 16, precision=precision).eval()
    model.load_state_dict(seed.state_dict())
    x = torch.from_numpy(rng.uniform(0, 1, (64, 784)).astype(np.float32))
    layers = [
        (m.weight.detach().numpy(), m.bias.detach().numpy())
        for m in seed.modules()
        if isinstance(m, nn.Linear)
    ]
    ae = ("relu", "identity", "relu", "identity")
    expected = MLP(layers, ae, precision=precision)(x.numpy())
    codes = MLP(layers[:2], ae[:2], precision=precision)(x.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), expected)
        np.testing.assert_array_equal(model.encoder(x).numpy(), codes)
        assert model.precision == precision
        copied = copy.deepcopy(model)
        np.testing.assert_array_equal(copied(x).numpy(), expected)
        # Back to fp32: PyTorch's numbers again.
        model.set_precision("fp32")
        torch.testing.assert_close(model(x), seed(x), rtol=1e-5, atol=1e-6)


def test_torch_modules_refuse_fp64_for_their_dtype_is_the_parameters():
    """fp64 names the numpy MLP's dtype; a module given it would have run its float32
    parameters at fp32, not what was asked."""
    refusal = "precision 'fp64' is fusedae.MLP's"
    with pytest.raises(ValueError, match=refusal):
        FusedMLP(nn.Linear(3, 2), precision="fp64")
    with pytest.raises(ValueError, match=refusal):
        AE(3, 2, precision="fp64")
    with pytest.raises(ValueError, match=refusal):
        FusedMLP(nn.Linear(3, 2)).set_precision("fp64")
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 2)), nn.LayerNorm(2))
    with pytest.raises(ValueError, match=refusal):
        accelerate(model, precision="fp64")
    assert type(model[0]) is nn.Sequential  # refused before anything changed
    accelerate(model)
    assert type(model[0]) is FusedMLP


@pytest.mark.parametrize("precision", NARROW)
def test_torch_narrow_precision_refuses_to_train_and_float64(rng, precision):
    model = AE(20, 3, 7, precision=precision)
    x = torch.rand(300, 20)
    with pytest.raises(RuntimeError, match=f"precision '{precision}' is for inference"):
        model(x)  # parameters that need gradients: a training call
    with pytest.raises(TypeError, match="float32"), torch.no_grad():
        model.double()(x.double())


@pytest.mark.parametrize("mode_dependent", [nn.Dropout, nn.BatchNorm1d])
@pytest.mark.parametrize("precision", NARROW)
def test_narrow_precision_refuses_to_train_whatever_the_modes(precision, mode_dependent):
    """A training-mode Dropout or BatchNorm runs the chain as plain PyTorch at fp32: a training
    call is refused all the same (it trained at fp32), and a call without gradients runs."""
    middle = nn.Dropout(0.2) if mode_dependent is nn.Dropout else nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(30, 16), middle, nn.Tanh(), nn.Linear(16, 4))
    fused, _ = accelerate(model, precision=precision)
    x = torch.rand(300, 30)
    with pytest.raises(RuntimeError, match=f"precision '{precision}' is for inference"):
        fused(x)
    with torch.no_grad():
        assert fused(x).shape == (300, 4)


@pytest.mark.parametrize("gates", ["off", "as shipped"])
@pytest.mark.parametrize("precision", NARROW)
def test_torch_compile_at_narrow_precision_refuses_to_train_and_infers_at_fp32(
    precision, gates, monkeypatch
):
    """Traced, a narrow-precision model runs PyTorch's own ops (the custom ops are fp32 and
    fp64 only): inference at fp32, and a training call refused as in eager (it trained at
    fp32), below the compiled gates too (these 300 rows are)."""
    if gates == "as shipped":
        monkeypatch.setattr(torch_cache, "COMPILED_INFERENCE_MIN_FLOPS", 120_000_000)
        monkeypatch.setattr(torch_cache, "COMPILED_TRAINING_MIN_FLOPS", 250_000_000)
    torch._dynamo.reset()
    model = AE(20, 3, 7, precision=precision)
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(300, 20)
    with torch.no_grad():
        got = compiled(x)
        want = model.set_precision("fp32")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model.set_precision(precision)
    with pytest.raises(RuntimeError, match=f"precision '{precision}' is for inference"):
        compiled(x)


@pytest.mark.parametrize("precision", NARROW)
def test_accelerate_at_narrow_precision(rng, precision):
    model = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 4), nn.Sigmoid())
    plain = copy.deepcopy(model)
    fused, report = accelerate(model, precision=precision)
    assert isinstance(fused, FusedMLP), report
    assert fused.precision == precision
    x = torch.from_numpy(rng.uniform(-1, 1, (50, 30)).astype(np.float32))
    with torch.inference_mode():
        got, want = fused(x), plain(x)
    assert normwise(got.numpy(), want.numpy()) < WORST[precision]
    assert not torch.equal(got, want)
    again, _ = accelerate(fused, precision="fp32")
    assert again.precision == "fp32"
    with torch.no_grad():
        torch.testing.assert_close(again(x), want)
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'int8'\)"):
        accelerate(plain, precision="int3")


@pytest.mark.parametrize("precision", NARROW)
def test_cli_encode_at_narrow_precision(tmp_path, rng, precision):
    torch.manual_seed(0)
    model = AE(64, 2).eval()
    torch_save(model, tmp_path / "m.safetensors")
    x = rng.standard_normal((500, 64))  # float64: converted, float32 out
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [sys.executable, "-m", "fusedae", "encode", tmp_path / "m.safetensors",
         tmp_path / "x.npy", "-o", tmp_path / "z.npy", "--precision", precision],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    z = np.load(tmp_path / "z.npy")
    assert z.dtype == np.float32
    mlp = MLP.load(tmp_path / "m.safetensors", "encoder", precision=precision)
    np.testing.assert_array_equal(z, mlp(x.astype(np.float32)))
