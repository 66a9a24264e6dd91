"""Encoding a Parquet file: rows per second of ``fusedae encode`` (1 and 2 threads) against
reading the same file with pyarrow alone (the ceiling: decoding is the limit) and against the
loop users write today (pyarrow batches through the plain PyTorch model, written back to
Parquet). One pytest-benchmark group per row count; ``report.py`` renders a section of its own.

The input is the seed's AE 784-42-16 use: rows of 784 float32 values as a fixed-size-list
column beside an int64 id, in row groups of 10,000 rows (31 MB); every peer reads it in the same
batches and, but for the read alone, writes the ids and the codes. Before timing, the PyTorch
loop's output is checked against fusedae's, so the smoke run is a test too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fusedae import MLP
from fusedae.cli import main
from fusedae.cli.common import rows_per_batch
from fusedae.cli.parquet import READ_BUFFER_BYTES

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

PARQUET = "parquet"
WIDTH, CODE = 784, 16
ROW_GROUP = 10_000
# Rows of the timed input: 200,000 rows are 627 MB of floats. FUSEDAE_BENCH_PARQUET_ROWS
# changes it (the 2M rows take 6.3 GB of disk).
ROWS = int(os.environ.get("FUSEDAE_BENCH_PARQUET_ROWS", "200000"))
SMOKE_ROWS = 2_500  # with benchmarks disabled
BATCH = rows_per_batch(None, WIDTH * 4, CODE * 4)  # encode's default batch
PEERS = ("pyarrow-read", "torch-loop", "fusedae-t1", "fusedae-t2")


def write_lake(root: Path, rows: int) -> Path:
    """The model (``ae.safetensors``) and the input (``rows.parquet``) in ``root``."""
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((42, WIDTH), np.float32) / 28, rng.standard_normal(42, np.float32)),
        (rng.standard_normal((CODE, 42), np.float32) / 7, rng.standard_normal(CODE, np.float32)),
    ]
    MLP(layers, ["relu", "identity"]).save(root / "ae.safetensors")
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), WIDTH))])
    chunk = rng.standard_normal((ROW_GROUP, WIDTH), np.float32)
    with pq.ParquetWriter(root / "rows.parquet", schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            count = min(ROW_GROUP, rows - start)
            x = pa.FixedSizeListArray.from_arrays(chunk[:count].reshape(-1), WIDTH)
            writer.write_table(pa.table({"id": np.arange(start, start + count), "x": x}, schema))
    return root


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The model and the input file, in one directory; written once per run."""
    options = request.config.getoption
    disabled = options("benchmark_disable") and not options("benchmark_enable")
    return write_lake(tmp_path_factory.mktemp("parquet-bench"), SMOKE_ROWS if disabled else ROWS)


def torch_encoder(model_path: Path) -> nn.Module:
    """The same encoder as plain PyTorch modules."""
    (w1, b1), (w2, b2) = MLP.load(model_path).layers
    encoder = nn.Sequential(nn.Linear(WIDTH, 42), nn.ReLU(), nn.Linear(42, CODE))
    with torch.no_grad():
        for linear, (weight, bias) in zip(
            (encoder[0], encoder[2]), ((w1, b1), (w2, b2)), strict=True
        ):
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
    return encoder.eval()


def batches(path: Path, columns: list[str]) -> Any:
    """The file's batches, read as ``fusedae encode`` reads them."""
    file = pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    return file.iter_batches(batch_size=BATCH, columns=columns)


def read_only(path: Path) -> int:
    rows = 0
    for batch in batches(path, ["x"]):
        rows += len(batch.column(0).flatten().to_numpy().reshape(-1, WIDTH))
    return rows


def torch_loop(model: nn.Module, path: Path, output: Path) -> None:
    """What users write today: batches through the PyTorch model, codes written to Parquet."""
    schema = pa.schema([("id", pa.int64()), ("codes", pa.list_(pa.float32(), CODE))])
    with pq.ParquetWriter(output, schema) as writer, torch.inference_mode():
        for batch in batches(path, ["id", "x"]):
            x = batch.column(1).flatten().to_numpy().reshape(-1, WIDTH)
            codes = model(torch.from_numpy(x)).numpy()
            codes_array = pa.FixedSizeListArray.from_arrays(codes.reshape(-1), CODE)
            writer.write_batch(pa.record_batch([batch.column(0), codes_array], schema=schema))


def encode(lake: Path, threads: int, output: Path) -> None:
    argv = ["encode", str(lake / "ae.safetensors"), str(lake / "rows.parquet"), "-o", str(output)]
    status = main([*argv, "--keep", "id", "--threads", str(threads), "--force"])
    assert status == 0


@pytest.mark.parametrize("peer", PEERS)
def test_encode_parquet(
    benchmark: Any,
    lake: Path,
    tmp_path: Path,
    pin_threads: Callable[[int], Any],
    peer: str,
) -> None:
    source = lake / "rows.parquet"
    rows = pq.read_metadata(source).num_rows
    threads = 1 if peer == "fusedae-t1" else 2
    output = tmp_path / "codes.parquet"
    # Built once, outside the timing (encode's timing includes loading its model: milliseconds).
    model = torch_encoder(lake / "ae.safetensors")
    targets: dict[str, Callable[[], object]] = {
        "pyarrow-read": lambda: read_only(source),
        "torch-loop": lambda: torch_loop(model, source, output),
        "fusedae-t1": lambda: encode(lake, 1, output),
        "fusedae-t2": lambda: encode(lake, 2, output),
    }
    benchmark.group = f"parquet-{rows}"
    benchmark.extra_info.update(
        {
            "kind": PARQUET,
            "peer": peer,
            "rows": rows,
            "threads": threads,
            "bytes": os.path.getsize(source),
        }
    )
    with pin_threads(threads):
        if benchmark.disabled:
            benchmark(targets[peer])
        else:
            benchmark.pedantic(targets[peer], rounds=5, warmup_rounds=1)
    if peer == "torch-loop":
        got = pq.read_table(output)
        encode(lake, threads, tmp_path / "fused.parquet")
        want = pq.read_table(tmp_path / "fused.parquet")
        assert got["id"].equals(want["id"])
        plain = got["codes"].combine_chunks().flatten().to_numpy()
        fused = want["codes"].combine_chunks().flatten().to_numpy()
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
