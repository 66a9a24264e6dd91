"""``ChainSpec``: the one representation of a chain of Linear layers that every entry point lowers
to (``MLP(...)``, ``.safetensors`` files, state_dicts, torch modules) before it is packed for the
kernels or written to a file. numpy only.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fusedae._ops import PostOp, post_ops

Part = Literal["all", "encoder", "decoder"]
PARTS: tuple[Part, ...] = ("all", "encoder", "decoder")
# How the kernels compute: "full" is every product and sum in the chain's dtype (float32 or
# float64); "bf16" stores the weights as bfloat16 (float32 in, out and in the sums); "int8"
# stores them as int8 with a scale per output and quantizes each layer's input rows to uint8
# (float32 in and out, int32 sums).
Precision = Literal["full", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("full", "bf16", "int8")
# What `precision=` takes in the public API: the dtype's own arithmetic ("fp32", "fp64"), or
# weights stored narrower ("bf16", "int8": float32 in and out).
PrecisionName = Literal["fp32", "fp64", "bf16", "int8"]
PRECISION_NAMES: tuple[PrecisionName, ...] = ("fp32", "fp64", "bf16", "int8")


def is_float64(dtype: object) -> bool:
    """Whether ``dtype`` is a numpy float64 of either byte order (``">f8" == np.float64`` is
    False)."""
    return isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize == 8


def spec_precision(name: str | None) -> Precision:
    """The ChainSpec precision for a public ``precision=`` value (None: the dtype's own)."""
    if name is not None and name not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {PRECISION_NAMES}, got {name!r}")
    if name == "bf16" or name == "int8":
        return name
    return "full"


def precision_name(precision: Precision) -> PrecisionName:
    """The public name of a ChainSpec precision ("full" runs float32 in a torch module)."""
    return "fp32" if precision == "full" else precision


LayerArrays = tuple[np.ndarray, np.ndarray | None]
Position = Literal["before", "after"]
POSITIONS: tuple[Position, ...] = ("before", "after")


@dataclass(frozen=True)
class Normalization:
    """An eval-mode BatchNorm1d: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per
    feature (``weight``/``bias`` None when it is not affine).

    ``position``: ``"before"`` normalizes the Linear's input, ``"after"`` its output (before the
    post-op). The arrays are kept as they are, unfolded: ``ChainSpec.native_arguments`` folds
    them into the Linear's weight and bias when packing, so a spec saves and rebuilds exactly.
    """

    position: Position
    mean: np.ndarray
    var: np.ndarray
    eps: float
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")

    def scale_and_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, shift)`` in float64 with ``y = x * scale + shift``."""
        scale = 1.0 / np.sqrt(np.asarray(self.var, np.float64) + self.eps)
        if self.weight is not None:
            scale = scale * np.asarray(self.weight, np.float64)
        shift = -np.asarray(self.mean, np.float64) * scale
        if self.bias is not None:
            shift = shift + np.asarray(self.bias, np.float64)
        return scale, shift

    def check_shape(self, features: int) -> None:
        """Raises ValueError unless every array has shape ``(features,)``."""
        for name in ("mean", "var", "weight", "bias"):
            array = getattr(self, name)
            if array is not None and array.shape != (features,):
                raise ValueError(
                    f"{self.position} normalization: {name} must have shape ({features},), "
                    f"got {array.shape}"
                )


@dataclass(frozen=True)
class Layer:
    """One Linear layer and what follows it: ``post_op(x @ weight.T + bias)`` for ``x`` of shape
    ``(rows, in)``; ``weight`` of shape ``(out, in)``, ``bias`` ``(out,)`` or None.

    ``normalization``: BatchNorms around the Linear, in the order they apply (all ``"before"``
    ones first): ``post_op(after(before(x) @ weight.T + bias))``. Unpacks as its ``(weight,
    bias)`` pair, as the layers of ``serialization.ChainSpec`` did (unfolded: ``folded()`` gives
    the pair that computes the same as the normalizations and the Linear together).
    """

    weight: np.ndarray
    bias: np.ndarray | None
    post_op: PostOp
    normalization: tuple[Normalization, ...] = ()

    def __post_init__(self) -> None:
        positions = [norm.position for norm in self.normalization]
        if positions != sorted(positions, key=POSITIONS.index):
            raise ValueError(f"normalizations before the Linear come first, got {positions}")

    def folded(self) -> LayerArrays:
        """The ``(weight, bias)`` computing the normalizations and the Linear in one, folded in
        float64 and rounded once to the weight's dtype; the layer's own arrays if it has no
        normalization."""
        if not self.normalization:
            return self.weight, self.bias
        weight = np.asarray(self.weight, np.float64)
        rows = weight.shape[0]
        bias = np.zeros(rows) if self.bias is None else np.asarray(self.bias, np.float64)
        # x -> before[0] -> ... -> Linear -> after[0] -> ...: the Linear absorbs the nearest
        # normalization first on each side.
        for norm in reversed(self.normalization):
            if norm.position == "before":
                scale, shift = norm.scale_and_shift()
                bias = bias + weight @ shift
                weight = weight * scale
        for norm in self.normalization:
            if norm.position == "after":
                scale, shift = norm.scale_and_shift()
                weight = weight * scale[:, None]
                bias = bias * scale + shift
        dtype = self.weight.dtype
        return weight.astype(dtype), bias.astype(dtype)

    def __iter__(self) -> Iterator[np.ndarray | None]:
        return iter((self.weight, self.bias))

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


def default_encoder_layers(widths: Sequence[int]) -> int:
    """Where the encoder ends in a chain of ``widths`` (input, then each layer's output): at the
    first narrowest inner layer if the output is as wide as the input, else at the end."""
    layers = len(widths) - 1
    if layers < 2 or widths[-1] != widths[0]:
        return layers
    inner = widths[1:-1]
    return inner.index(min(inner)) + 1


@dataclass(frozen=True)
class ChainSpec:
    """A chain of Linear layers: ``layers`` in order, each with its post-op; the first
    ``encoder_layers`` of them form the encoder, the rest the decoder; ``precision`` the kernels
    compute in. Input ``(rows, layers[0].in_features)``, output ``(rows, out_features)``.

    Construction checks the structure (layers, post-ops, ``encoder_layers``, ``precision``);
    ``check_shapes`` the widths, which the native chain checks on its own when packing.
    """

    layers: tuple[Layer, ...]
    encoder_layers: int
    precision: Precision = "full"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a chain needs at least one layer, got 0")
        for index, layer in enumerate(self.layers):
            if not isinstance(layer.post_op, PostOp):
                raise TypeError(f"layer {index}: post_op must be a PostOp, got {layer.post_op!r}")
        if isinstance(self.encoder_layers, bool) or not isinstance(
            self.encoder_layers, numbers.Integral
        ):  # (True and 1.5 passed the range check: a file written so could not be read back)
            raise TypeError(f"encoder_layers must be an int, got {self.encoder_layers!r}")
        if not 0 <= self.encoder_layers <= len(self.layers):
            raise ValueError(
                f"encoder_layers must be between 0 and {len(self.layers)}, "
                f"got {self.encoder_layers}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[LayerArrays],
        activations: Sequence[str | PostOp],
        encoder_layers: int | None = None,
    ) -> ChainSpec:
        """The chain of ``(weight, bias)`` pairs with one activation (a name or a PostOp) per
        layer; ``encoder_layers`` defaults to ``default_encoder_layers`` of the widths."""
        if not pairs:
            raise ValueError("a chain needs at least one layer, got 0")
        if len(activations) != len(pairs):
            raise ValueError(
                f"need one activation per layer: got {len(activations)} for {len(pairs)} layers"
            )
        ops = post_ops(activations)
        layers = tuple(
            Layer(weight, bias, op) for (weight, bias), op in zip(pairs, ops, strict=True)
        )
        if encoder_layers is None:
            # Weights that are not 2-D leave all layers to the encoder: `check_shapes` refuses them.
            two_d = all(layer.weight.ndim == 2 for layer in layers)
            widths = [layers[0].in_features, *(layer.out_features for layer in layers)]
            encoder_layers = default_encoder_layers(widths) if two_d else len(layers)
        return cls(layers, encoder_layers)

    @property
    def post_ops(self) -> tuple[PostOp, ...]:
        return tuple(layer.post_op for layer in self.layers)

    @property
    def activations(self) -> tuple[str, ...]:
        """Each layer's post-op name."""
        return tuple(layer.post_op.name for layer in self.layers)

    @property
    def widths(self) -> list[int]:
        """The input width, then each layer's output width."""
        return [self.layers[0].in_features, *(layer.out_features for layer in self.layers)]

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def select(self, part: Part) -> ChainSpec:
        """The chain of ``"encoder"`` or ``"decoder"`` (all encoder), or ``"all"`` (this one); a
        part without layers is a ValueError."""
        bounds = {
            "all": (0, len(self.layers)),
            "encoder": (0, self.encoder_layers),
            "decoder": (self.encoder_layers, len(self.layers)),
        }
        if part not in bounds:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        start, stop = bounds[part]
        if start == stop:
            raise ValueError(
                f"this model has no {part}: its encoder is {self.encoder_layers} of its "
                f"{len(self.layers)} layers"
            )
        if part == "all":
            return self
        return ChainSpec(self.layers[start:stop], stop - start, self.precision)

    def part(self, part: Part) -> tuple[list[LayerArrays], list[str]]:
        """The ``(weight, bias)`` pairs and activation names of ``select(part)`` (the layers' own
        arrays, normalizations not folded in)."""
        selected = self.select(part)
        return [(layer.weight, layer.bias) for layer in selected.layers], list(selected.activations)

    def check_shapes(self) -> None:
        """Raises ValueError unless each weight is 2-D, each bias matches its weight and each
        layer takes what the previous one gives."""
        previous: Layer | None = None
        for index, layer in enumerate(self.layers):
            weight, bias = layer.weight, layer.bias
            if weight.ndim != 2:
                raise ValueError(f"layer {index}: weight must be 2-D, got shape {weight.shape}")
            if 0 in weight.shape:
                raise ValueError(
                    f"layer {index}: widths must be at least 1, got weight shape {weight.shape}"
                )
            if bias is not None and bias.shape != weight.shape[:1]:
                raise ValueError(
                    f"layer {index}: bias must have shape ({weight.shape[0]},), got {bias.shape}"
                )
            for norm in layer.normalization:
                features = layer.in_features if norm.position == "before" else layer.out_features
                try:
                    norm.check_shape(features)
                except ValueError as error:
                    raise ValueError(f"layer {index}: {error}") from None
            if previous is not None and layer.in_features != previous.out_features:
                raise ValueError(
                    f"layer {index} takes {layer.in_features} features, but layer {index - 1} "
                    f"gives {previous.out_features}"
                )
            previous = layer

    def folded(self) -> ChainSpec:
        """The chain computing the same with each layer's normalizations folded into its weight
        and bias (``Layer.folded``); this one if it has none."""
        if not any(layer.normalization for layer in self.layers):
            return self
        self.check_shapes()  # folding multiplies arrays whose shapes must agree
        layers = tuple(Layer(*layer.folded(), layer.post_op) for layer in self.layers)
        return ChainSpec(layers, self.encoder_layers, self.precision)

    def native_arguments(
        self,
    ) -> tuple[list[np.ndarray], list[np.ndarray | None], list[str | tuple[str | float, ...]]]:
        """What ``_native.Chain`` takes: C-contiguous, aligned weights and biases (copied only
        where they are not) with normalizations folded in (``folded``), and each layer's
        post-op: its name, or ``(name, *params)`` for an op with parameters."""
        layers = self.folded().layers
        weights = [np.require(layer.weight, requirements=("C", "A")) for layer in layers]
        biases = [
            None if layer.bias is None else np.require(layer.bias, requirements=("C", "A"))
            for layer in layers
        ]
        post_ops = [op.native_argument for op in self.post_ops]
        return weights, biases, post_ops
