"""Compares builds of the native module in ONE process: each `.so` given is loaded as its own
module, every build's chain runs on the same input, the calls interleaved round after round,
and each build's median is printed with its ratio to the first. On a shared VM whose memory
bandwidth comes and goes with the neighbours, this held still where alternating processes
moved 10-30% (a neighbour's burst hits every build alike). One thread only: with more, each
module's pool spins between calls and the pools fight for the cores.

    cp python/fusedae/_native.abi3.so /tmp/before.so   # then change, rebuild
    .venv/bin/python tools/ab_builds.py /tmp/before.so python/fusedae/_native.abi3.so \\
        --widths 784,42,16,42,784 --ops relu,identity,relu,identity --precision int8
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np


def load(path: Path, index: int, scratch: Path) -> ModuleType:
    """The build at `path` as a module of its own (a copy, so two builds of one name load)."""
    copy = scratch / f"build{index}" / "_native.abi3.so"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    spec = importlib.util.spec_from_file_location("fusedae._native", copy)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_num_threads(1)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", type=Path, help="the .so files, the reference first")
    parser.add_argument("--widths", default="784,42,16,42,784")
    parser.add_argument("--ops", default=None, help="one post-op per layer (ReLU, identity last)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()

    widths = [int(w) for w in args.widths.split(",")]
    layers = len(widths) - 1
    ops = args.ops.split(",") if args.ops else ["relu"] * (layers - 1) + ["identity"]
    rng = np.random.default_rng(0)
    weights = [
        (rng.standard_normal((out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        for fan_in, out in itertools.pairwise(widths)
    ]
    biases = [(0.1 * rng.standard_normal(w.shape[0])).astype(np.float32) for w in weights]
    x = rng.standard_normal((args.rows, widths[0])).astype(np.float32)
    precision = None if args.precision == "fp32" else args.precision

    with tempfile.TemporaryDirectory() as scratch:
        modules = [load(path, i, Path(scratch)) for i, path in enumerate(args.builds)]
        chains = [m.Chain(weights, biases, ops, precision=precision) for m in modules]
        reference = chains[0](x)
        for path, chain in zip(args.builds[1:], chains[1:], strict=True):
            if not np.array_equal(chain(x), reference):
                print(f"note: {path} gives other bits than {args.builds[0]}")
        times: list[list[float]] = [[] for _ in chains]
        for _ in range(args.rounds):
            for chain, runs in zip(chains, times, strict=True):
                start = time.perf_counter()
                chain(x)
                runs.append(time.perf_counter() - start)
    first = statistics.median(times[0])
    for path, runs in zip(args.builds, times, strict=True):
        median = statistics.median(runs)
        print(f"{median * 1e3:9.3f} ms  {first / median:5.2f}x  {path}")


if __name__ == "__main__":
    main()
