"""fusedae's multithreaded calls on PyTorch's OpenMP threads (``share_torch_threads``) against
its own pool: the same results, bit for bit, the training gate that goes with each, a forked
child on a pool of its own, and only the thread that shared them on PyTorch's threads."""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import fusedae
from _threads import run_at_once
from fusedae import _native
from fusedae.torch import FusedMLP, cache, share_torch_threads

OPENMP_TORCH = "parallel backend: OpenMP" in torch.__config__.parallel_info()
needs_openmp_torch = pytest.mark.skipif(
    not OPENMP_TORCH, reason="PyTorch's parallel backend is not OpenMP"
)
# Rows enough for both threads to get rows of the seed's chain, forward and backward.
ROWS = 3000


@pytest.fixture(autouse=True)
def _two_threads_each():
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    fusedae.set_num_threads(2)  # (restored by conftest, as is the runtime)
    yield
    torch.set_num_threads(torch_threads)


def seed_chain() -> FusedMLP:
    return FusedMLP.from_sequential(
        nn.Sequential(
            nn.Linear(784, 42),
            nn.ReLU(),
            nn.Linear(42, 16),
            nn.Linear(16, 42),
            nn.ReLU(),
            nn.Linear(42, 784),
        )
    )


def forward_and_gradients(model: FusedMLP, x: torch.Tensor) -> list[np.ndarray]:
    """The model's output and every gradient of a backward through it."""
    x = x.detach().requires_grad_()
    for parameter in model.parameters():
        parameter.grad = None
    y = model(x)
    assert "FusedMLPFunction" in type(y.grad_fn).__name__  # the fused path, not plain PyTorch
    y.backward(torch.ones_like(y))
    tensors = [y, x.grad, *(parameter.grad for parameter in model.parameters())]
    return [tensor.detach().numpy().copy() for tensor in tensors]


@needs_openmp_torch
def test_importing_the_front_end_shares_pytorchs_openmp_threads():
    library = share_torch_threads()
    assert library is not None
    assert fusedae.info()["threads_runtime"] == f"openmp:{library}"
    assert os.path.basename(library).startswith(("libgomp", "libomp", "libiomp"))
    assert share_torch_threads(False) is None
    assert fusedae.info()["threads_runtime"] == "fusedae"


def test_a_runtime_not_loaded_is_not_taken():
    before = _native.threads_runtime()
    assert not _native.share_openmp_threads("libfusedae-no-such-runtime.so.1")
    assert not _native.share_openmp_threads("")
    assert _native.threads_runtime() == before


@needs_openmp_torch
def test_the_shared_threads_compute_what_the_pool_does_bit_for_bit():
    # Weight gradients are summed per share of the rows, whose split depends on the thread
    # count alone, not on which threads run the shares.
    model = seed_chain()
    x = torch.randn(ROWS, 784)
    share_torch_threads(False)
    on_pool = forward_and_gradients(model, x)
    assert share_torch_threads() is not None
    on_openmp = forward_and_gradients(model, x)
    for pool_values, openmp_values in zip(on_pool, on_openmp, strict=True):
        np.testing.assert_array_equal(openmp_values, pool_values)
    fusedae.set_num_threads(1)
    for one_thread, openmp_values in zip(forward_and_gradients(model, x), on_openmp, strict=True):
        np.testing.assert_allclose(openmp_values, one_thread, rtol=1e-4, atol=1e-4)


@needs_openmp_torch
def test_python_threads_calling_at_once_share_the_threads_or_run_alone():
    assert share_torch_threads() is not None
    model = seed_chain()
    inputs = [torch.randn(rows, 784) for rows in (1, 700, ROWS, ROWS)]
    with torch.no_grad():
        wants = [model[5](model[4](model[3](model[2](model[1](model[0](x)))))) for x in inputs]

    def check(index: int) -> bool:
        with torch.no_grad():
            return all(
                torch.allclose(model(inputs[index]), wants[index], rtol=1e-4, atol=1e-5)
                for _ in range(5)
            )

    assert run_at_once(check, len(inputs)) == []


def _runtime_and_output_in_child(model: FusedMLP, x: torch.Tensor) -> tuple[str, np.ndarray]:
    with torch.no_grad():
        return _native.threads_runtime(), model(x).numpy()


@needs_openmp_torch
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_runs_on_a_pool_of_its_own():
    # An OpenMP team's threads stay in the parent (PyTorch's own ops hang in such a child); the
    # child's calls start fusedae's pool instead.
    assert share_torch_threads() is not None
    model, x = seed_chain(), torch.randn(ROWS, 784)
    with torch.no_grad():
        want = model(x).numpy()  # the shared threads ran it
    with multiprocessing.get_context("fork").Pool(1) as children:
        runtime, got = children.apply_async(_runtime_and_output_in_child, (model, x)).get(60)
    assert runtime == "fusedae"
    np.testing.assert_array_equal(got, want)


def _reshare_on_one_pytorch_thread(model: FusedMLP, x: torch.Tensor) -> tuple[str, np.ndarray]:
    torch.set_num_threads(1)  # as DataLoader's workers do
    assert share_torch_threads() is not None
    return _runtime_and_output_in_child(model, x)


@needs_openmp_torch
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_child_forked_after_the_team_ran_runs_its_calls_on_the_pool():
    # In a child forked after the parent's team started, the runtime's threads are gone but
    # still counted: a parallel region there never ended. Where the child runs PyTorch on one
    # thread, as DataLoader's workers do, its calls take the pool even if it shares again.
    assert share_torch_threads() is not None
    model, x = seed_chain(), torch.randn(ROWS, 784)
    with torch.no_grad():
        torch.mm(x, x.T)  # PyTorch's team has started
        want = model(x).numpy()
    with multiprocessing.get_context("fork").Pool(1) as children:
        runtime, got = children.apply_async(_reshare_on_one_pytorch_thread, (model, x)).get(60)
    assert runtime.startswith("openmp:")
    np.testing.assert_array_equal(got, want)


@needs_openmp_torch
def test_only_the_thread_that_shared_runs_on_pytorchs_threads():
    library = share_torch_threads()
    assert library is not None
    assert _native.threads_runtime() == f"openmp:{library}"
    with ThreadPoolExecutor(1) as other:
        assert other.submit(_native.threads_runtime).result() == "fusedae"


@pytest.mark.parametrize("shared", [False, True])
def test_the_threaded_gate_follows_the_runtime(monkeypatch, shared):
    """On 2 threads each, a call that needs gradients is held to plain PyTorch by
    ``SHARED_THREADS_TRAINING_MIN_*`` on PyTorch's threads, ``THREADED_TRAINING_MIN_*`` on
    fusedae's own pool."""
    if shared and share_torch_threads() is None:
        pytest.skip("PyTorch's parallel backend is not OpenMP")
    if not shared:
        share_torch_threads(False)
    model = seed_chain()
    gate, other = ("SHARED_THREADS", "THREADED") if shared else ("THREADED", "SHARED_THREADS")
    monkeypatch.setattr(cache, f"{gate}_TRAINING_MIN_ROWS", 12)
    monkeypatch.setattr(cache, f"{other}_TRAINING_MIN_ROWS", 10**6)
    monkeypatch.setattr(cache, f"{other}_TRAINING_MIN_FLOPS", 10**12)
    for rows, fused_path in ((11, False), (12, True)):
        out = model(torch.randn(rows, 784, requires_grad=True))
        assert ("FusedMLPFunction" in type(out.grad_fn).__name__) == fused_path, rows


def test_openmp_runtimes_are_known_by_their_file_names():
    from fusedae.torch.threads import _RUNTIME_NAME

    for name in ("libgomp.so.1", "libgomp-947d5fa1.so.1.0.0", "libomp.dylib", "libiomp5.so"):
        assert _RUNTIME_NAME.fullmatch(name), name
    for name in ("libgompx.so.1", "libompl.so", "libtorch_cpu.so", "libiomp5md.dll"):
        assert not _RUNTIME_NAME.fullmatch(name), name
