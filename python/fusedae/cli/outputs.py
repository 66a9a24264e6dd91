"""Writing an ``encode`` OUTPUT: through a temporary file beside it, renamed once complete, and
the temporary files of killed runs removed by the next; and ``--resume``'s check that an OUTPUT
there holds what this job computes."""

from __future__ import annotations

import contextlib
import glob
import math
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
# at a coarser precision or from other input rows differs there.
PROBE_ROWS = 16
# How far a value written at full precision (fp32, fp64) may be from the exact one: SPREAD
# sqrt(k + 1) units of roundoff of the magnitudes (|W| |x| + |b|, layer by layer), the sums'
# rounding errors taken as a random walk. Measured (Intel, scalar/avx2/avx512, batches of 1 to
# 400): the job's own values within 0.003-0.022 of sqrt(k + 1) u |W| |x| at 64-4096 inputs a
# layer, 1.0 in rows of 4096 equal products (errors that add up in one direction), 8.6 at 16384;
# a bf16 job's 18-157, int8's 87-750, a model retrained by 0.1% 15-86 (4096 and 784 inputs). The
# worst case, 2 (k + 1) units, let the last two pass at 784 inputs. bf16 and int8 jobs: MARGIN
# times their first-order bounds (docs/precision.md), which hold on every ISA and batch size.
FULL_PRECISION_SPREAD = 10.0
NARROW_PRECISION_MARGIN = 2.0


def probe_rows(rows: int) -> np.ndarray:
    """Which of ``rows`` rows ``--resume`` checks: up to ``PROBE_ROWS``, the first and the last
    among them, evenly spread."""
    if rows == 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, rows - 1, min(rows, PROBE_ROWS)).round().astype(np.int64))


class ResumeCheck:
    """``--resume``'s check that a finished output holds what ``mlp`` computes: its chain in
    float64, folded and converted once a job (a Parquet job checks every finished shard)."""

    def __init__(self, mlp: MLP) -> None:
        spec = mlp.spec.folded()
        self.layers: list[tuple[np.ndarray, np.ndarray | None]] = [
            (
                np.asarray(layer.weight, np.float64),
                None if layer.bias is None else np.asarray(layer.bias, np.float64),
            )
            for layer in spec.layers
        ]
        self.absolute = [np.abs(weight) for weight, _ in self.layers]
        self.ops = spec.post_ops
        self.precision = spec.precision
        self.dtype = mlp.dtype

    def allowed(self, inputs: np.ndarray) -> np.ndarray:
        """How far each output of ``inputs`` (finite rows) may be from the exact value."""
        if self.precision == "bf16":
            return NARROW_PRECISION_MARGIN * _reference.bf16_bound(self.layers, self.ops, inputs)
        if self.precision == "int8":
            return NARROW_PRECISION_MARGIN * _reference.int8_bound(self.layers, self.ops, inputs)
        unit = float(np.finfo(self.dtype).eps) / 2
        return _reference.rounding_bound(
            self.layers, self.ops, inputs, lambda k: FULL_PRECISION_SPREAD * math.sqrt(k + 1) * unit
        )

    def without_overflow(self, inputs: np.ndarray, outputs: list[np.ndarray]) -> np.ndarray:
        """Which rows of ``inputs`` (with every layer's exact ``outputs``) no sum can overflow
        in: each layer's ``|W| |x| + |b|`` (what any order of its sum reaches at most) within
        half the dtype's largest value."""
        limit = float(np.finfo(self.dtype).max) / 2
        rows = np.ones(len(inputs), bool)
        below = np.abs(inputs)
        for (_, bias), absolute, output in zip(self.layers, self.absolute, outputs, strict=True):
            with np.errstate(over="ignore", invalid="ignore"):
                magnitude = below @ absolute.T + (0.0 if bias is None else np.abs(bias))
            rows &= (magnitude < limit).all(axis=1)
            below = np.abs(output)
        return rows

    def check(self, inputs: np.ndarray, written: np.ndarray, output: Path) -> None:
        """``output`` is skipped only where ``written``, some of its rows, are within
        ``allowed`` of the exact outputs of ``inputs``, the input's rows there; else another job
        wrote it. Only rows of finite inputs that no sum overflows in are compared: where NaN
        and inf come out of the others depends on the ISA and the batch."""
        finite = np.isfinite(inputs).all(axis=1)
        exact, outputs = _reference.forward(self.layers, self.ops, inputs[finite])
        safe = self.without_overflow(inputs[finite], outputs)
        rows, exact = np.flatnonzero(finite)[safe], exact[safe]
        allowed = self.allowed(inputs[rows])
        off = np.abs(np.asarray(written[rows], np.float64) - exact)
        beyond = ~(off <= allowed)  # (NaN written where a value is due: beyond)
        if not beyond.any():
            return
        worst = np.unravel_index(np.argmax(np.where(beyond, off / allowed, -1.0)), off.shape)
        raise CommandError(
            f"--resume: {output} exists with this job's shape, but not its values: of "
            f"{len(rows)} rows checked, {int(beyond.any(axis=1).sum())} are off (one value by "
            f"{off[worst]:.3g}, where {allowed[worst]:.3g} is allowed); another model, another "
            "precision or another INPUT wrote it? Delete it, or pass --force to overwrite it"
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
    # The bar first: it imports tqdm, and a Ctrl-C during an import can be lost (raised in
    # importlib's module-lock callback, whose exceptions Python ignores), so none is left once
    # the temporary file is there.
    with (
        progress_bar(total=rows, unit="row", unit_scale=True) as bar,
        staged_output(output) as file,
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
