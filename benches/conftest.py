"""Fixtures for the benchmark suite: the models and their data (shared by every peer), thread
pinning, the FMA-peak probe and a timer built on pytest-benchmark's pedantic mode.

``make test`` runs every benchmark once as a smoke test (``--benchmark-disable`` is in pytest's
``addopts``); ``make bench`` times them. ``--bench-seconds`` sets the timed seconds per benchmark.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn

import fusedae
from fusedae import _native
from fusedae._ops import IDENTITY, PostOp
from fusedae.torch.lower import post_op_module

# Shortest round of repeated calls: shorter rounds measure the timer more than the call.
MIN_ROUND_SECONDS = 2e-3
# Fewest timed rounds per benchmark, however slow one call is.
MIN_ROUNDS = 5


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-seconds",
        type=float,
        default=1.0,
        help="fusedae benches: seconds of timed rounds per benchmark (default 1.0)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """The kernel every timing below is of, at the top of the run's output."""
    info = fusedae.info()
    available = ", ".join(info["available_isas"])
    return (
        f"fusedae: ISA {info['isa']} on {info['target_arch']} (available: {available}), "
        f"{info['threads']} threads, {info['build_profile']} build"
    )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Records the kernel ISA and the peers' versions in the results JSON, for the report."""
    import onnxruntime

    machine_info["fusedae"] = fusedae.info()
    machine_info["versions"] = {
        "fusedae": fusedae.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


class ModelSpec(Protocol):
    key: str
    widths: tuple[int, ...]
    autoencoder: bool

    @property
    def activations(self) -> list[PostOp]: ...


class SeedAE(nn.Module):
    """The autoencoder exactly as the seed question writes it: the plain PyTorch baseline."""

    def __init__(self, x_dim: int, z_dim: int, h_dim: int = 42) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, x_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Zoo:
    """Models and data built once per session and shared by every peer, so that all peers run
    the same weights on the same inputs. Parameters are made outside ``inference_mode`` (as a
    user's would be)."""

    def __init__(self) -> None:
        self._eager: dict[str, nn.Module] = {}
        self._inputs: dict[tuple[int, int], np.ndarray] = {}
        self._streams: dict[tuple[int, int, int], list[np.ndarray]] = {}
        self._references: dict[tuple[str, int], np.ndarray] = {}

    def eager(self, model: ModelSpec) -> nn.Module:
        """The plain PyTorch module in eval mode: the seed's AE, or an ``nn.Sequential``."""
        if model.key not in self._eager:
            self._eager[model.key] = self._build(model)
        return self._eager[model.key]

    @staticmethod
    @torch.inference_mode(False)
    def _build(model: ModelSpec) -> nn.Module:
        torch.manual_seed(sum(model.widths))
        if model.autoencoder:
            x_dim, h_dim, z_dim = model.widths[:3]
            return SeedAE(x_dim, z_dim, h_dim).eval()
        children: list[nn.Module] = []
        pairs = zip(model.widths, model.widths[1:], strict=False)
        for (fan_in, fan_out), post_op in zip(pairs, model.activations, strict=True):
            children.append(nn.Linear(fan_in, fan_out))
            if post_op != IDENTITY:
                children.append(post_op_module(post_op))
        return nn.Sequential(*children).eval()

    def layers(self, model: ModelSpec) -> list[tuple[np.ndarray, np.ndarray, PostOp]]:
        """``(weight (out, in), bias, post-op)`` per layer, float32 copies."""
        linears = [m for m in self.eager(model).modules() if type(m) is nn.Linear]
        return [
            (lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy(), activation)
            for lin, activation in zip(linears, model.activations, strict=True)
        ]

    def inputs(self, model: ModelSpec, rows: int) -> np.ndarray:
        """Uniform [0, 1) float32 inputs of shape ``(rows, in_features)``, like scaled pixels."""
        key = (model.widths[0], rows)
        if key not in self._inputs:
            rng = np.random.default_rng(rows)
            self._inputs[key] = rng.random((rows, model.widths[0]), dtype=np.float32)
        return self._inputs[key]

    def stream(self, model: ModelSpec, rows: int, batches: int) -> list[np.ndarray]:
        """``batches`` distinct inputs of ``rows`` rows, ``inputs(model, rows)`` first."""
        key = (model.widths[0], rows, batches)
        if key not in self._streams:
            rng = np.random.default_rng([rows, batches])
            more = rng.random((batches - 1, rows, model.widths[0]), dtype=np.float32)
            self._streams.clear()  # one stream at a time: each is hundreds of MB
            self._streams[key] = [self.inputs(model, rows), *more]
        return self._streams[key]

    def reference(self, model: ModelSpec, rows: int) -> np.ndarray:
        """Plain PyTorch's output on ``inputs(model, rows)``."""
        key = (model.key, rows)
        if key not in self._references:
            with torch.inference_mode():
                out = self.eager(model)(torch.from_numpy(self.inputs(model, rows)))
            self._references[key] = out.numpy().copy()
        return self._references[key]


@pytest.fixture
def seed_ae() -> type[SeedAE]:
    """The seed's autoencoder class, for benches that build their own (the training steps)."""
    return SeedAE


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


@contextlib.contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    saved = (fusedae.get_num_threads(), torch.get_num_threads(), inductor_config.cpp.threads)
    fusedae.set_num_threads(threads)
    torch.set_num_threads(threads)
    inductor_config.cpp.threads = threads  # torch.compile bakes the count into its C++ code
    try:
        yield
    finally:
        fusedae.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
        inductor_config.cpp.threads = saved[2]


@pytest.fixture
def pin_threads() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with pin_threads(n):`` pins fusedae's, torch's and torch.compile's thread counts to
    ``n`` and restores them afterwards (ONNX Runtime takes its count per session)."""
    return _pinned_threads


def _fma_peak_gflops(threads: int, seconds: float) -> float:
    if threads == 1:
        return _native.fma_peak_gflops(seconds)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda _: _native.fma_peak_gflops(seconds), range(threads)))


@pytest.fixture
def fma_peak() -> Callable[[int, float], float]:
    """``fma_peak(threads, seconds)``: GFLOP/s of ``threads`` register-only fp32 FMA loops run
    at once (the probe releases the GIL), the ceiling for that thread count on the cores as
    they are right now."""
    return _fma_peak_gflops


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Callable[[Callable[[], Any]], None]:
    """``measure(target)`` times ``target()`` in pedantic mode: enough calls per round for a
    round of ``MIN_ROUND_SECONDS``, as many rounds as fit in ``--bench-seconds`` (at least
    ``MIN_ROUNDS``). With benchmarks disabled it calls ``target`` once."""
    seconds = float(request.config.getoption("bench_seconds"))

    def run(target: Callable[[], Any]) -> None:
        if benchmark.disabled:
            benchmark(target)
            return
        target()  # warm-up: first touch of buffers, lazy initialisation
        one = math.inf
        for _ in range(3):
            start = time.perf_counter()
            target()
            one = min(one, time.perf_counter() - start)
        iterations = max(1, math.ceil(MIN_ROUND_SECONDS / max(one, 1e-7)))
        rounds = max(MIN_ROUNDS, min(10_000, round(seconds / (one * iterations))))
        benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)

    return run
