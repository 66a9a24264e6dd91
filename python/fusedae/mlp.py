"""``MLP``: the fused kernels on numpy arrays, no PyTorch needed."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fusedae import _native, serialization
from fusedae._ops import IDENTITY, RELU, PostOp
from fusedae.chain import (
    ChainSpec,
    Layer,
    Precision,
    PrecisionName,
    is_float64,
    spec_precision,
)

FloatArray = npt.NDArray[np.floating]


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype:
    """``dtype`` as float32 or float64 in this machine's byte order (``">f8"`` too)."""
    resolved = np.dtype(dtype)
    if resolved.kind != "f" or resolved.itemsize not in (4, 8):
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    return resolved.newbyteorder("=")


_FULL_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype(np.float32), "fp64": np.dtype(np.float64)}


def resolve_precision(
    precision: str | None, dtype: npt.DTypeLike | None, default: np.dtype
) -> tuple[np.dtype, Precision]:
    """``(dtype, ChainSpec precision)`` for what the caller asked: ``precision`` ``"fp32"`` or
    ``"fp64"`` computes in that dtype, ``"bf16"`` and ``"int8"`` store the weights narrower and
    take and give float32; ``None`` keeps ``dtype`` (or ``default``) at full precision. A precision
    and a dtype that disagree are an error, not a silent choice."""
    spec = spec_precision(precision)
    if precision is None:
        return _float_dtype(default if dtype is None else dtype), spec
    wanted = _FULL_DTYPES.get(precision, np.dtype(np.float32))
    if dtype is not None and _float_dtype(dtype) != wanted:
        raise TypeError(
            f"precision {precision!r} takes and gives {wanted} arrays, but dtype={np.dtype(dtype)}"
        )
    return wanted, spec


def _as_parameter(value: npt.ArrayLike, what: str, ndim: int, dtype: np.dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{what}: expected a real numeric array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {array.shape}")
    return np.array(array, dtype=dtype, order="C", copy=True)


def check_output_size(rows: int, out_features: int, dtype: np.dtype) -> None:
    """Refuses a batch whose output could not even be addressed, before anything is allocated."""
    if rows * out_features * dtype.itemsize > sys.maxsize:
        raise ValueError(
            f"an output of {rows} x {out_features} {dtype} values is larger than memory can address"
        )


def check_input(
    x: object, dtype: np.dtype, in_features: int, out_features: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validates ``x`` of shape ``(*, in_features)``; returns it as an aligned C-contiguous 2-D
    array of ``dtype`` (copied only if it must be) and the leading shape."""
    array = x if isinstance(x, np.ndarray) else np.asarray(x, dtype=dtype)
    if array.dtype != dtype and (array.dtype.kind != "f" or array.dtype.itemsize != dtype.itemsize):
        raise TypeError(f"expected a {dtype} array, got {array.dtype}")
    shape = array.shape
    if not shape or shape[-1] != in_features:
        raise ValueError(f"expected an array of shape (*, {in_features}), got shape {shape}")
    lead = shape[:-1]
    rows = math.prod(lead)
    check_output_size(rows, out_features, dtype)
    if len(shape) != 2:
        array = array.reshape(rows, in_features)
    flags = array.flags
    if not (flags.c_contiguous and flags.aligned) or array.dtype != dtype:
        array = np.require(array, dtype, ["C", "A"])
    return array, lead


class MLP(_native.Chain):
    """A chain of Linear layers run by fusedae's fused SIMD kernels, on numpy arrays.

    ``layers`` holds ``(weight, bias)`` pairs in PyTorch layout: ``weight`` of shape
    ``(out, in)``, ``bias`` of shape ``(out,)`` or ``None``. ``activations`` gives one post-op
    per layer, applied to its outputs: a name (``"relu"``, ``"identity"``: ``fusedae._ops.OPS``)
    or a ``PostOp`` (default: ReLU after every layer but the last); ``MLP.from_spec`` takes a
    ``ChainSpec`` instead. The weights are packed once, in ``dtype`` (default: float64 if the
    first weight is float64, else float32); the MLP keeps no reference to the arrays passed in.
    ``precision="bf16"`` stores the weights as bfloat16 (rounded to nearest even) for inference:
    float32 in and out, sums in float32; ``"int8"`` stores them as int8 with a scale per output
    and quantizes each layer's input rows to uint8 (a scale and zero point per row), sums in
    int32; each within its error bound in ``docs/precision.md``. ``"fp32"``/``"fp64"`` name the
    dtype's own arithmetic.

    Calling it on an array of shape ``(*, in_features)`` and the MLP's dtype returns a new array
    of shape ``(*, out_features)``; ``out=`` takes a preallocated C-contiguous array instead.
    The call itself is native (``_native.Chain``): a 2-D C-contiguous array of the MLP's dtype
    goes straight to the kernel, and anything else comes back to ``_call_general``.
    """

    __slots__ = ("_dtype", "_spec")
    _dtype: np.dtype
    _spec: ChainSpec

    def __new__(
        cls,
        layers: Sequence[tuple[npt.ArrayLike, npt.ArrayLike | None]],
        activations: Sequence[str | PostOp] | None = None,
        *,
        dtype: npt.DTypeLike | None = None,
        isa: str | None = None,
        precision: PrecisionName | None = None,
    ) -> MLP:
        layers = list(layers)
        if not layers:
            raise ValueError("an MLP needs at least one layer, got 0")
        first = np.asarray(layers[0][0])
        default = np.dtype(np.float64 if is_float64(first.dtype) else np.float32)
        dtype, spec_precision = resolve_precision(precision, dtype, default)
        if activations is None:
            activations = [RELU] * (len(layers) - 1) + [IDENTITY]
        pairs: list[tuple[np.ndarray, np.ndarray | None]] = []
        for index, pair in enumerate(layers):
            if len(pair) != 2:
                raise ValueError(f"layer {index}: expected a (weight, bias) pair, got {pair!r}")
            weight, bias = pair
            weight = _as_parameter(weight, f"layer {index} weight", 2, dtype)
            if bias is not None:
                bias = _as_parameter(bias, f"layer {index} bias", 1, dtype)
            pairs.append((weight, bias))
        spec = ChainSpec.from_pairs(pairs, activations)
        return cls._packed(replace(spec, precision=spec_precision), dtype, isa)

    @classmethod
    def from_spec(
        cls,
        spec: ChainSpec,
        *,
        dtype: npt.DTypeLike | None = None,
        isa: str | None = None,
        precision: PrecisionName | None = None,
    ) -> MLP:
        """The MLP running ``spec`` (its weights copied, in ``dtype``: by default float64 if the
        first weight is float64, else float32) at ``precision`` (default: the spec's)."""
        if precision is None and spec.precision != "full":
            precision = spec.precision
        default = np.dtype(np.float64 if is_float64(spec.layers[0].weight.dtype) else np.float32)
        dtype, spec_precision = resolve_precision(precision, dtype, default)
        layers = []
        for index, layer in enumerate(spec.layers):
            weight = _as_parameter(layer.weight, f"layer {index} weight", 2, dtype)
            bias = layer.bias
            if bias is not None:
                bias = _as_parameter(bias, f"layer {index} bias", 1, dtype)
            layers.append(Layer(weight, bias, layer.post_op, layer.normalization))
        return cls._packed(
            ChainSpec(tuple(layers), spec.encoder_layers, spec_precision), dtype, isa
        )

    @classmethod
    def _packed(cls, spec: ChainSpec, dtype: np.dtype, isa: str | None) -> MLP:
        """Packs ``spec``, whose arrays are the MLP's own copies in ``dtype``."""
        native_precision = None if spec.precision == "full" else spec.precision
        self = _native.Chain.__new__(cls, *spec.native_arguments(), isa, native_precision)
        self._dtype = dtype
        self._spec = spec
        return self

    if TYPE_CHECKING:  # the native call, which takes more than `_native.Chain` promises

        def __call__(self, x: npt.ArrayLike, out: FloatArray | None = None) -> FloatArray:
            """``(*, in_features)`` -> ``(*, out_features)``, in the MLP's dtype."""

    def _call_general(self, x: npt.ArrayLike, out: FloatArray | None) -> FloatArray:
        """What the native call refused: input converted if it can be (the other byte order,
        any leading shape, non-contiguous, lists; float64 into a bf16/int8 chain), or an error
        that says what was wrong (another float dtype)."""
        if self._spec.precision != "full" and is_float64(getattr(x, "dtype", None)):
            x = np.asarray(x, np.float32)  # a bf16/int8 chain takes float32: float64 converted
        x2, lead = check_input(x, self._dtype, self.in_features, self.out_features)
        if out is None:
            result = self.forward(x2)
            return result if len(lead) == 1 else result.reshape((*lead, self.out_features))
        expected = (*lead, self.out_features)
        if not isinstance(out, np.ndarray) or out.shape != expected or out.dtype != self._dtype:
            got = (
                f"{out.dtype} array of shape {out.shape}"
                if isinstance(out, np.ndarray)
                else type(out).__name__
            )
            raise ValueError(f"out must be a {self._dtype} array of shape {expected}, got {got}")
        if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable):
            raise ValueError("out must be C-contiguous, aligned and writeable")
        self.forward(x2, out.reshape(x2.shape[0], self.out_features))
        return out

    def __reduce__(self) -> tuple[Callable[..., MLP], tuple[object, ...]]:
        # The packed form is rebuilt where it is unpickled (that CPU's kernel), from the spec
        # with its normalizations; the arrays keep the dtype, which follows from the first weight.
        return type(self).from_spec, (self._spec,)

    @property
    def activations(self) -> tuple[str, ...]:
        """Each layer's post-op name."""
        return self._spec.activations

    @property
    def spec(self) -> ChainSpec:
        """The chain this MLP runs (its arrays are the MLP's own: read them, do not write)."""
        return self._spec

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Copies of the ``(weight, bias)`` pairs, in the MLP's dtype (as the spec holds them:
        its normalizations are not folded in; ``spec.folded()`` has them folded)."""
        return [
            (layer.weight.copy(), None if layer.bias is None else layer.bias.copy())
            for layer in self._spec.layers
        ]

    def __repr__(self) -> str:
        chain = " -> ".join(str(width) for width in self._spec.widths)
        activations = [str(op) for op in self._spec.post_ops]
        return (
            f"MLP({chain}, activations={activations}, dtype={self._dtype}, "
            f"precision={self.precision}, isa={self.isa})"
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        part: serialization.Part = "all",
        *,
        dtype: npt.DTypeLike | None = None,
        isa: str | None = None,
        precision: PrecisionName | None = None,
    ) -> MLP:
        """The chain in a ``.safetensors`` file from ``fusedae.torch.save`` or ``MLP.save``,
        read with numpy alone.

        ``part``: ``"all"`` (every layer: an autoencoder's reconstruction), ``"encoder"`` (the
        layers up to the bottleneck the file records) or ``"decoder"`` (the layers after it).
        ``dtype`` defaults to the file's; ``precision`` as for ``MLP``. A file that is not such
        a model, or is truncated, is a ValueError; a part with no layers is one too.
        """
        spec = serialization.read(path).select(part)
        return cls.from_spec(spec, dtype=dtype, isa=isa, precision=precision)

    def save(self, path: str | os.PathLike[str], *, encoder_layers: int | None = None) -> None:
        """Writes the chain to a ``.safetensors`` file that ``MLP.load`` reads. ``encoder_layers``:
        how many leading layers ``MLP.load(path, "encoder")`` gives (default: the chain's own,
        as a file it was loaded from says, else up to the narrowest inner layer if the output
        is as wide as the input, else all of them). The file holds the weights as given, not a
        precision: load a bf16 or int8 MLP with ``MLP.load(path, precision=...)`` to run it so
        again."""
        spec = self._spec
        if encoder_layers is None:
            encoder_layers = spec.encoder_layers
        serialization.write_spec(path, ChainSpec(spec.layers, encoder_layers, spec.precision))
