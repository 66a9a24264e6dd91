"""The argv vocabulary of ``fuzz_cli.py``, shared with ``make_corpus.py``, which writes its seeds.

A fuzz input is read one byte at a time, each byte giving one argument:

* ``LITERAL`` is followed by a length byte and that many bytes, a free-form argument (UTF-8,
  with ``/``, NUL and ``{`` replaced: a literal never names a path outside the harness's
  working directory, nor holds what no real command line can);
* after an argument that takes a value (``--threads``, ``-o``, ``encode``'s MODEL, ...), an even
  byte picks from the values that fit it (``VALUES``), so that most mutations of a value try
  another value of the same kind;
* any other byte picks from all the tokens, ``TOKENS[byte % len(TOKENS)]``.

Tokens ``{fixtures}/...`` and ``{out}/...`` name files in the harness's directories.
"""

from __future__ import annotations

LITERAL = 0xFF
MAX_LITERAL = 40

COMMANDS = ("encode", "info", "bench", "demo", "-h", "--version", "--", "-", "")
FLAGS = (
    "-o",
    "--output",
    "--decode",
    "--reconstruct",
    "--force",
    "--threads",
    "--batch-size",
    "--key",
    "--layers",
    "--trust-pickle",
    # Parquet's; --engine ray is only parsed (it starts a Ray cluster).
    "--column",
    "--columns",
    "--keep",
    "--output-column",
    "--resume",
    "--engine",
    "--actors",
    "--cpus-per-actor",
    # bench's and demo's, which are only parsed.
    "--widths",
    "--batch",
    "--rounds",
    "--dtype",
    "--epochs",
)
COUNTS = ("0", "1", "2", "3", "-1", "1024", "1025", "99999999999999999999", "1.5", "x")
KEYS = ("x", "y", "arr_0")
LAYER_TEXTS = (
    "linear,relu,linear",
    "linear(8,4),relu,linear(4,2)",
    "linear,batchnorm,leaky_relu(0.2),linear",
    "linear,hardtanh(0,6),linear,sigmoid",
    "linear,relu",
    "linear(",
)
WIDTHS = ("3,2", "2,3,2", "3", "0,2", "a,b")
# Parquet columns (fuzz_cli.make_fixtures: rows.parquet holds id, x and label; scalars.parquet
# id and x0..x7).
COLUMNS = ("x", "id", "label", "x0", "missing")
COLUMN_LISTS = ("x0,x1,x2,x3,x4,x5,x6,x7", "x0,x1", "id", "x0,,x1", "x7,x6,x5,x4,x3,x2,x1,x0")
KEPT = ("id", "id,label", "x", "codes", "label,id,label")
ENGINES = ("local", "ray", "spark")
DTYPES = ("float32", "float64", "float16")
# ae takes rows of 8 values, its decoder codes of 2 (fuzz_cli.make_fixtures).
MODELS = (
    "{fixtures}/ae.safetensors",
    "{fixtures}/ae64bn.safetensors",
    "{fixtures}/encoder_only.safetensors",
    "{fixtures}/format1.safetensors",
    "{fixtures}/garbage.safetensors",
    "{fixtures}/truncated.safetensors",
    "{fixtures}/missing.safetensors",
    "{fixtures}/state_dict.pt",
    "{fixtures}/module.pt",
    "{fixtures}/garbage.pt",
)
INPUTS = (
    "{fixtures}/x.npy",
    "{fixtures}/x64.npy",
    "{fixtures}/x3d.npy",
    "{fixtures}/codes.npy",
    "{fixtures}/wide.npy",
    "{fixtures}/int.npy",
    "{fixtures}/fortran.npy",
    "{fixtures}/truncated.npy",
    "{fixtures}/empty.npy",
    "{fixtures}/scalar.npy",
    "{fixtures}/negative.npy",
    "{fixtures}/negative_rows.npy",
    "{fixtures}/x.npz",
    "{fixtures}/two.npz",
    "{fixtures}/compressed.npz",
    "{fixtures}/missing.npy",
    "{fixtures}/x.txt",
    "{fixtures}",
    "{out}/in.npy",
    "{fixtures}/rows.parquet",
    "{fixtures}/scalars.parquet",
    "{fixtures}/wrong_width.parquet",
    "{fixtures}/lake",
    "{fixtures}/lake/*.parquet",
    "{fixtures}/lake/**/*.parquet",
)
OUTPUTS = (
    "{out}/a.npy",
    "{out}/exists.npy",
    "{out}/in.npy",
    "{out}/a.txt",
    "{out}/nodir/a.npy",
    "{out}",
    "a.npy",
    "{fixtures}/x.npy",
    "{out}/codes.parquet",
    "{out}/codes",
    "codes",
    "{fixtures}/lake",
    "{fixtures}/rows.parquet",
)

TOKENS: tuple[str, ...] = tuple(
    dict.fromkeys(
        COMMANDS
        + FLAGS
        + COUNTS
        + KEYS
        + LAYER_TEXTS
        + WIDTHS
        + DTYPES
        + COLUMNS
        + COLUMN_LISTS
        + KEPT
        + ENGINES
        + MODELS
        + INPUTS
        + OUTPUTS
    )
)
assert 2 * len(TOKENS) < LITERAL  # each token has an odd byte below LITERAL
# What fits after an argument: a flag's values, encode's MODEL, then its INPUT.
VALUES: dict[str, tuple[str, ...]] = {
    "encode": MODELS,
    **dict.fromkeys(MODELS, INPUTS),
    **dict.fromkeys(("-o", "--output"), OUTPUTS),
    **dict.fromkeys(
        ("--threads", "--batch-size", "--batch", "--rounds", "--epochs", "--actors"), COUNTS
    ),
    "--cpus-per-actor": COUNTS,
    **dict.fromkeys(("--column", "--output-column"), COLUMNS),
    "--columns": COLUMN_LISTS,
    "--keep": KEPT,
    "--engine": ENGINES,
    "--key": KEYS,
    "--layers": LAYER_TEXTS,
    "--widths": WIDTHS,
    "--dtype": DTYPES,
}


def decode(data: bytes, fixtures: str, out: str) -> list[str]:
    """The argv that ``data`` spells, its paths in ``fixtures`` and ``out``."""
    tokens: list[str] = []  # as spelled in TOKENS, before the paths are filled in
    position = 0
    while position < len(data):
        byte = data[position]
        position += 1
        if byte == LITERAL:
            length = data[position] % (MAX_LITERAL + 1) if position < len(data) else 0
            raw = data[position + 1 : position + 1 + length]
            position += 1 + length
            text = raw.decode("utf-8", errors="replace")
            tokens.append(text.replace("/", "_").replace("\0", "_").replace("{", "("))
            continue
        fitting = VALUES.get(tokens[-1]) if tokens else None
        if fitting is not None and byte % 2 == 0:
            tokens.append(fitting[(byte // 2) % len(fitting)])
        else:
            tokens.append(TOKENS[byte % len(TOKENS)])
    return [token.replace("{fixtures}", fixtures).replace("{out}", out) for token in tokens]


def encode(argv: list[str]) -> bytes:
    """The fuzz input spelling ``argv`` (paths as ``{fixtures}/...``, ``{out}/...``): each item a
    token (where it fits the item before, as such), or else a literal."""
    data = bytearray()
    for index, argument in enumerate(argv):
        fitting = VALUES.get(argv[index - 1], ()) if index else ()
        if argument in fitting:
            data.append(2 * fitting.index(argument))
        elif argument in TOKENS:
            # The first byte that decodes to it: an odd one where an even one would fit.
            index = TOKENS.index(argument)
            data.append(
                next(
                    byte
                    for byte in range(index, LITERAL, len(TOKENS))
                    if not fitting or byte % 2 == 1
                )
            )
        else:
            raw = argument.encode()
            if len(raw) > MAX_LITERAL or any(c in argument for c in "/\0{"):
                raise ValueError(f"{argument!r} is neither a token nor a literal")
            data += bytes([LITERAL, len(raw)]) + raw
    return bytes(data)
