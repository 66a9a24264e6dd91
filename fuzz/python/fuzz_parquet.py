"""Coverage-guided fuzzing (atheris) of ``fusedae encode``'s Parquet input handling.

Each input is the content of a ``.parquet`` shard, written into an input directory and encoded
as ``fusedae encode MODEL DIR -o OUT`` would (``fusedae.cli.parquet.encode``): the shard's
footer and schema read, its column of rows chosen (the only list-of-floats column), the
batches read and checked, each through a 4 -> 3 model, the output shard written through its
temporary file.

The only documented error is ``CommandError`` (``main`` turns it into ``fusedae encode:
error: ...`` and status 1). A finding is anything else: another exception escaping (``main``
would show a traceback), a crash of the interpreter (pyarrow's reader on a malformed file), an
output shard whose rows are not the input's, or a file left in the output directory after an
error. fusedae is instrumented; pyarrow's reader is C++, which atheris does not see, so the
search is guided by fusedae's Python only and libFuzzer's byte mutations do the rest. Usage::

    python fuzz/python/fuzz_parquet.py CORPUS_DIR -max_total_time=60

stops at the first finding; with ``FUZZ_FINDINGS=DIR`` it records each distinct one in ``DIR``
and goes on (``findings.py``). Scratch files go to a directory made under ``$TMPDIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import findings
import numpy as np  # imported before instrumentation: numpy itself is not what is fuzzed
import pyarrow.parquet as pq

with atheris.instrument_imports(include=["fusedae"]):
    from fusedae import MLP
    from fusedae.cli import CommandError, parquet

WORKDIR = Path(tempfile.mkdtemp(prefix="fuzz-parquet-"))
INPUT = WORKDIR / "in"
OUTPUT = WORKDIR / "out"
WIDTH = 4
RNG = np.random.default_rng(0)
LAYERS = [(RNG.standard_normal((3, WIDTH)), RNG.standard_normal(3))]


class Finding(Exception):
    """A behaviour ``fusedae encode``'s Parquet handling must not have."""


def model_for(dtype: np.dtype) -> MLP:
    return MLP(LAYERS, ["identity"], dtype=dtype)


def TestOneInput(data: bytes) -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    INPUT.mkdir(exist_ok=True)
    (INPUT / "x.parquet").write_bytes(data)
    args = argparse.Namespace(
        input=INPUT,
        output=OUTPUT,
        column=None,
        columns=None,
        keep=None,
        output_column="codes",
        resume=False,
        force=False,
        batch_size=3,
        threads=None,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parquet.encode(args, model_for)
    except CommandError:
        left = sorted(p.name for p in OUTPUT.rglob("*") if p.is_file()) if OUTPUT.exists() else []
        if left:
            raise Finding(f"an error left {left} in the output directory") from None
        return
    written = pq.read_table(OUTPUT / "x.parquet")
    rows = pq.read_metadata(INPUT / "x.parquet").num_rows
    if written.num_rows != rows or written.schema.names != ["codes"]:
        raise Finding(f"{rows} rows in, {written.num_rows} out, columns {written.schema.names}")


def main() -> None:
    atheris.Setup(sys.argv, findings.keep_going(TestOneInput))
    atheris.Fuzz()  # never returns: libFuzzer ends the process, leaving the scratch directory


if __name__ == "__main__":
    main()
