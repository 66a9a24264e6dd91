"""Parquet INPUT and OUTPUT for ``fusedae encode`` (needs pyarrow: ``fusedae[parquet]``).

INPUT is one file, a directory (every ``*.parquet`` under it) or a glob of shards. Each shard
is read a batch at a time, so memory is bounded by the batch and the row group, not the shard,
and written to its own output shard through ``staged_output``: a shard either is complete under
its name or is not there, so a rerun with ``--resume`` skips the shards that are done.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import fusedae
from fusedae import _native
from fusedae._arrow import first_null, list_rows
from fusedae.cli.common import CommandError, progress_bar, rows_per_batch, say
from fusedae.cli.outputs import PROBE_ROWS, ResumeCheck, staged_output
from fusedae.mlp import MLP

if TYPE_CHECKING:
    import pyarrow as pa

GLOB_CHARACTERS = "*?["
IGNORED = (".", "_")  # the name prefixes pyarrow.dataset leaves out of a directory
# Output rows are buffered into row groups of about this size: the codes of one input batch
# (16 values a row) would make row groups too small to read back efficiently.
ROW_GROUP_BYTES = 64 << 20
READ_BUFFER_BYTES = 1 << 20
# Batches decoded ahead by a reader thread while the kernel runs on the current one: decoding
# is most of the time, and overlapping it with the kernel and the writing hides those.
READ_AHEAD_BATCHES = 2


def has_wildcard(text: str) -> bool:
    return any(c in text for c in GLOB_CHARACTERS)


def is_parquet(path: Path) -> bool:
    """Whether INPUT names Parquet: a ``.parquet`` file, a directory or a glob pattern (a path
    that exists is itself, whatever characters its name has: ``rows[2024].npy``)."""
    if path.exists():
        return path.suffix == ".parquet" or path.is_dir()
    return path.suffix == ".parquet" or (
        has_wildcard(str(path)) and path.suffix not in (".npy", ".npz")
    )


def import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.parquet
    except ImportError:
        raise CommandError("Parquet INPUT needs pyarrow: pip install 'fusedae[parquet]'") from None
    return pyarrow


@dataclass(frozen=True)
class Shard:
    source: Path
    output: Path
    rows: int
    schema: Any  # pyarrow.Schema


def find_sources(pattern: Path) -> tuple[Path, list[Path]]:
    """The Parquet files INPUT names, sorted, and the directory their output paths are relative
    to (a glob's directory before its first wildcard)."""
    text = str(pattern)
    # A file or directory that exists is itself, not a pattern (``x[1].parquet`` would match
    # ``x1.parquet``).
    if pattern.is_file():
        return pattern.parent, [pattern]
    if pattern.is_dir():
        root = pattern
        sources = parquet_files_under(pattern)
    elif has_wildcard(text):
        parts = pattern.parts
        fixed = next(i for i, part in enumerate(parts) if has_wildcard(part))
        root = Path(*parts[:fixed]) if fixed else Path()
        sources = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    else:
        raise CommandError(f"{pattern} does not exist")
    if not sources:
        raise CommandError(f"no Parquet files in {pattern}")
    return root, sources


def parquet_files_under(root: Path) -> list[Path]:
    """The ``*.parquet`` files under ``root``, sorted, as ``pyarrow.dataset`` finds a dataset's:
    through links to directories (each directory once), and not under names that start with
    ``.`` or ``_`` (hidden files, Spark's ``_temporary`` with its failed tasks' partial files,
    ``.ipynb_checkpoints``)."""
    found = []
    seen = set()

    def unreadable(error: OSError) -> None:
        raise error  # (os.walk leaves out a directory it cannot list, without a word)

    for directory, subdirectories, files in os.walk(root, onerror=unreadable, followlinks=True):
        status = os.stat(directory)
        if (status.st_dev, status.st_ino) in seen:  # a link back up the tree
            subdirectories.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        # Sorted: a directory reached by two names is read under the first, on every run.
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith(IGNORED))
        found += [
            Path(directory, name)
            for name in files
            if name.endswith(".parquet") and not name.startswith(IGNORED)
        ]
    return sorted(path for path in found if path.is_file())


def inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def plan_shards(pattern: Path, output: Path) -> list[Shard]:
    """Each input shard with its output path: OUTPUT itself for one ``.parquet`` input and a
    ``.parquet`` OUTPUT, else the shard's path under INPUT's directory, placed under OUTPUT."""
    pa = import_pyarrow()
    if has_wildcard(str(output)):
        raise CommandError(f"OUTPUT {output} is a pattern; name a directory or a .parquet file")
    root, sources = find_sources(pattern)
    if output.suffix == ".parquet":
        if len(sources) != 1 or sources[0] != pattern:
            raise CommandError(
                f"{pattern} names {len(sources)} shard(s); OUTPUT must be a directory, which "
                "gets one output shard per input shard"
            )
        outputs = [output]
    else:
        if inside(output, root):
            if pattern.is_dir():
                raise CommandError(f"OUTPUT {output} is inside INPUT {pattern}: choose another")
            # A pattern reaching into OUTPUT (``lake/**/*.parquet`` to ``lake/codes``) matches
            # the job's own output shards on a rerun: they are never its inputs.
            sources = [source for source in sources if not inside(source, output)]
            if not sources:
                raise CommandError(f"no Parquet files in {pattern} outside OUTPUT {output}")
        outputs = [output / source.relative_to(root) for source in sources]
    shards = []
    for source, target in zip(sources, outputs, strict=True):
        if target.resolve() == source.resolve():
            raise CommandError(f"{target} would overwrite the input shard {source}")
        try:  # ValueError: pyarrow's UnicodeDecodeError on a column name that is not UTF-8
            metadata = pa.parquet.ParquetFile(source).metadata
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowException, OSError, ValueError) as error:
            raise CommandError(f"cannot read {source} as Parquet: {error}") from None
        shards.append(Shard(source, target, metadata.num_rows, schema))
    return shards


@dataclass(frozen=True)
class Columns:
    """Which columns of a shard hold the rows (one list column, or scalar columns), which are
    copied to the output, and the rows' dtype."""

    features: tuple[str, ...]
    is_list: bool
    keep: tuple[str, ...]
    dtype: np.dtype
    width: int | None  # values a row; None for a list column of any length

    @property
    def read(self) -> list[str]:
        return [*self.features, *(name for name in self.keep if name not in self.features)]


def float_dtype(pa: Any, value_type: Any) -> np.dtype | None:
    if value_type == pa.float32():
        return np.dtype(np.float32)
    if value_type == pa.float64():
        return np.dtype(np.float64)
    return None


def choose_columns(
    schema: pa.Schema,
    path: Path,
    column: str | None,
    scalar_columns: Sequence[str] | None,
    keep: Sequence[str],
) -> Columns:
    """The ``Columns`` of a shard with ``schema``: ``column`` (a list of floats), else the
    ``scalar_columns`` (floats), else the one list-of-floats column it has."""
    pa = import_pyarrow()

    def field(name: str) -> Any:
        if name not in schema.names:
            raise CommandError(f"{path} has no column {name!r}; it has {schema.names}")
        if schema.names.count(name) > 1:
            raise CommandError(
                f"{path} has {schema.names.count(name)} columns named {name!r} (a column must "
                "name one); rename them where the shard is written"
            )
        return schema.field(name)

    def list_value_dtype(type_: Any) -> np.dtype | None:
        is_list = pa.types.is_list(type_) or pa.types.is_large_list(type_)
        if is_list or pa.types.is_fixed_size_list(type_):
            return float_dtype(pa, type_.value_type)
        return None

    for name in keep:
        field(name)
    if scalar_columns:
        dtypes = []
        for name in scalar_columns:
            dtype = float_dtype(pa, field(name).type)
            if dtype is None:
                raise CommandError(
                    f"{path}: column {name!r} is {field(name).type}; encode takes float32 or "
                    "float64 columns"
                )
            dtypes.append(dtype)
        features = tuple(scalar_columns)
        return Columns(features, False, tuple(keep), np.result_type(*dtypes), len(features))
    if column is None:
        candidates = [f.name for f in schema if list_value_dtype(f.type) is not None]
        if len(candidates) != 1:
            found = f"has list columns of floats {candidates}" if candidates else "has none"
            raise CommandError(
                f"{path}: name the column of rows with --column (a list of float32 or "
                f"float64 values), or scalar columns with --columns; it {found}, and columns "
                f"{schema.names}"
            )
        column = candidates[0]
    type_ = field(column).type
    dtype = list_value_dtype(type_)
    if dtype is None:
        raise CommandError(
            f"{path}: column {column!r} is {type_}; encode takes a list of float32 or float64 "
            "values (or scalar columns with --columns)"
        )
    width = type_.list_size if pa.types.is_fixed_size_list(type_) else None
    return Columns((column,), True, tuple(keep), dtype, width)


def batch_rows(
    pa: Any, batch: Any, columns: Columns, in_features: int, path: Path, first_row: int
) -> np.ndarray:
    """The rows of a record batch as a 2-D array (no copy from a list column without nulls)."""

    if not columns.is_list:
        rows = np.empty((batch.num_rows, len(columns.features)), columns.dtype)
        for index, name in enumerate(columns.features):
            array = batch.column(name)
            if array.null_count:
                row = first_row + first_null(array)
                raise CommandError(f"{path}: the value of column {name!r} in row {row} is null")
            rows[:, index] = array.to_numpy()
        return rows
    (name,) = columns.features
    try:
        return list_rows(pa, batch.column(name), name, in_features, first_row)
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None


def read_batches(
    pa: Any, path: Path, names: list[str], batch_size: int
) -> Generator[Any, None, None]:
    """The record batches of ``path``'s ``names``; a read error names the file."""
    try:
        # pyarrow's default pre-buffers every row group it will read, which for one pass over
        # a file holds the whole file in memory; streamed reads bound it by the row group.
        file = pa.parquet.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        # (No batch holds more than the file's rows; pyarrow takes no --batch-size over 2^63.)
        rows = max(1, file.metadata.num_rows)
        yield from file.iter_batches(batch_size=min(batch_size, rows), columns=names)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CommandError(f"cannot read {path}: {error}") from None


def read_ahead(batches: Iterator[Any], depth: int) -> Iterator[Any]:
    """The items of ``batches``, produced by a thread up to ``depth`` items ahead of the
    consumer (pyarrow decodes without the GIL). An exception of the producer is raised here, in
    order; when the consumer stops early, the thread stops at its next item."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(("batch", batch)):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            put(("error", error))
            return
        put(("end", None))

    thread = threading.Thread(target=produce, name="fusedae-parquet-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def shard_output_schema(
    pa: Any, mlp: MLP, shard: Shard, columns: Columns, output_column: str
) -> Any:
    """The schema of ``shard``'s output: the kept columns, then ``output_column`` (a
    fixed-size list of ``mlp.out_features`` values of its dtype)."""
    value_type = pa.float32() if mlp.dtype == np.float32 else pa.float64()
    return pa.schema(
        [shard.schema.field(name) for name in columns.keep]
        + [pa.field(output_column, pa.list_(value_type, mlp.out_features), nullable=False)]
    )


def columns_text(schema: Any) -> str:
    return ", ".join(f"{field.name} {field.type}" for field in schema)


def check_finished_shard(
    pa: Any, mlp: MLP, shard: Shard, columns: Columns, output_column: str, check: ResumeCheck
) -> None:
    """That the output ``--resume`` would skip is what this job writes for ``shard``: Parquet of
    its schema and row count whose first rows are ``mlp`` of the shard's (not another job's, nor
    a file that only has the name)."""
    try:
        metadata = pa.parquet.ParquetFile(shard.output).metadata
        schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CommandError(
            f"--resume: {shard.output} exists but is not a finished output shard ({error}); "
            "delete it, or pass --force to redo every shard"
        ) from None
    expected = shard_output_schema(pa, mlp, shard, columns, output_column)
    if not schema.equals(expected) or metadata.num_rows != shard.rows:
        raise CommandError(
            f"--resume: {shard.output} exists but is not this job's output for {shard.source} "
            f"(it holds {metadata.num_rows} rows of {columns_text(schema)}; this job writes "
            f"{shard.rows} rows of {columns_text(expected)}): delete it, or pass --force to "
            "redo every shard"
        )
    if shard.rows:  # its first rows (a Parquet file's rows are read in order), computed again
        batch = first_batch(pa, shard.source, columns.read)
        inputs = batch_rows(pa, batch, columns, mlp.in_features, shard.source, 0)
        codes = first_batch(pa, shard.output, [output_column]).column(0)
        written = codes.flatten().to_numpy(zero_copy_only=False).reshape(-1, mlp.out_features)
        count = min(len(inputs), len(written))  # (batches end where row groups do)
        check.check(inputs[:count], written[:count], shard.output)


def first_batch(pa: Any, path: Path, names: list[str]) -> Any:
    """The first record batch, of at most ``PROBE_ROWS`` rows, of ``path``'s ``names`` (which
    has rows)."""
    with contextlib.closing(read_batches(pa, path, names, PROBE_ROWS)) as batches:
        return next(batches)


def encode_shard(
    mlp: MLP, shard: Shard, columns: Columns, output_column: str, batch_size: int, bar: Any
) -> None:
    """Writes ``shard``'s rows through ``mlp`` to its output: the kept columns, then
    ``output_column`` (a fixed-size list of ``mlp.out_features`` values)."""
    pa = import_pyarrow()
    output_schema = shard_output_schema(pa, mlp, shard, columns, output_column)
    created = make_directories(shard.output.parent)
    try:
        write_shard(pa, mlp, shard, columns, output_schema, batch_size, bar)
    except BaseException:
        for directory in reversed(created):  # a failed shard leaves no empty directory either
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def make_directories(directory: Path) -> list[Path]:
    """Creates ``directory`` and its missing parents; returns those it created, outermost
    first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    missing.reverse()
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing


def write_shard(
    pa: Any,
    mlp: MLP,
    shard: Shard,
    columns: Columns,
    output_schema: Any,
    batch_size: int,
    bar: Any,
) -> None:
    """``encode_shard``'s writing, in its directory: a temporary file renamed when complete."""
    with (
        staged_output(shard.output) as file,
        pa.parquet.ParquetWriter(file, output_schema) as writer,
    ):
        pending: list[Any] = []
        pending_bytes = 0
        done = 0
        batches = read_batches(pa, shard.source, columns.read, batch_size)
        for batch in read_ahead(batches, READ_AHEAD_BATCHES):
            rows = batch_rows(pa, batch, columns, mlp.in_features, shard.source, done)
            codes = pa.FixedSizeListArray.from_arrays(mlp(rows).reshape(-1), mlp.out_features)
            kept = [batch.column(name) for name in columns.keep]
            record = pa.record_batch([*kept, codes], schema=output_schema)
            pending.append(record)
            pending_bytes += record.nbytes
            if pending_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_batches(pending, schema=output_schema))
                pending, pending_bytes = [], 0
            done += batch.num_rows
            bar.update(batch.num_rows)
        if done != shard.rows:  # a corrupt file: its footer and its row groups disagree
            raise CommandError(
                f"cannot read {shard.source}: its footer promises {shard.rows} rows, its row "
                f"groups hold {done}"
            )
        if pending:
            writer.write_table(pa.Table.from_batches(pending, schema=output_schema))


def leave_a_cpu_to_the_reader() -> None:
    """Where the thread count was left to the machine, one CPU fewer for the kernel: the reader
    thread decodes Parquet (most of the work) meanwhile, and a kernel thread beside it on every
    CPU slows both (on 2 CPUs, 2 kernel threads encoded 11% fewer rows/s than 1). Not where
    ``OMP_THREAD_LIMIT`` capped the count: there they leave CPUs free."""
    threads = fusedae.get_num_threads()
    source = _native.threads_source()
    if source.startswith("the CPUs") and "capped by" not in source and threads > 1:
        fusedae.set_num_threads(threads - 1)


@dataclass(frozen=True)
class Job:
    """A Parquet ``encode`` checked and ready: every shard, those still to do, the columns that
    hold the rows, the model and the batch size."""

    shards: list[Shard]
    todo: list[Shard]
    columns: Columns
    mlp: MLP
    output_column: str
    batch_size: int

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.todo)

    def encode(self, shard: Shard, bar: Any) -> None:
        encode_shard(self.mlp, shard, self.columns, self.output_column, self.batch_size, bar)

    def summary(self, output: Path, threads: str) -> str:
        skipped = len(self.shards) - len(self.todo)
        return f"wrote {len(self.todo)} shard(s), {self.rows} rows, to {output} ({threads})" + (
            f"; skipped {skipped} finished before" if skipped else ""
        )


def plan(args: argparse.Namespace, model_for: Callable[[np.dtype], MLP]) -> Job:
    """Plans the shards and checks every shard's columns before any work."""
    shards = plan_shards(args.input, args.output)
    finished = [shard for shard in shards if shard.output.exists()]
    if finished and not (args.resume or args.force):
        raise CommandError(
            f"{len(finished)} of the {len(shards)} output shard(s) exist ({finished[0].output} "
            "first); pass --resume to skip them or --force to overwrite them"
        )
    todo = [shard for shard in shards if shard not in finished] if args.resume else shards
    keep = args.keep or []
    if args.output_column in keep:
        raise CommandError(f"--keep names {args.output_column!r}, the output column")
    first = shards[0]
    columns = choose_columns(first.schema, first.source, args.column, args.columns, keep)
    named = columns.features[0] if columns.is_list else None
    chosen = [columns] + [
        choose_columns(shard.schema, shard.source, named, args.columns, keep)
        for shard in shards[1:]
    ]
    for shard, other in zip(shards, chosen, strict=True):
        if other.dtype != columns.dtype:
            raise CommandError(
                f"{shard.source} holds {other.dtype} rows and {first.source} {columns.dtype} "
                "rows: all shards must agree"
            )
    mlp = model_for(columns.dtype)
    for shard, other in zip(shards, chosen, strict=True):
        if other.width is not None and other.width != mlp.in_features:
            raise CommandError(
                f"{shard.source}: {', '.join(other.features)} hold rows of {other.width} "
                f"values, but the model takes rows of {mlp.in_features}"
            )
    if args.resume:
        pa = import_pyarrow()
        check = ResumeCheck(mlp)
        for shard in finished:
            check_finished_shard(pa, mlp, shard, columns, args.output_column, check)
    batch_size = rows_per_batch(
        args.batch_size,
        mlp.in_features * columns.dtype.itemsize,  # (float64 rows into a bf16 model: 8 bytes)
        mlp.out_features * mlp.dtype.itemsize,
    )
    return Job(shards, todo, columns, mlp, args.output_column, batch_size)


def encode(args: argparse.Namespace, model_for: Callable[[np.dtype], MLP]) -> None:
    """``fusedae encode`` on Parquet, in this process: the shards not done yet, one after the
    other, with one progress bar over their rows."""
    job = plan(args, model_for)
    if args.threads is None:
        leave_a_cpu_to_the_reader()
    with progress_bar(total=job.rows, unit="row", unit_scale=True) as bar:
        for index, shard in enumerate(job.todo):
            bar.set_postfix_str(f"shard {index + 1}/{len(job.todo)}", refresh=False)
            job.encode(shard, bar)
    threads = fusedae.get_num_threads()
    say(job.summary(args.output, f"{threads} kernel thread{'s' * (threads > 1)} beside the reader"))
