"""The rows of an ``encode`` INPUT (``.npy``, ``.npz``), read a chunk at a time."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import signal
import sys
import threading
import tokenize
import zipfile
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from fusedae.cli.common import CommandError

# What numpy's .npy header reading raises on a damaged header besides ValueError: TokenError
# from its tokenizer, TypeError from sorting header keys of mixed types, SyntaxError from the
# repeat count of a comma-string dtype (descr '<,4').
NPY_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError)


if sys.platform != "win32":
    import fcntl


def check_float(path: Path, dtype: np.dtype) -> None:
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise CommandError(
            f"{path} holds {dtype} values; encode takes float32 or float64 "
            "(convert with x.astype(np.float32))"
        )


class NpyRows:
    """The rows of a C-order ``.npy`` file (its array flattened to 2-D), streamed with memory
    bounded by the chunk, not the file.

    Where Linux grants a read lease on the file, it is memory-mapped and the pages of rows done
    are dropped: no copy. A mapping's reader dies of SIGBUS when another process truncates the
    file; the lease prevents that: the kernel holds back whoever opens the file for writing
    (truncating it, say) for up to ``/proc/sys/fs/lease-break-time`` seconds (45 by default) and
    signals us (SIGIO), so the job fails with an error naming the file before the chunk in
    flight is written (``check_unchanged``), and the lease goes with it. Elsewhere (macOS,
    Windows, network file systems, a file someone else owns or is writing), chunks are read
    into one reused buffer, which costs a copy (0.5 s a 3 GB file on a 2-core VM); a short
    read says the file was truncated, and a change of its modification time or size after the
    first read that it was rewritten (to the file system's clock's resolution: a rewrite within
    one tick of the first read goes unseen)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close(), after the last read)
        try:
            self.shape, self.dtype = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._offset = self._file.tell()
        self.rows = math.prod(self.shape[:-1])
        self._row_bytes = self.shape[-1] * self.dtype.itemsize if self.shape else 0
        self._modified = False
        self._previous_sigio: Any = None
        self._mapping = self._map_under_lease()
        self._released = 0
        self._buffer = np.empty(0, self.dtype)
        self._unchanged: tuple[int, int] | None = None  # mtime and size: buffered reads

    def _read_header(self) -> tuple[tuple[int, ...], np.dtype]:
        try:
            version = np.lib.format.read_magic(self._file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(self._file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(self._file)
            else:
                raise ValueError(f"version {version} is not supported")
        except NPY_HEADER_ERRORS as error:
            raise CommandError(f"{self.path} is not a .npy file numpy can read ({error})") from None
        check_float(self.path, dtype)
        if any(length < 0 for length in shape):
            raise CommandError(f"{self.path} has a negative dimension in its shape {shape}")
        if fortran_order and len(shape) > 1:
            raise CommandError(
                f"{self.path} is stored in Fortran order; encode streams rows, so save it in C "
                "order (np.save(path, np.ascontiguousarray(x)))"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        data_bytes = os.fstat(self._file.fileno()).st_size - self._file.tell()
        if data_bytes < nbytes:
            raise CommandError(
                f"{self.path} is truncated: its header promises {shape} {dtype} ({nbytes} bytes) "
                f"but it holds {data_bytes} bytes of data"
            )
        return shape, dtype

    def _map_under_lease(self) -> mmap.mmap | None:
        if (
            sys.platform != "linux"  # leases are Linux's
            or threading.current_thread() is not threading.main_thread()
        ):
            return None
        self._previous_sigio = signal.signal(signal.SIGIO, self._on_lease_break)
        try:
            fcntl.fcntl(self._file.fileno(), fcntl.F_SETLEASE, fcntl.F_RDLCK)
            return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # no lease here; ValueError: mmap of an empty file
            self._drop_lease()
            return None

    def _on_lease_break(self, signum: int, frame: FrameType | None) -> None:
        self._modified = True

    def _drop_lease(self) -> None:
        if self._previous_sigio is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._file.fileno(), fcntl.F_SETLEASE, fcntl.F_UNLCK)
            signal.signal(signal.SIGIO, self._previous_sigio)
            self._previous_sigio = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, valid until the next call; rows before ``start`` are done."""
        columns = self.shape[-1]
        if self._mapping is not None:
            self.check_unchanged(start)
            self._release_rows_before(start)
            return np.ndarray(
                (stop - start, columns),
                self.dtype,
                buffer=self._mapping,
                offset=self._offset + start * self._row_bytes,
            )
        if self._buffer.size < (stop - start) * columns:
            self._buffer = np.empty((stop - start) * columns, self.dtype)
        rows = self._buffer[: (stop - start) * columns].reshape(stop - start, columns)
        if rows.size == 0:
            return rows  # nothing to read (and a view of no bytes cannot be cast)
        if self._unchanged is None:
            self._unchanged = self._stamp()
        self._file.seek(self._offset + start * self._row_bytes)
        if self._file.readinto(rows.data.cast("B")) != rows.nbytes:
            raise CommandError(
                f"{self.path} was truncated while being read: rows {start} to {stop} of "
                f"{self.rows} are no longer there"
            )
        if self._stamp() != self._unchanged:  # (rows read before the change are in the output)
            raise CommandError(
                f"{self.path} was changed by another process while being read (rows {start} "
                f"to {self.rows} may hold other values than the rows before)"
            )
        return rows

    def check_unchanged(self, start: int) -> None:
        """Raises if the rows from ``start`` on, read through the mapping, may have changed
        since: after the rows of a chunk are encoded, before they are written (a chunk encoded
        for longer than the lease's break time has the writer go ahead under it)."""
        if self._mapping is not None and self._modified:
            raise CommandError(
                f"{self.path} was opened for writing by another process while being read "
                f"(rows {start} to {self.rows} were not read, or may have changed as they were)"
            )

    def _stamp(self) -> tuple[int, int]:
        status = os.fstat(self._file.fileno())  # (not ctime: a chmod or a rename changes it)
        return status.st_mtime_ns, status.st_size

    def _release_rows_before(self, start: int) -> None:
        """Drops the pages of rows already encoded from this process's memory."""
        assert self._mapping is not None
        end = (self._offset + start * self._row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._released:
            self._mapping.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
            self._released = end

    def close(self) -> None:
        self._drop_lease()
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a view still held: the collector unmaps it
                self._mapping.close()
        self._file.close()


def open_npz(path: Path, key: str | None) -> np.ndarray:
    """One array of a ``.npz`` file (read into memory)."""
    with open(path, "rb") as file:  # not there, not readable: the OSError main reports
        try:
            if not zipfile.is_zipfile(file):  # np.load would read a .npy whole to refuse it
                raise CommandError(f"{path} is not a .npz archive")
            file.seek(0)
            with np.load(file) as archive:
                names = list(archive.files)
                if key is None and len(names) != 1:
                    raise CommandError(f"{path} holds arrays {names}; pick one with --key")
                if key is not None and key not in names:
                    raise CommandError(f"{path} has no array {key!r}; it holds {names}")
                name = key or names[0]
                array = archive[name]
        except CommandError:
            raise
        except Exception as error:  # zipfile, zlib, bz2, lzma and numpy raise many kinds
            raise CommandError(
                f"{path} is not a .npz file numpy can read ({type(error).__name__}: {error})"
            ) from None
    if not isinstance(array, np.ndarray):  # a member without the .npy magic comes as bytes
        raise CommandError(f"{path}: {name!r} is not a .npy array")
    check_float(path, array.dtype)
    return array


class ArrayRows:
    """The rows of an array in memory (a ``.npz``'s), read as ``NpyRows`` reads a file's."""

    def __init__(self, array: np.ndarray) -> None:
        self.shape: tuple[int, ...] = array.shape
        self.dtype = array.dtype
        self.rows = math.prod(array.shape[:-1])
        self._rows = array.reshape(self.rows, array.shape[-1]) if array.ndim else array

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._rows[start:stop]

    def check_unchanged(self, start: int) -> None:
        pass  # (in memory: no one else writes it)

    def close(self) -> None:
        pass


Rows = NpyRows | ArrayRows


def open_rows(path: Path, key: str | None) -> Rows:
    if path.suffix == ".npy":
        return NpyRows(path)
    if path.suffix == ".npz":
        return ArrayRows(open_npz(path, key))
    raise CommandError(f"INPUT must be a .npy or .npz file, got {path}")
