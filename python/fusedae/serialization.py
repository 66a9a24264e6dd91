"""A chain of Linear layers in one ``.safetensors`` file, read and written with numpy alone.

The file holds tensors ``layers.{i}.weight`` (shape ``(out_i, in_i)``, PyTorch layout) and,
where layer ``i`` has one, ``layers.{i}.bias`` (shape ``(out_i,)``); for each BatchNorm folded
into layer ``i`` (its ``j``-th ``Normalization``), ``layers.{i}.normalization.{j}.mean`` and
``.var``, and ``.weight`` and ``.bias`` where it has them (shape ``(features,)``). All tensors
are float32, or all float64. Its ``__metadata__`` records the structure the tensors cannot:

* ``format``: ``"fusedae.chain"``, ``format_version``: ``"2"``;
* ``layers``: a JSON list with one object per layer, ``{"post_op": "leaky_relu", "params":
  {"negative_slope": 0.2}, "normalization": [{"position": "before", "eps": 1e-05}]}``: the name
  of its post-op (``fusedae._ops.OPS``) with every parameter by name, and its normalizations in
  order, each on the Linear's input (``"before"``) or output (``"after"``, before the post-op);
* ``encoder_layers``: how many leading layers form the encoder (``0`` to the layer count); the
  layers after them are the decoder, and all of them together reconstruct.

Format version 1 (fusedae before the real-models issue) is read too: it records post-ops by
name alone (``activations``, a JSON list such as ``["relu", "identity"]``) and has no
normalizations. Every file is written as version 2.

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
import sys
from collections.abc import Sequence

import numpy as np

from fusedae._ops import OPS, PostOp, post_op
from fusedae.chain import (
    PARTS,
    POSITIONS,
    ChainSpec,
    Layer,
    LayerArrays,
    Normalization,
    Part,
    default_encoder_layers,
    is_float64,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PARTS",
    "READABLE_VERSIONS",
    "ChainSpec",
    "LayerArrays",
    "Part",
    "default_encoder_layers",
    "read",
    "write",
    "write_spec",
]

FORMAT = "fusedae.chain"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")

_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_MAX_HEADER = 100_000_000  # the limit the reference implementation enforces
_NAME = re.compile(r"layers\.\d+\.(?:weight|bias|normalization\.\d+\.(?:mean|var|weight|bias))")
_NORMALIZATION_ARRAYS = ("mean", "var", "weight", "bias")  # the file's names, Normalization's


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
    """Writes ``spec`` to ``path`` as format version 2 (float32, or float64 if the first weight
    is float64), through a temporary file renamed at the end. Reading it back gives the same
    spec: same post-ops and parameters, same normalizations, the same bits in every array of
    the file's dtype."""
    spec.check_shapes()
    dtype = np.dtype("<f8" if is_float64(spec.layers[0].weight.dtype) else "<f4")
    tensors: list[tuple[str, np.ndarray]] = []
    described: list[dict[str, object]] = []

    def add(name: str, array: np.ndarray | None) -> None:
        if array is not None:
            tensors.append((name, np.ascontiguousarray(array, dtype=dtype)))

    for index, layer in enumerate(spec.layers):
        for norm in layer.normalization:
            if not math.isfinite(norm.eps):  # (JSON's NaN and Infinity, which `read` refuses)
                raise ValueError(
                    f"layer {index}: a normalization's eps of {norm.eps} cannot be saved: the "
                    "file takes finite numbers"
                )
        add(f"layers.{index}.weight", layer.weight)
        add(f"layers.{index}.bias", layer.bias)
        for position, norm in enumerate(layer.normalization):
            for kind in _NORMALIZATION_ARRAYS:
                add(f"layers.{index}.normalization.{position}.{kind}", getattr(norm, kind))
        described.append(
            {
                "post_op": layer.post_op.name,
                "params": layer.post_op.keyword_params(),
                "normalization": [
                    {"position": norm.position, "eps": float(norm.eps)}
                    for norm in layer.normalization
                ],
            }
        )
    header: dict[str, object] = {
        "__metadata__": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layers": json.dumps(described),
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
    """Reads a chain written by ``write`` (format version 2, or 1 from earlier fusedae); a file
    that is not one, or is cut short, is a ValueError naming the file and what is wrong."""
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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"no {FORMAT!r} metadata (write the file with fusedae.torch.save or MLP.save)"
        )
    version = metadata.get("format_version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit()):
        raise ValueError(f"bad format_version metadata {version!r}: expected a version number")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"format_version {version!r} is not supported (this fusedae reads "
            f"{' and '.join(map(repr, READABLE_VERSIONS))}; a newer fusedae wrote it?)"
        )
    written = metadata.get("encoder_layers")
    # As `write` puts it: a string of digits (`int` took the number 1.7 as 1, and " 1 ").
    if not (isinstance(written, str) and written.isascii() and written.isdigit()):
        raise ValueError(f"bad encoder_layers metadata {written!r}: expected a count")
    encoder_layers = int(written)
    described = _layers_v1(metadata) if version == "1" else _layers_v2(metadata)
    tensors = _tensors(header, memoryview(data)[8 + header_size :])
    layers: list[Layer] = []
    for index, (layer_op, normalization) in enumerate(described):
        prefix = f"layers.{index}"
        weight = tensors.pop(f"{prefix}.weight", None)
        if weight is None:
            raise ValueError(f"tensor '{prefix}.weight' is missing")
        norms = tuple(
            _normalization(tensors, f"{prefix}.normalization.{number}", entry)
            for number, entry in enumerate(normalization)
        )
        try:
            layers.append(Layer(weight, tensors.pop(f"{prefix}.bias", None), layer_op, norms))
        except ValueError as error:
            raise ValueError(f"layer {index}: {error}") from None
    if tensors:
        raise ValueError(f"unexpected tensors {sorted(tensors)}")
    dtypes = {
        array.dtype for layer in layers for array in (layer.weight, layer.bias) if array is not None
    }
    if len(dtypes) > 1:  # (a float64 layer after float32 ones ran in float32)
        raise ValueError(f"layers of {sorted(map(str, dtypes))}: a model file holds one dtype")
    spec = ChainSpec(tuple(layers), encoder_layers)
    spec.check_shapes()
    return spec


# What the metadata says of one layer: its post-op, and (position, eps) per normalization.
_LayerMetadata = tuple[PostOp, list[tuple[str, float]]]


def _layers_v1(metadata: dict[str, object]) -> list[_LayerMetadata]:
    """Version 1: ``activations``, a JSON list of post-op names (ops without parameters)."""
    try:
        activations = json.loads(str(metadata["activations"]))
    except (KeyError, ValueError, RecursionError) as error:
        raise ValueError(f"bad activations metadata ({error!r})") from None
    if not isinstance(activations, list) or not all(isinstance(name, str) for name in activations):
        raise ValueError("the activations metadata is not a JSON list of names")
    layers: list[_LayerMetadata] = []
    for index, name in enumerate(activations):
        op = OPS.get(name)
        if op is not None and op.params:  # version 1 could not record them
            raise ValueError(f"layer {index}: {name} has parameters, which version 1 lacks")
        try:
            layers.append((PostOp(name), []))
        except ValueError as error:
            raise ValueError(f"layer {index}: {error}") from None
    return layers


def _layers_v2(metadata: dict[str, object]) -> list[_LayerMetadata]:
    """Version 2: ``layers``, a JSON list of ``{"post_op", "params", "normalization"}``."""
    try:
        entries = json.loads(str(metadata["layers"]))
    except (KeyError, ValueError, RecursionError) as error:
        raise ValueError(f"bad layers metadata ({error!r})") from None
    if not isinstance(entries, list):
        raise ValueError("the layers metadata is not a JSON list")
    layers: list[_LayerMetadata] = []
    for index, entry in enumerate(entries):
        try:
            layers.append(_layer_v2(entry))
        except ValueError as error:
            raise ValueError(f"layer {index}: {error}") from None
    return layers


def _layer_v2(entry: object) -> _LayerMetadata:
    keys = {"post_op", "params", "normalization"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise ValueError(f"expected an object with keys {sorted(keys)}, got {entry!r}")
    name, params, normalization = entry["post_op"], entry["params"], entry["normalization"]
    if not isinstance(name, str):
        raise ValueError(f"post_op must be a name, got {name!r}")
    op = post_op(name).op  # an unknown name is the error that lists the known ones
    names = [param for param, _ in op.params]
    if not isinstance(params, dict) or sorted(params) != sorted(names):
        raise ValueError(f"{name} takes parameters {names} by name, got {params!r}")
    if not all(_is_number(value) for value in params.values()):
        raise ValueError(f"{name}: parameters must be finite numbers, got {params!r}")
    resolved = PostOp(name, tuple(float(params[param]) for param in names))
    if not isinstance(normalization, list):
        raise ValueError(f"normalization must be a list, got {normalization!r}")
    norms = []
    for norm in normalization:
        if not (
            isinstance(norm, dict)
            and set(norm) == {"position", "eps"}
            and norm["position"] in POSITIONS
            and _is_number(norm["eps"])
        ):
            raise ValueError(
                f"a normalization is an object with a position ({' or '.join(POSITIONS)}) and an "
                f"eps (a number), got {norm!r}"
            )
        norms.append((str(norm["position"]), float(norm["eps"])))
    return resolved, norms


def _is_number(value: object) -> bool:
    """A finite JSON float (Python's reader takes NaN and Infinity too), or an int that converts
    to one (not one beyond 1.8e308)."""
    return (type(value) is float and math.isfinite(value)) or (
        type(value) is int and abs(value) <= sys.float_info.max
    )


def _normalization(
    tensors: dict[str, np.ndarray], prefix: str, entry: tuple[str, float]
) -> Normalization:
    """The normalization ``entry`` (position, eps) describes, whose arrays are the tensors
    ``{prefix}.mean``, ``.var`` and, where present, ``.weight`` and ``.bias``."""
    mean, var = (tensors.pop(f"{prefix}.{kind}", None) for kind in ("mean", "var"))
    if mean is None or var is None:
        raise ValueError(f"tensor '{prefix}.{'var' if mean is not None else 'mean'}' is missing")
    position, eps = entry
    return Normalization(
        position,  # type: ignore[arg-type]  # one of POSITIONS: _layer_v2 checked it
        mean,
        var,
        eps,
        tensors.pop(f"{prefix}.weight", None),
        tensors.pop(f"{prefix}.bias", None),
    )


def _tensors(header: dict[str, object], body: memoryview) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors header, by name, copied out of the data ``body``; they
    must tile it exactly."""
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
    return tensors


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
