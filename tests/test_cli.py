"""The ``fusedae`` command, run in subprocesses as a user would."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _seed import AE
from fusedae import MLP, _native
from fusedae.cli import CommandError, common, inputs, main, outputs

BIG_ROWS = 1_250_000  # x 64 float32 = 320 MB


def fusedae(
    *args: object, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m fusedae ARGS`` (with ``env`` added to the environment); never raises on
    a non-zero exit."""
    command = [sys.executable, "-m", "fusedae", *map(str, args)]
    return subprocess.run(
        command,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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


UNSUPPORTED_ISA = next(
    isa for isa in ("neon", "avx512", "avx2") if isa not in _native.available_isas()
)


@pytest.mark.parametrize("isa", ["bogus", UNSUPPORTED_ISA])
@pytest.mark.parametrize(
    "command", [["info"], ["encode", "model.safetensors", "x.npy", "-o", "y.npy"]]
)
def test_a_forced_isa_this_cpu_cannot_run_is_the_commands_error(
    command: list[str], isa: str
) -> None:
    """An unknown name, or an ISA this CPU lacks (it was a traceback from the first kernel
    call)."""
    result = fusedae(*command, env={"FUSEDAE_ISA": isa})
    assert result.returncode == 1
    assert result.stderr.startswith(f"fusedae {command[0]}: error: "), result.stderr
    assert isa in result.stderr
    assert "Traceback" not in result.stderr


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


@pytest.mark.parametrize("name", ["AE.SAFETENSORS", "ae.st"])
def test_a_safetensors_model_under_another_name(
    tmp_path: Path, model_path: Path, name: str
) -> None:
    """A ``.safetensors`` file is one by its first bytes too (it was read as a PyTorch
    checkpoint, which it is not)."""
    model = tmp_path / name
    shutil.copyfile(model_path, model)
    x = np.random.default_rng(3).standard_normal((10, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["encode", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), MLP.load(model_path, "encoder")(x))


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
    np.save(tmp_path / "x.npy", x)  # --key on a .npy was left unread without a word
    result = fusedae("encode", model_path, tmp_path / "x.npy", "--key", "x", "-o", output)
    assert error_lines(result) == [
        f"fusedae encode: error: --key picks an array of a .npz INPUT; {tmp_path / 'x.npy'} is "
        "not one"
    ]


def torch_forward(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def with_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with its BatchNorms' statistics and affine parameters random."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                if module.affine:
                    module.weight.uniform_(0.5, 2)
                    module.bias.uniform_(-1, 1)
    return model.eval()


def test_bare_state_dict_is_refused_and_nothing_written(tmp_path: Path) -> None:
    torch.save(AE(64, 2).state_dict(), tmp_path / "ae.pt")
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    result = fusedae("encode", tmp_path / "ae.pt", tmp_path / "x.npy", "-o", tmp_path / "z.npy")
    assert result.returncode == 1
    message = result.stderr
    assert message.startswith(
        f"fusedae encode: error: {tmp_path / 'ae.pt'} is a bare state_dict: it holds the tensors"
    )
    for line in [
        "    encoder.0 (Linear 64 -> 42)",
        "    decoder.2 (Linear 42 -> 64)",
        "but not the activations between them, and fusedae does not guess them. Either:",
        "      --layers 'linear,ACT,linear,ACT,linear,ACT,linear,ACT'",
        f"      fusedae.torch.save(model, '{tmp_path / 'ae.safetensors'}')",
    ]:
        assert f"{line}\n" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae.pt", "x.npy"]


def test_checkpoints_of_other_tensors_or_layouts_are_clear_errors(tmp_path: Path) -> None:
    """Meta, sparse and quantized tensors (and a whole module on the meta device) were
    tracebacks; a training checkpoint holding the state_dict under a key said only "got
    dict" (a tester's)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = model.state_dict()
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    cases = {
        "meta": ({k: torch.empty_like(v, device="meta") for k, v in state.items()}, "a meta"),
        "sparse": ({**state, "0.weight": state["0.weight"].to_sparse()}, "a sparse_coo tensor"),
        "checkpoint": ({"model": state, "epoch": 3}, "save that alone: torch.save(checkpoint"),
        "module": (copy.deepcopy(model).to("meta"), "meta"),
    }
    for name, (saved, message) in cases.items():
        torch.save(saved, tmp_path / f"{name}.pt")
        result = fusedae(
            "encode",
            tmp_path / f"{name}.pt",
            tmp_path / "x.npy",
            "-o",
            tmp_path / "z.npy",
            *(["--trust-pickle"] if name == "module" else ["--layers", "linear,relu,linear"]),
        )
        assert result.returncode == 1, name
        assert "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr, result.stderr


def test_encode_state_dict_with_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AE(64, 2)
    torch.save(model.state_dict(), tmp_path / "ae.pt")
    x = np.random.default_rng(5).standard_normal((500, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    layers = ["--layers", "linear,relu,linear,linear,relu,linear"]
    result = fusedae(
        "encode", tmp_path / "ae.pt", tmp_path / "x.npy", "-o", tmp_path / "z.npy", *layers
    )
    assert result.returncode == 0, result.stderr
    expected = torch_forward(model.encoder, x)  # the encoder: the modules named encoder
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected, rtol=1e-5, atol=1e-6)


LAYERED_MODELS = {
    "relu and batchnorm": (
        lambda: torch.nn.Sequential(
            torch.nn.BatchNorm1d(12),
            torch.nn.Linear(12, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(16, 8, bias=False),
            torch.nn.ReLU(),
            torch.nn.BatchNorm1d(8, eps=1e-3, affine=False),
            torch.nn.Linear(8, 4),
        ),
        "batchnorm(12),linear(12,16),batchnorm,relu,dropout(0.5),linear,relu,"
        "batchnorm(eps=0.001),linear",
    ),
    "activations with parameters": (
        lambda: torch.nn.Sequential(
            torch.nn.Linear(12, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Linear(16, 8),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(8, 8),
            torch.nn.Hardtanh(0.0, 6.0),
            torch.nn.Linear(8, 6),
            torch.nn.ELU(0.5),
            torch.nn.Linear(6, 4),
            torch.nn.Softplus(2.0, 10.0),
        ),
        "linear,batchnorm,leaky_relu(0.2),linear,gelu_tanh,linear,hardtanh(min_val=0,max_val=6),"
        "linear,elu(alpha=0.5),linear,softplus(2,10)",
    ),
}


@pytest.mark.parametrize("name", LAYERED_MODELS)
def test_layers_run_like_the_torch_model(tmp_path: Path, name: str) -> None:
    build, layers = LAYERED_MODELS[name]
    torch.manual_seed(1)
    model = with_statistics(build())
    torch.save(model.state_dict(), tmp_path / "model.pth")
    x = np.random.default_rng(6).standard_normal((300, 12), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "out.npy"
    result = fusedae(
        "encode", tmp_path / "model.pth", tmp_path / "x.npy", "-o", output, "--layers", layers
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(output), torch_forward(model, x), rtol=1e-4, atol=1e-5)


BAD_LAYERS = {
    "too few": (
        "linear,relu,linear",
        "--layers names 2 modules with tensors (linear and batchnorm items), but the "
        "state_dict holds 3, in order:\n  0 (Linear 8 -> 6)\n  1 (BatchNorm1d 6)\n"
        "  3 (Linear 6 -> 2)",
    ),
    "wrong kind": (
        "linear,linear,relu,linear",
        "--layers item 2 (linear) is a linear, but the module it takes is 1 (BatchNorm1d 6)",
    ),
    "wrong shape": (
        "linear(8,5),batchnorm,relu,linear",
        "--layers item 1 (linear(8,5)) gives out_features=5, but the module it takes is "
        "0 (Linear 8 -> 6)",
    ),
    "unknown activation": ("linear,batchnorm,swish,linear", "unknown name 'swish'"),
    "bad parameter": (
        "linear,batchnorm,leaky_relu(0.2,0.3),linear",
        "--layers item 3 (leaky_relu(0.2,0.3)): takes at most 1 arguments (negative_slope)",
    ),
}


@pytest.mark.parametrize("name", BAD_LAYERS)
def test_bad_layers_name_the_item(tmp_path: Path, name: str) -> None:
    layers, message = BAD_LAYERS[name]
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2)
    )
    torch.save(model.state_dict(), tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", np.zeros((3, 8), np.float32))
    result = fusedae(
        "encode",
        tmp_path / "m.pt",
        tmp_path / "x.npy",
        "-o",
        tmp_path / "o.npy",
        "--layers",
        layers,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"fusedae encode: error: {tmp_path / 'm.pt'}: ")
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "x.npy"]


def test_layers_is_for_state_dicts_only(tmp_path: Path, model_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    result = fusedae(
        "encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "o.npy", "--layers", "linear"
    )
    assert result.returncode == 1
    assert "which records its layers; --layers and --trust-pickle are for PyTorch" in result.stderr


def test_pickled_module_needs_trust_pickle(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = with_statistics(
        torch.nn.Sequential(
            torch.nn.Linear(10, 8),
            torch.nn.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 3),
            torch.nn.Sigmoid(),
        )
    )
    torch.save(model, tmp_path / "model.pt")
    x = np.random.default_rng(7).standard_normal((200, 10), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "out.npy"
    command = ["encode", tmp_path / "model.pt", tmp_path / "x.npy", "-o", output]
    refused = fusedae(*command)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f"fusedae encode: error: {tmp_path / 'model.pt'} pickles Python objects "
        "(torch.nn.modules.container.Sequential, torch.nn.modules.linear.Linear, "
    )
    assert "torch.load(weights_only=True) refuses" in refused.stderr
    assert "If you trust the file, pass --trust-pickle" in refused.stderr
    assert not output.exists()
    result = fusedae(*command, "--trust-pickle")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(output), torch_forward(model, x), rtol=1e-5, atol=1e-6)
    with_layers = fusedae(*command, "--force", "--trust-pickle", "--layers", "linear")
    assert with_layers.returncode == 1
    assert "pickles a whole Sequential, whose layers fusedae reads" in with_layers.stderr


def test_trusted_pickle_of_a_module_that_is_not_a_chain(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(dim=1))
    torch.save(model, tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    result = fusedae(
        "encode",
        tmp_path / "model.pt",
        tmp_path / "x.npy",
        "-o",
        tmp_path / "o.npy",
        "--trust-pickle",
    )
    assert result.returncode == 1
    assert "the model is not one chain: fusedae cannot fuse 1 (Softmax) into it" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "x.npy"]


def test_trusted_pickle_needs_the_classes_it_names(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = AE(16, 2)  # tests/_seed.py: importable here, not in the command's process
    torch.save(model, tmp_path / "ae.pt")
    x = np.random.default_rng(8).standard_normal((50, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    command = ["encode", tmp_path / "ae.pt", tmp_path / "x.npy", "-o", tmp_path / "z.npy"]
    result = fusedae(*command, "--trust-pickle")
    assert result.returncode == 1
    assert "unpickling it needs the code that defined its classes" in result.stderr
    assert "No module named '_seed'" in result.stderr
    tests = str(Path(__file__).parent)
    result = fusedae(*command, "--trust-pickle", env={"PYTHONPATH": tests})
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "z.npy"), torch_forward(model.encoder, x), rtol=1e-5, atol=1e-6
    )


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
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 a damaged archive")
    result = fusedae("encode", tmp_path / "bad.pt", tmp_path / "x.npy", "-o", tmp_path / "o.npy")
    assert result.returncode == 1
    assert "bad.pt: not a PyTorch checkpoint torch can load" in result.stderr
    # Not even a checkpoint's start: torch's advice to unpickle it in full would mislead.
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = fusedae("encode", tmp_path / "bad.pt", tmp_path / "x.npy", "-o", tmp_path / "o.npy")
    assert "bad.pt is not a PyTorch checkpoint (torch.save writes a zip" in result.stderr
    assert "weights_only" not in result.stderr


def test_refuses_to_overwrite_without_force(tmp_path: Path, model_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    output = tmp_path / "out.npy"
    output.write_text("keep me")
    result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", output)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"fusedae encode: error: {output} exists; pass --force to overwrite it, or --resume"
    ]
    assert output.read_text() == "keep me"
    result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", output, "--force")
    assert result.returncode == 0, result.stderr
    assert np.load(output).shape == (5, 2)
    directory = tmp_path / "d.npy"
    directory.mkdir()
    for flag in ("--force", "--resume"):  # refused before the work, not after it
        result = fusedae("encode", model_path, tmp_path / "x.npy", "-o", directory, flag)
        assert error_lines(result) == [
            f"fusedae encode: error: OUTPUT {directory} is a directory; name a .npy file"
        ]


def test_resume_checks_the_job_before_it_finds_nothing_to_do(
    tmp_path: Path, model_path: Path
) -> None:
    """An existing OUTPUT is complete (its name says so), but it must be this job's: the model
    and INPUT are checked as for a run, and OUTPUT must have the job's shape and dtype."""
    np.save(tmp_path / "x.npy", np.zeros((5, 64), np.float32))
    output = tmp_path / "out.npy"
    argv = ["encode", model_path, tmp_path / "x.npy", "-o", output, "--resume"]
    assert fusedae(*argv).returncode == 0
    finished = output.read_bytes()
    result = fusedae(*argv)
    assert result.returncode == 0, result.stderr
    assert "exists (it is complete): nothing to do" in result.stdout
    assert output.read_bytes() == finished
    np.save(output, np.zeros((4, 2), np.float32))
    assert error_lines(fusedae(*argv)) == [
        f"fusedae encode: error: --resume: {output} exists with shape (4, 2) float32, but this "
        "job writes (5, 2) float32: it is not this job's output (--force overwrites it)"
    ]
    output.write_text("not an array")
    assert "exists but is no .npy" in fusedae(*argv).stderr
    # A header numpy's dtype parser raises SyntaxError on (found by the .npy fuzzer).
    output.write_bytes(
        (FUZZ_FINDINGS / "npy" / "SyntaxError-at-ast.py-50-inputs.py-69").read_bytes()
    )
    result = fusedae(*argv)
    assert result.returncode == 1, result.stderr
    assert "exists but is no .npy" in result.stderr
    output.write_text("not an array")
    result = fusedae("encode", model_path, tmp_path / "missing.npy", "-o", output, "--resume")
    assert result.returncode == 1
    assert output.read_text() == "not an array"


def retrained(model_path: Path, path: Path, scale: float = 1e-2) -> Path:
    """``model_path``'s model with every weight moved by about ``scale``, saved to ``path``: what
    a few more training steps make."""
    mlp = MLP.load(model_path)
    rng = np.random.default_rng(11)
    layers = [(w + scale * rng.standard_normal(w.shape), b) for w, b in mlp.layers]
    MLP(layers, list(mlp.activations), dtype=np.float32).save(path, encoder_layers=2)
    return path


def test_resume_refuses_another_jobs_output_of_the_same_shape(
    tmp_path: Path, model_path: Path
) -> None:
    """An OUTPUT of the job's shape and dtype written by a retrained model, at another
    precision or from other INPUT rows: --resume said "nothing to do", status 0, and the stale
    values stayed. Resumed on another ISA it is this job's output still."""
    x = np.random.default_rng(6).standard_normal((300, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "codes.npy"
    argv = ["encode", model_path, tmp_path / "x.npy", "-o", output, "--resume"]
    stale = "exists with this job's shape, but not its values"
    for other in (
        ["encode", retrained(model_path, tmp_path / "next.safetensors"), *argv[2:]],
        [*argv, "--precision", "int8"],
    ):
        output.unlink(missing_ok=True)
        assert fusedae(*other).returncode == 0
        written = output.read_bytes()
        result = fusedae(*argv)
        assert result.returncode == 1
        assert stale in result.stderr, result.stderr
        assert output.read_bytes() == written
    x[-1] += 1.0  # the last row changed since (the probe's rows include the first and last)
    np.save(tmp_path / "x.npy", x)
    assert stale in fusedae(*argv).stderr
    # One probe row of large values: it set the tolerance of every row, and a model whose code
    # layer's bias had moved by 0.5 passed.
    x[-1] = 1e4 * x[0]
    np.save(tmp_path / "x.npy", x)
    mlp = MLP.load(model_path)
    layers = mlp.layers
    layers[1] = (layers[1][0], layers[1][1] + 0.5)
    shifted = tmp_path / "shifted.safetensors"
    MLP(layers, list(mlp.activations), dtype=np.float32).save(shifted, encoder_layers=2)
    output.unlink()
    assert fusedae("encode", shifted, *argv[2:]).returncode == 0
    assert stale in fusedae(*argv).stderr
    output.unlink()
    assert fusedae(*argv, env={"FUSEDAE_ISA": "scalar"}).returncode == 0
    result = fusedae(*argv)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_resume_takes_this_jobs_output_from_any_isa_and_batch(tmp_path: Path, isa: str) -> None:
    """A standardization folded into the first layer (inputs about 1000, a bias of -1000 times
    the weights' sums): fp32's error is set by those magnitudes, not by the output's. A check
    against the outputs' scale refused this job's own output written on another ISA or in
    other batches (even on the same ISA)."""
    if isa not in _native.available_isas():
        pytest.skip(f"this CPU does not run {isa}")
    rng = np.random.default_rng(13)
    weight = (rng.standard_normal((64, 784)) / 28).astype(np.float32)
    bias = -(weight.astype(np.float64) @ np.full(784, 1000.0)).astype(np.float32)
    code = (rng.standard_normal((16, 64)) / 8).astype(np.float32)
    model = tmp_path / "folded.safetensors"
    MLP([(weight, bias), (code, None)], ["relu", "identity"]).save(model)
    np.save(tmp_path / "x.npy", (1000 + rng.standard_normal((3000, 784))).astype(np.float32))
    argv = ["encode", model, tmp_path / "x.npy", "-o", tmp_path / "codes.npy"]
    assert fusedae(*argv, "--batch-size", "1000", env={"FUSEDAE_ISA": isa}).returncode == 0
    result = fusedae(*argv, "--resume")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    # At 784 inputs a layer the worst-case bound let a bf16 job's output pass at fp32.
    (tmp_path / "codes.npy").unlink()
    bf16 = fusedae(*argv, "--precision", "bf16", env={"FUSEDAE_ISA": isa})
    assert bf16.returncode == 0, bf16.stderr
    assert "not its values" in fusedae(*argv, "--resume").stderr


def test_a_model_the_precision_cannot_hold_is_a_command_error(tmp_path: Path) -> None:
    """A NaN weight at int8, a weight beyond bf16's range: the packer's ValueError came out as
    a traceback. A zero-width layer in a file: a traceback from encode, and from MLP.load an
    error without the file's name."""
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    for value, precision, message in (
        (np.nan, "int8", "weight [0, 0] is NaN; precision int8 needs finite weights"),
        (3.4e38, "bf16", "precision bf16 holds at most"),
    ):
        weight = np.ones((3, 4), np.float32)
        weight[0, 0] = value
        model = tmp_path / f"{precision}.safetensors"
        MLP([(weight, None)], ["identity"]).save(model)
        argv = ["encode", model, tmp_path / "x.npy", "-o", tmp_path / "o.npy", "--force"]
        result = fusedae(*argv, "--precision", precision)
        assert result.returncode == 1
        (line,) = error_lines(result)
        assert line.startswith(f"fusedae encode: error: {model}: layer 0: ")
        assert message in line
    safetensors = pytest.importorskip("safetensors.numpy")
    metadata = {
        "format": "fusedae.chain",
        "format_version": "2",
        "encoder_layers": "1",
        "layers": '[{"post_op": "relu", "params": {}, "normalization": []}]',
    }
    model = tmp_path / "zero.safetensors"
    safetensors.save_file(
        {"layers.0.weight": np.zeros((3, 0), np.float32)}, str(model), metadata=metadata
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(str(model))}: .*widths must be at least 1"):
        MLP.load(model)
    result = fusedae("encode", model, tmp_path / "x.npy", "-o", tmp_path / "o.npy", "--force")
    assert result.returncode == 1
    assert len(error_lines(result)) == 1, result.stderr
    assert "widths must be at least 1" in result.stderr


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_resume_takes_this_jobs_non_finite_values(
    tmp_path: Path, model_path: Path, precision: str
) -> None:
    """Rows of NaN, of inf and of 3e38 (which overflows): where NaN and inf come out depends on
    the ISA (an inf input at int8: inf on avx2, NaN on avx512) and on the batch (a 3e38 row
    alone or among others); the check compared those places and refused the job's own output."""
    x = np.random.default_rng(8).standard_normal((101, 64)).astype(np.float32)
    x[0, 3], x[50, :] = np.nan, np.inf
    x[100, :] = 3e38  # the probe's last row, a batch of its own below
    np.save(tmp_path / "x.npy", x)
    argv = ["encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "o.npy"]
    argv += ["--precision", precision]
    written = fusedae(*argv, "--batch-size", "50", env={"FUSEDAE_ISA": "scalar"})
    assert written.returncode == 0, written.stderr
    result = fusedae(*argv, "--resume")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout


def test_output_that_is_the_input(tmp_path: Path, model_path: Path) -> None:
    """The input of a width-preserving part has the shape a finished output would have:
    ``--resume`` must not take it for one (it said "nothing to do", the input left as it was)."""
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    source = tmp_path / "x.npy"
    np.save(source, x)
    (tmp_path / "link.npy").symlink_to(source)
    for output in (source, tmp_path / "link.npy"):
        argv = ["encode", model_path, source, "-o", output, "--reconstruct"]
        assert error_lines(fusedae(*argv, "--resume")) == [
            f"fusedae encode: error: {output} is INPUT, not an output to resume: name another "
            "OUTPUT"
        ]
        assert "is INPUT; name another OUTPUT, or pass --force" in fusedae(*argv).stderr
        np.testing.assert_array_equal(np.load(source), x)
    result = fusedae("encode", model_path, source, "-o", source, "--reconstruct", "--force")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(source), MLP.load(model_path)(x))


def test_a_npy_named_like_a_pattern(tmp_path: Path, model_path: Path) -> None:
    """``rows[2024].npy`` is a .npy file (it was taken for a Parquet glob and refused)."""
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    np.save(tmp_path / "rows[2024].npy", x)
    output = tmp_path / "codes?.npy"
    result = fusedae("encode", model_path, tmp_path / "rows[2024].npy", "-o", output)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(output), MLP.load(model_path, "encoder")(x))
    for missing in ("missing[1].npy", "npy/*.npy"):  # (was "Parquet INPUT is written as Parquet")
        result = fusedae("encode", model_path, tmp_path / missing, "-o", output, "--force")
        assert "No such file or directory" in result.stderr
    directory = tmp_path / "shards.npy"  # a directory is Parquet shards, whatever its name
    directory.mkdir()
    result = fusedae("encode", model_path, directory, "-o", output, "--force")
    assert f"INPUT {directory} is read as Parquet (a .parquet file, a directory" in result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_a_progress_bar_that_cannot_be_written_stops_the_bar_not_the_job(
    tmp_path: Path, model_path: Path, stderr: str
) -> None:
    """stderr on a full disk (a log), or closed: tqdm's failed write ended the job (the output
    thrown away, and the error blamed OUTPUT)."""
    x = np.random.default_rng(4).standard_normal((300, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    command = [sys.executable, "-m", "fusedae", "encode", model_path, tmp_path / "x.npy"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*map(str, command), "-o", str(tmp_path / "codes.npy"), "--batch-size", "7"],
            stderr=full if stderr == "full" else None,
            stdout=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
            # (stderr closed: the child's descriptor 2 shut before it runs)
            preexec_fn=None if stderr == "full" else lambda: os.close(2),
        )
    assert result.returncode == 0
    assert "wrote" in result.stdout
    np.testing.assert_allclose(
        np.load(tmp_path / "codes.npy"), MLP.load(model_path, "encoder")(x), rtol=1e-5, atol=1e-6
    )


def test_a_summary_stdout_cannot_encode_is_escaped(tmp_path: Path, model_path: Path) -> None:
    """An OUTPUT name stdout's encoding lacks (``PYTHONIOENCODING=ascii``): the summary was
    dropped, and stdout sent to the null device, as if stdout had been closed."""
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    output = tmp_path / "codé.npy"
    result = fusedae(
        "encode", model_path, tmp_path / "x.npy", "-o", output, env={"PYTHONIOENCODING": "ascii"}
    )
    assert result.returncode == 0, result.stderr
    assert "cod\\xe9.npy" in result.stdout
    assert output.exists()


def test_a_progress_bar_in_a_log_is_a_line_per_redraw(tmp_path: Path, model_path: Path) -> None:
    """stderr to a file or a pipe (a batch scheduler's log, Ray's): the bar's redraws were one
    line, each begun with a carriage return, that a log shows whole."""
    np.save(tmp_path / "x.npy", np.zeros((300, 64), np.float32))
    result = fusedae(
        "encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "o.npy", "--batch-size", "7"
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) >= 2  # the bar at its start and at its end, at least
    assert all(re.match(r"\s*\d+%\|", line) for line in lines), lines
    assert lines[-1].startswith("100%|")


def test_a_progress_bar_in_a_log_redraws_every_30_seconds_on_lines_of_their_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tqdm's monitor thread redrew every 10 s (``maxinterval``) and a postfix on each call (a
    Parquet job of 40 small shards wrote 42 lines in a second); a bar's line was ended by the
    next redraw, so a warning meanwhile went on the bar's line."""
    bar = common.progress_bar(total=40, unit="row")
    assert (bar.mininterval, bar.maxinterval) == (30, 30)
    for shard in range(40):
        bar.set_postfix_str(f"shard {shard + 1}/40", refresh=False)
        bar.update(1)
    print("a warning", file=sys.stderr)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines  # the bar at its start, the warning, the bar at its end
    assert lines[1] == "a warning"
    assert lines[2].startswith("100%|")
    assert common.BestEffortStream._as_lines("\r 5%|a  \r10%|b   \n") == " 5%|a\n10%|b\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stdout", ["full", "closed pipe"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_summary_that_cannot_be_written_does_not_fail_the_job(
    tmp_path: Path, model_path: Path, stdout: str, resume: bool
) -> None:
    """stdout on a full disk, or a pipe whose reader is gone (``| head``): the summary printed
    after the output was in place failed the job, exit status 1 and "No space left on device"
    or "Broken pipe" (also for --resume's "nothing to do")."""
    x = np.random.default_rng(5).standard_normal((300, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "codes.npy"
    if resume:
        assert fusedae("encode", model_path, tmp_path / "x.npy", "-o", output).returncode == 0
    command = [sys.executable, "-m", "fusedae", "encode", model_path, tmp_path / "x.npy"]
    command += ["-o", output, *(["--resume"] if resume else [])]
    if stdout == "full":
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                list(map(str, command)),
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
                check=False,
            )
        returncode, stderr = result.returncode, result.stderr
    else:
        process = subprocess.Popen(
            list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # (the reader gone before the summary is written)
        stderr = process.stderr.read()
        returncode = process.wait(timeout=120)
    assert returncode == 0, stderr
    assert "error" not in stderr, stderr
    assert "Exception" not in stderr, stderr
    np.testing.assert_allclose(
        np.load(output), MLP.load(model_path, "encoder")(x), rtol=1e-5, atol=1e-6
    )


FUZZ_FINDINGS = Path(__file__).parent / "data" / "fuzz_findings"


@pytest.mark.parametrize(
    "finding", sorted((FUZZ_FINDINGS / "npy").iterdir()), ids=lambda path: path.name
)
def test_inputs_the_fuzzer_found_give_command_errors(tmp_path: Path, finding: Path) -> None:
    """Each once let another exception escape (numpy's TokenError, zipfile's NotImplementedError,
    an LZMAError, a MemoryError from a huge declared shape, ...): read as .npy and as .npz, only
    the documented CommandError may come out."""
    data = finding.read_bytes()
    for suffix in (".npy", ".npz"):
        path = tmp_path / f"x{suffix}"
        path.write_bytes(data)
        try:
            with contextlib.closing(inputs.open_rows(path, None)) as rows:
                if rows.shape and rows.shape[-1] > 0 and rows.rows:
                    rows.read(0, rows.rows)
        except CommandError:
            pass


def test_a_negative_dimension_is_refused(tmp_path: Path, model_path: Path) -> None:
    """numpy's header check lets (-2, -3, 64) through; 6 rows of data once gave exit status 0
    and an output numpy could not load."""
    x = tmp_path / "x.npy"
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -3, 64), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    x.write_bytes(
        b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(6 * 256)
    )
    result = fusedae("encode", model_path, x, "-o", tmp_path / "out.npy")
    assert result.returncode == 1
    assert error_lines(result) == [
        f"fusedae encode: error: {x} has a negative dimension in its shape (-2, -3, 64)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


@pytest.mark.parametrize("threads", ["1025", str(2**63)])
def test_too_many_threads_is_a_usage_error(tmp_path: Path, model_path: Path, threads: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    result = fusedae(
        "encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "o.npy", "--threads", threads
    )
    assert result.returncode == 2
    assert f"argument --threads: must be at most 1024, got {threads}" in result.stderr


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.parametrize(
    ("signum", "message"),
    [
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "stopped by SIGTERM"),
        (signal.SIGHUP, "stopped by SIGHUP"),  # (it left the temporary file, and said nothing)
    ],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_interrupted_encode_leaves_no_output(
    tmp_path: Path, model_path: Path, big_input: Path, signum: int, message: str
) -> None:
    process = start_encode(model_path, big_input, tmp_path / "codes.npy")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert list(tmp_path.iterdir()) == []
    assert stderr.strip().splitlines()[-1] == f"fusedae encode: {message}"


def test_nohup_keeps_encode_going(tmp_path: Path, model_path: Path) -> None:
    """``nohup`` starts the job with SIGHUP ignored, so that it outlives the terminal: catching
    SIGHUP regardless stopped it (status 129)."""
    x = np.random.default_rng(7).standard_normal((100_000, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    output = tmp_path / "codes.npy"
    process = start_encode(model_path, tmp_path / "x.npy", output, ignored=signal.SIGHUP)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    np.testing.assert_allclose(
        np.load(output), MLP.load(model_path, "encoder")(x), rtol=1e-5, atol=1e-6
    )


def test_main_puts_the_signal_handlers_back(tmp_path: Path, model_path: Path) -> None:
    """``main`` called in a process of its own (a test, a notebook) left SIGTERM and SIGHUP
    raising its exception after it returned."""
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    argv = ["encode", model_path, tmp_path / "x.npy", "-o", tmp_path / "o.npy"]
    assert main(list(map(str, argv))) == 0
    assert {signum: signal.getsignal(signum) for signum in before} == before


def start_encode(
    model: Path, x: Path, output: Path, ignored: signal.Signals | None = None
) -> subprocess.Popen[str]:
    """An encode of ``x`` in tiny chunks (it lasts seconds), once it has begun writing; started
    with the signal ``ignored`` ignored, as ``nohup`` starts a job with SIGHUP."""

    def set_signals() -> None:
        # A shell's background job starts with SIGINT ignored, and so would the child.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if ignored is not None:
            signal.signal(ignored, signal.SIG_IGN)

    command = [sys.executable, "-m", "fusedae", "encode", model, x, "-o", output]
    process = subprocess.Popen(
        [*map(str, command), "--batch-size", "8", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=set_signals,
    )
    temporary = output.with_name(f".{output.name}.{socket.gethostname()}.{process.pid}.tmp")
    deadline = time.monotonic() + 60
    while not temporary.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def test_temporary_files_of_other_hosts_stay(tmp_path: Path) -> None:
    """On storage several hosts share, a temporary file of another host may be a run still
    going there; one named before hosts were, with a dead process, is this host's orphan."""
    output = tmp_path / "codes.npy"
    dead = 4194305  # beyond PID_MAX_LIMIT: no process has it
    other_host = tmp_path / f".codes.npy.not-{socket.gethostname()}.{dead}.tmp"
    unnamed_host = tmp_path / f".codes.npy.{dead}.tmp"
    this_host = tmp_path / f".codes.npy.{socket.gethostname()}.{dead}.tmp"
    for path in (other_host, unnamed_host, this_host):
        path.write_bytes(b"")
    assert sorted(outputs.remove_orphaned_temporaries(output)) == sorted([unnamed_host, this_host])
    assert [p.name for p in tmp_path.iterdir()] == [other_host.name]


def test_the_next_run_removes_what_killed_runs_left(
    tmp_path: Path, model_path: Path, big_input: Path
) -> None:
    output = tmp_path / "codes.npy"
    for _ in range(8):  # each run removes what the one before it left
        process = start_encode(model_path, big_input, output)
        process.kill()
        process.communicate(timeout=60)
        orphans = list(tmp_path.glob(".codes.npy.*.tmp"))
        assert orphans == [output.with_name(f".codes.npy.{socket.gethostname()}.{process.pid}.tmp")]
    # A run still going keeps its file while another run for the same output finishes.
    going = start_encode(model_path, big_input, output)
    its_file = output.with_name(f".codes.npy.{socket.gethostname()}.{going.pid}.tmp")
    small = tmp_path / "small.npy"
    np.save(small, np.ones((3, 64), np.float32))
    result = fusedae("encode", model_path, small, "-o", output)
    assert result.returncode == 0, result.stderr
    assert "removed" not in result.stderr
    assert its_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["codes.npy", "small.npy", its_file.name]
    )
    going.terminate()
    _, stderr = going.communicate(timeout=60)
    assert f"removed {orphans[0]}, left by a run that was killed" in stderr
    assert np.load(output).shape == (3, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "small.npy"]


def test_input_truncated_while_being_read(tmp_path: Path, model_path: Path) -> None:
    x = tmp_path / "x.npy"
    rows = 400_000
    np.save(x, np.zeros((rows, 64), np.float32))
    output = tmp_path / "codes.npy"
    process = start_encode(model_path, x, output)
    # Under the read lease encode takes on Linux, this waits until encode has let go.
    os.truncate(x, x.stat().st_size // 2)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr  # an error, not SIGBUS
    if sys.platform == "linux":
        message = f"{x} was opened for writing by another process while being read (rows "
    else:
        message = f"{x} was truncated while being read: rows "
    assert f"fusedae encode: error: {message}" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


@pytest.mark.skipif(sys.platform != "linux", reason="read leases are Linux's")
def test_a_chunk_encoded_while_the_lease_breaks_is_not_trusted(tmp_path: Path) -> None:
    """A chunk is a view of the mapping: one encoded for longer than the lease's break time
    (45 s) had a writer change it under the kernel, and the rows went out, status 0 (a
    tester). The break is checked after each chunk is encoded, not only before the next."""
    x = tmp_path / "x.npy"
    np.save(x, np.ones((1000, 3)))
    with contextlib.closing(inputs.NpyRows(x)) as rows:
        rows.read(0, 1000)
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(x)!r}, 'r+b').close()"])
        deadline = time.monotonic() + 30
        error = None
        while error is None and time.monotonic() < deadline:  # until the break's signal comes
            try:
                rows.check_unchanged(0)
            except CommandError as raised:
                error = str(raised)
            time.sleep(0.01)
    writer.wait(timeout=60)
    assert error is not None
    assert error.startswith(f"{x} was opened for writing by another process while being read")


def test_each_chunk_is_checked_after_it_is_encoded_and_before_it_is_written(
    tmp_path: Path, model_path: Path
) -> None:
    """What ``write_rows`` asks of its source: whether the rows just encoded may have changed
    meanwhile (a lease broken during the chunk), before they go to the output."""
    checked: list[int] = []

    class Changing(inputs.ArrayRows):
        def check_unchanged(self, start: int) -> None:
            checked.append(start)
            if start == 4:
                raise CommandError("changed")

    source = Changing(np.ones((10, 64), np.float32))
    encoder = MLP.load(model_path, "encoder")
    with pytest.raises(CommandError, match="changed"):
        outputs.write_rows(encoder, source, tmp_path / "codes.npy", batch_size=4)
    assert checked == [0, 4]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "truncate",
            "{x} was truncated while being read: rows 600 to 700 of 1000 are no longer there",
        ),
        (
            "rewrite",
            "{x} was changed by another process while being read (rows 600 to 1000 may "
            "hold other values than the rows before)",
        ),
    ],
)
def test_reading_without_a_lease_sees_a_change(tmp_path: Path, change: str, message: str) -> None:
    """Where no lease is taken (here: off the main thread, which cannot take SIGIO), chunks are
    read: a truncated file gives a short read, and a rewrite in place that keeps the size (a
    producer filling a memmap: rows of the old and the new values came out, status 0, a
    tester's) a new modification time; each an error naming the file."""
    x = tmp_path / "x.npy"
    data = np.arange(1000 * 3, dtype=np.float64).reshape(1000, 3)
    np.save(x, data)
    outcome: list[object] = []

    def read() -> None:
        with contextlib.closing(inputs.NpyRows(x)) as rows:
            np.testing.assert_array_equal(rows.read(10, 20), data[10:20])
            if change == "truncate":
                os.truncate(x, x.stat().st_size - 8 * 3 * 500)
            else:
                time.sleep(0.05)  # past the file system clock's tick of the first read
                with open(x, "r+b") as file:
                    file.seek(-8 * 3 * 100, os.SEEK_END)
                    file.write(bytes(8 * 3 * 100))
            try:
                rows.read(600, 700)
            except CommandError as error:
                outcome.append(str(error))

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert outcome == [message.format(x=x)]


def encode_on_a_small_file_system(
    model: Path, x: Path, mount_options: str
) -> subprocess.CompletedProcess[str]:
    """``encode`` writing to ``/mnt/codes.npy`` on a tmpfs of its own (a private mount
    namespace), then the listing of that file system."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) (util-linux) for a private mount namespace")
    script = (
        f"mount -t tmpfs -o {mount_options} none /mnt || exit 99\n"
        f'"$@" -o /mnt/codes.npy; status=$?; ls -A /mnt; exit $status'
    )
    command = [sys.executable, "-m", "fusedae", "encode", model, x, "--batch-size", "100"]
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh", *map(str, command)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {result.stderr}")
    return result


@pytest.mark.parametrize(
    ("mount_options", "reason"),
    [("size=64k", "No space left on device"), ("ro", "Read-only file system")],
    ids=["full", "read-only"],
)
def test_a_file_system_that_refuses_the_output(
    tmp_path: Path, model_path: Path, mount_options: str, reason: str
) -> None:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((100_000, 64), np.float32))  # 800 kB of codes
    result = encode_on_a_small_file_system(model_path, x, mount_options)
    assert result.returncode == 1
    message = f"fusedae encode: error: cannot write /mnt/codes.npy: {reason}"
    assert error_lines(result)[-1] == message
    assert result.stdout == ""  # nothing left on the file system


@pytest.fixture(scope="module")
def big_codes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 MB .npy of (BIG_ROWS, 2) float32 codes, whose decoding is 320 MB."""
    path = tmp_path_factory.mktemp("codes") / "codes.npy"
    codes = np.random.default_rng(3).standard_normal((BIG_ROWS, 2), dtype=np.float32)
    np.save(path, codes)
    return path


@pytest.mark.parametrize(
    ("part", "out_features"),
    [("encoder", 2), ("all", 64), ("decoder", 64)],
    ids=["encode", "reconstruct", "decode"],
)
def test_memory_stays_bounded_on_a_large_input_or_output(
    request: pytest.FixtureRequest, tmp_path: Path, model_path: Path, part: str, out_features: int
) -> None:
    """Chunks of about 16 MiB of input or output, whichever rows are wider: a decode's 2-value
    input rows alone gave chunks of 2M rows, the whole 320 MB output at once."""
    flags = {"encoder": [], "all": ["--reconstruct"], "decoder": ["--decode"]}[part]
    big_input = request.getfixturevalue("big_codes" if part == "decoder" else "big_input")
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
    mlp = MLP.load(model_path, part)
    for rows in (slice(0, 1000), slice(BIG_ROWS - 1000, BIG_ROWS)):
        np.testing.assert_allclose(result[rows], mlp(np.asarray(x[rows])), rtol=1e-6, atol=1e-6)


def test_bench_runs() -> None:
    result = fusedae("bench", "--widths", "32,16,4", "--batch", 64, "--rounds", 2, "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert "32 -> 16 -> 4, batch 64, float32, 1 thread" in result.stdout
    assert "\nfusedae " in result.stdout
    assert "\nPyTorch eager " in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_demo_on_cuda_without_it_is_a_clear_error(tmp_path: Path) -> None:
    result = fusedae("demo", "--epochs", 1, "--out-dir", tmp_path / "out", "--device", "cuda")
    assert result.returncode == 1
    assert "--device cuda: this torch sees no CUDA device" in result.stderr
    assert "Traceback" not in result.stderr


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
