"""``fusedae encode``: a saved model over every row of a file."""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

import fusedae
from fusedae import _ops, serialization
from fusedae._ops import OPS
from fusedae.chain import ChainSpec, spec_precision
from fusedae.cli import parquet, ray_engine
from fusedae.cli.common import (
    CHUNK_BYTES,
    CommandError,
    names_list,
    positive_int,
    rows_per_batch,
    say,
    thread_count,
)
from fusedae.cli.inputs import NPY_HEADER_ERRORS, Rows, open_rows
from fusedae.cli.models import load_model
from fusedae.cli.outputs import ResumeCheck, probe_rows, write_rows
from fusedae.mlp import MLP

OUTPUT_COLUMNS = {"encoder": "codes", "decoder": "decoded", "all": "reconstructed"}

ENCODE_HELP = """\
Runs a model over every row of INPUT and writes the results to OUTPUT (.npy or Parquet).

MODEL is one of:
  * a .safetensors file written by fusedae.torch.save or fusedae.MLP.save: it records every
    layer, activation (with its parameters) and BatchNorm; needs numpy only;
  * a PyTorch state_dict (torch.save(model.state_dict(), path)), which needs torch and
    --layers: a state_dict holds the tensors of the Linear and BatchNorm layers but not the
    activations between them, and fusedae does not guess them;
  * a whole pickled nn.Module (torch.save(model, path)), which needs torch and
    --trust-pickle: loading it runs code from the file, so only for files you trust.

--layers spells the chain, in order, one comma-separated item per module, as a
nn.Sequential would list them:
  linear             the state_dict's next Linear; linear(IN,OUT) also checks its shape
  batchnorm          its next BatchNorm1d, in eval mode, with eps 1e-5 as in PyTorch;
                     batchnorm(N) checks its size, batchnorm(eps=0.001) sets eps
  ACTIVATION         applied after the Linear (and its BatchNorm) before it, one of
{activations}
                     (PyTorch's defaults shown; give parameters in order, leaky_relu(0.2),
                     or by name, hardtanh(min_val=0,max_val=6))
for example --layers 'linear,batchnorm,relu,linear,leaky_relu(0.2),linear,hardtanh(0,6)'.
The state_dict's modules are taken in the order it stores them (the order they were
registered, which is nn.Sequential's order); a module is a Linear if it holds weight (2-D)
and bias, a BatchNorm1d if it holds running_mean and running_var. Each item is checked
against the module it takes, and each Linear against the one before it. A dropout item (or
none: Dropout holds no tensors) does nothing, as in eval mode.

A model is one chain of layers with a mark where its encoder ends: after the modules named
encoder (then decoder), or after the first of an nn.Sequential of two Sequentials
(nn.Sequential(encoder, decoder), pickled or its state_dict: the modules under 0., then 1.),
or, for a single chain, at its narrowest layer if its output is as wide as its input, else at
its end. By default the command runs the encoder (rows -> codes); --decode runs the layers
after the mark (codes -> outputs); --reconstruct runs them all; the line it prints names the
layers it ran.

INPUT is a .npy file (read a chunk at a time, so it may be larger than memory) or a .npz
file (--key picks an array), of float32 or float64 rows, shape (..., in_features); OUTPUT has
the input's dtype and shape (..., out_features).

INPUT may also be Parquet (needs pyarrow: pip install 'fusedae[parquet]'): a .parquet file, a
directory (every .parquet under it, through links, leaving out names that start with . or _
as pyarrow does) or a quoted glob ('lake/part-*.parquet'), read a batch at a time. The rows
are a list column of float32 or float64 values (--column; by default the only such column) or
scalar float columns (--columns x0,x1,...). Each input shard gets an output shard, at the
same path under the directory OUTPUT (or OUTPUT itself, for one .parquet file and a .parquet
OUTPUT), holding the --keep columns and then the results as a fixed-size list column
(--output-column; codes, decoded or reconstructed by default).

Every output file is written to a temporary file in the same directory and renamed at the
end: an interrupted run leaves nothing under an output name, and the next run for it removes
what a killed run left (never the file of a run still going). --resume skips the outputs that
exist, which are complete: after an interruption it does the rest. Each must be this job's
(its shape, and some rows as close to the exact values as the precision makes them): one that
another model or other input rows wrote is an error.

--engine ray runs a Parquet job on Ray (pip install 'fusedae[ray]'): on the cluster at
RAY_ADDRESS, else on a local one. Each input shard is one task for a pool of --actors actors
of --cpus-per-actor CPUs each (each runs a reader thread and that many kernel threads): it
reads its shard, which must be readable on every node (relative paths are taken from here),
and writes its output shard the same way as above, so --resume works the same.
"""


def encode_help() -> str:
    """``ENCODE_HELP`` with the activations of the op table."""
    names = ", ".join(str(_ops.post_op(name)) for name in OPS)
    indent = " " * 21
    return ENCODE_HELP.format(
        activations=textwrap.fill(names, 91, initial_indent=indent, subsequent_indent=indent)
    )


def add_parser(commands: Any) -> None:
    encode = commands.add_parser(
        "encode",
        help="run a saved model over a .npy/.npz file or Parquet shards",
        description=encode_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument(
        "model", metavar="MODEL", type=Path, help=".safetensors, state_dict or pickled module"
    )
    encode.add_argument(
        "input", metavar="INPUT", type=Path, help=".npy, .npz, or Parquet (file, directory, glob)"
    )
    encode.add_argument(
        "-o", "--output", required=True, type=Path, help=".npy, .parquet or a directory"
    )
    part = encode.add_mutually_exclusive_group()
    part.add_argument("--decode", action="store_true", help="run the layers after the encoder")
    part.add_argument("--reconstruct", action="store_true", help="run every layer")
    encode.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"rows per chunk (default: about {CHUNK_BYTES >> 20} MiB of input or of output, "
        "whichever rows are wider)",
    )
    encode.add_argument(
        "--threads",
        type=thread_count,
        help="kernel threads (default: the CPUs available; for Parquet, one fewer: the reader "
        "decodes on the other)",
    )
    encode.add_argument(
        "--precision",
        choices=("fp32", "bf16", "int8"),
        default="fp32",
        help="fp32: the input's own dtype (float64 input in float64); bf16: weights stored as "
        "bfloat16; int8: weights as int8 per output, inputs quantized per row; both float32 out "
        "(see docs/precision.md)",
    )
    encode.add_argument("--key", help="the array to read from a .npz holding several")
    encode.add_argument(
        "--layers",
        metavar="ITEMS",
        help="the chain of a state_dict MODEL, e.g. 'linear,relu,linear,sigmoid' (see above)",
    )
    encode.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a MODEL that pickles a whole nn.Module (runs code from the file)",
    )
    rows = encode.add_mutually_exclusive_group()
    rows.add_argument("--column", help="Parquet: the list column holding the rows")
    rows.add_argument(
        "--columns", type=names_list, metavar="NAMES", help="Parquet: scalar columns, one per value"
    )
    encode.add_argument(
        "--keep", type=names_list, metavar="NAMES", help="Parquet: columns copied to the output"
    )
    encode.add_argument("--output-column", metavar="NAME", help="Parquet: the results' column")
    encode.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="Parquet: encode here, or on Ray (RAY_ADDRESS's cluster, else a local one)",
    )
    encode.add_argument(
        "--actors", type=positive_int, help="--engine ray: actors (default: CPUs / CPUs each)"
    )
    encode.add_argument(
        "--cpus-per-actor",
        type=positive_int,
        help="--engine ray: CPUs of each actor, its kernel threads (default: 1)",
    )
    existing = encode.add_mutually_exclusive_group()
    existing.add_argument("--force", action="store_true", help="overwrite outputs that exist")
    existing.add_argument(
        "--resume",
        action="store_true",
        help="skip outputs that exist (each is complete), after checking they are this job's",
    )
    encode.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    part: serialization.Part = (
        "decoder" if args.decode else "all" if args.reconstruct else "encoder"
    )
    if args.threads:
        fusedae.set_num_threads(args.threads)
    ray_flags = {"--actors": args.actors, "--cpus-per-actor": args.cpus_per_actor}
    if parquet.is_parquet(args.input):
        if args.key is not None:
            raise CommandError("--key picks an array of a .npz INPUT; this INPUT is Parquet")
        if args.output.suffix in (".npy", ".npz"):
            raise CommandError(
                f"OUTPUT {args.output}: INPUT {args.input} is read as Parquet (a .parquet file, "
                "a directory or a pattern), and Parquet INPUT is written as Parquet, to a "
                ".parquet file or a directory"
            )
        args.output_column = args.output_column or OUTPUT_COLUMNS[part]
        if args.engine == "ray":
            refuse_given(
                {"--threads": args.threads},
                "with --engine ray each actor runs as many kernel threads as its CPUs "
                "(--cpus-per-actor)",
            )
        else:
            refuse_given(ray_flags, "for --engine ray")
        spec = load_model(args.model, args.layers, args.trust_pickle)
        engine = ray_engine.encode if args.engine == "ray" else parquet.encode
        engine(args, lambda dtype: model_mlp(args.model, spec, part, dtype, args.precision))
        return
    parquet_flags = {
        "--column": args.column,
        "--columns": args.columns,
        "--keep": args.keep,
        "--output-column": args.output_column,
        "--engine": None if args.engine == "local" else args.engine,
    }
    refuse_given({**parquet_flags, **ray_flags}, f"for Parquet INPUT, and {args.input} is not")
    if args.key is not None and args.input.suffix != ".npz":
        raise CommandError(f"--key picks an array of a .npz INPUT; {args.input} is not one")
    output: Path = args.output
    if output.suffix != ".npy":
        raise CommandError(f"OUTPUT must end in .npy for a .npy or .npz INPUT, got {output}")
    if output.exists() and args.input.exists() and output.samefile(args.input):
        if args.resume:  # (the input has the shape of a finished output where widths agree)
            raise CommandError(f"{output} is INPUT, not an output to resume: name another OUTPUT")
        if not args.force:
            raise CommandError(
                f"{output} is INPUT; name another OUTPUT, or pass --force to replace the input "
                "with the result"
            )
    if output.is_dir():  # (before any work: --force does not make it a file)
        raise CommandError(f"OUTPUT {output} is a directory; name a .npy file")
    if output.exists() and not (args.force or args.resume):
        raise CommandError(f"{output} exists; pass --force to overwrite it, or --resume")
    if not output.parent.is_dir():
        raise CommandError(f"the directory of {output} does not exist")
    spec = load_model(args.model, args.layers, args.trust_pickle)
    with contextlib.closing(open_rows(args.input, args.key)) as source:
        mlp = model_mlp(args.model, spec, part, source.dtype, args.precision)
        shape = source.shape
        widths = " -> ".join(map(str, mlp.spec.widths))
        if not shape or shape[-1] != mlp.in_features:
            raise CommandError(
                f"{args.input} has shape {shape}, but the model's {part} ({widths}) takes rows "
                f"of {mlp.in_features} values: shape (..., {mlp.in_features})"
            )
        out_shape = (*shape[:-1], mlp.out_features)
        if output.exists() and args.resume:
            check_finished(output, out_shape, mlp, source)
            say(f"{output} exists (it is complete): nothing to do")
            return
        batch_size = rows_per_batch(
            args.batch_size,
            shape[-1] * source.dtype.itemsize,
            mlp.out_features * mlp.dtype.itemsize,
        )
        write_rows(mlp, source, output, batch_size)
    say(f"wrote {output}: {out_shape} {mlp.dtype} from {shape}, {part} {widths}")


def refuse_given(flags: dict[str, object], reason: str) -> None:
    """An error naming the ``flags`` given (not None), which do not apply for ``reason``."""
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise CommandError(f"{', '.join(given)}: {reason}")


def check_finished(output: Path, shape: tuple[int, ...], mlp: MLP, source: Rows) -> None:
    """``--resume`` found ``output``: it must be what this job writes (a complete file, which
    its name guarantees, of the job's shape and dtype, holding ``mlp`` of ``source``'s rows where
    some are computed again), or the job is not the one it finished."""
    try:
        existing = np.load(output, mmap_mode="r")
    except (OSError, EOFError, *NPY_HEADER_ERRORS) as error:
        raise CommandError(f"--resume: {output} exists but is no .npy ({error})") from None
    if not isinstance(existing, np.ndarray):
        raise CommandError(f"--resume: {output} exists but is an archive, not a .npy")
    if existing.shape != shape or existing.dtype != mlp.dtype:
        raise CommandError(
            f"--resume: {output} exists with shape {existing.shape} {existing.dtype}, but this "
            f"job writes {shape} {mlp.dtype}: it is not this job's output (--force overwrites it)"
        )
    rows = probe_rows(source.rows)
    if len(rows):
        inputs = np.stack([source.read(row, row + 1)[0].copy() for row in rows])
        ResumeCheck(mlp).check(inputs, existing.reshape(-1, mlp.out_features)[rows], output)


def model_mlp(
    path: Path, spec: ChainSpec, part: serialization.Part, dtype: np.dtype, precision: str
) -> MLP:
    """The ``part`` of the model in ``path`` as an ``MLP`` taking rows of ``dtype`` at
    ``precision`` (``"fp32"``: the rows' own dtype; ``"bf16"``, ``"int8"``: float32, rows
    converted)."""
    try:
        selected = spec.select(part)
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None
    narrow = spec_precision(precision)
    try:  # (weights a precision cannot hold: NaN for int8, beyond bf16's range)
        if narrow != "full":
            return MLP.from_spec(selected, precision=narrow)
        return MLP.from_spec(selected, dtype=f"f{dtype.itemsize}")
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None
