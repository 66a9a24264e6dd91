"""``fusedae bench``: fusedae against PyTorch eager and ONNX Runtime on one shape."""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import fusedae
from fusedae import _native, _reference
from fusedae._ops import IDENTITY, RELU, PostOp, post_ops
from fusedae.chain import ChainSpec
from fusedae.cli.common import (
    positive_int,
    print_table,
    thread_count,
    time_interleaved,
    widths_list,
)
from fusedae.mlp import MLP


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="time fusedae against PyTorch eager (and ONNX Runtime) on one shape",
        description=(
            "Times one forward pass of a random Linear chain (ReLU between layers, none after "
            "the last) on a random batch: fusedae, PyTorch eager when torch is installed, ONNX "
            "Runtime when onnx and onnxruntime are. Rounds alternate between them; the median "
            "is reported, with the error against a float64 numpy reference."
        ),
    )
    bench.add_argument(
        "--widths",
        type=widths_list,
        default=[784, 42, 16],
        help="input width, then each layer's output width (default: 784,42,16)",
    )
    bench.add_argument("--batch", type=positive_int, default=4096, help="default: %(default)s")
    bench.add_argument(
        "--threads", type=thread_count, help="threads for every backend (default: fusedae's)"
    )
    bench.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="default: %(default)s"
    )
    bench.add_argument("--rounds", type=positive_int, default=15, help="default: %(default)s")
    bench.set_defaults(run=run)


def onnx_model(
    layers: Sequence[tuple[np.ndarray, np.ndarray]], activations: Sequence[str | PostOp]
) -> Any:
    """The chain as an ONNX model (opset 17): ``Gemm(transB=1)`` per layer, then each post-op's
    ONNX nodes from the op table; input ``"x"`` with a dynamic batch dimension."""
    import onnx
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(layers[0][0].dtype)
    nodes, initializers, name = [], [], "x"
    for index, ((weight, bias), post_op) in enumerate(
        zip(layers, post_ops(activations), strict=True)
    ):
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(
            helper.make_node("Gemm", [name, f"w{index}", f"b{index}"], [f"h{index}"], transB=1)
        )
        name = f"h{index}"
        nodes += post_op.onnx_nodes(name, f"r{index}", layers[0][0].dtype)
        name = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", elem, ["batch", layers[0][0].shape[1]])],
        [helper.make_tensor_value_info(name, elem, ["batch", layers[-1][0].shape[0]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def onnx_session(
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    activations: Sequence[str | PostOp],
    threads: int,
    *,
    int8: bool = False,
) -> Any:
    """An ONNX Runtime session (default graph optimizations, ``threads`` intra-op, one inter-op)
    running ``onnx_model`` (ONNX Runtime's graph optimizations drop an ``Identity``); with
    ``int8``, after ONNX Runtime's ``quantize_dynamic`` (int8 weights per channel, uint8
    activations quantized per call)."""
    import onnxruntime

    data = onnx_model(layers, activations).SerializeToString()
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as directory:
            source, quantized = Path(directory, "fp32.onnx"), Path(directory, "int8.onnx")
            source.write_bytes(data)
            quantize_dynamic(source, quantized, per_channel=True, weight_type=QuantType.QInt8)
            data = quantized.read_bytes()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(args: argparse.Namespace) -> None:
    widths, batch, dtype = args.widths, args.batch, np.dtype(args.dtype)
    if args.threads:
        fusedae.set_num_threads(args.threads)
    threads = fusedae.get_num_threads()
    rng = np.random.default_rng(0)
    layers = [
        (
            (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(dtype),
            (0.1 * rng.standard_normal(n_out)).astype(dtype),
        )
        for n_in, n_out in itertools.pairwise(widths)
    ]
    spec = ChainSpec.from_pairs(layers, [RELU] * (len(layers) - 1) + [IDENTITY])
    x = rng.standard_normal((batch, widths[0])).astype(dtype)
    mlp = MLP.from_spec(spec)
    out = np.empty((batch, widths[-1]), dtype)
    backends: dict[str, Callable[[], Any]] = {"fusedae": lambda: mlp(x, out=out)}
    missing = []
    try:
        import torch
    except ImportError:
        missing.append("PyTorch (pip install torch)")
    else:
        from fusedae.torch.lower import to_sequential

        torch.set_num_threads(threads)
        model = to_sequential(spec)
        x_torch = torch.from_numpy(x)

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return model(x_torch).numpy()

        backends["PyTorch eager"] = run_torch
    try:
        session = onnx_session(layers, spec.post_ops, threads)
    except ImportError:
        missing.append("ONNX Runtime (pip install onnx onnxruntime)")
    else:
        backends["ONNX Runtime"] = lambda: session.run(None, {"x": x})[0]
    on_threads = f"{threads} thread{'s' * (threads > 1)}"
    print(f"{' -> '.join(map(str, widths))}, batch {batch}, {dtype}, {on_threads}, ISA {mlp.isa}")
    peak = _native.fma_peak_gflops(dtype=dtype.name) * threads
    print(f"FMA peak measured now: {peak:.0f} GFLOP/s on {on_threads}")
    expected, _ = _reference.forward(layers, spec.post_ops, x)
    errors = {name: float(np.abs(run() - expected).max()) for name, run in backends.items()}
    seconds = time_interleaved(backends, args.rounds)
    flops = mlp.flops_per_row * batch
    baseline = seconds.get("PyTorch eager")
    rows = [
        [
            name,
            f"{1e3 * t:.3f}",
            f"{batch / t / 1e6:.2f}",
            f"{flops / t / 1e9:.1f}",
            f"{100 * flops / t / 1e9 / peak:.0f}%",
            "-" if baseline is None else f"{baseline / t:.2f}x",
            f"{errors[name]:.1e}",
        ]
        for name, t in seconds.items()
    ]
    print_table(
        ["backend", "ms/batch", "Mrows/s", "GFLOP/s", "of peak", "vs PyTorch", "max |err|"], rows
    )
    for name in missing:
        print(f"not timed: {name} is not installed")
