"""Writes the seed corpora of the Python fuzz harnesses into ``fuzz/python/corpus/<target>/``.

``safetensors``: model files of ``MLP.save`` / ``serialization.write_spec`` (float32 and
float64, every post-op, parameters, BatchNorm before and after a Linear, no bias, no encoder),
a format version 1 file, and truncated copies. ``npy``: small ``.npy`` files (1-D, 2-D, 3-D,
0-d, no rows, float32/float64, big-endian, int, header versions 1.0 and 2.0, Fortran order) and
``.npz`` archives (one array, two, deflated). ``cli``: argv of ``fuzz_cli.py`` as ``cli_argv``
encodes them. ``parquet``: small shards (``parquet_files``).

Deterministic: the same bytes on every run (fixed weights, zip entries dated 1980-01-01), so
the committed corpus changes only when this script does. Run from anywhere:
``python fuzz/python/make_corpus.py``. The directories are emptied first.
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cli_argv  # noqa: E402  (beside this file, not a package)

from fusedae import MLP, serialization  # noqa: E402
from fusedae._ops import PostOp  # noqa: E402
from fusedae.chain import ChainSpec, Layer, Normalization  # noqa: E402

CORPUS = HERE / "corpus"
REPO = HERE.parent.parent


def values(*shape: int, dtype: type = np.float32, start: int = 0) -> np.ndarray:
    """Small, exactly representable, distinct values of ``shape``: a fixed pattern."""
    count = int(np.prod(shape))
    return ((np.arange(start, start + count) % 7 - 3) / 4).reshape(shape).astype(dtype)


# --- safetensors ------------------------------------------------------------------------------


def model_files(directory: Path) -> None:
    """Valid model files of each kind, then truncated copies of one."""
    relu_ae = MLP(
        [
            (values(2, 4), values(2)),
            (values(4, 2, start=1), values(4, start=2)),
        ]
    )
    relu_ae.save(directory / "relu_ae_f32.safetensors")

    with_params = MLP(
        [
            (values(2, 3, dtype=np.float64), values(2, dtype=np.float64)),
            (values(2, 2, dtype=np.float64, start=3), None),
            (values(3, 2, dtype=np.float64, start=5), values(3, dtype=np.float64)),
        ],
        [
            PostOp("leaky_relu", (0.2,)),
            PostOp("hardtanh", (0.0, 6.0)),
            PostOp("softplus", (2.0, 10.0)),
        ],
    )
    with_params.save(directory / "params_f64.safetensors")

    names = ["identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"]
    every_op = MLP([(values(2, 2, start=i), values(2, start=i)) for i in range(len(names))], names)
    every_op.save(directory / "every_op_f32.safetensors", encoder_layers=3)

    no_encoder = MLP([(values(3, 2), None)], [PostOp("elu", (0.5,))])
    no_encoder.save(directory / "elu_no_encoder.safetensors", encoder_layers=0)

    batchnorm = ChainSpec(
        (
            Layer(
                values(3, 2),
                values(3),
                PostOp("relu"),
                (
                    Normalization("before", values(2), values(2) + 1, 1e-5, values(2), values(2)),
                    Normalization("after", values(3), values(3) + 1, 1e-3),
                ),
            ),
            Layer(values(2, 3, start=4), None, PostOp("identity")),
        ),
        encoder_layers=1,
    )
    serialization.write_spec(directory / "batchnorm_f32.safetensors", batchnorm)

    shutil.copyfile(
        REPO / "tests" / "data" / "format-1-ae.safetensors", directory / "format1.safetensors"
    )

    whole = (directory / "relu_ae_f32.safetensors").read_bytes()
    (header_size,) = struct.unpack("<Q", whole[:8])
    for name, size in [
        ("size_field_cut", 4),
        ("size_field_only", 8),
        ("header_cut", 8 + header_size // 2),
        ("data_cut", len(whole) - 3),
    ]:
        (directory / f"truncated_{name}.safetensors").write_bytes(whole[:size])


# --- npy / npz --------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def npy_with_header(header: dict[str, object], data: bytes) -> bytes:
    """A ``.npy`` with exactly ``header``, which ``write_array`` would not write."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def npz_bytes(arrays: dict[str, np.ndarray], compression: int = zipfile.ZIP_STORED) -> bytes:
    """An ``.npz`` as ``np.savez`` writes it, but with fixed dates, so the bytes never change."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = compression
            archive.writestr(entry, npy_bytes(array))
    return buffer.getvalue()


def array_files(directory: Path) -> None:
    files: dict[str, bytes] = {
        "f32_2d.npy": npy_bytes(values(3, 4)),
        "f64_1d.npy": npy_bytes(values(5, dtype=np.float64)),
        "f32_3d.npy": npy_bytes(values(2, 2, 3)),
        "f32_header_2_0.npy": npy_bytes(values(2, 3), version=(2, 0)),
        "f64_fortran_2d.npy": npy_bytes(np.asfortranarray(values(3, 2, dtype=np.float64))),
        "f32_fortran_1d.npy": npy_with_header(
            {"descr": "<f4", "fortran_order": True, "shape": (4,)}, values(4).tobytes()
        ),
        "f32_big_endian.npy": npy_bytes(values(2, 3).astype(">f4")),
        "i32.npy": npy_bytes(np.arange(4, dtype=np.int32).reshape(2, 2)),
        "f32_no_rows.npy": npy_bytes(np.zeros((0, 4), np.float32)),
        "f64_0d.npy": npy_bytes(np.array(1.5)),
        "one.npz": npz_bytes({"x": values(2, 3)}),
        "two.npz": npz_bytes({"x": values(2, 3, dtype=np.float64), "y": values(3)}),
        "deflated.npz": npz_bytes({"x": values(2, 3)}, zipfile.ZIP_DEFLATED),
    }
    files["truncated.npy"] = files["f32_2d.npy"][:-5]
    for name, data in files.items():
        (directory / name).write_bytes(data)


# --- cli --------------------------------------------------------------------------------------

AE, X = "{fixtures}/ae.safetensors", "{fixtures}/x.npy"
CLI_SEEDS: dict[str, list[str]] = {
    "info": ["info"],
    "encode": ["encode", AE, X, "-o", "{out}/a.npy"],
    "reconstruct": ["encode", AE, X, "-o", "{out}/a.npy", "--reconstruct", "--batch-size", "2"],
    "decode": ["encode", AE, "{fixtures}/codes.npy", "--decode", "-o", "{out}/a.npy"],
    "threads": ["encode", AE, "{fixtures}/x3d.npy", "--threads", "1", "-o", "{out}/a.npy"],
    "threads_batch": ["encode", AE, X, "-o", "{out}/a.npy", "--threads", "2", "--batch-size", "3"],
    "force": [
        "encode",
        "{fixtures}/ae64bn.safetensors",
        "{fixtures}/x64.npy",
        "-o",
        "{out}/exists.npy",
        "--force",
    ],
    "in_place": ["encode", AE, "{out}/in.npy", "-o", "{out}/in.npy", "--force"],
    "npz_key": ["encode", AE, "{fixtures}/two.npz", "--key", "x", "-o", "{out}/a.npy"],
    "npz": ["encode", AE, "{fixtures}/x.npz", "-o", "{out}/a.npy"],
    "state_dict": [
        "encode",
        "{fixtures}/state_dict.pt",
        X,
        "--layers",
        "linear,relu,linear",
        "-o",
        "{out}/a.npy",
    ],
    "pickle": ["encode", "{fixtures}/module.pt", X, "--trust-pickle", "-o", "{out}/a.npy"],
    "bad_model": ["encode", "{fixtures}/garbage.safetensors", X, "-o", "{out}/a.npy"],
    "bad_input": ["encode", AE, "{fixtures}/truncated.npy", "-o", "{out}/a.npy"],
    "relative": ["encode", AE, X, "-o", "b.npy"],
    "parquet": [
        "encode",
        AE,
        "{fixtures}/rows.parquet",
        "-o",
        "{out}/codes.parquet",
        "--keep",
        "id,label",
    ],
    "parquet_lake": ["encode", AE, "{fixtures}/lake", "-o", "{out}/codes", "--column", "x"],
    "parquet_glob": [
        "encode",
        AE,
        "{fixtures}/lake/**/*.parquet",
        "-o",
        "codes",
        "--reconstruct",
        "--output-column",
        "x",
        "--keep",
        "id",
    ],
    "parquet_scalars": [
        "encode",
        "{fixtures}/ae64bn.safetensors",
        "{fixtures}/scalars.parquet",
        "-o",
        "{out}/codes",
        "--columns",
        "x0,x1,x2,x3,x4,x5,x6,x7",
        "--resume",
    ],
    "parquet_bad": ["encode", AE, "{fixtures}/wrong_width.parquet", "-o", "{out}/codes"],
    "parquet_engine": ["encode", AE, "{fixtures}/lake", "-o", "{out}/codes", "--actors", "2"],
    # What the first runs with Parquet in the vocabulary found (all clear errors now, or kept
    # shards): a failure after a finished shard, a .npy OUTPUT, --resume on an unrelated .npy.
    "parquet_partial": [
        "encode",
        "{fixtures}/format1.safetensors",
        "{fixtures}/lake",
        "-o",
        "{out}/codes",
    ],
    "parquet_npy_output": ["encode", AE, "{fixtures}/rows.parquet", "-o", "{out}/a.npy"],
    "resume_npy": ["encode", AE, X, "--resume", "-o", "{out}/exists.npy"],
    "bench": ["bench", "--widths", "3,2", "--batch", "1", "--rounds", "1"],
    "demo": ["demo", "--epochs", "1"],
}


def cli_files(directory: Path) -> None:
    for name, argv in CLI_SEEDS.items():
        (directory / name).write_bytes(cli_argv.encode(argv))


# --- parquet ------------------------------------------------------------------------------


def parquet_files(directory: Path) -> None:
    """Small shards of rows of 4 values (the harness's model takes 4): each list type and
    value type, nulls, an empty shard, rows of the wrong length, two row groups, no list
    column, two list columns; uncompressed and compressed. No statistics or creation time
    vary between runs: the bytes are the same on every run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = values(5, 4)
    flat = pa.array(x.reshape(-1))
    offsets = pa.array(np.arange(0, 21, 4), pa.int32())
    tables = {
        "fixed_f32": pa.table({"x": pa.FixedSizeListArray.from_arrays(flat, 4)}),
        "list_f64": pa.table({"x": pa.array(x.astype(np.float64).tolist())}),
        "large_list_f32": pa.table(
            {"x": pa.LargeListArray.from_arrays(offsets.cast(pa.int64()), flat)}
        ),
        "list_with_id": pa.table(
            {"id": np.arange(5), "x": pa.ListArray.from_arrays(offsets, flat)}
        ),
        "empty": pa.table({"x": pa.array([], pa.list_(pa.float32(), 4))}),
        "null_row": pa.table({"x": pa.array([[1.0] * 4, None], pa.list_(pa.float32()))}),
        "null_value": pa.table({"x": pa.array([[1.0, None, 2.0, 3.0]], pa.list_(pa.float32()))}),
        "short_row": pa.table({"x": pa.array([[1.0] * 3], pa.list_(pa.float32()))}),
        "no_list": pa.table({"a": [1.0], "b": [2.0]}),
        "two_lists": pa.table({"x": [[1.0] * 4], "y": [[2.0] * 4]}),
        "ints": pa.table({"x": [[1] * 4]}),
    }
    for name, table in tables.items():
        for compression in ("none", "snappy"):
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression=compression, row_group_size=3)
            (directory / f"{name}_{compression}.parquet").write_bytes(buffer.getvalue())


def main() -> None:
    targets: dict[str, Callable[[Path], None]] = {
        "safetensors": model_files,
        "npy": array_files,
        "cli": cli_files,
        "parquet": parquet_files,
    }
    for target, write in targets.items():
        directory = CORPUS / target
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        write(directory)
        files = sorted(directory.iterdir())
        total = sum(path.stat().st_size for path in files)
        print(f"{directory.relative_to(REPO)}: {len(files)} files, {total} bytes")


if __name__ == "__main__":
    main()
