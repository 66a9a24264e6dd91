"""Times the issue's autoencoder, 784-256-64-32-64-256-784 at 4096 rows on one thread, with
each activation between the layers and a sigmoid at the end, as a share of the FMA peak
measured in the same run (alternating, medians):

    .venv/bin/python tools/activation_speed.py [float32|float64]
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time

import numpy as np
import numpy.typing as npt

import fusedae
from fusedae import _native

WIDTHS = [784, 256, 64, 32, 64, 256, 784]
ROWS = 4096
HIDDEN = ["identity", "relu", "gelu_tanh", "sigmoid", "silu", "tanh", "gelu", "elu", "softplus"]


def post_ops(hidden: str) -> list[str | tuple[str | float, ...]]:
    """`hidden` after every hidden layer, a sigmoid after the last."""
    ops: list[str | tuple[str | float, ...]] = [hidden] * (len(WIDTHS) - 2)
    return [*ops, "sigmoid"]


def main() -> None:
    dtype = np.dtype(sys.argv[1] if len(sys.argv) > 1 else "float32")
    fusedae.set_num_threads(1)
    rng = np.random.default_rng(0)
    weights: list[npt.NDArray[np.floating]] = [
        (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)
        for i, o in itertools.pairwise(WIDTHS)
    ]
    biases: list[npt.NDArray[np.floating] | None] = [
        (0.1 * rng.standard_normal(o)).astype(dtype) for o in WIDTHS[1:]
    ]
    x = rng.standard_normal((ROWS, WIDTHS[0])).astype(dtype)
    chains = {op: _native.Chain(weights, biases, post_ops(op)) for op in HIDDEN}
    out = np.empty((ROWS, WIDTHS[-1]), dtype=dtype)
    times: dict[str, list[float]] = {op: [] for op in HIDDEN}
    peaks = []
    for _ in range(7):
        peaks.append(_native.fma_peak_gflops(0.1, dtype.name))
        for op, chain in chains.items():
            start = time.perf_counter()
            chain.forward(x, out)
            times[op].append(time.perf_counter() - start)
    peak = statistics.median(peaks)
    print(f"{_native.selected_isa()} {dtype}, 1 thread, FMA peak {peak:.1f} GFLOP/s")
    for op, chain in chains.items():
        seconds = statistics.median(times[op])
        gflops = chain.flops_per_row * ROWS / seconds / 1e9
        print(
            f"  {op:>10} hidden + sigmoid last: {seconds * 1e3:7.2f} ms "
            f"{gflops:6.1f} GFLOP/s = {100 * gflops / peak:5.1f}% of peak"
        )


if __name__ == "__main__":
    main()
