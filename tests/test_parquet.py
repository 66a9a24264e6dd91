"""``fusedae encode`` on Parquet: shards in, one output shard each, row for row equal to
``fusedae.MLP``, resumable after an interruption, in bounded memory."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from _lake import assert_same_rows, every_file, list_column, output_shards, read_rows
from fusedae import MLP
from fusedae.cli import CommandError, build_parser, main, parquet
from fusedae.cli.common import CHUNK_BYTES

pa = pytest.importorskip(
    "pyarrow", reason="Parquet needs the extra: pip install 'fusedae[parquet]'"
)
pq = pytest.importorskip("pyarrow.parquet")

WIDTH = 10  # values a row
# Rows per shard, the empty one included, and how each stores its rows.
SHARDS = {
    "part-0.parquet": (1000, "fixed_size_list"),
    "part-1.parquet": (0, "fixed_size_list"),
    "nested/part-2.parquet": (2501, "list"),
    "nested/part-3.parquet": (777, "large_list"),
}
ROW_GROUP_ROWS = 700  # not a multiple of the batch sizes the tests use: partial batches


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 -> 42 -> 3 -> 42 -> 10 autoencoder; its encoder is the first two layers."""
    rng = np.random.default_rng(0)
    widths = [WIDTH, 42, 3, 42, WIDTH]
    layers = [
        (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.standard_normal(n_out))
        for n_in, n_out in itertools.pairwise(widths)
    ]
    path = tmp_path_factory.mktemp("model") / "ae.safetensors"
    MLP(layers, ["relu", "identity", "relu", "sigmoid"], dtype=np.float32).save(path)
    return path


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of rows with an ``id`` column numbering them across shards and a ``label``."""
    root = tmp_path_factory.mktemp("lake")
    rng = np.random.default_rng(1)
    first = 0
    for name, (rows, kind) in SHARDS.items():
        x = rng.standard_normal((rows, WIDTH), dtype=np.float32)
        table = pa.table(
            {
                "id": np.arange(first, first + rows),
                "x": list_column(x, kind),
                "label": [f"row {i}" for i in range(first, first + rows)],
            }
        )
        (root / name).parent.mkdir(exist_ok=True)
        pq.write_table(table, root / name, row_group_size=ROW_GROUP_ROWS)
        first += rows
    return root


@pytest.mark.parametrize("batch_size", ["300", "4096", str(2**70)])  # (pyarrow's limit: 2^63)
def test_a_directory_of_shards_row_for_row(
    tmp_path: Path, model_path: Path, lake: Path, batch_size: str
) -> None:
    out = tmp_path / "codes"
    argv = ["encode", str(model_path), str(lake), "-o", str(out), "--batch-size", batch_size]
    status = main([*argv, "--keep", "id,label"])
    assert status == 0
    assert every_file(out) == sorted(SHARDS)
    ids, codes = read_rows(output_shards(out), "codes")
    want_ids, x = read_rows(sorted(lake.rglob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)  # every row, once
    assert_same_rows(codes, MLP.load(model_path, "encoder")(x))
    for name in SHARDS:
        table = pq.read_table(out / name)
        assert table.schema.names == ["id", "label", "codes"]
        assert table.schema.field("codes").type == pa.list_(pa.float32(), 3)
        assert table["label"].to_pylist() == [f"row {i}" for i in table["id"].to_pylist()]


def test_scalar_float64_columns_one_file_to_one_file(tmp_path: Path, model_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((333, WIDTH))
    names = [f"x{i}" for i in range(WIDTH)]
    source = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"key": np.arange(333), **dict(zip(names, x.T, strict=True))}), source)
    out = tmp_path / "out.parquet"
    argv = ["encode", str(model_path), str(source), "-o", str(out), "--columns", ",".join(names)]
    assert main([*argv, "--reconstruct", "--keep", "key"]) == 0
    table = pq.read_table(out)
    assert table.schema.names == ["key", "reconstructed"]
    assert table.schema.field("reconstructed").type == pa.list_(pa.float64(), WIDTH)
    got = table["reconstructed"].combine_chunks().flatten().to_numpy().reshape(333, WIDTH)
    want = MLP.load(model_path, "all", dtype=np.float64)(x)
    assert_same_rows(got, want)


def test_a_glob_of_shards_and_a_named_column(tmp_path: Path, model_path: Path, lake: Path) -> None:
    out = tmp_path / "out"
    pattern = str(lake / "nested" / "part-*.parquet")
    assert main(["encode", str(model_path), pattern, "-o", str(out), "--column", "x"]) == 0
    assert every_file(out) == ["part-2.parquet", "part-3.parquet"]
    assert pq.read_table(out / "part-3.parquet").schema.names == ["codes"]


def test_a_pattern_reaching_into_output_leaves_its_shards_out(
    tmp_path: Path, model_path: Path
) -> None:
    """``lake/**/*.parquet`` to ``lake/codes``: a rerun (``--resume``) matches the first run's
    output shards too, which are not inputs (read as such, they nested ``codes/codes`` or failed
    on a missing column)."""
    lake = tmp_path / "lake"
    (lake / "nested").mkdir(parents=True)
    x = np.random.default_rng(3).standard_normal((5, WIDTH), dtype=np.float32)
    for name in ("a.parquet", "nested/b.parquet"):
        pq.write_table(pa.table({"id": np.arange(5), "x": list_column(x, "list")}), lake / name)
    out = lake / "codes"
    argv = ["encode", str(model_path), str(lake / "**" / "*.parquet"), "-o", str(out)]
    for flags in (["--keep", "id"], ["--keep", "id", "--resume"]):
        assert main([*argv, *flags]) == 0
        assert every_file(out) == ["a.parquet", "nested/b.parquet"]
    with pytest.raises(CommandError, match=r"no Parquet files in .* outside OUTPUT"):
        parquet.plan_shards(out / "*.parquet", out)
    # An OUTPUT above the inputs holds them, but no rerun of the pattern reaches its shards.
    for pattern in (lake / "nested", lake / "nested" / "*.parquet", lake / "nested" / "b.parquet"):
        shards = parquet.plan_shards(pattern, lake)
        assert [(s.source, s.output) for s in shards] == [
            (lake / "nested/b.parquet", lake / "b.parquet")
        ]


ROW = [1.0] * WIDTH


@pytest.mark.parametrize(
    ("columns", "argv", "message"),
    [
        ({"x": [ROW], "y": [ROW]}, [], "it has list columns of floats ['x', 'y']"),
        ({"x": [[1] * WIDTH]}, [], "it has none"),
        ({"x": [ROW]}, ["--column", "y"], "has no column 'y'"),
        ({"x": [ROW[:-1]]}, [], "row 0 of column 'x' holds 9 values"),
        ({"x": [ROW, None]}, [], "the list of column 'x' in row 1 is null"),
        ({"x": [ROW, [*ROW[:-1], None]]}, [], "a value of column 'x' in row 1 is null"),
        (  # in a second batch: the row counted from the file's first
            {"x": [ROW] * 3 + [[None, *ROW[1:]]]},
            ["--batch-size", "2"],
            "a value of column 'x' in row 3 is null",
        ),
        ({"a": ["text"], "b": [1.0]}, ["--columns", "a,b"], "column 'a' is string"),
        ({"x": [ROW]}, ["--keep", "id"], "has no column 'id'"),
        ({"x": [ROW]}, ["--key", "x"], "--key picks an array of a .npz INPUT"),
        ({"x": [ROW]}, ["--keep", "codes"], "--keep names 'codes', the output column"),
        ({"a": [1.0], "b": [1.0]}, ["--columns", "a,b"], "hold rows of 2 values"),
    ],
    ids=[
        "two-list-columns",
        "ints",
        "missing",
        "short-row",
        "null-row",
        "null-value",
        "null-value-later",
        "string",
        "keep-missing",
        "key",
        "keep-output",
        "too-few-columns",
    ],
)
def test_bad_input_is_a_clear_error_and_nothing_is_written(
    tmp_path: Path,
    model_path: Path,
    capsys: pytest.CaptureFixture[str],
    columns: dict[str, list[object]],
    argv: list[str],
    message: str,
) -> None:
    source = tmp_path / "in" / "bad.parquet"
    source.parent.mkdir()
    pq.write_table(pa.table(columns), source)
    out = tmp_path / "out"
    assert main(["encode", str(model_path), str(source.parent), "-o", str(out), *argv]) == 1
    error = capsys.readouterr().err
    assert message in error, error
    assert not out.exists()  # not even an empty directory


def test_shards_that_disagree_fail_before_any_work(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    for name, dtype in (("a", np.float32), ("b", np.float64)):
        x = np.ones((4, WIDTH), dtype)
        pq.write_table(pa.table({"x": list_column(x, "list")}), lake / f"{name}.parquet")
    assert main(["encode", str(model_path), str(lake), "-o", str(tmp_path / "out")]) == 1
    assert "all shards must agree" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{lake}/inside", "is inside INPUT"),
        ("{tmp}/one.parquet", "OUTPUT must be a directory"),
        ("{tmp}/codes.npy", "Parquet INPUT is written as Parquet"),
        ("{tmp}/part-*", "is a pattern; name a directory or a .parquet file"),
    ],
)
def test_outputs_that_cannot_work(
    tmp_path: Path,
    model_path: Path,
    lake: Path,
    capsys: pytest.CaptureFixture[str],
    output: str,
    message: str,
) -> None:
    output = output.format(lake=lake, tmp=tmp_path)
    assert main(["encode", str(model_path), str(lake), "-o", output]) == 1
    assert message in capsys.readouterr().err


def test_not_parquet_and_nothing_to_read(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 but not really")
    assert main(["encode", str(model_path), str(garbage), "-o", str(tmp_path / "o")]) == 1
    assert f"cannot read {garbage} as Parquet" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["encode", str(model_path), str(empty), "-o", str(tmp_path / "o")]) == 1
    assert f"no Parquet files in {empty}" in capsys.readouterr().err
    pattern = str(tmp_path / "none-*.parquet")
    assert main(["encode", str(model_path), pattern, "-o", str(tmp_path / "o")]) == 1
    assert "no Parquet files in" in capsys.readouterr().err


def test_parquet_flags_on_npy_input_are_refused(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, WIDTH), np.float32))
    argv = ["encode", str(model_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "c.npy")]
    assert main([*argv, "--column", "x", "--keep", "id"]) == 1
    assert "--column, --keep: for Parquet INPUT" in capsys.readouterr().err


def test_an_interrupted_run_leaves_no_partial_shard_and_resume_finishes(
    tmp_path: Path, model_path: Path, lake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    argv = ["encode", str(model_path), str(lake), "-o", str(out), "--keep", "id"]
    batches = []
    real_batch_rows = parquet.batch_rows

    def interrupted(*args: object) -> np.ndarray:
        batches.append(args)
        # Shards in path order: nested/part-2 (9 batches), nested/part-3 (3), part-0, part-1.
        if len(batches) == 11:  # in nested/part-3, a batch of it done
            raise KeyboardInterrupt
        return real_batch_rows(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(parquet, "batch_rows", interrupted)
    assert main([*argv, "--batch-size", "300"]) == 128 + signal.SIGINT
    monkeypatch.undo()
    assert every_file(out) == ["nested/part-2.parquet"]  # the first in order, complete
    assert main(argv) == 1  # finished shards are not overwritten silently
    assert main([*argv, "--resume"]) == 0
    assert every_file(out) == sorted(SHARDS)
    ids, codes = read_rows(output_shards(out), "codes")
    want_ids, x = read_rows(sorted(lake.rglob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)
    assert_same_rows(codes, MLP.load(model_path, "encoder")(x))


@pytest.mark.parametrize(
    ("left_there", "flags", "message"),
    [
        ("not Parquet", [], "exists but is not a finished output shard"),
        ("codes", ["--reconstruct"], "is not this job's output"),  # another job's
        ("codes", ["--keep", "id,label"], "is not this job's output"),
        ("codes", ["--output-column", "z"], "is not this job's output"),
        ("first rows", [], "is not this job's output"),  # another input's, of fewer rows
    ],
)
def test_resume_skips_only_shards_this_job_finished(
    tmp_path: Path,
    model_path: Path,
    lake: Path,
    capsys: pytest.CaptureFixture[str],
    left_there: str,
    flags: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    argv = ["encode", str(model_path), str(lake), "-o", str(out), "--keep", "id"]
    assert main(argv) == 0
    shard = out / "part-0.parquet"
    if left_there == "not Parquet":
        shard.write_text("a file of the name only")
    elif left_there == "first rows":
        pq.write_table(pq.read_table(shard).slice(0, 10), shard)
    (out / "part-1.parquet").unlink()
    before = shard.read_bytes()
    assert main([*argv, *flags, "--resume"]) == 1
    assert message in capsys.readouterr().err
    assert shard.read_bytes() == before
    assert not (out / "part-1.parquet").exists()  # nothing done before the error


def test_resume_refuses_shards_another_model_wrote(
    tmp_path: Path, model_path: Path, lake: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shards of the job's schema and rows written by a retrained model (or from other rows of
    the input shard): --resume skipped them, status 0, their codes stale."""
    mlp = MLP.load(model_path)
    rng = np.random.default_rng(12)
    layers = [(w + 1e-2 * rng.standard_normal(w.shape), b) for w, b in mlp.layers]
    retrained = tmp_path / "next.safetensors"
    MLP(layers, list(mlp.activations), dtype=np.float32).save(retrained, encoder_layers=2)
    out = tmp_path / "out"
    argv = [str(lake), "-o", str(out), "--keep", "id"]
    assert main(["encode", str(retrained), *argv]) == 0
    (out / "part-1.parquet").unlink()
    before = (out / "part-0.parquet").read_bytes()
    assert main(["encode", str(model_path), *argv, "--resume"]) == 1
    assert "exists with this job's shape, but not its values" in capsys.readouterr().err
    assert (out / "part-0.parquet").read_bytes() == before
    assert not (out / "part-1.parquet").exists()  # nothing done before the error
    assert main(["encode", str(retrained), *argv, "--resume"]) == 0
    assert every_file(out) == sorted(SHARDS)
    # A null among the values of the job's own shard (a traceback from pyarrow's copy-free read).
    shard = pq.read_table(out / "part-0.parquet")
    codes = shard["codes"].combine_chunks()
    values = codes.flatten().to_numpy().copy()
    nulled = pa.array(values, mask=np.arange(values.size) == 1)
    field = shard.schema.field("codes")
    column = pa.FixedSizeListArray.from_arrays(nulled, codes.type.list_size).cast(field.type)
    pq.write_table(shard.set_column(1, field, column), out / "part-0.parquet")
    assert main(["encode", str(retrained), *argv, "--resume"]) == 1
    assert "exists with this job's shape, but not its values" in capsys.readouterr().err


def test_resume_finishes_the_missing_shards(tmp_path: Path, model_path: Path, lake: Path) -> None:
    out = tmp_path / "out"
    argv = ["encode", str(model_path), str(lake), "-o", str(out), "--keep", "id,label"]
    assert main([*argv, "--reconstruct"]) == 0
    finished = out / "part-0.parquet"
    before = finished.stat().st_mtime_ns
    (out / "nested" / "part-3.parquet").unlink()
    assert main([*argv, "--reconstruct", "--resume"]) == 0
    assert finished.stat().st_mtime_ns == before
    ids, rows = read_rows(output_shards(out), "reconstructed")
    want_ids, x = read_rows(sorted(lake.rglob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)
    assert_same_rows(rows, MLP.load(model_path, "all")(x))


def test_a_column_named_twice_is_a_clear_error(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "joined.parquet"
    x = list_column(np.ones((3, WIDTH), np.float32), "list")
    pq.write_table(pa.Table.from_arrays([x, x, pa.array([1, 2, 3])], ["x", "x", "id"]), source)
    argv = ["encode", str(model_path), str(source), "-o", str(tmp_path / "out.parquet")]
    for flags in ([], ["--column", "x"]):
        assert main([*argv, *flags]) == 1
        error = capsys.readouterr().err
        assert ("name the column" if not flags else "has 2 columns named 'x'") in error, error
    pq.write_table(pa.Table.from_arrays([x, pa.array([1, 2, 3])] * 2, ["x", "id"] * 2), source)
    assert main([*argv, "--column", "x", "--keep", "id"]) == 1
    assert "has 2 columns named" in capsys.readouterr().err
    assert not (tmp_path / "out.parquet").exists()


def test_paths_that_exist_are_not_patterns(tmp_path: Path, model_path: Path) -> None:
    """``x[1].parquet`` is that file, not the pattern matching ``x1.parquet`` beside it (which
    was encoded in its place, status 0); ``run[1]`` that directory."""
    rng = np.random.default_rng(4)
    for name, rows in (("x[1].parquet", 10), ("x1.parquet", 7), ("run[1]/a.parquet", 5)):
        x = rng.standard_normal((rows, WIDTH), dtype=np.float32)
        (tmp_path / name).parent.mkdir(exist_ok=True)
        pq.write_table(
            pa.table({"id": np.arange(rows), "x": list_column(x, "list")}), tmp_path / name
        )
    encoder = MLP.load(model_path, "encoder")
    for source, output, written in (
        ("x[1].parquet", "out", "out/x[1].parquet"),
        ("x[1].parquet", "one.parquet", "one.parquet"),
        ("run[1]", "run-out", "run-out/a.parquet"),
    ):
        argv = ["encode", str(model_path), str(tmp_path / source), "-o", str(tmp_path / output)]
        assert main([*argv, "--keep", "id"]) == 0
        read = tmp_path / source / "a.parquet" if source == "run[1]" else tmp_path / source
        _, x = read_rows([read], "x")
        assert_same_rows(read_rows([tmp_path / written], "codes")[1], encoder(x))
    pattern = str(tmp_path / "x*.parquet")  # a pattern is still one, where nothing has its name
    assert main(["encode", str(model_path), pattern, "-o", str(tmp_path / "both")]) == 0
    assert every_file(tmp_path / "both") == ["x1.parquet", "x[1].parquet"]


def test_a_directory_through_links_without_hidden_or_temporary_files(
    tmp_path: Path, model_path: Path
) -> None:
    """A partition linked into the dataset was left out (status 0, its rows missing), and a
    Spark job's ``_temporary`` partial files or ``.ipynb_checkpoints`` copies went in (rows
    twice): the files are those ``pyarrow.dataset`` reads (which goes round a cycle of links
    until the path is too long: here each directory is read once)."""
    rng = np.random.default_rng(5)
    lake, elsewhere = tmp_path / "lake", tmp_path / "elsewhere"
    names = ("a.parquet", "_temporary/0/a.parquet", ".ipynb_checkpoints/a.parquet", "_SUCCESS")
    for directory, name in [(lake, name) for name in names] + [(elsewhere, "b.parquet")]:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((4, WIDTH), dtype=np.float32)
        pq.write_table(
            pa.table({"id": np.arange(4), "x": list_column(x, "list")}), directory / name
        )
    (lake / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(lake, target_is_directory=True)  # a cycle: each once
    out = tmp_path / "out"
    assert main(["encode", str(model_path), str(lake), "-o", str(out)]) == 0
    assert every_file(out) == ["a.parquet", "linked/b.parquet"]
    assert pq.read_table(out).num_rows == 8


SHARD_ROWS = 50_000  # in batches of 16 rows: a shard lasts ~0.3 s


def test_a_killed_run_is_finished_by_resume(tmp_path: Path, model_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    rng = np.random.default_rng(3)
    for index in range(6):
        x = rng.standard_normal((SHARD_ROWS, WIDTH), dtype=np.float32)
        ids = np.arange(index * SHARD_ROWS, (index + 1) * SHARD_ROWS)
        table = pa.table({"id": ids, "x": list_column(x, "list")})
        pq.write_table(table, lake / f"part-{index}.parquet")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fusedae", "encode", model_path, lake, "-o", out]
    process = subprocess.Popen(
        [*map(str, command), "--batch-size", "16", "--keep", "id", "--threads", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(out.glob("part-*.parquet")):  # once a shard is done, in the middle of one
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.communicate(timeout=60)
    assert 1 <= len(list(out.glob("part-*.parquet"))) < 6
    result = subprocess.run(
        [*map(str, command), "--resume", "--keep", "id"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert every_file(out) == [f"part-{i}.parquet" for i in range(6)]
    ids, codes = read_rows(output_shards(out), "codes")
    want_ids, x = read_rows(sorted(lake.glob("*.parquet")), "x")
    np.testing.assert_array_equal(ids, want_ids)
    assert_same_rows(codes, MLP.load(model_path, "encoder")(x))


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(*command: object) -> float:
    """The peak RSS of ``command``, run from a small Python: a child's peak counts the memory of
    the process it was forked from."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, command)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) / 1024  # kilobytes on Linux


def test_memory_is_bounded_by_the_batch_and_row_group_not_the_file(tmp_path: Path) -> None:
    width, group = 784, 10_000  # row groups of 31 MB
    rng = np.random.default_rng(4)
    layers = [
        (rng.standard_normal((42, width), dtype=np.float32) / 28, np.zeros(42, np.float32)),
        (rng.standard_normal((16, 42), dtype=np.float32) / 7, np.zeros(16, np.float32)),
    ]
    MLP(layers, ["relu", "identity"]).save(tmp_path / "m.safetensors")
    chunk = pa.table(
        {"x": list_column(rng.standard_normal((group, width), np.float32), "fixed_size_list")}
    )
    peaks = {}
    for groups in (1, 12):  # 31 MB, then 376 MB
        source = tmp_path / f"in-{groups}.parquet"
        with pq.ParquetWriter(source, chunk.schema) as writer:
            for _ in range(groups):
                writer.write_table(chunk)
        command = [sys.executable, "-m", "fusedae", "encode", tmp_path / "m.safetensors", source]
        peaks[groups] = peak_rss_mib(*command, "-o", tmp_path / f"out-{groups}.parquet")
        assert pq.read_metadata(tmp_path / f"out-{groups}.parquet").num_rows == groups * group
    # pyarrow's default read (pre-buffered) would hold the whole file, 345 MiB more. Its
    # allocator's pools still grow a little over the row groups (about 60 MiB here, as when
    # pyarrow reads the file alone).
    file_growth = (11 * group * width * 4) / 2**20
    message = f"peak RSS {peaks[1]:.0f} MiB on one row group, {peaks[12]:.0f} on 12"
    assert peaks[12] - peaks[1] < file_growth / 4, message


def test_batches_are_sized_by_the_wider_rows_in_their_own_dtypes(
    tmp_path: Path, model_path: Path
) -> None:
    """About ``CHUNK_BYTES`` of input or output a batch, whichever rows are wider: sized by
    the 3-value codes alone, a decode's batch held 3.3x as many bytes of output (2 -> 784: 98x,
    6.6 GB a batch); and the input's rows in their own dtype (float64 rows into a bf16 model
    were counted at 4 bytes a value: 32 MiB a batch)."""
    rng = np.random.default_rng(5)
    codes, wide = tmp_path / "codes.parquet", tmp_path / "wide.parquet"
    rows = rng.standard_normal((10, 3), dtype=np.float32)
    pq.write_table(pa.table({"x": list_column(rows, "fixed_size_list")}), codes)
    pq.write_table(pa.table({"x": list_column(rng.standard_normal((10, WIDTH)), "list")}), wide)
    cases = [
        (codes, ["--decode"], "decoder", None, WIDTH * 4),
        (wide, ["--precision", "bf16"], "encoder", "bf16", WIDTH * 8),
    ]
    for source, flags, part, precision, row_bytes in cases:
        argv = ["encode", str(model_path), str(source), "-o", str(tmp_path / "out"), *flags]
        job = parquet.plan(
            build_parser().parse_args(argv),
            lambda _, part=part, precision=precision: MLP.load(
                model_path, part, precision=precision
            ),
        )
        assert job.batch_size == CHUNK_BYTES // row_bytes, flags


FUZZ_FINDINGS = Path(__file__).parent / "data" / "fuzz_findings" / "parquet"


@pytest.mark.parametrize("finding", sorted(FUZZ_FINDINGS.iterdir()), ids=lambda path: path.name)
def test_shards_the_fuzzer_found_are_clear_errors(
    tmp_path: Path, finding: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each once got through as something else: a column name that is not UTF-8 raised
    pyarrow's UnicodeDecodeError; a footer promising more rows than its row groups hold wrote
    an output shard with fewer rows than the input (fuzz/python/fuzz_parquet.py's model)."""
    source = tmp_path / "in" / "x.parquet"
    source.parent.mkdir()
    source.write_bytes(finding.read_bytes())
    rng = np.random.default_rng(0)
    MLP([(rng.standard_normal((3, 4)), np.zeros(3))], ["identity"]).save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    argv = ["encode", str(tmp_path / "m.safetensors"), str(source.parent), "-o", str(out)]
    assert main(argv) == 1
    assert f"cannot read {source}" in capsys.readouterr().err
    assert not out.exists() or every_file(out) == []


def run_without_thread_settings(
    *command: object, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``command`` with no *_NUM_THREADS variable but those of ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.endswith("NUM_THREADS")}
    return subprocess.run(
        list(map(str, command)),
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **env},
        check=False,
    )


@pytest.mark.parametrize("env", [{}, {"FUSEDAE_NUM_THREADS": "2"}], ids=["default", "set"])
def test_a_cpu_is_left_to_the_reader_unless_threads_are_set(
    tmp_path: Path, model_path: Path, lake: Path, env: dict[str, str]
) -> None:
    probe = "import fusedae; print(fusedae.get_num_threads())"
    cpus = int(run_without_thread_settings(sys.executable, "-c", probe, env={}).stdout)
    threads = int(env["FUSEDAE_NUM_THREADS"]) if env else max(1, cpus - 1)
    command = [sys.executable, "-m", "fusedae", "encode", model_path, lake, "-o", tmp_path / "o"]
    result = run_without_thread_settings(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert f"({threads} kernel thread" in result.stdout


def test_read_ahead_keeps_order_raises_in_order_and_stops_with_its_consumer() -> None:
    def items() -> Iterator[int]:
        yield from range(5)
        raise CommandError("the source broke")

    got: list[int] = []
    with pytest.raises(CommandError, match="the source broke"):
        got.extend(parquet.read_ahead(items(), depth=2))
    assert got == list(range(5))

    endless = itertools.count()
    reader = parquet.read_ahead(endless, depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # as when the consumer fails or is interrupted: the thread ends with it
    assert not [t for t in threading.enumerate() if t.name == "fusedae-parquet-reader"]
    assert next(endless) <= 3 + 2 + 1  # it read at most its depth ahead (and one in hand)
