"""Rows of floats held in an Arrow list column, for ``encode`` on Parquet and for
``fusedae.ray.Encoder`` on pyarrow batches (pyarrow is the caller's: ``pa``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def first_null(array: Any) -> int:
    return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])


def list_rows(pa: Any, array: Any, name: str, in_features: int, first_row: int = 0) -> np.ndarray:
    """The rows of ``array`` (one chunk of a list, large-list or fixed-size-list column named
    ``name``) as a 2-D array, without a copy where it has no nulls. A null row, a null value or a
    row of another length than ``in_features`` is a ``ValueError`` naming the row (counted from
    ``first_row``)."""
    if array.null_count:
        raise ValueError(
            f"the list of column {name!r} in row {first_row + first_null(array)} is null"
        )
    if pa.types.is_fixed_size_list(array.type):
        lengths = np.full(len(array), array.type.list_size)
    else:
        lengths = pa.compute.list_value_length(array).to_numpy()
    wrong = np.flatnonzero(lengths != in_features)
    if wrong.size:
        row = int(wrong[0])
        raise ValueError(
            f"row {first_row + row} of column {name!r} holds {lengths[row]} values, but the model "
            f"takes rows of {in_features}"
        )
    values = array.flatten()
    if values.null_count:
        row = first_row + first_null(values) // in_features
        raise ValueError(f"a value of column {name!r} in row {row} is null")
    return values.to_numpy(zero_copy_only=False).reshape(len(array), in_features)
