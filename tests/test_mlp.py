"""The numpy API against the float64 reference, on every ISA this CPU runs."""

from __future__ import annotations

import copy
import itertools
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedae
from _address_space import run_limited
from _threads import run_at_once
from fusedae import _native, _reference
from fusedae._ops import RELU
from fusedae.chain import ChainSpec, Layer, Normalization

WIDTHS = [1, 17, 42, 64, 784]
BATCHES = [0, 1, 2, 7, 64, 1000]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}


def random_layers(rng: np.random.Generator, widths: list[int], dtype=np.float32, bias=True):
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        bound = 1 / np.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(dtype)
        layers.append((weight, rng.uniform(-bound, bound, fan_out).astype(dtype) if bias else None))
    return layers


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest deviation relative to the largest value, over the whole output."""
    if want.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


def rounding_error(layers, activations, x: np.ndarray, got: np.ndarray) -> float:
    """Largest deviation from the float64 reference per element, relative to the size of the
    terms summed into that element (the chain run on absolute values). Unlike a plain relative
    error this stays meaningful when an output is a small result of cancelling large terms."""
    want, _ = _reference.forward(layers, activations, x)
    absolute = [(np.abs(w), None if b is None else np.abs(b)) for w, b in layers]
    scale, _ = _reference.forward(absolute, ["identity"] * len(layers), np.abs(x))
    if want.size == 0:
        return 0.0
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(scale, 1e-30)))


def check_against_reference(mlp: fusedae.MLP, layers, x: np.ndarray) -> None:
    got = mlp(x)
    assert got.dtype == mlp.dtype
    assert got.shape == (*x.shape[:-1], mlp.out_features)
    assert rounding_error(layers, mlp.activations, x, got) <= TOLERANCE[mlp.dtype.type]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", WIDTHS)
def test_encoder_matches_reference_for_every_width_and_batch(rng, isa, dtype, width):
    for widths in ([784, 42, width], [width, 42, 16], [width, width]):
        layers = random_layers(rng, widths, dtype)
        mlp = fusedae.MLP(layers, isa=isa)
        assert mlp.isa == isa
        for batch in BATCHES:
            check_against_reference(
                mlp, layers, rng.standard_normal((batch, widths[0])).astype(dtype)
            )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_autoencoder_is_one_chain_with_identity_at_the_bottleneck(rng, isa, dtype):
    layers = random_layers(rng, [784, 42, 16, 42, 784], dtype)
    mlp = fusedae.MLP(layers, ["relu", "identity", "relu", "identity"], isa=isa)
    for batch in BATCHES:
        check_against_reference(mlp, layers, rng.standard_normal((batch, 784)).astype(dtype))


def test_asymmetric_deep_chain_without_biases_and_relu_last(rng, isa):
    layers = random_layers(rng, [100, 300, 64, 42, 2, 42, 100], bias=False)
    activations = ["relu", "relu", "identity", "relu", "relu", "relu"]
    mlp = fusedae.MLP(layers, activations, isa=isa)
    check_against_reference(mlp, layers, rng.standard_normal((257, 100)).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(1, 80), min_size=2, max_size=5),
    batch=st.integers(0, 40),
    dtype=st.sampled_from([np.float32, np.float64]),
    relu_mask=st.integers(0, 31),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_chain_matches_reference(widths, batch, dtype, relu_mask, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng, widths, dtype)
    activations = ["relu" if relu_mask >> i & 1 else "identity" for i in range(len(layers))]
    for isa in fusedae.info()["available_isas"]:
        mlp = fusedae.MLP(layers, activations, isa=isa)
        check_against_reference(mlp, layers, rng.standard_normal((batch, widths[0])).astype(dtype))


def test_inputs_of_any_rank_layout_alignment_and_byte_order(rng, isa):
    layers = random_layers(rng, [42, 17, 5])
    mlp = fusedae.MLP(layers, isa=isa)
    base = rng.standard_normal((6, 84)).astype(np.float32)
    read_only = base[:, :42].copy()
    read_only.flags.writeable = False
    raw = np.zeros(6 * 42 * 4 + 1, np.uint8)[1:]
    unaligned = raw.view(np.float32).reshape(6, 42)
    unaligned[:] = base[:, :42]
    cases = {
        "1-D": base[0, :42],
        "3-D": base.reshape(2, 3, 84)[:, :, :42],
        "strided columns": base[:, ::2],
        "strided rows": base[::2, :42],
        "fortran": np.asfortranarray(base[:, :42]),
        "read-only": read_only,
        "unaligned": unaligned,
        "big-endian": base[:, :42].astype(">f4"),
        "list": base[:2, :42].tolist(),
    }
    assert not unaligned.flags.aligned
    for name, x in cases.items():
        x64 = np.asarray(x, np.float64)
        got = mlp(x)
        assert got.shape == (*x64.shape[:-1], 5), name
        assert rounding_error(layers, mlp.activations, x64, got) <= 1e-5, name


def test_out_receives_the_result(rng, isa):
    layers = random_layers(rng, [30, 42, 7])
    mlp = fusedae.MLP(layers, isa=isa)
    x = rng.standard_normal((2, 5, 30)).astype(np.float32)
    out = np.full((2, 5, 7), np.nan, np.float32)
    assert mlp(x, out=out) is out
    np.testing.assert_array_equal(out, mlp(x))
    flat_out = np.full((10, 7), np.nan, np.float32)  # 2-D: the native call fills it itself
    assert mlp(x.reshape(10, 30), flat_out) is flat_out
    np.testing.assert_array_equal(flat_out, out.reshape(10, 7))


def test_pickle_and_copy_rebuild_the_same_mlp(rng):
    for dtype in (np.float32, np.float64):
        mlp = fusedae.MLP(random_layers(rng, [12, 42, 3], dtype), ["relu", "relu"])
        x = rng.standard_normal((5, 12)).astype(dtype)
        for clone in (pickle.loads(pickle.dumps(mlp)), copy.deepcopy(mlp)):
            assert repr(clone) == repr(mlp)
            np.testing.assert_array_equal(clone(x), mlp(x))


def test_pickle_and_save_keep_normalizations(rng, tmp_path):
    features = 12
    norm = Normalization(
        "before", rng.standard_normal(features), rng.uniform(0.5, 2, features), 1e-3, None, None
    )
    spec = ChainSpec(
        (
            Layer(rng.standard_normal((7, features)), None, RELU, (norm,)),
            Layer(rng.standard_normal((3, 7)), rng.standard_normal(3), RELU),
        ),
        1,
    )
    mlp = fusedae.MLP.from_spec(spec, dtype=np.float64)
    x = rng.standard_normal((5, features))
    want, _ = _reference.forward([layer.folded() for layer in spec.layers], mlp.activations, x)
    np.testing.assert_allclose(mlp(x), want, rtol=1e-12, atol=1e-12)
    mlp.save(tmp_path / "mlp.safetensors")
    for clone in (pickle.loads(pickle.dumps(mlp)), fusedae.MLP.load(tmp_path / "mlp.safetensors")):
        assert clone.spec.layers[0].normalization[0].eps == 1e-3
        np.testing.assert_array_equal(clone(x), mlp(x))


def test_nan_and_inf_propagate_like_pytorch(rng, isa):
    layers = random_layers(rng, [20, 42, 16])
    mlp = fusedae.MLP(layers, isa=isa)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    x[1, 4] = np.nan
    x[2, 0] = np.inf
    got = mlp(x)
    want, _ = _reference.forward(layers, mlp.activations, x)
    assert np.all(np.isfinite(got[0]))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    assert rounding_error(layers, mlp.activations, x[:1], got[:1]) <= 1e-5


def test_threads_give_identical_results_and_are_configurable(rng):
    layers = random_layers(rng, [784, 42, 16])
    mlp = fusedae.MLP(layers)
    x = rng.standard_normal((3000, 784)).astype(np.float32)
    fusedae.set_num_threads(1)
    assert fusedae.get_num_threads() == 1
    single = mlp(x)
    fusedae.set_num_threads(2)
    assert fusedae.info()["threads"] == 2
    np.testing.assert_array_equal(mlp(x), single)
    for bad in (0, -3, 1025, 10**12):
        with pytest.raises(ValueError, match=f"between 1 and 1024, got {bad}"):
            fusedae.set_num_threads(bad)
    assert fusedae.get_num_threads() == 2


def _encode_in_child(mlp: fusedae.MLP, x: np.ndarray) -> tuple[np.ndarray, int]:
    """The codes, and how many threads the call started in this process."""
    before = len(os.listdir("/proc/self/task"))
    codes = mlp(x)
    return codes, len(os.listdir("/proc/self/task")) - before


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_gets_its_own_threads(rng):
    # The parent's pool threads do not exist in a fork; the child must start its own, not wait
    # on the parent's or fall back to one thread.
    mlp = fusedae.MLP(random_layers(rng, [784, 42, 16]))
    x = rng.standard_normal((3000, 784)).astype(np.float32)
    fusedae.set_num_threads(2)
    want = mlp(x)  # the pool is running in the parent now
    with multiprocessing.get_context("fork").Pool(1) as children:
        got, started = children.apply_async(_encode_in_child, (mlp, x)).get(timeout=60)
    np.testing.assert_array_equal(got, want)
    assert started == 1  # the second of two threads (the caller is the first)


def test_four_python_threads_calling_at_once_get_their_own_results(rng):
    layers = random_layers(rng, [784, 42, 16, 42, 784])
    mlp = fusedae.MLP(layers, ["relu", "identity", "relu", "identity"])
    inputs = [rng.standard_normal((n, 784)).astype(np.float32) for n in (1, 33, 700, 2500)]
    wants = [_reference.forward(layers, mlp.activations, x)[0] for x in inputs]

    def check(index: int) -> bool:
        return all(relative_error(mlp(inputs[index]), wants[index]) <= 1e-5 for _ in range(5))

    assert run_at_once(check, len(inputs)) == []


def test_outputs_past_a_mib_leak_nothing(rng):
    """An output over 1 MiB comes from a line-aligned slice of a larger block: PyO3's
    ``PySlice::new`` leaked an int on each such call (100,000 calls: 2.7 MiB)."""
    mlp = fusedae.MLP(random_layers(rng, [16, 784]), ["identity"])
    x = rng.standard_normal((512, 16)).astype(np.float32)  # 1.6 MB out
    for _ in range(10):
        mlp(x)
    before = sys.getallocatedblocks()
    for _ in range(2000):
        mlp(x)
    assert sys.getallocatedblocks() - before < 200


CALLED_AT_SHUTDOWN = """
import numpy as np, fusedae
mlp = fusedae.MLP([(np.eye(64, dtype=np.float32), None)])
x = np.ones((8192, 64), np.float32)  # 2 MiB out: the aligned block numpy.empty allocates
class CalledAtShutdown:
    def __del__(self):
        y = mlp(x)  # (not `.sum()`: numpy imports its first call's code)
        print("at shutdown:", y.shape, y[8191, 63], flush=True)
held = CalledAtShutdown()
"""


def test_a_call_during_interpreter_shutdown():
    """From a ``__del__`` run at exit, as numpy's own matmul works there: an output over 1 MiB
    imported numpy on each call, which fails then ("sys.meta_path is None")."""
    done = run_python(CALLED_AT_SHUTDOWN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "at shutdown: (8192, 64) 1.0", done.stderr


WORKING_MEMORY_BEYOND_THE_LIMIT = """
import numpy as np, fusedae
fusedae.set_num_threads(1)
width = 1_000_000  # 512 MB of working memory for 64 rows, 8 MB of weights
mlp = fusedae.MLP([(np.full((width, 1), 0.5, np.float32), None),
                   (np.full((1, width), 1e-6, np.float32), None)])
x = np.ones((64, 1), np.float32)
mlp(x[:1])
limit_address_space(100)
try:
    mlp(x)
except MemoryError as error:
    print("MemoryError:", error)
print(round(float(mlp(x[:1])[0, 0]), 2))
"""


def test_working_memory_beyond_the_limit_is_a_memory_error():
    """A call whose working memory (it grows with the widest layer) cannot be allocated raises
    MemoryError, as numpy does, and the chain goes on working (it aborted the process)."""
    done = run_limited(WORKING_MEMORY_BEYOND_THE_LIMIT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"MemoryError: could not allocate the call's \d+ MB of working", done.stdout)
    assert done.stdout.strip().endswith("\n0.5")


class TestBadInput:
    @pytest.fixture
    def mlp(self, rng):
        return fusedae.MLP(random_layers(rng, [8, 42, 3]))

    @pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex64, np.float64, bool])
    def test_wrong_dtype_is_a_type_error_naming_both(self, mlp, dtype):
        with pytest.raises(TypeError, match=f"expected a float32 array, got {np.dtype(dtype)}"):
            mlp(np.zeros((2, 8), dtype))

    def test_zero_dimensional_input(self, mlp):
        with pytest.raises(ValueError, match=r"shape \(\*, 8\), got shape \(\)"):
            mlp(np.float32(1.0))

    def test_feature_size_mismatch_names_both(self, mlp):
        with pytest.raises(
            ValueError, match=r"expected an array of shape \(\*, 8\), got shape \(4, 9\)"
        ):
            mlp(np.zeros((4, 9), np.float32))

    def test_batch_zero_gives_an_empty_output(self, mlp):
        assert mlp(np.zeros((0, 8), np.float32)).shape == (0, 3)
        assert mlp(np.zeros((2, 0, 8), np.float32)).shape == (2, 0, 3)

    def test_inconsistent_weights_and_biases(self, rng):
        w1, w2 = np.zeros((42, 8), np.float32), np.zeros((3, 41), np.float32)
        with pytest.raises(ValueError, match="layer 1: takes 41 inputs but layer 0 gives 42"):
            fusedae.MLP([(w1, None), (w2, None)])
        with pytest.raises(ValueError, match="bias must have 42 values"):
            fusedae.MLP([(w1, np.zeros(41, np.float32))])
        with pytest.raises(ValueError, match=r"expected 2 dimensions, got shape \(8,\)"):
            fusedae.MLP([(np.zeros(8, np.float32), None)])
        with pytest.raises(ValueError, match="at least one layer"):
            fusedae.MLP([])
        with pytest.raises(ValueError, match="one activation per layer"):
            fusedae.MLP([(w1, None)], ["relu", "relu"])
        with pytest.raises(ValueError, match="or 'softplus', got 'softsign'"):
            fusedae.MLP([(w1, None)], ["softsign"])
        with pytest.raises(ValueError, match="widths must be at least 1"):
            fusedae.MLP([(np.zeros((0, 8), np.float32), None)])
        with pytest.raises(TypeError, match="dtype must be float32 or float64, got float16"):
            fusedae.MLP([(w1, None)], dtype=np.float16)

    def test_sizes_that_would_overflow(self, rng):
        widening = fusedae.MLP(random_layers(rng, [1, 64]))
        huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (2**58, 1), (0, 0))
        with pytest.raises(ValueError, match="larger than memory can address"):
            widening(huge)

    def test_bad_out(self, mlp):
        x = np.zeros((4, 8), np.float32)
        with pytest.raises(
            ValueError, match=r"shape \(4, 3\), got float32 array of shape \(4, 2\)"
        ):
            mlp(x, out=np.zeros((4, 2), np.float32))
        with pytest.raises(ValueError, match="float32 array of shape"):
            mlp(x, out=np.zeros((4, 3), np.float64))
        with pytest.raises(ValueError, match="C-contiguous"):
            mlp(x, out=np.zeros((3, 4), np.float32).T)
        read_only = np.zeros((4, 3), np.float32)
        read_only.flags.writeable = False
        with pytest.raises(ValueError, match="writeable"):
            mlp(x, out=read_only)

    def test_out_overlapping_the_input(self, rng):
        square = fusedae.MLP(random_layers(rng, [4, 4]))
        x = np.ones((3, 4), np.float32)
        with pytest.raises(ValueError, match="must not overlap x"):
            square(x, out=x)

    def test_native_chain_checks_its_own_arguments(self, mlp):
        weights, biases = zip(*mlp.layers, strict=True)
        chain = _native.Chain(list(weights), list(biases), list(mlp.activations))
        with pytest.raises(
            TypeError, match="expected a 2-D float32 numpy array, got a 3-D float32"
        ):
            chain(np.zeros((1, 1, 8), np.float32), np.zeros((1, 3), np.float32))
        with pytest.raises(TypeError, match="got a list"):
            chain([[0.0] * 8], np.zeros((1, 3), np.float32))
        with pytest.raises(
            ValueError, match="x has 7 features per row, but the first layer takes 8"
        ):
            chain(np.zeros((1, 7), np.float32), np.zeros((1, 3), np.float32))
        with pytest.raises(ValueError, match="x must be C-contiguous"):
            chain(np.zeros((8, 2), np.float32).T, np.zeros((2, 3), np.float32))
        with pytest.raises(ValueError, match="out must be C-contiguous"):
            chain(np.zeros((2, 8), np.float32), np.zeros((3, 2), np.float32).T)
        fortran_weight = np.zeros((8, 42), np.float32).T
        with pytest.raises(ValueError, match="layer 0 weight must be C-contiguous"):
            _native.Chain([fortran_weight], [None], ["relu"])
        with pytest.raises(ValueError, match="one bias and one post-op per weight"):
            _native.Chain([np.zeros((2, 2), np.float32)], [], ["relu"])


def run_python(
    code: str, *args: str, unset: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` with ``env`` added to the environment and ``unset`` taken out."""
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**environment, **env},
        timeout=120,
        check=False,
    )


def test_import_needs_no_torch_and_info_reports_the_isa():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import fusedae, numpy as np\n"
        "info = fusedae.info()\n"
        "m = fusedae.MLP([(np.eye(3, dtype=np.float32), None)])\n"
        "assert (m(np.ones((1, 3), np.float32)) == 1).all()\n"
        "print(info['isa'], info['build_profile'], info['threads'], info['half_registers'])\n"
    )
    result = run_python(code, FUSEDAE_ISA="")
    assert result.returncode == 0, result.stderr
    isa, profile, threads, half = result.stdout.split()
    assert isa == fusedae.info()["available_isas"][0]
    assert profile == "release"
    assert int(threads) >= 1
    # Only AVX-512 has half registers that can cost less (a measured property of the CPU).
    assert half in (("True", "False") if isa == "avx512" else ("False",))
    # The vendor Linux reads from CPUID too (x86-64), else none.
    cpuinfo = Path("/proc/cpuinfo")
    vendors = {
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("vendor_id")
    }
    if fusedae.info()["target_arch"] == "x86_64" and vendors:
        assert {fusedae.info()["cpu_vendor"]} == vendors
    elif fusedae.info()["target_arch"] != "x86_64":
        assert fusedae.info()["cpu_vendor"] == ""
    untouched = run_python("import sys, fusedae; print('torch' in sys.modules)")
    assert untouched.stdout.strip() == "False"


THREADS_IN_A_WORKER = """
import os, sys, fusedae
os.environ.update(dict(item.split("=", 1) for item in sys.argv[1:]))  # as Ray does at task start
if hasattr(os, "sched_setaffinity") and os.environ.get("ONE_CPU"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
info = fusedae.info()
print(info["threads"], info["threads_from"], sep="|")
"""


@pytest.mark.parametrize(
    ("variables", "threads", "source"),
    [
        (["FUSEDAE_NUM_THREADS=3", "OMP_NUM_THREADS=2"], 3, "FUSEDAE_NUM_THREADS=3"),
        (["OMP_NUM_THREADS=5"], 5, "OMP_NUM_THREADS=5"),
        (["OMP_NUM_THREADS=4,2"], 4, "OMP_NUM_THREADS=4,2"),
        (
            ["FUSEDAE_NUM_THREADS=lots", "OMP_NUM_THREADS=1"],
            1,
            'OMP_NUM_THREADS=1 (FUSEDAE_NUM_THREADS="lots" ignored: not a count from 1 to 1024)',
        ),
        (["ONE_CPU=1"], 1, "the CPUs this process may use"),
        (
            ["OMP_NUM_THREADS=4", "OMP_THREAD_LIMIT=1"],
            1,
            "OMP_NUM_THREADS=4, capped by OMP_THREAD_LIMIT=1",
        ),
        (["OMP_NUM_THREADS=2", "OMP_THREAD_LIMIT=8"], 2, "OMP_NUM_THREADS=2"),
    ],
)
def test_the_thread_count_follows_the_worker_it_runs_in(variables, threads, source):
    """Variables set after import, before the first call, as an engine sets them when a task
    starts in a worker that imported fusedae earlier."""
    if "ONE_CPU=1" in variables and not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity mask on this platform")
    result = run_python(
        THREADS_IN_A_WORKER,
        *variables,
        unset=("FUSEDAE_NUM_THREADS", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{threads}|{source}"


def test_set_num_threads_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDAE_NUM_THREADS", "3")
    fusedae.set_num_threads(2)
    assert (fusedae.get_num_threads(), fusedae.info()["threads_from"]) == (2, "set_num_threads")


def test_forcing_each_supported_isa():
    for isa in fusedae.info()["available_isas"]:
        result = run_python("import fusedae; print(fusedae.info()['isa'])", FUSEDAE_ISA=isa)
        assert result.stdout.strip() == isa, result.stderr


def test_unknown_or_unsupported_isa_is_a_clear_error():
    result = run_python("import fusedae; fusedae.info()", FUSEDAE_ISA="sse9")
    assert result.returncode != 0
    assert (
        'ValueError: unknown ISA "sse9": expected one of avx512, avx2, neon, scalar'
        in result.stderr
    )
    missing = [i for i in ("avx512", "avx2", "neon") if i not in fusedae.info()["available_isas"]]
    for isa in missing:
        result = run_python("import fusedae; fusedae.info()", FUSEDAE_ISA=isa)
        assert (
            f"RuntimeError: ISA {isa} was requested but this CPU does not support it"
            in result.stderr
        )
    with pytest.raises(ValueError, match="unknown ISA"):
        fusedae.MLP([(np.eye(2, dtype=np.float32), None)], isa="sse9")
