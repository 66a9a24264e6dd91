"""Issue 12's speed table: the MNIST autoencoder 784-256-64-32-64-256-784 at 4096 rows on one
thread, ReLU or GELU(tanh) between the layers and a Sigmoid at the end, through fusedae's numpy
`MLP`, PyTorch eager (`inference_mode`) and ONNX Runtime, on the same weights and inputs as the
bench (`benches/conftest.py`'s zoo). Every peer, and the FMA-peak probe, runs once per round in an
order shuffled per round, so a slow spell of this shared VM hits every peer alike (the bench runs
each peer for half a second in turn, and its ratios move with whichever peer a slow spell hit);
medians over the rounds:

    .venv/bin/python tools/real_models_table.py [ROUNDS]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import fusedae
from fusedae import _native
from fusedae.cli.bench import onnx_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from bench_models import MODEL_BY_KEY
from conftest import Zoo

ROWS = 4096
WARM_UP = 2
MODELS = ("mnist-relu", "mnist-gelu")


def row(key: str, zoo: Zoo, rounds: int) -> str:
    """One model's table row."""
    model = MODEL_BY_KEY[key]
    layers = zoo.layers(model)
    x = zoo.inputs(model, ROWS)
    mlp = fusedae.MLP([(w, b) for w, b, _ in layers], activations=[a for *_, a in layers])
    eager = zoo.eager(model)
    session = onnx_session([(w, b) for w, b, _ in layers], [a for *_, a in layers], 1)
    tensor = torch.from_numpy(x)

    def run_eager() -> object:
        with torch.inference_mode():
            return eager(tensor)

    peers: dict[str, Callable[[], object]] = {
        "peak": lambda: _native.fma_peak_gflops(0.05, "float32"),
        "fusedae": lambda: mlp(x),
        "eager": run_eager,
        "ort": lambda: session.run(None, {"x": x})[0],
    }
    times: dict[str, list[float]] = {name: [] for name in peers}
    peaks: list[float] = []
    for index in range(WARM_UP + rounds):
        order = list(peers.items())
        random.Random(index).shuffle(order)
        for name, call in order:
            start = time.perf_counter()
            result = call()
            if index >= WARM_UP:
                times[name].append(time.perf_counter() - start)
                if name == "peak":
                    peaks.append(float(result))  # type: ignore[arg-type]
    peak = statistics.median(peaks)
    median = {name: statistics.median(values) for name, values in times.items()}

    def cell(name: str) -> str:
        gflops = model.flops_per_row * ROWS / median[name] / 1e9
        return f"{median[name] * 1e3:.1f} ms ({100 * gflops / peak:.0f}%)"

    return (
        f"| {model.label} | {peak:.1f} | {cell('fusedae')} | {cell('eager')} | {cell('ort')} | "
        f"{median['eager'] / median['fusedae']:.2f}x | {median['ort'] / median['fusedae']:.2f}x |"
    )


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    torch.set_num_threads(1)
    fusedae.set_num_threads(1)
    zoo = Zoo()
    print(f"{_native.selected_isa()}, 1 thread, {ROWS} rows, median of {rounds} shuffled rounds")
    print(
        "| model | FMA peak GFLOP/s | fusedae MLP | PyTorch eager | ONNX Runtime | vs eager "
        "| vs ONNX Runtime |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in MODELS:
        print(row(key, zoo, rounds), flush=True)


if __name__ == "__main__":
    main()
