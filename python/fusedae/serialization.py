"""A chain of Linear layers in one ``.safetensors`` file, read and written with numpy alone.

The file holds tensors ``layers.{i}.weight`` (shape ``(out_i, in_i)``, PyTorch layout) and,
where layer ``i`` has one, ``layers.{i}.bias`` (shape ``(out_i,)``), all float32 or all float64.
Its ``__metadata__`` records the structure the tensors cannot:

* ``format``: ``"fusedae.chain"``, ``format_version``: ``"1"``;
* ``activations``: a JSON list of names (``"relu"``, ``"identity"``: the post-ops of
  ``fusedae._ops.OPS``), one per layer, applied to its outputs;
* ``encoder_layers``: how many leading layers form the encoder (``0`` to the layer count); the
  layers after them are the decoder, and all of them together reconstruct.

``write`` picks ``encoder_layers`` when not told (``default_encoder_layers``): a chain whose
output is as wide as its input is read as an autoencoder whose encoder ends at its narrowest
inner layer; any other chain is all encoder. Both directions go through ``ChainSpec``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from fusedae._ops import IDENTITY, RELU, PostOp
from fusedae.chain import (
    PARTS,
    ChainSpec,
    Layer,
    LayerArrays,
    Part,
    default_encoder_layers,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PARTS",
    "ChainSpec",
    "LayerArrays",
    "Part",
    "default_encoder_layers",
    "from_state_dict",
    "read",
    "write",
    "write_spec",
]

FORMAT = "fusedae.chain"
FORMAT_VERSION = "1"

_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100_000_000  # the limit the reference implementation enforces
_NAME = re.compile(r"layers\.(\d+)\.(weight|bias)")
_STATE_KEY = re.compile(r"(?:(.*)\.)?(\d+)\.(weight|bias)")


def write(
    path: str | os.PathLike[str],
    layers: Sequence[tuple[np.ndarray, np.ndarray | None]],
    activations: Sequence[str | PostOp],
    encoder_layers: int | None = None,
) -> None:
    """Writes the chain of ``(weight, bias)`` pairs and activations to ``path``: ``write_spec``
    of ``ChainSpec.from_pairs``."""
    arrays = [
        (np.asarray(weight), None if bias is None else np.asarray(bias)) for weight, bias in layers
    ]
    write_spec(path, ChainSpec.from_pairs(arrays, activations, encoder_layers))


def write_spec(path: str | os.PathLike[str], spec: ChainSpec) -> None:
    """Writes ``spec`` to ``path`` (float32, or float64 if the first weight is float64), through
    a temporary file renamed at the end."""
    spec.check_shapes()
    for index, op in enumerate(spec.post_ops):
        if op.params:  # the file records names only: a parameter would be lost
            raise ValueError(
                f"layer {index}: format_version {FORMAT_VERSION} stores post-ops by name, "
                f"without parameters, got {op}"
            )
    dtype = np.dtype("<f8" if spec.layers[0].weight.dtype == np.float64 else "<f4")
    tensors: list[tuple[str, np.ndarray]] = []
    for index, layer in enumerate(spec.layers):
        weight = np.ascontiguousarray(layer.weight, dtype=dtype)
        bias = None if layer.bias is None else np.ascontiguousarray(layer.bias, dtype=dtype)
        tensors.append((f"layers.{index}.weight", weight))
        if bias is not None:
            tensors.append((f"layers.{index}.bias", bias))
    header: dict[str, object] = {
        "__metadata__": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "activations": json.dumps(list(spec.activations)),
            "encoder_layers": str(spec.encoder_layers),
        }
    }
    offset = 0
    for name, array in tensors:
        header[name] = {
            "dtype": "F64" if dtype.itemsize == 8 else "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    temporary = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for _, array in tensors:
                file.write(array.tobytes())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def read(path: str | os.PathLike[str]) -> ChainSpec:
    """Reads a chain written by ``write``; a file that is not one, or is cut short, is a
    ValueError naming the file and what is wrong with it."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return _parse(data)
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: not a valid fusedae model file: {error}") from None


def _parse(data: bytes) -> ChainSpec:
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short for a safetensors file")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(
            f"the header claims {header_size} bytes, but the file holds {len(data) - 8} after "
            "the size field (truncated, or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"no {FORMAT!r} metadata (write the file with fusedae.torch.save or MLP.save)"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"format_version {metadata.get('format_version')!r} is not supported "
            f"(this fusedae reads {FORMAT_VERSION!r})"
        )
    try:
        activations = json.loads(metadata["activations"])
        encoder_layers = int(metadata["encoder_layers"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"bad activations or encoder_layers metadata ({error!r})") from None
    if not isinstance(activations, list) or not all(isinstance(name, str) for name in activations):
        raise ValueError("the activations metadata is not a JSON list of names")
    body = memoryview(data)[8 + header_size :]
    tensors: dict[str, np.ndarray] = {}
    end = 0
    for begin, stop, name, entry in sorted(_entries(header)):
        if begin != end:
            raise ValueError(f"tensor {name!r} starts at byte {begin} of the data, not at {end}")
        if stop > len(body):
            raise ValueError(
                f"the file is truncated: tensor {name!r} ends at byte {stop} of the data, but "
                f"the file holds {len(body)}"
            )
        tensors[name] = _tensor(name, entry, body[begin:stop])
        end = stop
    if end != len(body):
        raise ValueError(f"the tensors take {end} bytes, but the file holds {len(body)}")
    layers: list[LayerArrays] = []
    for index in range(len(activations)):
        weight = tensors.pop(f"layers.{index}.weight", None)
        if weight is None:
            raise ValueError(f"tensor 'layers.{index}.weight' is missing")
        layers.append((weight, tensors.pop(f"layers.{index}.bias", None)))
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)}")
    spec = ChainSpec.from_pairs(layers, activations, encoder_layers)
    spec.check_shapes()
    return spec


def _entries(header: dict[str, object]) -> list[tuple[int, int, str, dict[str, object]]]:
    """``(begin, end, name, entry)`` for each tensor in a safetensors header."""
    entries = []
    for name, entry in header.items():
        if not _NAME.fullmatch(name):
            raise ValueError(f"unexpected tensor {name!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name!r}: expected a JSON object, got {entry!r}")
        offsets = entry.get("data_offsets")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"tensor {name!r}: bad data_offsets in {entry!r}")
        entries.append((offsets[0], offsets[1], name, entry))
    return entries


def _tensor(name: str, entry: dict[str, object], data: memoryview) -> np.ndarray:
    """The tensor ``entry`` describes, copied out of ``data`` (the bytes its offsets span)."""
    dtype = _DTYPES.get(str(entry.get("dtype")))
    shape = entry.get("shape")
    if dtype is None:
        raise ValueError(f"tensor {name!r}: dtype must be F32 or F64, got {entry.get('dtype')!r}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    size = math.prod(shape) * dtype.itemsize
    if size != len(data):
        raise ValueError(
            f"tensor {name!r}: shape {tuple(shape)} of {dtype.name} needs {size} bytes, "
            f"but its data_offsets span {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def from_state_dict(state: Mapping[str, np.ndarray]) -> ChainSpec:
    """The chain in a PyTorch ``state_dict`` of ``nn.Sequential``s of Linear layers (as numpy
    arrays), such as the seed's ``AE`` (``encoder.0``, ``encoder.2``, ``decoder.0``, ...) or its
    single-Sequential form.

    A state_dict does not record activations, so: one module between two Linear layers of the
    same Sequential is read as a ReLU (the seed's layout), none as identity, more is an error;
    the last Linear of each Sequential is followed by identity. Sequentials chain in the order of
    the state_dict. Modules ``encoder`` and ``decoder`` set where the encoder ends; otherwise
    ``default_encoder_layers`` does.
    """
    groups: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in state.items():
        match = _STATE_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"unsupported checkpoint: {key!r} is not the weight or bias of a Linear layer "
                "in an nn.Sequential"
            )
        prefix, index, kind = match.group(1) or "", int(match.group(2)), match.group(3)
        groups.setdefault(prefix, {}).setdefault(index, {})[kind] = np.asarray(value)
    if not groups:
        raise ValueError("unsupported checkpoint: it holds no layers")
    layers: list[Layer] = []
    for prefix, modules in groups.items():
        indices = sorted(modules)
        for position, index in enumerate(indices):
            where = f"{prefix}.{index}" if prefix else str(index)
            if "weight" not in modules[index]:
                raise ValueError(f"unsupported checkpoint: {where} has a bias but no weight")
            gap = indices[position + 1] - index - 1 if position + 1 < len(indices) else 0
            if gap > 1:
                raise ValueError(
                    f"unsupported checkpoint: {gap} modules between {where} and the next Linear "
                    "layer (only one ReLU, or nothing, can be read from a state_dict)"
                )
            post_op = RELU if gap else IDENTITY
            layers.append(Layer(modules[index]["weight"], modules[index].get("bias"), post_op))
    names = [prefix.rsplit(".", 1)[-1] for prefix in groups]
    encoder_layers = len(next(iter(groups.values()))) if names == ["encoder", "decoder"] else None
    spec = ChainSpec.from_pairs(
        [(layer.weight, layer.bias) for layer in layers],
        [layer.post_op for layer in layers],
        encoder_layers,
    )
    spec.check_shapes()
    return spec
