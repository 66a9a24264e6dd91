"""Parquet shards for the tests of ``encode`` and of Ray: building them and reading them back.
pyarrow is imported inside, so that a module importing this one can still skip without it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def list_column(x: np.ndarray, kind: str) -> pa.Array:
    import pyarrow as pa

    values = pa.array(x.reshape(-1))
    if kind == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1]), pa.int32())
    if kind == "large_list":
        return pa.LargeListArray.from_arrays(offsets.cast(pa.int64()), values)
    return pa.ListArray.from_arrays(offsets, values)


def read_rows(paths: list[Path], column: str) -> tuple[np.ndarray, np.ndarray]:
    """The ids and the rows of ``column`` of the shards, ordered by id."""
    import pyarrow.parquet as pq

    ids, rows = [], []
    for path in paths:
        table = pq.read_table(path)
        if not table.num_rows:
            continue
        ids.append(table["id"].to_numpy())
        rows.append(table[column].combine_chunks().flatten().to_numpy().reshape(len(ids[-1]), -1))
    order = np.argsort(np.concatenate(ids))
    return np.concatenate(ids)[order], np.concatenate(rows)[order]


def assert_same_rows(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to float rounding: the kernels may round a row's last bits differently by where it
    falls in a batch (a vector tail), and encode's batches are not the reference call's."""
    eps = np.finfo(want.dtype).eps
    np.testing.assert_allclose(got, want, rtol=4 * eps, atol=16 * eps * np.abs(want).max())


def output_shards(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.parquet"))


def every_file(directory: Path) -> list[str]:
    """Every file under ``directory``, hidden temporaries included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
