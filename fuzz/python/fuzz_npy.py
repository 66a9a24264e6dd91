"""Coverage-guided fuzzing (atheris) of ``fusedae encode``'s input handling.

Each input is the content of an INPUT file, written as ``x.npy`` and as ``x.npz``, and read as
``fusedae encode`` reads it:

* ``inputs.NpyRows(path)``, then ``.read(0, rows)`` for all rows and ``.read(rows // 2, rows)``
  (which drops the pages before it), every byte of each chunk touched, then ``.close()``; in
  the main thread, where Linux grants a read lease and the file is memory-mapped, and in a
  worker thread, where chunks are read into a buffer. Reads are only those ``encode`` could
  make: none of a 0-d array, an empty last axis (no model takes rows of 0 values) or no rows;
* ``inputs.open_rows(path, key)`` for the ``.npz``, with ``key`` None and ``"x"``, then the same
  reads from the ``ArrayRows``.

The only documented error is ``CommandError`` (``main`` turns it into ``fusedae encode:
error: ...`` and status 1). A finding is anything else: another exception escaping
(``ValueError``, ``AttributeError``, ``zlib.error``, ...: ``main`` would show a traceback), a
float32/float64 array with a negative dimension accepted (``write_rows`` would fail on it), a
chunk of the wrong shape, a crash (SIGBUS from a mapping past the end of the file), a hang, or
``NpyRows`` leaving its SIGIO handler installed. fusedae and ``zipfile`` are instrumented; a
custom mutator makes a third of the mutations on the structure (a header field set to an edge
value, a member of an archive changed with its CRC kept right). Usage::

    python fuzz/python/fuzz_npy.py CORPUS_DIR -max_total_time=60

stops at the first finding; with ``FUZZ_FINDINGS=DIR`` it records each distinct one in ``DIR``
and goes on (``findings.py``).

Scratch files go to a directory made under ``$TMPDIR``, which stays behind (libFuzzer ends the
process itself); ``tools/fuzz_python.sh`` points ``TMPDIR`` at a directory it removes.
"""

from __future__ import annotations

import ast
import io
import math
import random
import signal
import struct
import sys
import tempfile
import warnings
import zipfile as plain_zipfile  # the mutator's, uninstrumented: it adds no coverage
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import atheris
import findings
import numpy as np  # imported before instrumentation: numpy itself is not what is fuzzed

with atheris.instrument_imports(include=["fusedae", "zipfile"]):
    del sys.modules["zipfile"]  # imported anew by fusedae.cli.inputs, instrumented, for both
    from fusedae.cli import CommandError, inputs

WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-npy-"))
NPY = WORKDIR / "x.npy"
NPZ = WORKDIR / "x.npz"
WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-npy-worker")
SIGIO_HANDLER = signal.getsignal(signal.SIGIO)


class Finding(Exception):
    """A behaviour ``fusedae encode``'s input handling must not have."""


def TestOneInput(data: bytes) -> None:
    NPY.write_bytes(data)
    NPZ.write_bytes(data)
    check_npy()  # main thread: memory-mapped under a read lease
    WORKER.submit(check_npy).result()  # another thread: no lease, read into a buffer
    if signal.getsignal(signal.SIGIO) is not SIGIO_HANDLER:
        raise Finding("NpyRows left its SIGIO handler installed")
    for key in (None, "x"):
        check_npz(key)


def check_npy() -> None:
    check(lambda: inputs.NpyRows(NPY))


def check_npz(key: str | None) -> None:
    check(lambda: inputs.open_rows(NPZ, key))


def check(open_source: Callable[[], inputs.Rows]) -> None:
    """Opens a source and reads it all; ``CommandError`` is the one exception allowed."""
    try:
        source = open_source()
    except CommandError:
        return
    try:
        read_all(source, source.shape, source.dtype)
    except CommandError:
        pass
    finally:
        source.close()


def read_all(source: inputs.Rows, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Reads ``source`` as ``encode`` would with a model taking rows of ``shape[-1]`` values:
    ``encode_rows`` refuses a 0-d array, and an empty last axis (no model takes rows of 0
    values), before reading; ``write_rows`` reads ``start:stop`` only where ``start < rows``."""
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise Finding(f"a {dtype} input was accepted")
    if any(length < 0 for length in shape):
        raise Finding(f"an input of shape {shape} was accepted")
    if not shape or shape[-1] == 0:
        return
    rows, columns = math.prod(shape[:-1]), shape[-1]
    for start in sorted({0, rows // 2}):
        if start >= rows:
            continue
        chunk = source.read(start, rows)
        if chunk.shape != (rows - start, columns) or chunk.dtype != dtype:
            raise Finding(
                f"read({start}, {rows}) of {shape} {dtype} gave {chunk.shape} {chunk.dtype}"
            )
        chunk.tobytes()  # touches every byte: a mapping past the end of the file is SIGBUS
        del chunk  # as write_rows holds no view of a chunk when it closes the source


# --- the mutator ------------------------------------------------------------------------------
# libFuzzer's byte mutations rarely get past a .npy header's length field or a zip member's
# CRC-32, so a third of the mutations are made on the structure instead: a header field set to
# an edge value, or a member of a .npz archive changed, renamed, dropped or duplicated (with
# its CRC right), the archive written anew.

MAGIC = b"\x93NUMPY"
EDGE_FIELDS: dict[str, tuple[object, ...]] = {
    "descr": (
        "<f4",
        ">f4",
        "<f8",
        ">f8",
        "<f2",
        "<f16",
        "<i4",
        "|b1",
        "<c8",
        "|O",
        "<U2",
        "|V4",
        [("a", "<f4")],
        "",
        4,
    ),
    "fortran_order": (True, False, 1, "yes", None),
    "shape": (
        (),
        (0,),
        (3,),
        (2, 3),
        (0, 4),
        (3, 0),
        (-1, 4),
        (-2, -3, 4),
        (2**40,),
        (2**33, 2),
        (2**62, 4),
        (2**63, 0),
        (2**64, 1),
        (1,) * 33,
        [2, 3],
        (2.0, 3),
        "x",
    ),
}
MEMBER_NAMES = ("x.npy", "y.npy", "arr_0.npy", "x", "x.txt", "dir/x.npy")
COMPRESSIONS = (
    plain_zipfile.ZIP_STORED,
    plain_zipfile.ZIP_DEFLATED,
    plain_zipfile.ZIP_BZIP2,
    plain_zipfile.ZIP_LZMA,
)


def split_npy(data: bytes) -> tuple[int, dict[str, object], bytes] | None:
    """``(major version, header fields, the data after the header)`` of a ``.npy``."""
    if not data.startswith(MAGIC) or len(data) < 10:
        return None
    major = data[6]
    size = "<H" if major == 1 else "<I"
    start = 8 + struct.calcsize(size)
    if len(data) < start:
        return None
    (length,) = struct.unpack(size, data[8:start])
    try:
        fields = ast.literal_eval(data[start : start + length].decode("latin-1"))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return (major, fields, data[start + length :]) if isinstance(fields, dict) else None


def join_npy(major: int, fields: dict[str, object], body: bytes) -> bytes:
    """A ``.npy`` with header ``fields`` as written (padded as numpy pads it), then ``body``."""
    text = "{" + "".join(f"{key!r}: {value!r}, " for key, value in fields.items()) + "}"
    size = "<H" if major == 1 else "<I"
    prefix = 8 + struct.calcsize(size)
    text += " " * (-(prefix + len(text) + 1) % 64) + "\n"
    encoded = text.encode("latin-1", errors="replace")
    return MAGIC + bytes([major, 0]) + struct.pack(size, len(encoded) % 2**32) + encoded + body


def mutate_npy(data: bytes, rng: random.Random) -> bytes | None:
    """A header field replaced by an edge value or dropped, the version changed, or the data
    cut or extended; None if ``data`` is no ``.npy``."""
    parts = split_npy(data)
    if parts is None:
        return None
    major, fields, body = parts
    action = rng.randrange(6)
    if action < 3:
        field = rng.choice(list(EDGE_FIELDS))
        fields[field] = rng.choice(EDGE_FIELDS[field])
    elif action == 3 and fields:
        del fields[rng.choice(list(fields))]
    elif action == 4:
        major = rng.choice((1, 2, 3, 4))
    else:
        body = body[: rng.randrange(len(body) + 1)] + bytes(rng.choice((0, 0, 4, 8, 64)))
    return join_npy(major, fields, body)


def mutate_npz(data: bytes, max_size: int, rng: random.Random) -> bytes | None:
    """One member of the archive changed (its content mutated, or its name, or its
    compression), dropped or duplicated, and the archive written anew; None if ``data`` is no
    zip archive whose members can be read."""
    try:
        with plain_zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [
                [info.filename, archive.read(info), info.compress_type]
                for info in archive.infolist()
            ]
    except Exception:  # anything a broken archive raises: it is not one to change
        return None
    if not members:
        return None
    member = rng.choice(members)
    action = rng.randrange(6)
    if action < 3:
        content = member[1]
        member[1] = mutate_npy(content, rng) or atheris.Mutate(content, max_size)
    elif action == 3:
        member[0] = rng.choice(MEMBER_NAMES)
    elif action == 4:
        member[2] = rng.choice(COMPRESSIONS)
    elif len(members) > 1:
        members.remove(member)
    else:
        members.append([rng.choice(MEMBER_NAMES), member[1], member[2]])
    buffer = io.BytesIO()
    with plain_zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name is meant
        for name, content, compression in members:
            entry = plain_zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = compression
            archive.writestr(entry, content)
    return buffer.getvalue()


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's custom mutator: a structural change (a third of the time) or its own."""
    rng = random.Random(seed)
    mutated: bytes | None = None
    if rng.randrange(3) == 0:
        mutated = mutate_npz(data, max_size, rng) or mutate_npy(data, rng)
    if mutated is None:
        mutated = atheris.Mutate(data, max_size)
    return mutated[:max_size]


def main() -> None:
    atheris.Setup(sys.argv, findings.keep_going(TestOneInput), custom_mutator=mutate)
    atheris.Fuzz()  # never returns: libFuzzer ends the process, leaving the scratch directory


if __name__ == "__main__":
    main()
