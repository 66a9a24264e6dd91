"""Forward-pass speed of fusedae against its peers, one pytest-benchmark group per
(model, batch, threads).

Every group holds: the FMA-peak probe (the ceiling, measured in the same run), ours through the
numpy ``MLP`` and through the torch module (``FusedMLP`` / ``AE``), PyTorch eager,
``torch.compile`` of the eager module, and ONNX Runtime on a graph built from the same weights.
Each peer's output is checked against plain PyTorch, so the smoke run (benchmarks disabled) is a
real test. ``benchmark.extra_info`` holds what ``report.py`` needs (FLOPs per call, peer, ...).

    make bench        # or: pytest benches --benchmark-enable --benchmark-only \\
                      #         --benchmark-json=benches/results.json && \\
                      #     python benches/report.py benches/results.json
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import fusedae
from fusedae import _native
from fusedae._ops import IDENTITY, RELU, PostOp
from fusedae.cli.bench import onnx_session

# Rows per call when benchmarks are disabled (the smoke run): enough to cross the kernels' row
# tiles and thread split, few enough to keep `make test` quick.
SMOKE_MAX_ROWS = 256
# A streamed group's inputs: at least this much, 8x the 32 MB last-level cache here, so every
# call's rows come from memory, as when a large dataset is encoded batch after batch.
STREAM_BYTES = 256 << 20
# The FMA-peak probe: seconds per probe, probes per group.
PEAK_SECONDS = 0.1
PEAK_ROUNDS = 5


@dataclass(frozen=True)
class Model:
    """A chain of Linear layers, ``widths`` from input to output; ``hidden`` after each layer but
    the last, ``last`` after the last (for the seed's autoencoder: ReLU but at the bottleneck and
    the end). ``streamed``: batches also run as a stream (each call on the next rows of
    ``STREAM_BYTES`` of input), not only on one batch that stays in cache."""

    key: str
    label: str
    widths: tuple[int, ...]
    batches: tuple[int, ...] = (1, 64, 4096)
    autoencoder: bool = False
    streamed: tuple[int, ...] = (4096,)
    hidden: PostOp = RELU
    last: PostOp = IDENTITY

    @property
    def activations(self) -> list[PostOp]:
        if self.autoencoder:  # Linear, ReLU, Linear | Linear, ReLU, Linear
            return [RELU, IDENTITY] * ((len(self.widths) - 1) // 2)
        return [self.hidden] * (len(self.widths) - 2) + [self.last]

    @property
    def flops_per_row(self) -> int:
        """2 x sum(in x out): multiply-adds only, as the issue counts them."""
        return 2 * sum(a * b for a, b in zip(self.widths, self.widths[1:], strict=False))


MNIST_AE_WIDTHS = (784, 256, 64, 32, 64, 256, 784)
SIGMOID = PostOp("sigmoid")
GELU_TANH = PostOp("gelu_tanh")

MODELS = (
    Model("enc784", "encoder 784-42-16", (784, 42, 16), batches=(1, 64, 4096, 65536)),
    Model("ae784", "AE 784-42-16-42-784", (784, 42, 16, 42, 784), autoencoder=True),
    Model("digits", "encoder 64-42-2", (64, 42, 2)),
    Model("enc1024", "encoder 1024-256-32", (1024, 256, 32), streamed=()),
    # The MNIST autoencoders of public repositories: a deeper stack, a Sigmoid on the pixels.
    Model(
        "mnist-relu",
        "AE 784-256-64-32-64-256-784 ReLU, Sigmoid",
        MNIST_AE_WIDTHS,
        streamed=(),
        last=SIGMOID,
    ),
    Model(
        "mnist-gelu",
        "AE 784-256-64-32-64-256-784 GELU(tanh), Sigmoid",
        MNIST_AE_WIDTHS,
        streamed=(),
        hidden=GELU_TANH,
        last=SIGMOID,
    ),
)
THREADS = (1, 2)
# Order within a group; peers of one group run back to back.
PEERS = (
    "fma-peak",
    "fusedae-numpy",
    "fusedae-torch",
    "torch-eager",
    "torch-compile",
    "onnxruntime",
)

MODEL_BY_KEY = {model.key: model for model in MODELS}

# Passes over every group, minutes apart (`make bench` asks for 4): a neighbour on the host that
# slows one peer's timing for a while is unlikely to hit the same peer in every pass, and the
# report keeps each peer's fastest pass. The smoke run needs one.
PASSES = int(os.environ.get("FUSEDAE_BENCH_PASSES", "1"))

CASES = [
    pytest.param(
        pass_index,
        model.key,
        batch,
        streamed,
        threads,
        peer,
        id=f"{model.key}-b{batch}{'-streamed' if streamed else ''}-t{threads}-{peer}"
        + (f"-pass{pass_index}" if PASSES > 1 else ""),
    )
    for pass_index in range(PASSES)
    for model in MODELS
    for batch in model.batches
    for streamed in (False, True)[: 2 if batch in model.streamed else 1]
    for threads in THREADS
    for peer in PEERS
]


def group_name(model: Model, batch: int, streamed: bool, threads: int) -> str:
    stream = " streamed" if streamed else ""
    return f"{model.label} | batch {batch}{stream} | {threads} thread{'s' if threads > 1 else ''}"


def _on_inputs(inputs: Sequence[Any], call: Callable[[Any], Any]) -> Callable[[], Any]:
    """A target that runs ``call`` on the one input, or on the next one of a stream each time
    (the same few tens of nanoseconds of Python for every peer)."""
    if len(inputs) == 1:
        return functools.partial(call, inputs[0])
    stream = itertools.cycle(inputs)
    return lambda: call(next(stream))


def _fusedae_numpy(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
    layers = zoo.layers(model)
    mlp = fusedae.MLP([(w, b) for w, b, _ in layers], activations=[a for _, _, a in layers])
    assert mlp.flops_per_row == model.flops_per_row
    return _on_inputs(xs, mlp)


def _fusedae_torch(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
    from fusedae.torch import AE, FusedMLP

    eager = zoo.eager(model)
    module: torch.nn.Module
    if model.autoencoder:
        x_dim, h_dim, z_dim = model.widths[:3]
        module = AE(x_dim, z_dim, h_dim)
        module.load_state_dict(eager.state_dict())
    else:
        module = FusedMLP.from_sequential(eager)
    module.eval()
    return _on_inputs([torch.from_numpy(x) for x in xs], module)


def _torch_eager(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
    return _on_inputs([torch.from_numpy(x) for x in xs], zoo.eager(model))


def _torch_compile(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
    torch._dynamo.reset()  # compile afresh for this batch size and thread count
    compiled = torch.compile(zoo.eager(model))
    xts = [torch.from_numpy(x) for x in xs]
    try:
        with torch.inference_mode():
            compiled(xts[0])
    except Exception as exc:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}")
    return _on_inputs(xts, compiled)


def _onnxruntime(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
    layers = zoo.layers(model)
    session = onnx_session(
        [(weight, bias) for weight, bias, _ in layers], [act for *_, act in layers], threads
    )
    return _on_inputs([{"x": x} for x in xs], lambda feed: session.run(None, feed)[0])


BUILDERS = {
    "fusedae-numpy": _fusedae_numpy,
    "fusedae-torch": _fusedae_torch,
    "torch-eager": _torch_eager,
    "torch-compile": _torch_compile,
    "onnxruntime": _onnxruntime,
}


def _as_numpy(out: Any) -> np.ndarray:
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


@pytest.mark.parametrize(("pass_index", "model_key", "batch", "streamed", "threads", "peer"), CASES)
def test_forward(
    benchmark: Any,
    measure: Callable[[Callable[[], Any]], None],
    zoo: Any,
    pin_threads: Any,
    fma_peak: Callable[[int, float], float],
    pass_index: int,
    model_key: str,
    batch: int,
    streamed: bool,
    threads: int,
    peer: str,
) -> None:
    """One peer of one (model, batch, input, threads) group: checked against plain PyTorch on
    the first input, then timed; ``rows`` < ``batch``, and a stream of two batches, only in the
    smoke run."""
    model = MODEL_BY_KEY[model_key]
    rows = batch if benchmark.enabled else min(batch, SMOKE_MAX_ROWS)
    benchmark.group = group_name(model, batch, streamed, threads)
    benchmark.extra_info.update(
        model=model.label,
        model_key=model.key,
        widths=list(model.widths),
        batch=batch,
        streamed=streamed,
        rows=rows,
        threads=threads,
        peer=peer,
        pass_index=pass_index,
        flops=model.flops_per_row * rows,
        load_average=os.getloadavg()[0],  # others' work on the cores skews the numbers
    )
    with pin_threads(threads):
        if peer == "fma-peak":
            _peak(benchmark, fma_peak, threads)
            return
        if peer == "torch-compile" and benchmark.disabled:
            pytest.skip("torch.compile is only run when benchmarking (it takes seconds)")
        xs = [zoo.inputs(model, rows)]
        if streamed:
            batch_bytes = rows * model.widths[0] * xs[0].itemsize
            xs = zoo.stream(
                model, rows, -(-STREAM_BYTES // batch_bytes) if benchmark.enabled else 2
            )
        expected = zoo.reference(model, rows)
        # Modules are built outside inference_mode, as a user's would be (parameters made
        # inside it are inference tensors, which FusedMLP cannot cache its packing for).
        target = BUILDERS[peer](zoo, model, xs, threads)
        with torch.inference_mode():
            got = _as_numpy(target())
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
            measure(target)


def _peak(benchmark: Any, fma_peak: Callable[[int, float], float], threads: int) -> None:
    """The group's ceiling: ``threads`` FMA probes at once, the best of ``PEAK_ROUNDS`` (a
    neighbour on the host can only slow a probe down, never speed it up)."""
    seconds = PEAK_SECONDS if benchmark.enabled else 0.005
    runs: list[float] = []
    if benchmark.enabled:
        benchmark.pedantic(
            lambda: runs.append(fma_peak(threads, seconds)), rounds=PEAK_ROUNDS, iterations=1
        )
    else:
        benchmark(lambda: runs.append(fma_peak(threads, seconds)))
    single = _native.fma_peak_gflops(seconds)
    benchmark.extra_info.update(
        flops=0,
        peak_gflops=max(runs),
        peak_gflops_runs=runs,
        peak_gflops_one_thread=single,
    )
    assert min(runs) > 0
    assert single > 0
