"""Coverage-guided fuzzing (atheris) of fusedae's ``.safetensors`` model reader.

Each input is a candidate model file. It goes through:

* ``serialization._parse(data)``, whose only documented error is ``ValueError``;
* ``MLP.load(path, part)`` on the same bytes written to a file, for every part: a file
  ``_parse`` refuses must be a ``ValueError`` starting ``"<path>: not a valid fusedae model
  file: "``; from one it accepts, a part without layers (or anything the native chain refuses)
  may be a ``ValueError``, and every MLP loaded must run a batch of zeros to an output of the
  right shape;
* for a file ``_parse`` accepts, ``serialization.write_spec`` then ``read`` of what it gave:
  the same chain (post-ops and parameters, normalizations, ``encoder_layers``, the same bits
  in every array of the written dtype), and no temporary file left behind.

A finding is anything else: another exception escaping (``RecursionError``, ``OverflowError``,
a native ``PanicException``, ...), a crash or a hang (libFuzzer's ``-timeout``), a broken
round trip or a leftover ``.tmp`` file. Usage::

    python fuzz/python/fuzz_safetensors.py CORPUS_DIR -max_total_time=60

stops at the first finding; with ``FUZZ_FINDINGS=DIR`` it records each distinct one in ``DIR``
and goes on (``findings.py``).

The custom mutator keeps many inputs well-formed enough to reach past the size field and the
JSON header: besides libFuzzer's byte mutations (with the size field left as mutated, or fixed
to the JSON header's length), it edits the header as JSON (the ``layers`` metadata too),
putting edge values (huge integers, NaN, negative sizes, deep nesting, wrong types) in place
of values, or deleting and duplicating entries.

Scratch files go to a directory made under ``$TMPDIR``, which stays behind (libFuzzer ends the
process itself); ``tools/fuzz_python.sh`` points ``TMPDIR`` at a directory it removes.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import sys
import tempfile
from typing import Any

import atheris
import findings
import numpy as np  # imported before instrumentation: numpy itself is not what is fuzzed

with atheris.instrument_imports(include=["fusedae"]):
    from fusedae import MLP, serialization
    from fusedae.chain import PARTS, ChainSpec

WORKDIR = tempfile.mkdtemp(prefix="fuzz-safetensors-")
MODEL = os.path.join(WORKDIR, "model.safetensors")
ROUND_TRIP = os.path.join(WORKDIR, "round-trip.safetensors")
READ_ERROR = f"{MODEL}: not a valid fusedae model file: "

# Stands for a deeply nested list, spliced into the header's text after json.dumps (which
# could not write it: it recurses).
DEEP = "\0deep\0"
DEEP_TEXT = "[" * 1200 + "]" * 1200  # deeper than the default recursion limit, 1000
EDGE_VALUES: tuple[object, ...] = (
    0,
    1,
    -1,
    2,
    3,
    2**31,
    2**63,
    2**64 + 1,
    10**400,
    -(10**400),
    0.5,
    -0.0,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "0",
    "1",
    "2",
    "1e400",
    "F32",
    "F64",
    "F16",
    "relu",
    "leaky_relu",
    "softplus",
    "before",
    "after",
    "fusedae.chain",
    None,
    True,
    [],
    {},
    [0],
    [0, 0],
    [1, 2],
    [2, 0],
    [0, 10**30],
    [10**30, 10**30],
    [-1, 2],
    DEEP,
)


class Finding(Exception):
    """A behaviour the reader's documentation does not allow."""


# --- the checks -------------------------------------------------------------------------------


def TestOneInput(data: bytes) -> None:
    try:
        spec: ChainSpec | None = serialization._parse(data)
    except ValueError:
        spec = None
    with open(MODEL, "wb") as file:
        file.write(data)
    check_load(spec)
    if spec is not None:
        check_round_trip(spec)


def check_load(spec: ChainSpec | None) -> None:
    """``MLP.load`` of the file refuses what ``_parse`` refused, with the file's name, and runs
    what it accepted."""
    if spec is None:
        try:
            MLP.load(MODEL)
        except ValueError as error:
            if not str(error).startswith(READ_ERROR):
                raise Finding(f"the error does not start {READ_ERROR!r}: {error}") from error
            return
        raise Finding("MLP.load accepted a file that serialization._parse refused")
    for part in PARTS:
        try:
            mlp = MLP.load(MODEL, part)
        except ValueError:
            continue  # no layers in that part, or weights the native chain refuses
        y = mlp(np.zeros((2, mlp.in_features), mlp.dtype))
        if y.shape != (2, mlp.out_features) or y.dtype != mlp.dtype:
            raise Finding(f"{part}: {mlp!r} gave a {y.dtype} array of shape {y.shape}")


def check_round_trip(spec: ChainSpec) -> None:
    """What ``_parse`` accepted, written and read back, is the same chain."""
    serialization.write_spec(ROUND_TRIP, spec)
    again = serialization.read(ROUND_TRIP)
    dtype = np.dtype("<f8" if spec.layers[0].weight.dtype == np.float64 else "<f4")
    if fingerprint(spec, dtype) != fingerprint(again, dtype):
        raise Finding(f"the round trip changed the chain: {spec} -> {again}")
    leftovers = [name for name in os.listdir(WORKDIR) if name.endswith(".tmp")]
    if leftovers:
        raise Finding(f"write_spec left {leftovers}")


def fingerprint(spec: ChainSpec, dtype: np.dtype) -> tuple[object, ...]:
    """Everything a file records of ``spec``, its arrays as bytes of ``dtype``, floats by repr
    (so NaN equals NaN and -0.0 differs from 0.0)."""

    def array(value: np.ndarray | None) -> tuple[object, ...] | None:
        if value is None:
            return None
        return value.shape, np.ascontiguousarray(value, dtype).tobytes()

    layers = []
    for layer in spec.layers:
        norms = tuple(
            (
                norm.position,
                repr(norm.eps),
                *map(array, (norm.mean, norm.var, norm.weight, norm.bias)),
            )
            for norm in layer.normalization
        )
        params = tuple(map(repr, layer.post_op.params))
        layers.append((layer.post_op.name, params, norms, array(layer.weight), array(layer.bias)))
    return spec.encoder_layers, spec.precision, tuple(layers)


# --- the mutator ------------------------------------------------------------------------------


def split(data: bytes) -> tuple[str, bytes] | None:
    """``(header text, tensor data)`` of a file whose header is one JSON value, found by its size
    field if that is right, else by parsing; None where there is no JSON after the size field.
    The text is the header's bytes as Latin-1, so lengths in characters are lengths in bytes."""
    if len(data) < 8:
        return None
    text = data[8:].decode("latin-1")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        if size <= len(text):
            json.loads(text[:size])
            return text[:size], data[8 + size :]
    except (ValueError, RecursionError):
        pass
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return None
    while end < len(text) and text[end] == " ":  # the padding belongs to the header
        end += 1
    return text[:end], data[8 + end :]


def with_size(header: str, body: bytes) -> bytes:
    encoded = header.encode("latin-1", errors="replace")
    return struct.pack("<Q", len(encoded)) + encoded + body


def fix_size(data: bytes) -> bytes:
    """``data`` with its size field set to the length of the JSON header that follows."""
    parts = split(data)
    return data if parts is None else with_size(*parts)


def mutate_json(value: object, rng: random.Random) -> object:
    """``value`` (a parsed JSON document) with one place changed: a value replaced by an edge
    value, or an entry deleted or duplicated (under another key, in an object)."""
    places: list[tuple[Any, Any]] = []  # (container, key or index)

    def collect(node: object) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                places.append((node, key))
                collect(child)
        elif isinstance(node, list):
            for index, child in enumerate(node):
                places.append((node, index))
                collect(child)

    collect(value)
    if not places:
        return rng.choice(EDGE_VALUES)
    container, key = rng.choice(places)
    action = rng.randrange(4)
    if action <= 1:
        container[key] = rng.choice(EDGE_VALUES)
    elif action == 2:
        del container[key]
    elif isinstance(container, list):
        container.insert(key, container[key])
    else:
        container[f"{key}{rng.choice(['', '.0', '0', 'x'])}"] = container[key]
    return value


def mutate_header(header: object, rng: random.Random) -> object:
    """``mutate_json`` of the header, or, half the time, of its ``layers`` metadata (JSON text
    within the JSON)."""
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("layers"), str) and rng.randrange(2):
        try:
            layers = json.loads(metadata["layers"])
        except (ValueError, RecursionError):
            pass
        else:
            metadata["layers"] = json.dumps(mutate_json(layers, rng))
            return header
    return mutate_json(header, rng)


def dumps(value: object) -> str:
    """``json.dumps``, with ``DEEP`` written as ``DEEP_TEXT`` (in ``layers`` metadata too)."""
    text = json.dumps(value, separators=(",", ":"))
    in_string = json.dumps(json.dumps(DEEP))[1:-1]  # DEEP within a JSON string within JSON
    return text.replace(in_string, DEEP_TEXT).replace(json.dumps(DEEP), DEEP_TEXT)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's custom mutator: one of three kinds of change, picked by ``seed``."""
    rng = random.Random(seed)
    kind = rng.randrange(10)
    parts = split(data) if kind < 4 else None
    if parts is not None:
        header, body = parts
        try:
            document = json.loads(header)
            mutated = with_size(dumps(mutate_header(document, rng)), body)
        except (ValueError, RecursionError):
            mutated = atheris.Mutate(data, max_size)
    else:
        mutated = atheris.Mutate(data, max_size)
        if kind < 8:
            mutated = fix_size(mutated)
    return mutated[:max_size]


def main() -> None:
    atheris.Setup(sys.argv, findings.keep_going(TestOneInput), custom_mutator=mutate)
    atheris.Fuzz()  # never returns: libFuzzer ends the process, leaving the scratch directory


if __name__ == "__main__":
    main()
