"""Coverage-guided fuzzing (atheris) of the ``fusedae`` command line, run in-process.

Each input spells an argv from a vocabulary (``cli_argv.py``): subcommands, flags, values, and
files in a temporary directory: valid and broken models (``.safetensors``, a state_dict, a
pickled module, garbage), valid and broken inputs (``.npy`` of several shapes and dtypes,
``.npz``, truncated, Fortran order, negative shapes), and outputs (new, existing, the input
itself, a missing directory, a wrong suffix, relative to the working directory). Before each
run the output directory, the working directory while ``main`` runs, is reset: an ``exists.npy``, an
``in.npy`` and the temporary file of a killed run writing ``a.npy`` (``.a.npy.HOST.PID.tmp``, PID
beyond any process). Then ``cli.main(argv)`` runs with stdout and stderr captured; ``bench``
and ``demo`` are only parsed (running them takes seconds: their argument types are what is
fuzzed).

Allowed: ``main`` returning a status; ``SystemExit`` with status 0 (``--help``,
``--version``) or 2 (argparse's usage errors). A finding is anything else:

* another exception escaping ``main`` (a traceback where ``fusedae COMMAND: error:`` belongs);
* status 1 without ``fusedae COMMAND: error: ...`` on stderr;
* a temporary file of this process (``.NAME.HOST.PID.tmp``) left anywhere;
* after a failed run (status not 0): any file created, changed or removed, but the complete
  output shards of a Parquet run that failed on a later shard;
* after a successful ``encode --resume`` that found its ``.npy`` OUTPUT: any file changed;
* after a successful ``encode``: anything changed but OUTPUT (and the killed run's temporary
  file for it, which must be gone), or an OUTPUT that is not a ``.npy`` of the input's leading
  shape and float dtype (with a ``.safetensors`` model, of the values ``MLP.load`` computes);
  for Parquet, an output shard without its input shard's rows and kept columns (and values);
* ``--engine ray`` is only parsed (it would start a Ray cluster).
* after a successful ``info``: any file changed;
* a crash or a hang (libFuzzer's ``-timeout``).

Usage::

    python fuzz/python/fuzz_cli.py CORPUS_DIR -max_total_time=60

stops at the first finding; with ``FUZZ_FINDINGS=DIR`` it records each distinct one in ``DIR``
and goes on (``findings.py``). Without torch, the checkpoint fixtures are left out.

Scratch files go to a directory made under ``$TMPDIR``, which stays behind (libFuzzer ends the
process itself); ``tools/fuzz_python.sh`` points ``TMPDIR`` at a directory it removes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import zipfile
from pathlib import Path

import atheris
import cli_argv
import findings
import numpy as np  # imported before instrumentation: numpy itself is not what is fuzzed

try:
    import torch
except ImportError:  # the checkpoint fixtures are left out
    torch = None
try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the Parquet fixtures are left out
    pa = pq = None

with atheris.instrument_imports(include=["fusedae"]):
    from fusedae import MLP, cli, serialization
    from fusedae._ops import PostOp
    from fusedae.chain import ChainSpec, Layer, Normalization

REPO = Path(__file__).resolve().parent.parent.parent
ROOT = Path(tempfile.mkdtemp(prefix="fuzz-cli-")).resolve()
FIXTURES = ROOT / "fixtures"
OUT = ROOT / "out"
DEAD = 4194305  # beyond PID_MAX_LIMIT (4194304): no process has it
HOST = socket.gethostname()
ORPHAN = f".a.npy.{HOST}.{DEAD}.tmp"  # what a killed run writing a.npy left
OWN_TEMPORARY = re.compile(rf"^\..+\.{os.getpid()}\.tmp$")
Tree = dict[str, bytes | None]  # path relative to ROOT -> content (None: a directory)


class Finding(Exception):
    """A behaviour the command line must not have."""


# --- the files --------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def make_fixtures(directory: Path) -> None:
    """The models and inputs the vocabulary names. ``ae`` is 8 -> 4 -> 2 -> 4 -> 8 (encoder:
    two layers); ``ae64bn`` float64 8 -> 3 -> 8 with BatchNorm; ``encoder_only`` 8 -> 3."""
    directory.mkdir()
    rng = np.random.default_rng(0)

    def pair(rows: int, columns: int, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        weight = rng.standard_normal((rows, columns)).astype(dtype)
        return weight, rng.standard_normal(rows).astype(dtype)

    MLP([pair(4, 8), pair(2, 4), pair(4, 2), pair(8, 4)]).save(directory / "ae.safetensors")
    norm = Normalization("before", rng.standard_normal(8), rng.random(8) + 0.5, 1e-5)
    bn = ChainSpec(
        (
            Layer(*pair(3, 8, np.float64), PostOp("leaky_relu", (0.2,)), (norm,)),
            Layer(*pair(8, 3, np.float64), PostOp("sigmoid")),
        ),
        encoder_layers=1,
    )
    serialization.write_spec(directory / "ae64bn.safetensors", bn)
    MLP([pair(3, 8)], ["tanh"]).save(directory / "encoder_only.safetensors")
    shutil.copyfile(
        REPO / "tests" / "data" / "format-1-ae.safetensors", directory / "format1.safetensors"
    )
    model = (directory / "ae.safetensors").read_bytes()
    (directory / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (directory / "truncated.safetensors").write_bytes(model[: len(model) - 5])

    (directory / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip")
    if torch is not None:  # without it, encode refuses every checkpoint alike
        torch.manual_seed(0)
        sequential = torch.nn.Sequential(
            torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
        ).eval()
        torch.save(sequential.state_dict(), directory / "state_dict.pt")
        torch.save(sequential, directory / "module.pt")

    x = rng.standard_normal((5, 8)).astype(np.float32)
    files = {
        "x.npy": npy_bytes(x),
        "x64.npy": npy_bytes(x.astype(np.float64)),
        "x3d.npy": npy_bytes(rng.standard_normal((2, 3, 8)).astype(np.float32)),
        "codes.npy": npy_bytes(rng.standard_normal((5, 2)).astype(np.float32)),
        "wide.npy": npy_bytes(rng.standard_normal((5, 7)).astype(np.float32)),
        "int.npy": npy_bytes(np.arange(16, dtype=np.int32).reshape(2, 8)),
        "fortran.npy": npy_bytes(np.asfortranarray(x)),
        "empty.npy": npy_bytes(np.zeros((0, 8), np.float32)),
        "scalar.npy": npy_bytes(np.array(1.0, np.float32)),
        "negative.npy": negative_shape_npy((-1, 8), b""),
        "negative_rows.npy": negative_shape_npy((-2, -3, 8), np.ones((6, 8), np.float32).tobytes()),
        "x.npz": npz_bytes({"x": x}),
        "two.npz": npz_bytes({"x": x, "y": np.zeros(3, np.float32)}),
        "compressed.npz": compressed_npz(x),
        "x.txt": b"1 2 3\n",
    }
    files["truncated.npy"] = files["x.npy"][:-7]
    for name, data in files.items():
        (directory / name).write_bytes(data)
    if pa is not None:
        parquet_fixtures(directory, x)


def parquet_fixtures(directory: Path, x: np.ndarray) -> None:
    """``rows.parquet``: id, x (a fixed-size list of 8 float32) and label, in row groups of 2;
    ``scalars.parquet``: id and x0..x7 (float64); ``wrong_width.parquet``: a row of 7 values;
    ``lake/``: a shard of 3 rows (a list column) and an empty one beneath."""
    n = len(x)
    rows = pa.table(
        {
            "id": np.arange(n),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
            "label": [f"row {i}" for i in range(n)],
        }
    )
    pq.write_table(rows, directory / "rows.parquet", row_group_size=2)
    scalars = {f"x{j}": x[:, j].astype(np.float64) for j in range(8)}
    pq.write_table(pa.table({"id": np.arange(n), **scalars}), directory / "scalars.parquet")
    wrong = pa.array([[1.0] * 8, [1.0] * 7], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": wrong}), directory / "wrong_width.parquet")
    (directory / "lake" / "more").mkdir(parents=True)
    shard = pa.table({"id": np.arange(3), "x": pa.array(x[:3].tolist(), pa.list_(pa.float32()))})
    pq.write_table(shard, directory / "lake" / "part-0.parquet")
    pq.write_table(shard.slice(0, 0), directory / "lake" / "more" / "part-1.parquet")


def negative_shape_npy(shape: tuple[int, ...], data: bytes) -> bytes:
    """A ``.npy`` of ``shape``, negative dimensions and all (numpy reads the header without
    complaint), then ``data``."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def compressed_npz(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_bytes(x))
    return buffer.getvalue()


def reset_out() -> None:
    """The output directory (the working directory) as each run finds it."""
    for entry in os.scandir(OUT):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    (OUT / "exists.npy").write_bytes(EXISTS)
    (OUT / "in.npy").write_bytes(PRISTINE[os.path.join("fixtures", "x.npy")] or b"")
    (OUT / ORPHAN).write_bytes(b"what a killed run wrote")


def snapshot() -> Tree:
    """Every file and directory under ROOT, files with their content."""
    tree: Tree = {}
    start = len(str(ROOT)) + 1
    for directory, subdirectories, files in os.walk(ROOT):
        for name in subdirectories:
            tree[os.path.join(directory, name)[start:]] = None
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                tree[path[start:]] = file.read()
    return tree


def fixtures(tree: Tree) -> Tree:
    return {path: content for path, content in tree.items() if path.split(os.sep)[0] == "fixtures"}


def restore_fixtures(pristine: Tree) -> None:
    """Undoes what a successful run wrote among the fixtures (``-o`` may name one)."""
    shutil.rmtree(FIXTURES)
    for path, content in sorted(pristine.items()):
        if path.startswith("fixtures"):
            target = ROOT / path
            if content is None:
                target.mkdir()
            else:
                target.write_bytes(content)


# --- the checks -------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace | None:
    """``argv`` parsed as ``main`` parses it; None where argparse exits."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return PARSER.parse_args(argv)
        except SystemExit:
            return None


def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)``'s status (or argparse's exit status), stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = cli.main(argv)
        except SystemExit as exit:
            if exit.code not in (0, 2):
                raise Finding(f"SystemExit({exit.code!r}) escaped main") from exit
            status = exit.code
    return status, stdout.getvalue(), stderr.getvalue()


def TestOneInput(data: bytes) -> None:
    os.chdir(OUT)  # where relative paths go; libFuzzer's own are relative to START
    try:
        check_run(cli_argv.decode(data, str(FIXTURES), str(OUT)))
    finally:
        os.chdir(START)


def check_run(argv: list[str]) -> None:
    reset_out()
    args = parse(argv)
    if args is not None and args.command in ("bench", "demo"):
        return
    if args is not None and getattr(args, "engine", None) == "ray":
        return
    before = snapshot()
    after: Tree | None = None
    try:
        status, _, stderr = run(argv)
        if status == 1 and ": error: " not in stderr:
            raise Finding(f"status 1 without an error message: {stderr[-500:]!r}")
        after = snapshot()
        check_files(args, status, before, after)
    except BaseException as error:
        if hasattr(error, "add_note"):  # Python 3.11+: the traceback shows it
            error.add_note(f"argv: {argv}")
        raise
    finally:  # the next input finds the fixtures as they were, whatever this one did
        if fixtures(snapshot() if after is None else after) != PRISTINE:
            restore_fixtures(PRISTINE)


def check_files(args: argparse.Namespace | None, status: int, before: Tree, after: Tree) -> None:
    leftovers = [path for path in after if OWN_TEMPORARY.match(os.path.basename(path))]
    if leftovers:
        raise Finding(f"temporary files left: {leftovers}")
    if status != 0 or args is None or args.command != "encode":
        if after == before:
            return
        # A Parquet run that fails on a shard keeps the shards it finished (for --resume).
        if status == 0 or args is None or not cli.parquet.is_parquet(Path(args.input)):
            raise Finding(f"status {status}, but files changed: {describe(before, after)}")
        output = os.path.relpath(os.path.realpath(args.output), ROOT)
        check_parquet_run(args, output, before, after, complete=False)
        return
    output = os.path.relpath(os.path.realpath(args.output), ROOT)
    if output not in after:
        raise Finding(f"status 0, but no {output}")
    if output.endswith(".parquet") or after[output] is None:
        check_parquet_run(args, output, before, after, complete=True)
        return
    if args.resume and output in before:  # nothing to do
        if after != before:
            raise Finding(f"--resume found {output}, but files changed: {describe(before, after)}")
        return
    expected = dict(before)
    # A killed run's temporary file for OUTPUT is gone; OUTPUT is new or replaced.
    expected.pop(
        os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.{HOST}.{DEAD}.tmp"),
        None,
    )
    expected[output] = after[output]
    if after != expected:
        raise Finding(f"encode changed more than {output}: {describe(expected, after)}")
    check_output(args, before, after[output])


def check_output(args: argparse.Namespace, before: Tree, output: bytes | None) -> None:
    """OUTPUT is a ``.npy`` of what the model computes from INPUT as it was before the run."""
    if output is None:
        raise Finding("the output is a directory")
    try:
        result = np.load(io.BytesIO(output))
    except Exception as error:
        raise Finding(f"the output is no .npy numpy reads ({error!r}): {output[:128]!r}") from error
    source = before.get(os.path.relpath(os.path.realpath(args.input), ROOT))
    if source is None:
        raise Finding(f"encode succeeded on {args.input}, which is no fixture")
    loaded = np.load(io.BytesIO(source))
    x = loaded if isinstance(loaded, np.ndarray) else loaded[args.key or loaded.files[0]]
    dtype = np.dtype(f"f{x.dtype.itemsize}")
    if result.shape[:-1] != x.shape[:-1] or result.dtype != dtype:
        raise Finding(f"{result.shape} {result.dtype} output of a {x.shape} {x.dtype} input")
    if Path(args.model).suffix == ".safetensors":
        part = "decoder" if args.decode else "all" if args.reconstruct else "encoder"
        expected = MLP.load(args.model, part, dtype=dtype)(x)
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        if not np.allclose(result, expected, rtol=tolerance, atol=tolerance, equal_nan=True):
            raise Finding(f"the output differs from MLP.load({part})(input)")


def check_parquet_run(
    args: argparse.Namespace, output: str, before: Tree, after: Tree, complete: bool
) -> None:
    """Only OUTPUT (a file, or what is under a directory) changed; each output shard (each one
    written, unless ``complete``) has its input shard's rows, kept columns and, with a
    ``.safetensors`` model, the values ``MLP.load`` computes."""
    changed = [
        path
        for path in set(before) | set(after)
        if before.get(path, b"") != after.get(path, b"") or (path in before) != (path in after)
    ]
    parents = {str(parent) for parent in Path(output).parents}  # a .parquet OUTPUT's, created
    outside = [
        p
        for p in changed
        if p != output
        and not p.startswith(output + os.sep)
        and not (p in parents and after[p] is None)
    ]
    if outside:
        raise Finding(f"encode changed more than {output}: {describe(before, after)}")
    # Which output shard comes from which input shard: the command's own plan (the mapping is
    # not what is checked here; the contents are).
    shards = cli.parquet.plan_shards(Path(args.input), Path(args.output))
    part = "decoder" if args.decode else "all" if args.reconstruct else "encoder"
    column = args.output_column or {"encoder": "codes", "decoder": "decoded"}.get(
        part, "reconstructed"
    )
    for shard in shards:
        written = os.path.relpath(shard.output, ROOT)
        if written not in after or after[written] == before.get(written):
            if complete and not args.resume:
                raise Finding(f"status 0, but {written} was not written")
            continue
        got = pq.read_table(io.BytesIO(after[written] or b""))
        source = pq.read_table(io.BytesIO(before[os.path.relpath(shard.source, ROOT)] or b""))
        if got.column_names != [*(args.keep or []), column]:
            raise Finding(f"{shard.output} has columns {got.column_names}")
        if got.num_rows != source.num_rows:
            raise Finding(f"{shard.output}: {got.num_rows} rows from {source.num_rows}")
        for name in args.keep or []:
            if not got[name].equals(source[name]):
                raise Finding(f"{shard.output}: kept column {name!r} differs from the input's")
        if Path(args.model).suffix != ".safetensors" or not source.num_rows:
            continue
        if args.columns:
            x = np.column_stack([source[name].to_numpy() for name in args.columns])
        else:
            lists = [f.name for f in source.schema if pa.types.is_list(f.type)]
            lists += [f.name for f in source.schema if pa.types.is_fixed_size_list(f.type)]
            values = source[args.column or lists[0]].combine_chunks().flatten().to_numpy()
            x = values.reshape(source.num_rows, -1)
        dtype = np.dtype(f"f{x.dtype.itemsize}")
        expected = MLP.load(args.model, part, dtype=dtype)(x)
        result = got[column].combine_chunks().flatten().to_numpy().reshape(expected.shape)
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        if not np.allclose(result, expected, rtol=tolerance, atol=tolerance, equal_nan=True):
            raise Finding(f"{shard.output} differs from MLP.load({part})(input)")


def describe(before: Tree, after: Tree) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    modified = sorted(path for path in set(before) & set(after) if before[path] != after[path])
    return f"added {added}, removed {removed}, modified {modified}"


make_fixtures(FIXTURES)
PRISTINE = snapshot()  # the fixtures, before OUT exists
EXISTS = npy_bytes(np.zeros((2, 2), np.float32))
PARSER = cli.build_parser()  # main builds its own; this one tells which subcommand runs
OUT.mkdir()
START = os.getcwd()


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's custom mutator: half the time libFuzzer's own mutations, else one argument
    replaced, inserted or deleted, a replacement or insertion being (half the time) an even
    byte, so a value that fits the argument before it (``cli_argv``)."""
    rng = random.Random(seed)
    if not data or rng.randrange(2):
        return atheris.Mutate(data, max_size)
    mutated = bytearray(data)
    action = rng.choice(("replace", "insert", "delete"))
    position = rng.randrange(len(mutated) + (action == "insert"))
    longest = max(map(len, cli_argv.VALUES.values()))
    tokens = len(cli_argv.TOKENS)
    byte = 2 * rng.randrange(longest) if rng.randrange(2) else 2 * rng.randrange(tokens) + 1
    if action == "replace":
        mutated[position] = byte
    elif action == "insert":
        mutated.insert(position, byte)
    else:
        del mutated[position]
    return bytes(mutated[:max_size])


def main() -> None:
    atheris.Setup(sys.argv, findings.keep_going(TestOneInput), custom_mutator=mutate)
    atheris.Fuzz()  # never returns: libFuzzer ends the process, leaving the scratch directory


if __name__ == "__main__":
    main()
