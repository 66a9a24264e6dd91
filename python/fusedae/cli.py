"""The ``fusedae`` command: ``demo``, ``encode``, ``bench`` and ``info``.

``info`` and ``encode`` with a ``.safetensors`` model need numpy only; torch, scikit-learn and
matplotlib are imported inside the subcommands that use them, when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import math
import mmap
import os
import pickletools
import signal
import statistics
import sys
import textwrap
import threading
import time
import tokenize
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import numpy as np

import fusedae
from fusedae import _native, _ops, _reference, serialization
from fusedae._ops import IDENTITY, OPS, RELU, PostOp, post_ops
from fusedae.chain import ChainSpec
from fusedae.mlp import MLP
from fusedae.state_dict import StateModule, from_state_dict, state_modules

if sys.platform != "win32":
    import fcntl

CHUNK_BYTES = 16 << 20  # input bytes per chunk when --batch-size is not given

ENCODE_HELP = """\
Runs a model over every row of INPUT and writes the results to OUTPUT (.npy).

MODEL is one of:
  * a .safetensors file written by fusedae.torch.save or fusedae.MLP.save: it records every
    layer, activation (with its parameters) and BatchNorm; needs numpy only;
  * a PyTorch state_dict (torch.save(model.state_dict(), path)), which needs torch and
    --layers: a state_dict holds the tensors of the Linear and BatchNorm layers but not the
    activations between them, and fusedae does not guess them;
  * a whole pickled nn.Module (torch.save(model, path)), which needs torch and
    --trust-pickle: loading it runs code from the file, so only for files you trust.

--layers spells the chain, in order, one comma-separated item per module, as a
nn.Sequential would list them:
  linear             the state_dict's next Linear; linear(IN,OUT) also checks its shape
  batchnorm          its next BatchNorm1d, in eval mode, with eps 1e-5 as in PyTorch;
                     batchnorm(N) checks its size, batchnorm(eps=0.001) sets eps
  ACTIVATION         applied after the Linear (and its BatchNorm) before it, one of
{activations}
                     (PyTorch's defaults shown; give parameters in order, leaky_relu(0.2),
                     or by name, hardtanh(min_val=0,max_val=6))
for example --layers 'linear,batchnorm,relu,linear,leaky_relu(0.2),linear,hardtanh(0,6)'.
The state_dict's modules are taken in the order it stores them (the order they were
registered, which is nn.Sequential's order); a module is a Linear if it holds weight (2-D)
and bias, a BatchNorm1d if it holds running_mean and running_var. Each item is checked
against the module it takes, and each Linear against the one before it. A dropout item (or
none: Dropout holds no tensors) does nothing, as in eval mode.

A model is one chain of layers with a mark where its encoder ends: after the modules named
encoder (then decoder), or, for a single chain, at its narrowest layer if its output is as
wide as its input, else at its end. By default the command runs the encoder (rows -> codes);
--decode runs the layers after the mark (codes -> outputs); --reconstruct runs them all.

INPUT is a .npy file (read a chunk at a time, so it may be larger than memory) or a .npz
file (--key picks an array), of float32 or float64 rows, shape (..., in_features); OUTPUT has
the input's dtype and shape (..., out_features). It is written to a temporary file in the same
directory and renamed at the end: an interrupted run leaves nothing under OUTPUT, and the
next run for OUTPUT removes what a killed run left (never the file of a run still going).
"""


def encode_help() -> str:
    """``ENCODE_HELP`` with the activations of the op table."""
    names = ", ".join(str(_ops.post_op(name)) for name in OPS)
    indent = " " * 21
    return ENCODE_HELP.format(
        activations=textwrap.fill(names, 91, initial_indent=indent, subsequent_indent=indent)
    )


class CommandError(Exception):
    """A failure reported on stderr after ``fusedae COMMAND: error:``, with exit status 1."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def thread_count(text: str) -> int:
    value = positive_int(text)
    if value > _native.MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {_native.MAX_THREADS}, got {value}")
    return value


def widths_list(text: str) -> list[int]:
    """``"784,42,16"`` -> ``[784, 42, 16]``."""
    try:
        widths = [positive_int(part) for part in text.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if len(widths) < 2:
        raise argparse.ArgumentTypeError(f"need at least two widths (in,out), got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedae",
        description="Fused SIMD CPU kernels for small MLPs and autoencoders.",
    )
    parser.add_argument("--version", action="version", version=f"fusedae {fusedae.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train the seed's autoencoder on handwritten digits and compare encoders",
        description=(
            "Trains the seed's AE (64 -> 42 -> 2 -> 42 -> 64) on scikit-learn's bundled 8x8 "
            "handwritten digits (1797 images, no download) with PyTorch, on CUDA when present; "
            "saves it; encodes the dataset with the fused kernels and with PyTorch; prints the "
            "timings and the largest difference; and draws the 2-D codes and some "
            "reconstructions. Needs torch, scikit-learn and matplotlib (pip install "
            "'fusedae[demo]')."
        ),
    )
    demo.add_argument(
        "--out-dir",
        type=Path,
        default=Path("demo-out"),
        help="where files go (default: %(default)s)",
    )
    demo.add_argument("--epochs", type=positive_int, default=200, help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    demo.add_argument(
        "--device", choices=("cpu", "cuda"), help="training device (default: cuda if available)"
    )
    demo.set_defaults(run=run_demo)

    encode = commands.add_parser(
        "encode",
        help="run a saved model over a .npy/.npz file",
        description=encode_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument(
        "model", metavar="MODEL", type=Path, help=".safetensors, state_dict or pickled module"
    )
    encode.add_argument("input", metavar="INPUT", type=Path, help=".npy or .npz")
    encode.add_argument("-o", "--output", required=True, type=Path, help="the .npy to write")
    part = encode.add_mutually_exclusive_group()
    part.add_argument("--decode", action="store_true", help="run the layers after the encoder")
    part.add_argument("--reconstruct", action="store_true", help="run every layer")
    encode.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"rows per chunk (default: about {CHUNK_BYTES >> 20} MiB of input)",
    )
    encode.add_argument(
        "--threads", type=thread_count, help="kernel threads (default: the CPUs available)"
    )
    encode.add_argument("--key", help="the array to read from a .npz holding several")
    encode.add_argument(
        "--layers",
        metavar="ITEMS",
        help="the chain of a state_dict MODEL, e.g. 'linear,relu,linear,sigmoid' (see above)",
    )
    encode.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a MODEL that pickles a whole nn.Module (runs code from the file)",
    )
    encode.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    encode.set_defaults(run=run_encode)

    bench = commands.add_parser(
        "bench",
        help="time fusedae against PyTorch eager (and ONNX Runtime) on one shape",
        description=(
            "Times one forward pass of a random Linear chain (ReLU between layers, none after "
            "the last) on a random batch: fusedae, PyTorch eager when torch is installed, ONNX "
            "Runtime when onnx and onnxruntime are. Rounds alternate between them; the median "
            "is reported, with the error against a float64 numpy reference."
        ),
    )
    bench.add_argument(
        "--widths",
        type=widths_list,
        default=[784, 42, 16],
        help="input width, then each layer's output width (default: 784,42,16)",
    )
    bench.add_argument("--batch", type=positive_int, default=4096, help="default: %(default)s")
    bench.add_argument(
        "--threads", type=thread_count, help="threads for every backend (default: fusedae's)"
    )
    bench.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="default: %(default)s"
    )
    bench.add_argument("--rounds", type=positive_int, default=15, help="default: %(default)s")
    bench.set_defaults(run=run_bench)

    info = commands.add_parser(
        "info",
        help="version, kernel ISA, threads and build",
        description="Prints fusedae.info(): version, ISA in use, ISAs available, threads, build.",
    )
    info.set_defaults(run=run_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, OSError) as error:
        print(f"fusedae {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fusedae {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def run_info(args: argparse.Namespace) -> None:
    for key, value in fusedae.info().items():
        text = ", ".join(value) if isinstance(value, list) else value
        print(f"{key + ':':16} {text}")


# --- encode -----------------------------------------------------------------------------------


def load_model(path: Path, layers: str | None, trust_pickle: bool) -> ChainSpec:
    """The chain in MODEL: a ``.safetensors`` file; a PyTorch state_dict spelled by ``layers``
    (``fusedae.state_dict``); or, with ``trust_pickle``, a pickled ``nn.Module``. The last two
    import torch."""
    if path.suffix == ".safetensors":
        if layers is not None or trust_pickle:
            raise CommandError(
                f"{path} records its own layers; --layers and --trust-pickle are for PyTorch "
                "checkpoints"
            )
        try:
            return serialization.read(path)
        except ValueError as error:
            raise CommandError(str(error)) from None
    try:
        import torch
    except ImportError:
        raise CommandError(
            f"{path} is not a .safetensors file, so it is read as a PyTorch checkpoint, which "
            "needs torch; install it, or convert the model once with fusedae.torch.save"
        ) from None
    loaded = load_checkpoint(path, trust_pickle)
    if isinstance(loaded, torch.nn.Module):
        if layers is not None:
            raise CommandError(
                f"{path} pickles a whole {type(loaded).__name__}, whose layers fusedae reads "
                "from the module itself; --layers is for a bare state_dict"
            )
        from fusedae.torch.saving import chain_spec

        try:
            return chain_spec(loaded)
        except (TypeError, ValueError) as error:
            raise CommandError(f"{path}: {error}") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CommandError(
            f"{path}: expected a state_dict (parameter names -> tensors) or an nn.Module, got "
            f"{type(loaded).__name__}"
        )
    arrays = {
        key: (
            value.detach()
            .to(torch.float64 if value.dtype == torch.float64 else torch.float32)
            .numpy()
            if value.is_floating_point()
            else value.detach().numpy()
        )
        for key, value in loaded.items()
    }
    try:
        if layers is None:
            modules = state_modules(arrays)
        else:
            return from_state_dict(arrays, layers)
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None
    raise CommandError(bare_state_dict_refusal(path, modules))


def load_checkpoint(path: Path, trust_pickle: bool) -> object:
    """What ``torch.save`` wrote to ``path``: unpickled in full with ``trust_pickle``, else by
    torch's weights-only unpickler, which refuses anything but tensors and plain containers."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except (AttributeError, ModuleNotFoundError) as error:  # only unpickling in full gets here
        raise CommandError(
            f"{path}: unpickling it needs the code that defined its classes ({error}); convert "
            "the model once where that code runs: fusedae.torch.save(model, "
            f"'{path.with_suffix('.safetensors').name}')"
        ) from None
    except Exception as error:  # torch.load raises many kinds, all meaning "cannot load it"
        names = [] if trust_pickle else pickled_names(path)
        if names:
            raise CommandError(
                f"{path} pickles Python objects ({', '.join(names)}), such as a whole "
                "nn.Module saved with torch.save(model), which torch.load(weights_only=True) "
                "refuses: unpickling runs code from the file. If you trust the file, pass "
                "--trust-pickle"
            ) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CommandError(
            f"{path}: not a PyTorch checkpoint torch can load ({type(error).__name__}: "
            f"{first_line})"
        ) from None


def pickled_names(path: Path) -> list[str]:
    """The classes and functions the pickle of a ``torch.save`` archive names, read without
    running it, leaving out those of every tensor and container (storages, rebuild functions,
    OrderedDict, builtins); empty if it is not such an archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return []
            data = archive.read(pickles[0])
        names = []
        strings: list[str] = []
        for opcode, argument, _ in pickletools.genops(data):
            if isinstance(argument, str):
                strings.append(argument)
            if opcode.name == "GLOBAL":
                names.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
    except (zipfile.BadZipFile, ValueError, OSError):
        return []
    tensor_parts = ("torch._utils.", "collections.OrderedDict", "Storage", "builtin")
    found = [name for name in dict.fromkeys(names) if not any(p in name for p in tensor_parts)]
    return found[:4] + ["..."] * (len(found) > 4)


def bare_state_dict_refusal(path: Path, modules: Sequence[StateModule]) -> str:
    """Why a state_dict without ``--layers`` is not run, and the two ways out."""
    listed = "\n".join(f"    {module}" for module in modules)
    skeleton = ",".join(
        "linear,ACT" if module.kind == "linear" else "batchnorm" for module in modules
    )
    converted = path.with_suffix(".safetensors")
    return (
        f"{path} is a bare state_dict: it holds the tensors of these modules, in order,\n"
        f"{listed}\n"
        "but not the activations between them, and fusedae does not guess them. Either:\n"
        "  * spell the chain with --layers, each ACT an activation or left out (see --help):\n"
        f"      --layers '{skeleton}'\n"
        "  * or convert the model once in Python, where its modules are known, and run that:\n"
        f"      fusedae.torch.save(model, '{converted}')"
    )


def check_float(path: Path, dtype: np.dtype) -> None:
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise CommandError(
            f"{path} holds {dtype} values; encode takes float32 or float64 "
            "(convert with x.astype(np.float32))"
        )


class NpyRows:
    """The rows of a C-order ``.npy`` file (its array flattened to 2-D), streamed with memory
    bounded by the chunk, not the file.

    Where Linux grants a read lease on the file, it is memory-mapped and the pages of rows done
    are dropped: no copy. A mapping's reader dies of SIGBUS when another process truncates the
    file; the lease prevents that: the kernel holds back whoever opens the file for writing
    (truncating it, say) for up to ``/proc/sys/fs/lease-break-time`` seconds (45 by default) and
    signals us (SIGIO), so the next chunk fails with an error naming the file and the lease goes
    with it. The chunk in flight was read before any change. Elsewhere (macOS, Windows, network
    file systems, a file someone else owns or is writing), chunks are read into one reused
    buffer, which costs a copy (0.5 s a 3 GB file on a 2-core VM) and a short read says the file
    was truncated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close(), after the last read)
        try:
            self.shape, self.dtype = self._read_header()
        except BaseException:
            self._file.close()
            raise
        self._offset = self._file.tell()
        self.rows = math.prod(self.shape[:-1])
        self._row_bytes = self.shape[-1] * self.dtype.itemsize if self.shape else 0
        self._modified = False
        self._previous_sigio: Any = None
        self._mapping = self._map_under_lease()
        self._released = 0
        self._buffer = np.empty(0, self.dtype)

    def _read_header(self) -> tuple[tuple[int, ...], np.dtype]:
        try:
            version = np.lib.format.read_magic(self._file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(self._file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(self._file)
            else:
                raise ValueError(f"version {version} is not supported")
        except (ValueError, tokenize.TokenError) as error:  # numpy lets TokenError through
            raise CommandError(f"{self.path} is not a .npy file numpy can read ({error})") from None
        check_float(self.path, dtype)
        if any(length < 0 for length in shape):
            raise CommandError(f"{self.path} has a negative dimension in its shape {shape}")
        if fortran_order and len(shape) > 1:
            raise CommandError(
                f"{self.path} is stored in Fortran order; encode streams rows, so save it in C "
                "order (np.save(path, np.ascontiguousarray(x)))"
            )
        nbytes = math.prod(shape) * dtype.itemsize
        data_bytes = os.fstat(self._file.fileno()).st_size - self._file.tell()
        if data_bytes < nbytes:
            raise CommandError(
                f"{self.path} is truncated: its header promises {shape} {dtype} ({nbytes} bytes) "
                f"but it holds {data_bytes} bytes of data"
            )
        return shape, dtype

    def _map_under_lease(self) -> mmap.mmap | None:
        if (
            sys.platform != "linux"  # leases are Linux's
            or threading.current_thread() is not threading.main_thread()
        ):
            return None
        self._previous_sigio = signal.signal(signal.SIGIO, self._on_lease_break)
        try:
            fcntl.fcntl(self._file.fileno(), fcntl.F_SETLEASE, fcntl.F_RDLCK)
            return mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # no lease here; ValueError: mmap of an empty file
            self._drop_lease()
            return None

    def _on_lease_break(self, signum: int, frame: FrameType | None) -> None:
        self._modified = True

    def _drop_lease(self) -> None:
        if self._previous_sigio is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._file.fileno(), fcntl.F_SETLEASE, fcntl.F_UNLCK)
            signal.signal(signal.SIGIO, self._previous_sigio)
            self._previous_sigio = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, valid until the next call; rows before ``start`` are done."""
        columns = self.shape[-1]
        if self._mapping is not None:
            if self._modified:
                raise CommandError(
                    f"{self.path} was opened for writing by another process while being read "
                    f"(rows {start} to {self.rows} were not read)"
                )
            self._release_rows_before(start)
            return np.ndarray(
                (stop - start, columns),
                self.dtype,
                buffer=self._mapping,
                offset=self._offset + start * self._row_bytes,
            )
        if self._buffer.size < (stop - start) * columns:
            self._buffer = np.empty((stop - start) * columns, self.dtype)
        rows = self._buffer[: (stop - start) * columns].reshape(stop - start, columns)
        if rows.size == 0:
            return rows  # nothing to read (and a view of no bytes cannot be cast)
        self._file.seek(self._offset + start * self._row_bytes)
        if self._file.readinto(rows.data.cast("B")) != rows.nbytes:
            raise CommandError(
                f"{self.path} was truncated while being read: rows {start} to {stop} of "
                f"{self.rows} are no longer there"
            )
        return rows

    def _release_rows_before(self, start: int) -> None:
        """Drops the pages of rows already encoded from this process's memory."""
        assert self._mapping is not None
        end = (self._offset + start * self._row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._released:
            self._mapping.madvise(mmap.MADV_DONTNEED, self._released, end - self._released)
            self._released = end

    def close(self) -> None:
        self._drop_lease()
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a view still held: the collector unmaps it
                self._mapping.close()
        self._file.close()


def open_npz(path: Path, key: str | None) -> np.ndarray:
    """One array of a ``.npz`` file (read into memory)."""
    with open(path, "rb") as file:  # not there, not readable: the OSError main reports
        try:
            if not zipfile.is_zipfile(file):  # np.load would read a .npy whole to refuse it
                raise CommandError(f"{path} is not a .npz archive")
            file.seek(0)
            with np.load(file) as archive:
                names = list(archive.files)
                if key is None and len(names) != 1:
                    raise CommandError(f"{path} holds arrays {names}; pick one with --key")
                if key is not None and key not in names:
                    raise CommandError(f"{path} has no array {key!r}; it holds {names}")
                name = key or names[0]
                array = archive[name]
        except CommandError:
            raise
        except Exception as error:  # zipfile, zlib, bz2, lzma and numpy raise many kinds
            raise CommandError(
                f"{path} is not a .npz file numpy can read ({type(error).__name__}: {error})"
            ) from None
    if not isinstance(array, np.ndarray):  # a member without the .npy magic comes as bytes
        raise CommandError(f"{path}: {name!r} is not a .npy array")
    check_float(path, array.dtype)
    return array


class ArrayRows:
    """The rows of an array in memory (a ``.npz``'s), read as ``NpyRows`` reads a file's."""

    def __init__(self, array: np.ndarray) -> None:
        self.shape: tuple[int, ...] = array.shape
        self.dtype = array.dtype
        self.rows = math.prod(array.shape[:-1])
        self._rows = array.reshape(self.rows, array.shape[-1]) if array.ndim else array

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._rows[start:stop]

    def close(self) -> None:
        pass


Rows = NpyRows | ArrayRows


def open_rows(path: Path, key: str | None) -> Rows:
    if path.suffix == ".npy":
        return NpyRows(path)
    if path.suffix == ".npz":
        return ArrayRows(open_npz(path, key))
    raise CommandError(f"INPUT must be a .npy or .npz file, got {path}")


TEMPORARY_SUFFIX = ".tmp"


def temporary_name(output: Path) -> Path:
    """Where a run writing ``output`` writes first: hidden, beside it, named by the process."""
    return output.with_name(f".{output.name}.{os.getpid()}{TEMPORARY_SUFFIX}")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process, or a platform that cannot tell: assume alive
    return True


def lock_exclusively(file: BinaryIO) -> bool:
    """Takes an exclusive lock on ``file`` without waiting; the system drops it when the holder
    dies, SIGKILL included. True where taken (or where locks do not exist, as on Windows, where a
    file another process has open cannot be deleted anyway)."""
    if sys.platform == "win32":
        return True
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_orphaned_temporaries(output: Path) -> list[Path]:
    """Deletes the temporary files of earlier runs for ``output`` that died without cleaning up
    (SIGKILL, power loss), and returns them. A run still going keeps its file: its process
    exists and it holds the file's lock, and a file is deleted only when neither holds."""
    removed = []
    prefix = f".{output.name}."
    for candidate in output.parent.glob(f"{glob.escape(prefix)}*{TEMPORARY_SUFFIX}"):
        pid = candidate.name[len(prefix) : -len(TEMPORARY_SUFFIX)]
        if not pid.isdigit() or int(pid) == os.getpid() or process_exists(int(pid)):
            continue
        try:
            with open(candidate, "rb") as file:
                if lock_exclusively(file):
                    candidate.unlink()
                    removed.append(candidate)
        except OSError:
            continue  # gone meanwhile, or not ours to delete: leave it
    return removed


def write_rows(mlp: MLP, source: Rows, output: Path, batch_size: int) -> None:
    """Writes ``mlp`` applied to the rows of ``source`` (shape ``(..., in_features)``) to
    ``output`` as a ``.npy`` of shape ``(..., out_features)``, ``batch_size`` rows at a time,
    through a temporary file in the same directory that replaces ``output`` only once complete.
    An error writing names ``output``; the temporary file is removed on any error or
    interruption."""
    from tqdm import tqdm

    shape, rows = source.shape, source.rows
    buffer = np.empty((min(batch_size, rows), mlp.out_features), mlp.dtype)
    header = {
        "descr": np.lib.format.dtype_to_descr(mlp.dtype),
        "fortran_order": False,
        "shape": (*shape[:-1], mlp.out_features),
    }
    for orphan in remove_orphaned_temporaries(output):
        print(f"removed {orphan}, left by a run that was killed", file=sys.stderr)
    temporary = temporary_name(output)
    try:
        with open(temporary, "xb") as file, tqdm(total=rows, unit="row", unit_scale=True) as bar:
            lock_exclusively(file)
            np.lib.format.write_array_header_1_0(file, header)
            for start in range(0, rows, batch_size):
                stop = min(start + batch_size, rows)
                result = buffer[: stop - start]
                mlp(source.read(start, stop), out=result)
                file.write(result.data)
                bar.update(stop - start)
        os.replace(temporary, output)
    except OSError as error:
        discard(temporary)
        raise CommandError(f"cannot write {output}: {error.strerror or error}") from error
    except BaseException:
        discard(temporary)
        raise


def discard(temporary: Path) -> None:
    """Removes ``temporary`` if it can: where it cannot (a file system gone read-only), the next
    run for the same output does, and the error that brought us here is the one to report."""
    with contextlib.suppress(OSError):
        temporary.unlink(missing_ok=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the temporary file is removed


def run_encode(args: argparse.Namespace) -> None:
    output: Path = args.output
    if output.suffix != ".npy":
        raise CommandError(f"OUTPUT must end in .npy, got {output}")
    if output.exists() and not args.force:
        raise CommandError(f"{output} exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise CommandError(f"the directory of {output} does not exist")
    part: serialization.Part = (
        "decoder" if args.decode else "all" if args.reconstruct else "encoder"
    )
    spec = load_model(args.model, args.layers, args.trust_pickle)
    with contextlib.closing(open_rows(args.input, args.key)) as source:
        encode_rows(args, part, spec, source)


def encode_rows(
    args: argparse.Namespace, part: serialization.Part, spec: ChainSpec, source: Rows
) -> None:
    shape, dtype = source.shape, source.dtype
    try:
        selected = spec.select(part)
    except ValueError as error:
        raise CommandError(f"{args.model}: {error}") from None
    mlp = MLP.from_spec(selected, dtype=f"f{dtype.itemsize}")
    widths = " -> ".join(str(n) for n in selected.widths)
    if not shape or shape[-1] != mlp.in_features:
        raise CommandError(
            f"{args.input} has shape {shape}, but the model's {part} ({widths}) takes rows of "
            f"{mlp.in_features} values: shape (..., {mlp.in_features})"
        )
    if args.threads:
        fusedae.set_num_threads(args.threads)
    batch_size = args.batch_size or max(1, CHUNK_BYTES // (shape[-1] * dtype.itemsize))
    signal.signal(signal.SIGTERM, _terminate)
    write_rows(mlp, source, args.output, batch_size)
    out_shape = (*shape[:-1], mlp.out_features)
    print(f"wrote {args.output}: {out_shape} {mlp.dtype} from {shape}, {part} {widths}")


# --- timing, shared by bench and demo ---------------------------------------------------------


def time_interleaved(
    functions: Mapping[str, Callable[[], object]], rounds: int, min_seconds: float = 0.02
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds (A B A B ...) of
    enough calls to last about ``min_seconds`` each, so machine noise hits all alike."""
    calls = {}
    for name, function in functions.items():
        function()  # warm up
        start = time.perf_counter()
        function()
        calls[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Left-aligns the first column, right-aligns the others."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))


# --- bench ------------------------------------------------------------------------------------


def onnx_session(
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    activations: Sequence[str | PostOp],
    threads: int,
) -> Any:
    """An ONNX Runtime session (default graph optimizations, ``threads`` intra-op, one inter-op)
    running the chain: ``Gemm(transB=1)`` per layer, then each post-op's ONNX nodes from the
    op table (ONNX Runtime's graph optimizations drop an ``Identity``); input ``"x"`` with a
    dynamic batch dimension."""
    import onnx
    import onnxruntime
    from onnx import helper, numpy_helper

    elem = helper.np_dtype_to_tensor_dtype(layers[0][0].dtype)
    nodes, initializers, name = [], [], "x"
    for index, ((weight, bias), post_op) in enumerate(
        zip(layers, post_ops(activations), strict=True)
    ):
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(
            helper.make_node("Gemm", [name, f"w{index}", f"b{index}"], [f"h{index}"], transB=1)
        )
        name = f"h{index}"
        nodes += post_op.onnx_nodes(name, f"r{index}", layers[0][0].dtype)
        name = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", elem, ["batch", layers[0][0].shape[1]])],
        [helper.make_tensor_value_info(name, elem, ["batch", layers[-1][0].shape[0]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_bench(args: argparse.Namespace) -> None:
    widths, batch, dtype = args.widths, args.batch, np.dtype(args.dtype)
    if args.threads:
        fusedae.set_num_threads(args.threads)
    threads = fusedae.get_num_threads()
    rng = np.random.default_rng(0)
    layers = [
        (
            (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(dtype),
            (0.1 * rng.standard_normal(n_out)).astype(dtype),
        )
        for n_in, n_out in itertools.pairwise(widths)
    ]
    spec = ChainSpec.from_pairs(layers, [RELU] * (len(layers) - 1) + [IDENTITY])
    x = rng.standard_normal((batch, widths[0])).astype(dtype)
    mlp = MLP.from_spec(spec)
    out = np.empty((batch, widths[-1]), dtype)
    backends: dict[str, Callable[[], Any]] = {"fusedae": lambda: mlp(x, out=out)}
    missing = []
    try:
        import torch
    except ImportError:
        missing.append("PyTorch (pip install torch)")
    else:
        from fusedae.torch.lower import to_sequential

        torch.set_num_threads(threads)
        model = to_sequential(spec)
        x_torch = torch.from_numpy(x)

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return model(x_torch).numpy()

        backends["PyTorch eager"] = run_torch
    try:
        session = onnx_session(layers, spec.post_ops, threads)
    except ImportError:
        missing.append("ONNX Runtime (pip install onnx onnxruntime)")
    else:
        backends["ONNX Runtime"] = lambda: session.run(None, {"x": x})[0]
    on_threads = f"{threads} thread{'s' * (threads > 1)}"
    print(f"{' -> '.join(map(str, widths))}, batch {batch}, {dtype}, {on_threads}, ISA {mlp.isa}")
    peak = _native.fma_peak_gflops(dtype=dtype.name) * threads
    print(f"FMA peak measured now: {peak:.0f} GFLOP/s on {on_threads}")
    expected, _ = _reference.forward(layers, spec.post_ops, x)
    errors = {name: float(np.abs(run() - expected).max()) for name, run in backends.items()}
    seconds = time_interleaved(backends, args.rounds)
    flops = mlp.flops_per_row * batch
    baseline = seconds.get("PyTorch eager")
    rows = [
        [
            name,
            f"{1e3 * t:.3f}",
            f"{batch / t / 1e6:.2f}",
            f"{flops / t / 1e9:.1f}",
            f"{100 * flops / t / 1e9 / peak:.0f}%",
            "-" if baseline is None else f"{baseline / t:.2f}x",
            f"{errors[name]:.1e}",
        ]
        for name, t in seconds.items()
    ]
    print_table(
        ["backend", "ms/batch", "Mrows/s", "GFLOP/s", "of peak", "vs PyTorch", "max |err|"], rows
    )
    for name in missing:
        print(f"not timed: {name} is not installed")


# --- demo -------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> None:
    try:
        import matplotlib
        import torch
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise CommandError(
            f"the demo needs torch, scikit-learn and matplotlib: pip install 'fusedae[demo]' "
            f"({error})"
        ) from None
    matplotlib.use("Agg")
    from tqdm import tqdm

    from fusedae.torch import AE, save

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16).astype(np.float32)  # (1797, 64), pixels in [0, 1]
    labels = digits.target
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model = AE(x.shape[1], 2).to(device)
    data = torch.from_numpy(x).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with tqdm(range(args.epochs), desc=f"training on {device}", unit="epoch") as bar:
        for _ in bar:
            total = torch.zeros((), device=device)
            for index in torch.randperm(len(data), device=device).split(64):
                batch = data[index]
                loss = torch.nn.functional.mse_loss(model(batch), batch, reduction="sum")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.detach()
            bar.set_postfix(mse=f"{total.item() / data.numel():.4f}")
    model = model.cpu().eval()

    model_path = out_dir / "digits-ae.safetensors"
    save(model, model_path)
    torch.save(model.state_dict(), out_dir / "digits-ae.pt")
    np.save(out_dir / "digits.npy", x)
    encoder, autoencoder = MLP.load(model_path, "encoder"), MLP.load(model_path)
    plain_encoder = torch.nn.Sequential(*model.encoder)  # PyTorch's own modules, not fused
    plain_autoencoder = torch.nn.Sequential(*model.encoder, *model.decoder)
    tiled = np.tile(x, (100, 1))
    rows, codes, reconstructions = [], encoder(x), autoencoder(x)
    for task, mlp, plain, inputs in [
        ("encode", encoder, plain_encoder, x),
        ("reconstruct", autoencoder, plain_autoencoder, x),
        ("encode", encoder, plain_encoder, tiled),
        ("reconstruct", autoencoder, plain_autoencoder, tiled),
    ]:
        inputs_torch = torch.from_numpy(inputs)

        def run_torch(module: torch.nn.Module = plain, t: torch.Tensor = inputs_torch) -> Any:
            with torch.inference_mode():
                return module(t).numpy()

        def run_fused(mlp: MLP = mlp, a: np.ndarray = inputs) -> np.ndarray:
            return mlp(a)

        seconds = time_interleaved({"fused": run_fused, "torch": run_torch}, rounds=9)
        difference = float(np.abs(run_fused() - run_torch()).max())
        rows.append(
            [
                task,
                str(len(inputs)),
                f"{1e3 * seconds['fused']:.3f}",
                f"{1e3 * seconds['torch']:.3f}",
                f"{seconds['torch'] / seconds['fused']:.1f}x",
                f"{difference:.1e}",
            ]
        )
    print(f"\nCPU timings, {fusedae.get_num_threads()} threads, ISA {encoder.isa} (median):")
    print_table(["task", "rows", "fusedae ms", "PyTorch ms", "speedup", "max |diff|"], rows)
    figures = [
        plot_codes(codes, labels, out_dir / "codes.png"),
        plot_reconstructions(x, reconstructions, labels, out_dir / "reconstructions.png"),
    ]
    print(f"\nwrote {model_path} (and digits-ae.pt, digits.npy), {', '.join(map(str, figures))}")
    print(f"try: fusedae encode {model_path} {out_dir / 'digits.npy'} -o {out_dir / 'codes.npy'}")


def plot_codes(codes: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """Scatter of ``codes`` ``(n, 2)`` coloured by digit ``labels`` ``(n,)``."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    for digit in range(10):
        chosen = codes[labels == digit]
        axes.scatter(chosen[:, 0], chosen[:, 1], s=6, color=plt.cm.tab10(digit), label=str(digit))
    axes.legend(title="digit", markerscale=3, loc="best", fontsize="small")
    axes.set(title="Digits encoded to 2-D by the fused encoder", xlabel="z[0]", ylabel="z[1]")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_reconstructions(
    x: np.ndarray, reconstructions: np.ndarray, labels: np.ndarray, path: Path
) -> Path:
    """The first image of each digit (``x`` rows of 64 pixels) above its reconstruction."""
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 10, figsize=(10, 2.4), layout="constrained")
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[0])
        for row, images in enumerate((x, reconstructions)):
            axes = grid[row, digit]
            axes.imshow(images[index].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes.set(xticks=[], yticks=[])
    grid[0, 0].set_ylabel("original")
    grid[1, 0].set_ylabel("reconstructed")
    figure.suptitle("Digits and their reconstructions through a 2-D code")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
