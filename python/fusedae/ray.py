"""fusedae on Ray Data (needs ``pip install 'fusedae[ray]'``).

``Encoder`` is a callable class for ``Dataset.map_batches``: Ray constructs it once per actor,
so the model is read and packed once per actor, not once per batch::

    import ray
    from fusedae.ray import Encoder

    codes = ray.data.read_parquet("s3://lake/embeddings/").map_batches(
        Encoder,
        fn_constructor_kwargs={"model": "ae.safetensors", "input_column": "features"},
        batch_format="pyarrow",  # or "numpy"; pyarrow skips a numpy object per row
        batch_size=8192,
        compute=ray.data.ActorPoolStrategy(size=8),  # actors
        num_cpus=4,  # CPUs each: the kernel threads of each actor
    )
    codes.write_parquet("s3://lake/codes/")

Each actor runs as many kernel threads as the CPUs Ray gave it, so actors side by side do not
oversubscribe a node. ``fusedae encode --engine ray`` runs a whole Parquet job this way, one
output shard per input shard, resumable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import fusedae
from fusedae import serialization
from fusedae._arrow import list_rows
from fusedae.chain import is_float64, spec_precision
from fusedae.mlp import MLP

# Precisions a model can be packed at: the rows' own dtype, or weights stored as bfloat16 or int8.
PRECISIONS = ("fp32", "bf16", "int8")


def actor_cpus() -> int | None:
    """The CPUs Ray assigned to the calling task or actor (at least 1 if it was given a fraction),
    or None outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    cpus = context.get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))


def threads_from_actor_cpus() -> None:
    """Sizes fusedae's thread pool to the CPUs of the calling Ray actor (no change outside one)."""
    cpus = actor_cpus()
    if cpus is not None:
        fusedae.set_num_threads(cpus)


def rows_of(column: np.ndarray, name: str, in_features: int) -> np.ndarray:
    """A Ray numpy batch column as a 2-D float array: a tensor column arrives 2-D already; a list
    column arrives as a 1-D object array of 1-D arrays, stacked here. A column of one value a row
    is refused, as the pyarrow batches' ``table_rows`` refuses it."""
    if column.dtype == object:
        if len(column) == 0:
            return np.empty((0, in_features), np.float32)
        missing = next((index for index, row in enumerate(column) if row is None), None)
        if missing is not None:
            raise ValueError(f"column {name!r} has no value (null) at row {missing} of the batch")
        lengths = {len(row) for row in column}
        if lengths != {in_features}:
            raise ValueError(
                f"column {name!r} holds rows of {sorted(lengths)} values, but the model takes "
                f"rows of {in_features}"
            )
        return np.stack(list(column))
    if column.ndim < 2:  # (the model would take the whole batch for one row)
        raise ValueError(
            f"column {name!r} holds one value a row (shape {column.shape}); the rows must be "
            f"lists or arrays of {in_features} floats"
        )
    return column


class Encoder:
    """A ``map_batches`` callable (``batch_format="numpy"`` or ``"pyarrow"``): reads
    ``input_column``, writes the model's output as ``output_column`` (a fixed-size list column,
    one row per input row), and passes the batch's other columns through (ids, keys). ``model``
    is a ``.safetensors`` file from ``fusedae.torch.save`` or ``MLP.save``; ``part`` is
    ``"encoder"``, ``"decoder"`` or ``"all"``; ``precision`` is ``"fp32"`` (rows of float64 are
    computed in float64, any other dtype in float32, batch by batch), ``"bf16"`` or ``"int8"``
    (weights stored narrower, float32 out: see ``docs/precision.md``). A null value inside a
    row is an error from pyarrow batches; numpy batches hold it as NaN already (a NaN output
    row): use pyarrow batches where a column may hold nulls. ``keep_input``
    keeps the input column (dropped by default: it is most of the bytes). The output column is
    Ray's tensor column from numpy batches, a fixed-size list column from pyarrow ones; one that
    the batch already has is an error."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        input_column: str,
        output_column: str | None = None,
        part: serialization.Part = "encoder",
        precision: str = "fp32",
        keep_input: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: this build has {PRECISIONS}")
        threads_from_actor_cpus()
        self.spec = serialization.read(model).select(part)
        self.precision = precision
        narrow = spec_precision(precision)
        self.models: dict[np.dtype, MLP] = {
            np.dtype(np.float32): MLP.from_spec(
                self.spec, precision=None if narrow == "full" else narrow, dtype=np.float32
            )
        }
        self.input_column = input_column
        self.output_column = output_column or {"encoder": "codes", "decoder": "decoded"}.get(
            part, "reconstructed"
        )
        self.keep_input = keep_input

    @property
    def in_features(self) -> int:
        return self.models[np.dtype(np.float32)].in_features

    def encode(self, rows: np.ndarray) -> tuple[MLP, np.ndarray]:
        """The model for ``rows`` and its output on them: rows of float64 computed in float64 at
        fp32, of any other real dtype (float16, integers) in float32."""
        float64 = is_float64(rows.dtype) and self.precision == "fp32"
        dtype = np.dtype(np.float64 if float64 else np.float32)
        if dtype not in self.models:
            self.models[dtype] = MLP.from_spec(self.spec, dtype=dtype)
        if rows.dtype != dtype and rows.dtype.kind in "fiu":
            rows = rows.astype(dtype)
        model = self.models[dtype]
        return model, model(rows)

    def missing_column(self, names: Sequence[str]) -> KeyError:
        return KeyError(f"the batch has no column {self.input_column!r}; it has {sorted(names)}")

    def check_output_column(self, names: Sequence[str]) -> None:
        replaced = self.output_column == self.input_column and not self.keep_input
        if self.output_column in names and not replaced:
            raise ValueError(
                f"the batch has a column {self.output_column!r} already: name another output_column"
            )

    def __call__(self, batch: Any) -> Any:
        """``batch``: a dict of numpy arrays (``batch_format="numpy"``) or a ``pyarrow.Table``
        (``batch_format="pyarrow"``, faster for a list column: no numpy object per row)."""
        if not isinstance(batch, Mapping):
            return self.encode_table(batch)
        if self.input_column not in batch:
            raise self.missing_column(list(batch))
        self.check_output_column(list(batch))
        rows = rows_of(batch[self.input_column], self.input_column, self.in_features)
        out = {
            name: column
            for name, column in batch.items()
            if name != self.input_column or self.keep_input
        }
        out[self.output_column] = self.encode(rows)[1]
        return out

    def encode_table(self, table: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute

        if self.input_column not in table.column_names:
            raise self.missing_column(table.column_names)
        self.check_output_column(table.column_names)
        rows = table_rows(pa, table.column(self.input_column), self.input_column, self.in_features)
        model, output = self.encode(rows)
        values = pa.array(output.reshape(-1))
        if not self.keep_input:
            table = table.drop_columns([self.input_column])
        return table.append_column(
            self.output_column, pa.FixedSizeListArray.from_arrays(values, model.out_features)
        )


def table_rows(pa: Any, column: Any, name: str, in_features: int) -> np.ndarray:
    """A list column of an Arrow table (fixed-size or not, or Ray's tensor extension over one)
    as a 2-D float array, without a copy where it is one chunk without nulls."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    is_list = pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
    if not (is_list or pa.types.is_fixed_size_list(array.type)):
        raise ValueError(f"column {name!r} is {array.type}; the rows must be lists of floats")
    return list_rows(pa, array, name, in_features)


def init(**local_options: Any) -> None:
    """Connects to the cluster at ``RAY_ADDRESS``, else does what ``ray.init()`` does: joins a
    cluster ``ray start`` left running on this machine, or starts a local one with
    ``local_options`` (``ray.init`` arguments, such as ``num_cpus``); quiet, without the
    dashboard. Nothing if Ray is initialized already."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, **local_options)


__all__: Sequence[str] = ["Encoder", "actor_cpus", "init", "threads_from_actor_cpus"]
