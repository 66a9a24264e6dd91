"""The chain in an ``encode`` MODEL file: ``.safetensors``, a PyTorch state_dict spelled by
``--layers``, or a pickled ``nn.Module`` (with ``--trust-pickle``)."""

from __future__ import annotations

import os
import pickletools
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusedae import serialization
from fusedae.chain import ChainSpec
from fusedae.cli.common import CommandError
from fusedae.state_dict import StateModule, from_state_dict, state_modules


def is_safetensors(path: Path) -> bool:
    """Whether MODEL is a ``.safetensors`` file: by its name (in any case), or by its first
    bytes whatever its name (``model.st``): a header length that fits the file, then the JSON
    header's ``{`` (a torch.save zip has its compression method there, a pickle no ``{``)."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with path.open("rb") as file:
            head = file.read(9)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False  # (the checkpoint reader reports the error)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def load_model(path: Path, layers: str | None, trust_pickle: bool) -> ChainSpec:
    """The chain in MODEL: a ``.safetensors`` file; a PyTorch state_dict spelled by ``layers``
    (``fusedae.state_dict``); or, with ``trust_pickle``, a pickled ``nn.Module``. The last two
    import torch."""
    if is_safetensors(path):
        if layers is not None or trust_pickle:
            raise CommandError(
                f"{path}: a .safetensors MODEL is one fusedae.torch.save or MLP.save wrote, "
                "which records its layers; --layers and --trust-pickle are for PyTorch "
                "checkpoints (torch.save)"
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

        meta = [name for name, tensor in loaded.state_dict().items() if tensor.is_meta]
        if meta:
            raise CommandError(f"{path}: {meta[0]} is a meta tensor (no values)")
        try:
            return chain_spec(loaded)
        except (TypeError, ValueError) as error:
            raise CommandError(f"{path}: {error}") from None
    if not isinstance(loaded, Mapping):
        raise CommandError(
            f"{path}: expected a state_dict (parameter names -> tensors) or an nn.Module, got "
            f"{type(loaded).__name__}"
        )
    others = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if others:
        nested = [key for key in others if isinstance(loaded[key], Mapping)]
        hint = (
            f"; if the state_dict is its {nested[0]!r}, save that alone: "
            f"torch.save(checkpoint[{nested[0]!r}], path)"
            if nested
            else ""
        )
        raise CommandError(
            f"{path}: expected a state_dict (parameter names -> tensors), but {others[:4]} "
            f"are not tensors{hint}"
        )
    arrays = {key: state_array(path, key, value) for key, value in loaded.items()}
    try:
        if layers is None:
            modules = state_modules(arrays)
        else:
            return from_state_dict(arrays, layers)
    except ValueError as error:
        raise CommandError(f"{path}: {error}") from None
    raise CommandError(bare_state_dict_refusal(path, modules))


def state_array(path: Path, key: str, value: Any) -> np.ndarray:
    """A state_dict tensor as numpy: float32 or float64 (float64 kept, other floats widened)."""
    import torch

    if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
        if value.is_quantized:
            kind = "quantized"
        elif value.layout != torch.strided:
            kind = str(value.layout).removeprefix("torch.")
        else:
            kind = value.device.type
        raise CommandError(
            f"{path}: {key} is a {kind} tensor; encode reads dense CPU tensors (save the "
            "state_dict of the float model)"
        )
    value = value.detach()
    if value.is_floating_point():
        value = value.to(torch.float64 if value.dtype == torch.float64 else torch.float32)
    return value.numpy()


def load_checkpoint(path: Path, trust_pickle: bool) -> object:
    """What ``torch.save`` wrote to ``path``: unpickled in full with ``trust_pickle``, else by
    torch's weights-only unpickler, which refuses anything but tensors and plain containers."""
    import torch

    try:
        with warnings.catch_warnings():
            # Older torch's own loader (2.1) warns of its storage class on every load: the command's
            # first line of output, about nothing the user wrote.
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except (AttributeError, ModuleNotFoundError) as error:  # only unpickling in full gets here
        raise CommandError(
            f"{path}: unpickling it needs the code that defined its classes ({error}); convert "
            "the model once where that code runs: fusedae.torch.save(model, "
            f"'{path.with_suffix('.safetensors').name}')"
        ) from None
    except Exception as error:  # torch.load raises many kinds, all meaning "cannot load it"
        if not looks_like_a_checkpoint(path):  # (torch's advice to unpickle it would mislead)
            raise CommandError(
                f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive or a "
                "pickle) nor a .safetensors file"
            ) from None
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


def looks_like_a_checkpoint(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` writes: a zip archive, or (the legacy format)
    a pickle's protocol opcode."""
    try:
        with open(path, "rb") as file:
            start = file.read(4)
    except OSError:
        return True  # the error torch.load gave says why
    return start.startswith((b"PK\x03\x04", b"\x80"))


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
