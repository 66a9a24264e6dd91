"""Compares builds of the native module in ONE process: each `.so` given is loaded as its own
module, every build's chain runs on the same input, the calls interleaved round after round,
and each build's median is printed with its ratio to the first. On a shared VM whose memory
bandwidth comes and goes with the neighbours, this held still where alternating processes
moved 10-30% (a neighbour's burst hits every build alike). One thread only: with more, each
module's pool spins between calls and the pools fight for the cores.

    cp python/fusedae/_native.abi3.so /tmp/before.so   # then change, rebuild
    .venv/bin/python tools/ab_builds.py /tmp/before.so python/fusedae/_native.abi3.so \\
        --widths 784,42,16,42,784 --ops relu,identity,relu,identity --precision int8

With `--backward`, what is timed is the training backward instead: every layer's weight and bias
gradients (and the input's with `--grad-input`) from one saved forward of each build.

Compare builds of one profile: the Makefile's fast one (`FAST_RELEASE`: no LTO, 16 codegen
units) runs the seed encoder's forward at 256 rows 1.4x slower than the shipped one (216 against
155 us, Zen 4), its backward as fast.

Every call reads the same input, which after the first round sits in L3 (260 MB on the Intel
VM). A change to how the input streams in (fetching ahead) is judged with `--pool-mb 400`: each
call then reads the next of enough inputs to fill that many MB, beyond L3, and the builds take
turns going first (whichever runs second on an input another build just read finds part of it
in cache: fetching the block after next measured 1.37x there, 0.97x fairly).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

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


def backward_call(chain: Any, x: np.ndarray, grad_input: bool) -> Callable[[], object]:
    """The chain's backward (every layer's parameters) from one saved forward of `x`."""
    y, saved = chain._forward_saving_dlpack(x.__dlpack__())
    grad_output = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    needs_params = [True] * len(chain.saved_columns)
    return lambda: chain._backward_dlpack(
        x.__dlpack__(),
        saved.__dlpack__(),
        y.__dlpack__(),
        grad_output.__dlpack__(),
        needs_params,
        grad_input,
    )


def ignoring_input(call: Callable[[], object]) -> Callable[[np.ndarray], object]:
    """`call` taking an input it does not read (the backward's is fixed by its forward)."""
    return lambda _: call()


def outputs(result: object) -> list[np.ndarray]:
    """A call's arrays: the output, or the backward's gradients."""
    if isinstance(result, tuple):
        return [a for a in result if a is not None]
    return [cast(np.ndarray, result)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", type=Path, help="the .so files, the reference first")
    parser.add_argument("--widths", default="784,42,16,42,784")
    parser.add_argument("--ops", default=None, help="one post-op per layer (ReLU, identity last)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--backward", action="store_true", help="time the backward (fp32 only)")
    parser.add_argument("--grad-input", action="store_true", help="with --backward: grad_input too")
    parser.add_argument(
        "--pool-mb", type=int, default=0, help="forward: each call a fresh input from this many MB"
    )
    args = parser.parse_args()
    if args.pool_mb and args.backward:
        parser.error("--pool-mb times the forward only")

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
    inputs = [x] + [
        rng.standard_normal(x.shape).astype(np.float32)
        for _ in range((args.pool_mb << 20) // max(x.nbytes, 1))
    ]
    precision = None if args.precision == "fp32" else args.precision

    with tempfile.TemporaryDirectory() as scratch:
        modules = [load(path, i, Path(scratch)) for i, path in enumerate(args.builds)]
        chains = [m.Chain(weights, biases, ops, precision=precision) for m in modules]
        calls = [
            ignoring_input(backward_call(chain, x, args.grad_input)) if args.backward else chain
            for chain in chains
        ]
        reference = calls[0](x)
        for path, call in zip(args.builds[1:], calls[1:], strict=True):
            if not all(
                np.array_equal(a, b)
                for a, b in zip(outputs(call(x)), outputs(reference), strict=True)
            ):
                print(f"note: {path} gives other bits than {args.builds[0]}")
        times: list[list[float]] = [[] for _ in chains]
        fresh = itertools.cycle(inputs)
        for round_ in range(args.rounds):
            # With a pool, the builds take turns going first; without, the fixed order.
            turn = round_ % len(calls) if args.pool_mb else 0
            for index in [*range(turn, len(calls)), *range(turn)]:
                call_input = next(fresh)
                start = time.perf_counter()
                calls[index](call_input)
                times[index].append(time.perf_counter() - start)
    first = statistics.median(times[0])
    for path, runs in zip(args.builds, times, strict=True):
        median = statistics.median(runs)
        print(f"{median * 1e6:10.2f} us  {first / median:5.2f}x  {path}")


if __name__ == "__main__":
    main()
