"""The native module's own contract: post-ops by name, the DLPack entry `fusedae.torch` reads
tensors through, and results that do not depend on the load on the machine."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from fusedae import _native


def chain_and_input(rng: np.random.Generator, dtype, rows: int, widths=(8, 42, 3)):
    weights = [
        rng.standard_normal((out, inp)).astype(dtype) for inp, out in itertools.pairwise(widths)
    ]
    biases = [rng.standard_normal(w.shape[0]).astype(dtype) for w in weights]
    post_ops = ["relu"] * (len(weights) - 1) + ["identity"]
    x = rng.standard_normal((rows, widths[0])).astype(dtype)
    return _native.Chain(weights, biases, post_ops), x


def test_post_ops_are_named_once_and_unknown_names_are_errors(rng):
    assert _native.POST_OPS == (
        "identity",
        "relu",
        "leaky_relu",
        "sigmoid",
        "tanh",
        "gelu",
        "gelu_tanh",
        "silu",
        "elu",
        "hardtanh",
        "softplus",
    )
    weight = np.ones((2, 3), np.float32)
    x = np.array([[-1.0, 0.0, -2.0]], np.float32)
    for spelled in ("relu", ("relu",)):
        assert (_native.Chain([weight], [None], [spelled])(x) == 0).all()
    # PyTorch's defaults when no parameters are given; all of them, or an error.
    assert _native.Chain([weight], [None], ["leaky_relu"])(x)[0, 0] == np.float32(-0.03)
    assert _native.Chain([weight], [None], [("leaky_relu", 0.5)])(x)[0, 0] == -1.5
    with pytest.raises(ValueError, match='layer 0: unknown post-op "swish": expected one of'):
        _native.Chain([weight], [None], ["swish"])
    with pytest.raises(ValueError, match="takes 0 parameters"):
        _native.Chain([weight], [None], [("relu", 0.5)])
    with pytest.raises(ValueError, match="takes 2 parameters"):
        _native.Chain([weight], [None], [("hardtanh", 0.5)])
    with pytest.raises(ValueError, match="min_val"):
        _native.Chain([weight], [None], [("hardtanh", 1.0, 0.0)])
    with pytest.raises(TypeError, match="a post-op is a name"):
        _native.Chain([weight], [None], [None])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dlpack_entry_gives_the_array_call_bits(rng, dtype):
    for rows in (0, 1, 5, 300):
        chain, x = chain_and_input(rng, dtype, rows)
        got = chain._forward_dlpack(torch.utils.dlpack.to_dlpack(torch.from_numpy(x)))
        assert got.dtype == dtype
        assert got.shape == (rows, 3)
        np.testing.assert_array_equal(got, chain(x))
    leading = torch.from_numpy(x).reshape(4, 75, 8)
    got = chain._forward_dlpack(torch.utils.dlpack.to_dlpack(leading))
    np.testing.assert_array_equal(got, chain(x))
    empty = torch.zeros((4, 0, 8), dtype=getattr(torch, np.dtype(dtype).name)).transpose(0, 1)
    assert chain._forward_dlpack(torch.utils.dlpack.to_dlpack(empty)).shape == (0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_outputs_start_on_a_cache_line(rng, dtype):
    # Past 1 MiB the output comes from numpy.empty, whose blocks start 16 or 32 bytes into a
    # line; the kernel's stores split there. Each entry point allocates it on a line, shaped
    # and filled as any other array.
    chain, x = chain_and_input(rng, dtype, 2 * (1 << 20) // (3 * np.dtype(dtype).itemsize) + 7)
    expected = chain.forward(x, np.empty((x.shape[0], 3), dtype))
    capsule = torch.utils.dlpack.to_dlpack(torch.from_numpy(x))
    with torch.no_grad():
        via_torch = chain._forward_dlpack(capsule)
    for got in (chain(x), chain.forward(x), via_torch):
        assert got.ctypes.data % 64 == 0
        assert got.shape == expected.shape
        assert got.dtype == dtype
        assert got.flags.c_contiguous
        assert got.flags.writeable
        np.testing.assert_array_equal(got, expected)


def test_dlpack_entry_checks_what_the_capsule_describes(rng):
    chain, x = chain_and_input(rng, np.float32, 6)
    tensor = torch.from_numpy(x)
    to_dlpack = torch.utils.dlpack.to_dlpack
    with pytest.raises(TypeError, match="expected float32 values"):
        chain._forward_dlpack(to_dlpack(tensor.double()))
    with pytest.raises(TypeError, match="expected float32 values"):
        chain._forward_dlpack(to_dlpack(tensor.to(torch.int32)))
    with pytest.raises(ValueError, match=r"shape \(\*, 8\), got shape \[6, 7\]"):
        chain._forward_dlpack(to_dlpack(tensor[:, :7]))
    with pytest.raises(ValueError, match=r"shape \(\*, 8\), got shape \[\]"):
        chain._forward_dlpack(to_dlpack(tensor[0, 0]))
    with pytest.raises(ValueError, match="C-contiguous"):
        chain._forward_dlpack(to_dlpack(torch.from_numpy(np.asfortranarray(x))))
    with pytest.raises(ValueError, match="C-contiguous"):
        chain._forward_dlpack(to_dlpack(torch.zeros(8, 12)[:, ::2].t()))
    consumed = to_dlpack(tensor)
    torch.from_dlpack(consumed)  # renames the capsule "used_dltensor"
    with pytest.raises(ValueError, match="unconsumed 'dltensor'"):
        chain._forward_dlpack(consumed)
    with pytest.raises(TypeError, match="expected a DLPack capsule, got a 2-D float32 array"):
        chain._forward_dlpack(x)
    with pytest.raises(TypeError, match="expected a DLPack capsule, got a int"):
        chain._forward_dlpack(tensor.data_ptr())


def test_a_resize_from_another_thread_waits_until_the_call_returns(rng):
    """The GIL stays held while the kernel reads a tensor through DLPack, so another Python
    thread cannot start a resize (which reallocates the storage and frees the old memory) until
    the call returns: the call reads the tensor it was given, whole. (A resize already running
    in another thread when the call starts is a data race for every reader of the tensor, as
    for PyTorch's own ops: PyTorch releases the GIL inside `resize_`.)"""
    rows = 16384
    chain, x = chain_and_input(rng, np.float32, rows, widths=(784, 42, 16))
    want = chain(x)
    tensor = torch.from_numpy(x).clone()
    started = threading.Event()

    def resize_when_started() -> None:
        started.wait()
        tensor.resize_(4 * rows, 784)  # a larger storage: the old memory is freed

    resizer = threading.Thread(target=resize_when_started)
    resizer.start()
    started.set()
    got = chain._forward_dlpack(torch.utils.dlpack.to_dlpack(tensor))
    resizer.join()
    assert tensor.shape == (4 * rows, 784)
    # The resize came after the call (the GIL) or, if the resizer won the GIL first, before it:
    # either way the call read whole memory holding the tensor's first rows.
    np.testing.assert_array_equal(got[:rows], want)


REPRODUCE = """
import hashlib, sys
import numpy as np
from fusedae import MLP
rng = np.random.default_rng(12345)
widths = [784, 42, 16, 42, 784]
layers = [
    ((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32),
     rng.standard_normal(o).astype(np.float32))
    for i, o in zip(widths[:-1], widths[1:])
]
mlp = MLP(layers, ["relu", "identity", "relu", "identity"])
x = rng.standard_normal((1000, 784)).astype(np.float32)
print(hashlib.sha256(mlp(x).tobytes() + mlp(x[:1]).tobytes()).hexdigest())
"""


def run_reproduce() -> str:
    env = {k: v for k, v in os.environ.items() if k != "FUSEDAE_HALF_REGISTERS"}
    result = subprocess.run(
        [sys.executable, "-c", REPRODUCE],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return result.stdout.strip()


def test_the_same_input_gives_the_same_bits_in_a_process_beside_a_busy_loop():
    """Which form a layer is packed in (and so the order of its sums) comes from the CPU's
    identity, not a timing: a process started beside a busy loop on every core computes the
    same bits as one started on an idle machine."""
    quiet = output_hash_in_a_fresh_process(busy=False)
    busy = output_hash_in_a_fresh_process(busy=True)
    assert quiet == busy


def output_hash_in_a_fresh_process(busy: bool) -> str:
    if not busy:
        return run_reproduce()
    spin = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    spinners = [
        subprocess.Popen([sys.executable, "-c", spin]) for _ in range(max(os.cpu_count() or 1, 2))
    ]
    try:
        return run_reproduce()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
