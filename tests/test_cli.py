"""The ``fusedae`` command, run in subprocesses as a user would."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _seed import AE
from fusedae import MLP

BIG_ROWS = 1_250_000  # x 64 float32 = 320 MB


def fusedae(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m fusedae ARGS``; never raises on a non-zero exit."""
    command = [sys.executable, "-m", "fusedae", *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An autoencoder 64 -> 42 -> 2 -> 42 -> 64 whose encoder is its first two layers."""
    rng = np.random.default_rng(1)
    widths = [64, 42, 2, 42, 64]
    layers = [
        (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.standard_normal(n_out))
        for n_in, n_out in itertools.pairwise(widths)
    ]
    path = tmp_path_factory.mktemp("model") / "ae.safetensors"
    MLP(layers, ["relu", "identity", "relu", "identity"], dtype=np.float32).save(path)
    return path


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320 MB .npy of (BIG_ROWS, 64) float32, written in chunks."""
    path = tmp_path_factory.mktemp("big") / "big.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(BIG_ROWS, 64))
    rng = np.random.default_rng(2)
    chunk = rng.standard_normal((50_000, 64), dtype=np.float32)
    for start in range(0, BIG_ROWS, len(chunk)):
        array[start : start + len(chunk)] = chunk[: BIG_ROWS - start]
    array.flush()
    del array
    return path


@pytest.mark.parametrize("command", [[], ["demo"], ["encode"], ["bench"], ["info"]])
def test_help(command: list[str]) -> None:
    result = fusedae(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {' '.join(['fusedae', *command])} ")


def test_info_and_console_script() -> None:
    result = fusedae("info")
    assert result.returncode == 0, result.stderr
    assert "version:" in result.stdout
    assert "isa:" in result.stdout
    script = shutil.which("fusedae", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the fusedae console script is not installed beside this python")
    installed = subprocess.run([script, "info"], capture_output=True, text=True, check=False)
    assert installed.stdout == result.stdout


@pytest.mark.parametrize(
    ("flags", "part", "in_features"),
    [([], "encoder", 64), (["--decode"], "decoder", 2), (["--reconstruct"], "all", 64)],
    ids=["encode", "decode", "reconstruct"],
)
def test_encode_matches_mlp(
    tmp_path: Path, model_path: Path, flags: list[str], part: str, in_features: int
) -> None:
    x = np.random.default_rng(3).standard_normal((1000, in_features), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "out.npy"
    result = fusedae(
        "encode", model_path, tmp_path / "x.npy", "-o", output, "--batch-size", 96, *flags
    )
    assert result.returncode == 0, result.stderr
    expected = MLP.load(model_path, part)(x)
    np.testing.assert_allclose(np.load(output), expected, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "x.npy"]


def test_encode_npz_float64_3d(tmp_path: Path, model_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((4, 25, 64))
    np.savez(tmp_path / "data.npz", labels=np.arange(4), x=x)
    output = tmp_path / "codes.npy"
    result = fusedae(
        "encode", model_path, tmp_path / "data.npz", "--key", "x", "-o", output, "--threads", 1
    )
    assert result.returncode == 0, result.stderr
    codes = np.load(output)
    assert (codes.shape, codes.dtype) == ((4, 25, 2), np.float64)
    np.testing.assert_allclose(codes, MLP.load(model_path, "encoder", dtype=np.float64)(x))


def test_encode_pytorch_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AE(64, 2)
    torch.save(model.state_dict(), tmp_path / "ae.pt")
    x = np.random.default_rng(5).standard_normal((500, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    result = fusedae("encode", tmp_path / "ae.pt", tmp_path / "x.npy", "-o", tmp_path / "z.npy")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = model.encoder(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make_input", "flags", "message"),
    [
        (
            lambda path: np.save(path, np.zeros((10, 63), np.float32)),
            [],
            "x.npy has shape (10, 63), but the model's encoder (64 -> 42 -> 2) takes rows of 64 "
            "values: shape (..., 64)",
        ),
        (
            lambda path: np.save(path, np.zeros((10, 64), np.float32)),
            ["--decode"],
            "x.npy has shape (10, 64), but the model's decoder (2 -> 42 -> 64) takes rows of 2",
        ),
        (
            lambda path: np.save(path, np.zeros((10, 64), np.int64)),
            [],
            "x.npy holds int64 values; encode takes float32 or float64",
        ),
        (
            lambda path: path.write_bytes(np.lib.format.magic(1, 0) + b"garbage"),
            [],
            "x.npy is not a .npy file numpy can read",
        ),
        (
            lambda path: path.write_bytes(npy_bytes(np.zeros((10, 64), np.float32))[:-8]),
            [],
            "x.npy is truncated: its header promises (10, 64) float32 (2560 bytes) but it holds "
            "2552 bytes of data",
        ),
        (
            lambda path: np.save(path, np.asfortranarray(np.zeros((10, 64), np.float32))),
            [],
            "x.npy is stored in Fortran order",
        ),
    ],
)
def test_mismatched_input_fails_before_any_work(
    tmp_path: Path, model_path: Path, make_input, flags: list[str], message: str
) -> None:
    make_input(tmp_path / "x.npy")
    result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "out.npy", *flags)
    assert result.returncode == 1
    (line,) = error_lines(result)  # one line: no progress bar, so no work started
    assert line.startswith("fusedae encode: error: ")
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_bad_model_files(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    result = fusedae(
        "encode", tmp_path / "bad.safetensors", tmp_path / "x.npy", "-o", tmp_path / "o.npy"
    )
    assert result.returncode == 1
    assert "bad.safetensors: not a valid fusedae model file" in result.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = fusedae("encode", tmp_path / "bad.pt", tmp_path / "x.npy", "-o", tmp_path / "o.npy")
    assert result.returncode == 1
    assert "bad.pt: not a PyTorch checkpoint torch can load" in result.stderr


def test_refuses_to_overwrite_without_force(tmp_path: Path, model_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    output = tmp_path / "out.npy"
    output.write_text("keep me")
    result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", output)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"fusedae encode: error: {output} exists; pass --force to overwrite it"
    ]
    assert output.read_text() == "keep me"
    result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", output, "--force")
    assert result.returncode == 0, result.stderr
    assert np.load(output).shape == (5, 2)


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_encode_leaves_no_output(
    tmp_path: Path, model_path: Path, big_input: Path, signum: int
) -> None:
    output = tmp_path / "codes.npy"
    command = [sys.executable, "-m", "fusedae", "encode", model_path, big_input, "-o", output]
    process = subprocess.Popen(  # tiny chunks: the run lasts seconds
        [*map(str, command), "--batch-size", "8", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background job starts with SIGINT ignored, and so would the child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".codes.npy.*.tmp")):  # it has started writing
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "out_features"), [([], 2), (["--reconstruct"], 64)], ids=["encode", "reconstruct"]
)
def test_memory_stays_bounded_on_a_large_memory_mapped_input(
    tmp_path: Path, model_path: Path, big_input: Path, flags: list[str], out_features: int
) -> None:
    output = tmp_path / "out.npy"
    command = [sys.executable, "-m", "fusedae", "encode", model_path, big_input, "-o", output]
    # A child's peak RSS counts the memory of the process it was forked from, so the child is
    # started from a small Python rather than from this one.
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, command), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.split()[-1]) / 1024  # kilobytes on Linux
    input_mib = big_input.stat().st_size / 2**20
    # Python, numpy and fusedae take about 35 MiB; without releasing the pages already encoded
    # the peak would exceed the input's size.
    assert peak_mib < 100, f"peak RSS {peak_mib:.0f} MiB while encoding {input_mib:.0f} MiB"
    result = np.load(output, mmap_mode="r")
    assert result.shape == (BIG_ROWS, out_features)
    x = np.load(big_input, mmap_mode="r")
    mlp = MLP.load(model_path, "all" if flags else "encoder")
    for rows in (slice(0, 1000), slice(BIG_ROWS - 1000, BIG_ROWS)):
        np.testing.assert_allclose(result[rows], mlp(np.asarray(x[rows])), rtol=1e-6, atol=1e-6)


def test_bench_runs() -> None:
    result = fusedae("bench", "--widths", "32,16,4", "--batch", 64, "--rounds", 2, "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert "32 -> 16 -> 4, batch 64, float32, 1 thread" in result.stdout
    assert "\nfusedae " in result.stdout
    assert "\nPyTorch eager " in result.stdout


def test_demo_smoke(tmp_path: Path) -> None:
    result = fusedae("demo", "--epochs", 2, "--out-dir", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "max |diff|" in result.stdout
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {
        "codes.png",
        "reconstructions.png",
        "digits-ae.safetensors",
        "digits-ae.pt",
        "digits.npy",
    }
    for name in ("codes.png", "reconstructions.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert MLP.load(tmp_path / "out" / "digits-ae.safetensors", "encoder").out_features == 2
