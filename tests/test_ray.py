"""fusedae on a local Ray cluster: ``fusedae.ray.Encoder`` in ``map_batches`` and ``fusedae
encode --engine ray``, row for row equal to ``fusedae.MLP``, the model loaded once per actor,
as many kernel threads as the actor's CPUs, and resumable after the driver is killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fusedae
from _lake import assert_same_rows, every_file, list_column, output_shards, read_rows
from fusedae import MLP
from fusedae.cli import main, ray_engine

ray = pytest.importorskip("ray", reason="Ray needs the extra: pip install 'fusedae[ray]'")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from fusedae.ray import Encoder  # noqa: E402 (needs ray)

WIDTH = 12
# Rows per shard: an empty shard, and row counts that leave a partial last batch.
SHARD_ROWS = {"part-0.parquet": 1000, "part-1.parquet": 0, "part-2.parquet": 777}
BATCH_ROWS = 256
# Ray Data's read tasks need a CPU of their own beside the actor pool, or the pool waits for
# them forever: 2 CPUs for the actors and 1 for reading (a logical one on a 2-core machine).
CLUSTER_CPUS = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster for this module; its address, for commands run as other drivers."""
    import ray.cloudpickle

    # The actor classes defined here travel by value: the workers cannot import this module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fusedae.ray.init(num_cpus=CLUSTER_CPUS, object_store_memory=128 << 20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((42, WIDTH)) / np.sqrt(WIDTH), rng.standard_normal(42)),
        (rng.standard_normal((4, 42)) / np.sqrt(42), rng.standard_normal(4)),
        (rng.standard_normal((42, 4)) / 2, rng.standard_normal(42)),
        (rng.standard_normal((WIDTH, 42)) / np.sqrt(42), rng.standard_normal(WIDTH)),
    ]
    path = tmp_path_factory.mktemp("model") / "ae.safetensors"
    MLP(layers, ["relu", "identity", "relu", "tanh"], dtype=np.float32).save(path)
    return path


def write_lake(root: Path, shard_rows: dict[str, int], seed: int) -> Path:
    """Shards with an ``id`` column numbering the rows across shards and rows in ``x``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    first = 0
    for name, rows in shard_rows.items():
        x = rng.standard_normal((rows, WIDTH), dtype=np.float32)
        ids = np.arange(first, first + rows)
        pq.write_table(pa.table({"id": ids, "x": list_column(x, "fixed_size_list")}), root / name)
        first += rows
    return root


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lake(tmp_path_factory.mktemp("ray") / "lake", SHARD_ROWS, seed=1)


class RecordingEncoder(Encoder):
    """An ``Encoder`` that records each construction (process and thread count) in a file and
    returns its thread count beside each row."""

    def __init__(self, log: str, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        with open(log, "a") as file:
            file.write(f"{os.getpid()} {fusedae.get_num_threads()}\n")

    def __call__(self, batch: Any) -> Any:
        out = super().__call__(batch)
        rows = len(out["id"])
        extra = {"threads": fusedae.get_num_threads(), "pid": os.getpid()}
        for name, value in extra.items():
            if isinstance(out, dict):
                out[name] = np.full(rows, value)
            else:
                out = out.append_column(name, pa.array(np.full(rows, value)))
        return out


def as_rows(column: np.ndarray) -> np.ndarray:
    """A column of a numpy batch as a 2-D array (a list column arrives as objects)."""
    return np.stack(list(column)) if column.dtype == object else column


@pytest.mark.parametrize(
    ("actors", "cpus", "batch_format"), [(1, 2, "numpy"), (2, 1, "numpy"), (2, 1, "pyarrow")]
)
def test_encoder_in_map_batches_row_for_row(
    cluster: str,
    tmp_path: Path,
    model_path: Path,
    lake: Path,
    actors: int,
    cpus: int,
    batch_format: str,
) -> None:
    log = tmp_path / "constructions.log"
    # Blocks enough for every actor: the three small shards are read as one block.
    encoded = (
        ray.data.read_parquet(str(lake))
        .repartition(8)
        .map_batches(
            RecordingEncoder,
            fn_constructor_kwargs={
                "log": str(log),
                "model": str(model_path),
                "input_column": "x",
            },
            batch_format=batch_format,
            batch_size=BATCH_ROWS,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
        )
    )
    batches = list(encoded.iter_batches(batch_format="numpy", batch_size=None))
    ids = np.concatenate([batch["id"] for batch in batches])
    codes = np.concatenate([as_rows(batch["codes"]) for batch in batches])
    threads = np.concatenate([batch["threads"] for batch in batches])
    pids = np.concatenate([batch["pid"] for batch in batches])
    assert "x" not in batches[0]

    want_ids, x = read_rows(sorted(lake.glob("*.parquet")), "x")
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], want_ids)  # every row, once
    assert_same_rows(codes[order], MLP.load(model_path, "encoder")(x))
    assert set(threads.tolist()) == {cpus}
    assert len(set(pids.tolist())) == actors  # each actor encoded rows
    constructions = log.read_text().split()
    assert len(constructions) == 2 * actors  # one per actor, each in its own process
    assert len(set(constructions[::2])) == actors
    assert set(constructions[1::2]) == {str(cpus)}


def test_encoder_outside_ray_and_its_errors(model_path: Path) -> None:
    """Called directly (a test, a notebook) it encodes with the thread count as it is; bad
    input is a clear error."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, WIDTH))
    reconstruct = Encoder(model_path, input_column="x", part="all", keep_input=True)
    out = reconstruct({"x": x, "key": np.arange(5)})
    assert sorted(out) == ["key", "reconstructed", "x"]
    assert out["reconstructed"].dtype == np.float64  # float64 rows run in float64
    np.testing.assert_allclose(out["reconstructed"], MLP.load(model_path, dtype=np.float64)(x))
    big_endian = reconstruct({"x": x.astype(">f8")})["reconstructed"]  # (either byte order)
    np.testing.assert_array_equal(big_endian, out["reconstructed"])
    rows_as_objects = np.empty(5, dtype=object)
    rows_as_objects[:] = list(x.astype(np.float32))
    encoder = Encoder(model_path, input_column="x")
    assert encoder({"x": rows_as_objects})["codes"].shape == (5, 4)
    assert encoder({"x": np.empty(0, dtype=object)})["codes"].shape == (0, 4)

    table = pa.table({"key": np.arange(5), "x": list_column(x.astype(np.float32), "list")})
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    for batch in (table, chunked):
        out_table = encoder(batch)
        assert out_table.column_names == ["key", "codes"]
        codes = out_table["codes"].combine_chunks().flatten().to_numpy().reshape(5, 4)
        np.testing.assert_array_equal(codes, encoder({"x": x.astype(np.float32)})["codes"])
    assert encoder(table.slice(0, 0))["codes"].type == pa.list_(pa.float32(), 4)
    # Other real dtypes run in float32, as the docstring says.
    half, counts = x.astype(np.float16), np.arange(5 * WIDTH).reshape(5, WIDTH) % 7
    for rows in (half, counts):
        want = encoder({"x": rows.astype(np.float32)})["codes"]
        np.testing.assert_array_equal(encoder({"x": rows})["codes"], want)
    half_table = pa.table({"x": list_column(half, "list")})
    codes = encoder(half_table)["codes"].combine_chunks().flatten().to_numpy().reshape(5, 4)
    np.testing.assert_array_equal(codes, encoder({"x": half})["codes"])

    with pytest.raises(KeyError, match=r"no column 'x'; it has \['features'\]"):
        encoder({"features": x})
    with pytest.raises(ValueError, match=r"rows of \[11\] values, but the model takes rows of 12"):
        encoder({"x": np.array([row[:11] for row in x] + [None], dtype=object)[:-1]})
    with_null = np.empty(2, dtype=object)
    with_null[:] = [x[0], None]  # a list column's null, as Ray hands it (was a TypeError)
    with pytest.raises(ValueError, match=r"column 'x' has no value \(null\) at row 1"):
        encoder({"x": with_null})
    short = pa.table({"x": pa.array([[1.0] * WIDTH, [1.0] * (WIDTH - 1)], pa.list_(pa.float32()))})
    with pytest.raises(
        ValueError, match=r"row 1 of column 'x' holds 11 values, but the model takes rows of 12"
    ):
        encoder(short)
    with pytest.raises(ValueError, match="the list of column 'x' in row 1 is null"):
        encoder(pa.table({"x": pa.array([[1.0] * WIDTH, None], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match="a value of column 'x' in row 0 is null"):
        encoder(pa.table({"x": pa.array([[1.0] * (WIDTH - 1) + [None]], pa.list_(pa.float32()))}))
    with pytest.raises(ValueError, match="column 'x' is string"):
        encoder(pa.table({"x": ["a"]}))
    # One value a row: the model took the batch's WIDTH values for one row, and no error.
    with pytest.raises(ValueError, match=r"column 'x' holds one value a row \(shape \(12,\)\)"):
        encoder({"x": x[0].astype(np.float32), "key": np.arange(WIDTH)})
    with pytest.raises(ValueError, match="column 'x' is float"):
        encoder(pa.table({"x": x[0].astype(np.float32)}))
    with pytest.raises(ValueError, match="has a column 'codes' already"):
        encoder({"x": x, "codes": x})
    with pytest.raises(ValueError, match="has a column 'codes' already"):
        encoder(table.append_column("codes", table["key"]))
    in_place = Encoder(model_path, input_column="x", output_column="x")
    assert sorted(in_place({"x": x, "key": np.arange(5)})) == ["key", "x"]
    with pytest.raises(ValueError, match="precision 'int4'"):
        Encoder(model_path, input_column="x", precision="int4")
    int8 = Encoder(model_path, input_column="x", precision="int8")
    np.testing.assert_array_equal(
        int8({"x": x})["codes"],
        MLP.load(model_path, "encoder", precision="int8")(x.astype(np.float32)),
    )
    with pytest.raises(ValueError, match="decoder"):
        Encoder(model_path, input_column="x", part="middle")  # type: ignore[arg-type]


def test_engine_ray_writes_what_the_local_engine_writes(
    cluster: str, tmp_path: Path, model_path: Path, lake: Path
) -> None:
    common = ["encode", str(model_path), str(lake), "--keep", "id", "--batch-size", "300"]
    assert main([*common, "-o", str(tmp_path / "local")]) == 0
    assert main([*common, "-o", str(tmp_path / "ray"), "--engine", "ray", "--actors", "2"]) == 0
    assert every_file(tmp_path / "ray") == sorted(SHARD_ROWS)  # the empty shard too
    for local, remote in zip(
        output_shards(tmp_path / "local"), output_shards(tmp_path / "ray"), strict=True
    ):
        assert pq.read_table(remote).equals(pq.read_table(local))
    ids, codes = read_rows(output_shards(tmp_path / "ray"), "codes")
    want_ids, x = read_rows(sorted(lake.glob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)
    assert_same_rows(codes, MLP.load(model_path, "encoder")(x))


def test_engine_ray_reports_an_actors_error_clearly(
    cluster: str, tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard whose rows are checked in the actor (a list column: lengths vary by row) fails
    with the same message as in this process, and leaves no output shard."""
    lake = tmp_path / "lake"
    lake.mkdir()
    rows = [np.zeros(WIDTH, np.float32)] * 3 + [np.zeros(WIDTH + 1, np.float32)]
    pq.write_table(pa.table({"x": pa.array(rows, pa.list_(pa.float32()))}), lake / "bad.parquet")
    out = tmp_path / "out"
    assert main(["encode", str(model_path), str(lake), "-o", str(out), "--engine", "ray"]) == 1
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        f"fusedae encode: error: {lake / 'bad.parquet'}: row 3 of column 'x' holds 13 values, "
        "but the model takes rows of 12"
    )
    assert not out.exists()  # not even an empty directory


def test_engine_ray_flags_are_checked(model_path: Path, lake: Path, tmp_path: Path) -> None:
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, WIDTH), np.float32))
    argv = ["encode", str(model_path), str(npy), "-o", str(tmp_path / "y.npy")]
    assert main([*argv, "--engine", "ray"]) == 1
    assert main([*argv, "--cpus-per-actor", "2"]) == 1
    argv = ["encode", str(model_path), str(lake), "-o", str(tmp_path / "out")]
    assert main([*argv, "--actors", "2"]) == 1  # --engine local
    assert main([*argv, "--engine", "ray", "--threads", "2"]) == 1
    assert not (tmp_path / "out").exists()


def test_engine_ray_refuses_a_pool_the_cluster_cannot_place(
    cluster: str, tmp_path: Path, model_path: Path, lake: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray would wait forever for actors it cannot place: an error instead."""
    argv = ["encode", str(model_path), str(lake), "-o", str(tmp_path / "out"), "--engine", "ray"]
    assert main([*argv, "--cpus-per-actor", str(CLUSTER_CPUS + 1)]) == 1
    assert f"the largest node of the cluster has {CLUSTER_CPUS} CPUs" in capsys.readouterr().err
    assert main([*argv, "--actors", "2", "--cpus-per-actor", "2"]) == 1
    assert "--actors 2 x 2 CPU(s): the cluster has room for 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_engine_ray_takes_paths_relative_to_the_driver(
    cluster: str,
    tmp_path: Path,
    model_path: Path,
    lake: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The actors run in directories of their own: the paths they get are absolute."""
    shutil.copytree(lake, tmp_path / "lake")
    monkeypatch.chdir(tmp_path)
    assert main(["encode", str(model_path), "lake", "-o", "out", "--engine", "ray"]) == 0
    assert every_file(tmp_path / "out") == sorted(SHARD_ROWS)


class DyingShardEncoder:
    """An actor that dies on every shard, as one the OOM killer stops would."""

    def __init__(self, job: object) -> None:
        pass

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        os._exit(1)


def test_engine_ray_stops_when_an_actor_keeps_dying(
    cluster: str,
    tmp_path: Path,
    model_path: Path,
    lake: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Retried a bounded number of times, then a clear error, not a job that never ends."""
    monkeypatch.setattr(ray_engine, "ShardEncoder", DyingShardEncoder)
    out = tmp_path / "out"
    argv = ["encode", str(model_path), str(lake), "-o", str(out), "--engine", "ray"]
    started = time.monotonic()
    assert main([*argv, "--actors", "1"]) == 1
    assert time.monotonic() - started < 60
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("fusedae encode: error: an actor died encoding a shard, 3 times")
    assert not out.exists()


KILLED_SHARD_ROWS = 50_000  # in batches of 16 rows: a shard lasts about half a second


def test_a_killed_driver_is_finished_by_resume(
    cluster: str, tmp_path: Path, model_path: Path
) -> None:
    """The driver is killed while the actor writes a shard: the shards done are complete, the
    one in progress is not under its name, and ``--resume`` (a new driver) does the rest."""
    shards = {f"part-{index}.parquet": KILLED_SHARD_ROWS for index in range(6)}
    lake = write_lake(tmp_path / "lake", shards, seed=3)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fusedae", "encode", model_path, lake, "-o", out]
    command += ["--engine", "ray", "--actors", "1", "--keep", "id"]
    environment = {**os.environ, "RAY_ADDRESS": cluster}
    process = subprocess.Popen(
        [*map(str, command), "--batch-size", "16"], stderr=subprocess.PIPE, env=environment
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")):  # once a shard is done, in the middle of one
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    finished = list(out.glob("part-*.parquet"))
    assert 1 <= len(finished) < 6
    for shard in finished:
        assert pq.read_metadata(shard).num_rows == KILLED_SHARD_ROWS

    result = subprocess.run(
        [*map(str, command), "--resume"], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    assert every_file(out) == sorted(shards)  # no temporary file left either
    ids, codes = read_rows(output_shards(out), "codes")
    want_ids, x = read_rows(sorted(lake.glob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)
    assert_same_rows(codes, MLP.load(model_path, "encoder")(x))
