"""Writing an ``encode`` OUTPUT: through a temporary file beside it, renamed once complete, and
the temporary files of killed runs removed by the next; and ``--resume``'s check that an OUTPUT
there holds what this job computes."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fusedae import _reference
from fusedae.cli.common import CommandError, progress_bar, report
from fusedae.cli.inputs import Rows
from fusedae.mlp import MLP

if sys.platform != "win32":
    import fcntl


TEMPORARY_SUFFIX = ".tmp"
# `--resume` checks this many rows of a finished output (spread over it where the rows can be
# read in any order): one of the job's shape and dtype written by another model (retrained, say),
# with other options or from other input rows differs there.
PROBE_ROWS = 16
# How far a written value may be from the exact one, in multiples of the job's precision's
# first-order error bound (`fusedae._reference`): the bound holds on every ISA and batch size,
# and the margin keeps a right output from being refused where the bound is tight.
PROBE_MARGIN = 2.0


def probe_rows(rows: int) -> np.ndarray:
    """Which of ``rows`` rows ``--resume`` checks: up to ``PROBE_ROWS``, the first and the last
    among them, evenly spread."""
    if rows == 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, rows - 1, min(rows, PROBE_ROWS)).round().astype(np.int64))


def check_written_rows(mlp: MLP, inputs: np.ndarray, written: np.ndarray, output: Path) -> None:
    """``--resume`` skips ``output`` only where ``written``, some of its rows, are what ``mlp``
    computes from ``inputs``, the input's rows there: within ``PROBE_MARGIN`` times the
    precision's error bound of the exact values, each value (rows of finite inputs), and not
    finite where ``mlp`` is not (the others). Else another job wrote it."""
    computed = mlp(np.ascontiguousarray(inputs))
    written = np.asarray(written, dtype=computed.dtype)
    finite = np.isfinite(computed)
    same_places = np.array_equal(finite, np.isfinite(written)) and np.array_equal(
        computed[~finite], written[~finite], equal_nan=True
    )
    rows = np.isfinite(inputs).all(axis=1)
    spec = mlp.spec.folded()
    layers = [(layer.weight, layer.bias) for layer in spec.layers]
    ops = spec.post_ops
    exact, _ = _reference.forward(layers, ops, inputs[rows])
    if spec.precision == "bf16":
        bound = _reference.bf16_bound(layers, ops, inputs[rows])
    elif spec.precision == "int8":
        bound = _reference.int8_bound(layers, ops, inputs[rows])
    else:
        bound = _reference.full_bound(layers, ops, inputs[rows], computed.dtype)
    checked = finite[rows] & np.isfinite(exact)
    off, allowed = np.abs(written[rows] - exact)[checked], PROBE_MARGIN * bound[checked]
    if same_places and (off <= allowed).all():
        return
    if same_places:
        worst = np.argmax(off / allowed)
        found = f"up to {off[worst]:.3g} off, where {allowed[worst]:.3g} is allowed"
    else:
        found = "not finite where this job's are, or the other way round"
    raise CommandError(
        f"--resume: {output} exists with this job's shape, but not its values: of "
        f"{len(inputs)} rows checked, values are {found}; another model, other options or "
        "another INPUT wrote it? Delete it, or pass --force to overwrite it"
    )


def temporary_name(output: Path) -> Path:
    """Where a run writing ``output`` writes first: hidden, beside it, named by the host and the
    process (on storage that several hosts share, as Ray's actors do, process ids repeat)."""
    return output.with_name(
        f".{output.name}.{socket.gethostname()}.{os.getpid()}{TEMPORARY_SUFFIX}"
    )


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process, or a platform that cannot tell: assume alive
    return True


def lock_exclusively(file: BinaryIO) -> bool:
    """Takes an exclusive lock on ``file`` without waiting; the system drops it when the holder
    dies, SIGKILL included. True where taken (or where locks do not exist, as on Windows, where a
    file another process has open cannot be deleted anyway)."""
    if sys.platform == "win32":
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_orphaned_temporaries(output: Path) -> list[Path]:
    """Deletes the temporary files of earlier runs for ``output`` that died without cleaning up
    (SIGKILL, power loss), and returns them. A run still going keeps its file: its process
    exists and it holds the file's lock, and a file is deleted only when neither holds. Files of
    other hosts stay: this one cannot see their processes."""
    removed = []
    prefix = f".{output.name}."
    for candidate in output.parent.glob(f"{glob.escape(prefix)}*{TEMPORARY_SUFFIX}"):
        host, _, pid = candidate.name[len(prefix) : -len(TEMPORARY_SUFFIX)].rpartition(".")
        if host not in ("", socket.gethostname()):  # "": named before hosts were (this host's)
            continue
        if not pid.isdigit() or int(pid) == os.getpid() or process_exists(int(pid)):
            continue
        try:
            with open(candidate, "rb") as file:
                if lock_exclusively(file):
                    candidate.unlink()
                    removed.append(candidate)
        except OSError:
            continue  # gone meanwhile, or not ours to delete: leave it
    return removed


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[BinaryIO]:
    """An open, locked temporary file beside ``output`` that replaces it when the block ends
    without error, and is removed on any error or interruption. Removes first what killed runs
    for ``output`` left behind. An ``OSError`` in the block becomes a ``CommandError`` naming
    ``output``."""
    for orphan in remove_orphaned_temporaries(output):
        report(f"removed {orphan}, left by a run that was killed")
    temporary = temporary_name(output)
    try:
        with open(temporary, "xb") as file:
            lock_exclusively(file)
            yield file
        os.replace(temporary, output)
    except OSError as error:
        discard(temporary)
        raise CommandError(f"cannot write {output}: {error.strerror or error}") from error
    except BaseException:
        discard(temporary)
        raise


def write_rows(mlp: MLP, source: Rows, output: Path, batch_size: int) -> None:
    """Writes ``mlp`` applied to the rows of ``source`` (shape ``(..., in_features)``) to
    ``output`` as a ``.npy`` of shape ``(..., out_features)``, ``batch_size`` rows at a time,
    through ``staged_output``."""
    shape, rows = source.shape, source.rows
    buffer = np.empty((min(batch_size, rows), mlp.out_features), mlp.dtype)
    header = {
        "descr": np.lib.format.dtype_to_descr(mlp.dtype),
        "fortran_order": False,
        "shape": (*shape[:-1], mlp.out_features),
    }
    with (
        staged_output(output) as file,
        progress_bar(total=rows, unit="row", unit_scale=True) as bar,
    ):
        np.lib.format.write_array_header_1_0(file, header)
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            result = buffer[: stop - start]
            mlp(source.read(start, stop), out=result)
            source.check_unchanged(start)
            file.write(result.data)
            bar.update(stop - start)


def discard(temporary: Path) -> None:
    """Removes ``temporary`` if it can: where it cannot (a file system gone read-only), the next
    run for the same output does, and the error that brought us here is the one to report."""
    with contextlib.suppress(OSError):
        temporary.unlink(missing_ok=True)
