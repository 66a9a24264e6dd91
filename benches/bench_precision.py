"""Lower precision against its peers: one pytest-benchmark group per (model, batch, threads).

Every group holds the three ceilings measured in the same run (the fp32 FMA loop and the bf16 and
int8 kernels' own instructions: ``vdpbf16ps`` with AVX512_BF16, ``vpdpbusd`` with AVX512_VNNI),
fusedae at fp32, bf16 and int8, and
PyTorch at fp32, bf16 (``model.to(torch.bfloat16)``) and int8 (``quantize_dynamic``, default
per-tensor and per-channel), ONNX Runtime at fp32 and int8 (``quantize_dynamic`` per channel). Each
records its normwise relative error against the float64 reference on the same weights and
inputs (``extra_info["error"]``; at batch 1 and 64 over 256 rows, in calls of the batch's size);
speed is reported in fp32-equivalent GFLOP/s (2 x in x out per
row, whatever the precision).

    pytest benches/bench_precision.py --benchmark-enable --benchmark-only \\
        --benchmark-json=benches/precision.json && python benches/report.py benches/precision.json
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fusedae
from bench_models import MODEL_BY_KEY, SMOKE_MAX_ROWS, Model, _on_inputs
from fusedae import _native, _reference
from fusedae.cli.bench import onnx_session

MODELS = ("enc784", "ae784", "enc1024")
BATCHES = (1, 64, 4096)
THREADS = (1, 2)
PEERS = (
    "fma-peak",
    "bf16-peak",
    "int8-peak",
    "fusedae-fp32",
    "fusedae-bf16",
    "fusedae-int8",
    "torch-fp32",
    "torch-bf16",
    "torch-int8",
    "torch-int8-per-channel",
    "onnxruntime-fp32",
    "onnxruntime-int8",
)
# The error each precision must stay under on these models (the ceilings), and for fp32
# what float32 rounding gives.
CEILINGS = {"fp32": 1e-5, "bf16": 1e-2, "int8": 3e-2}
# Calls smaller than this are repeated on distinct inputs for the error (see ``_error``).
ERROR_MIN_ROWS = 256
PEAK_SECONDS = 0.1
PEAK_ROUNDS = 5

CASES = [
    pytest.param(key, batch, threads, peer, id=f"{key}-b{batch}-t{threads}-{peer}")
    for key in MODELS
    for batch in BATCHES
    for threads in THREADS
    for peer in PEERS
]


def precision_of(peer: str) -> str:
    return next(p for p in ("int8", "bf16", "fp32") if p in peer)


def group_name(model: Model, batch: int, threads: int) -> str:
    return f"precision | {model.label} | batch {batch} | {threads} thread{'s' * (threads > 1)}"


def _fusedae(precision: str) -> Callable[..., Callable[[], Any]]:
    def build(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
        layers = zoo.layers(model)
        mlp = fusedae.MLP(
            [(w, b) for w, b, _ in layers],
            [a for *_, a in layers],
            precision=None if precision == "fp32" else precision,
        )
        return _on_inputs(xs, mlp)

    return build


def _torch(precision: str) -> Callable[..., Callable[[], Any]]:
    def build(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
        module = copy.deepcopy(zoo.eager(model))
        xts = [torch.from_numpy(x) for x in xs]
        if precision == "bf16":
            # The user's rows are float32: the conversion is part of the call, as it is ours.
            module = module.to(torch.bfloat16)
            return _on_inputs(xts, lambda x: module(x.to(torch.bfloat16)))
        if precision != "fp32":
            from torch.ao import quantization

            qconfig = {"int8": None, "int8-per-channel": quantization.per_channel_dynamic_qconfig}
            spec = {nn.Linear: qconfig[precision]} if qconfig[precision] else {nn.Linear}
            module = quantization.quantize_dynamic(module, spec, dtype=torch.qint8)
        return _on_inputs(xts, module)

    return build


def _onnxruntime(int8: bool) -> Callable[..., Callable[[], Any]]:
    def build(zoo: Any, model: Model, xs: list[np.ndarray], threads: int) -> Callable[[], Any]:
        layers = zoo.layers(model)
        session = onnx_session(
            [(w, b) for w, b, _ in layers], [a for *_, a in layers], threads, int8=int8
        )
        return _on_inputs([{"x": x} for x in xs], lambda feed: session.run(None, feed)[0])

    return build


BUILDERS = {
    "fusedae-fp32": _fusedae("fp32"),
    "fusedae-bf16": _fusedae("bf16"),
    "fusedae-int8": _fusedae("int8"),
    "torch-fp32": _torch("fp32"),
    "torch-bf16": _torch("bf16"),
    "torch-int8": _torch("int8"),
    "torch-int8-per-channel": _torch("int8-per-channel"),
    "onnxruntime-fp32": _onnxruntime(int8=False),
    "onnxruntime-int8": _onnxruntime(int8=True),
}


def _as_float64(out: Any) -> np.ndarray:
    if isinstance(out, torch.Tensor):
        return out.to(torch.float64).numpy()
    return np.asarray(out, np.float64)


@pytest.mark.parametrize(("model_key", "batch", "threads", "peer"), CASES)
def test_precision(
    benchmark: Any,
    measure: Callable[[Callable[[], Any]], None],
    zoo: Any,
    pin_threads: Any,
    model_key: str,
    batch: int,
    threads: int,
    peer: str,
) -> None:
    """One peer of one group: its error against the float64 reference on the group's input
    (held to its precision's ceiling), then its time."""
    model = MODEL_BY_KEY[model_key]
    rows = batch if benchmark.enabled else min(batch, SMOKE_MAX_ROWS)
    benchmark.group = group_name(model, batch, threads)
    benchmark.extra_info.update(
        kind="precision",
        model=model.label,
        model_key=model.key,
        batch=batch,
        rows=rows,
        threads=threads,
        peer=peer,
        flops=model.flops_per_row * rows,
        load_average=os.getloadavg()[0],
    )
    with pin_threads(threads):
        if peer.endswith("-peak"):
            _peak(benchmark, threads, {"bf16-peak": "bf16", "int8-peak": "int8"}.get(peer))
            return
        error = _error(zoo, model, peer, rows, threads)
        benchmark.extra_info["error"] = error
        if peer.startswith("fusedae"):
            assert error <= CEILINGS[precision_of(peer)], error
        target = BUILDERS[peer](zoo, model, [zoo.inputs(model, rows)], threads)
        with torch.inference_mode():
            measure(target)


def _error(zoo: Any, model: Model, peer: str, rows: int, threads: int) -> float:
    """``peer``'s normwise relative error against the float64 reference, over calls of ``rows``
    rows. A call of fewer than ``ERROR_MIN_ROWS`` rows is repeated on distinct inputs until that
    many rows are in: one row's 16 outputs are too few to rank the peers, and the dynamic
    quantizers scale each call by its own input, so the calls must stay that size."""
    calls = -(-ERROR_MIN_ROWS // rows)
    x = zoo.inputs(model, rows * calls)
    xs = np.split(x, calls)
    layers = zoo.layers(model)
    want, _ = _reference.forward(
        [(w, b) for w, b, _ in layers], [a for *_, a in layers], x.astype(np.float64)
    )
    target = BUILDERS[peer](zoo, model, xs, threads)
    with torch.inference_mode():
        got = np.concatenate([_as_float64(target()) for _ in xs])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _peak(benchmark: Any, threads: int, precision: str | None) -> None:
    """The ceiling of ``threads`` probes at once: the fp32 FMA loop, or the bf16 or int8
    kernel's own instruction, the best of ``PEAK_ROUNDS``."""
    seconds = PEAK_SECONDS if benchmark.enabled else 0.005

    def one(_: object = None) -> float:
        return _native.fma_peak_gflops(seconds, precision=precision)

    def probe() -> float:
        if threads == 1:
            return one()
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, range(threads)))

    runs: list[float] = []
    rounds = PEAK_ROUNDS if benchmark.enabled else 1
    benchmark.pedantic(lambda: runs.append(probe()), rounds=rounds, iterations=1)
    benchmark.extra_info.update(flops=0, peak_gflops=max(runs), peak_gflops_runs=runs)
    assert min(runs) > 0
