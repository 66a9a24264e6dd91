"""Torch modules -> ``ChainSpec``: which modules form a chain, and where each tensor it reads
lives; and back, a ``ChainSpec`` as plain PyTorch modules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fusedae._ops import IDENTITY, OPS, Op, PostOp
from fusedae.chain import ChainSpec

# Where a tensor lives: a module's `_parameters` (or `_buffers`) dict and its key there. A cache
# reads the tensor through it on every call, so a parameter replaced on the module is seen.
TensorSlot = tuple[dict[str, Any], str]


# The op table's module names resolved (its entries name them: `import fusedae` imports no torch).
_OPS_BY_MODULE_TYPE: dict[type[nn.Module], Op] = {
    getattr(nn, name): op for op in OPS.values() for name in op.torch_modules
}


def _post_op(module: nn.Module, op: Op) -> PostOp:
    """The post-op ``module`` applies: ``op`` with the module's parameter attributes."""
    return PostOp(op.name, tuple(float(getattr(module, name)) for name, _ in op.params))


@dataclass(frozen=True)
class LoweredChain:
    """A chain of modules as the kernels see it.

    ``layers``: each ``nn.Linear`` with the post-op after it. ``slots``: every tensor the chain's
    ``ChainSpec`` reads, in the order ``spec`` takes them (today each layer's weight and bias);
    the same order in which the modules hand them to ``FusedMLPFunction``.
    """

    layers: tuple[tuple[nn.Linear, PostOp], ...]
    slots: tuple[TensorSlot, ...]

    @property
    def in_features(self) -> int:
        return self.layers[0][0].in_features

    @property
    def post_ops(self) -> tuple[PostOp, ...]:
        return tuple(op for _, op in self.layers)

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensors in ``slots`` now."""
        return [owner[key] for owner, key in self.slots]

    def spec(
        self, tensors: Sequence[torch.Tensor | None], encoder_layers: int | None = None
    ) -> ChainSpec:
        """The ChainSpec over ``tensors`` (CPU tensors numpy can read, one per slot), whose
        arrays share the tensors' memory where they can; ``encoder_layers`` defaults as in
        ``ChainSpec.from_pairs``."""
        arrays = [None if tensor is None else as_array(tensor) for tensor in tensors]
        pairs = [
            (cast(np.ndarray, arrays[2 * i]), arrays[2 * i + 1]) for i in range(len(self.layers))
        ]
        return ChainSpec.from_pairs(pairs, self.post_ops, encoder_layers)


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """The values of a CPU ``tensor`` as numpy (sharing memory where the tensor holds them as
    they are: not for a conjugated or negated view)."""
    return tensor.detach().resolve_conj().resolve_neg().numpy()


def lower(modules: Iterable[nn.Module]) -> LoweredChain | None:
    """The chain ``modules`` form, in order, or None if they are not one: ``nn.Linear`` layers,
    each followed by at most one post-op module of the op table (``fusedae._ops.OPS``), or by
    several applying one idempotent op; ``nn.Identity`` anywhere. Only exact types qualify (a
    subclass may compute something else)."""
    layers: list[tuple[nn.Linear, PostOp]] = []
    for module in modules:
        kind = type(module)
        if kind is nn.Linear:
            layers.append((cast(nn.Linear, module), IDENTITY))
            continue
        op = _OPS_BY_MODULE_TYPE.get(kind)
        if op is None:
            return None
        post_op = _post_op(module, op)
        if post_op == IDENTITY:
            continue
        if not layers:
            return None  # a post-op before any Linear
        linear, current = layers[-1]
        if current == IDENTITY:
            layers[-1] = (linear, post_op)
        elif current != post_op or not op.idempotent:
            return None  # two post-ops in a row that are not one
    if not layers:
        return None
    slots = tuple((linear._parameters, key) for linear, _ in layers for key in ("weight", "bias"))
    return LoweredChain(tuple(layers), slots)


def describe(layers: Sequence[tuple[nn.Linear, PostOp]]) -> str:
    """``"Linear 64->42, ReLU, Linear 42->2"``."""
    parts = []
    for linear, post_op in layers:
        parts.append(f"Linear {linear.in_features}->{linear.out_features}")
        if post_op != IDENTITY:
            module = post_op_module(post_op)
            parts.append(repr(module) if post_op.params else type(module).__name__)
    return ", ".join(parts)


def post_op_module(post_op: PostOp) -> nn.Module:
    """The ``torch.nn`` module that applies ``post_op``."""
    module_type: type[nn.Module] = getattr(nn, post_op.op.torch_modules[0])
    return module_type(**post_op.keyword_params())


def to_sequential(spec: ChainSpec, dtype: torch.dtype | None = None) -> nn.Sequential:
    """``spec`` as plain PyTorch modules: ``nn.Linear`` (copies of the weights, in ``dtype``,
    default the first weight's), each followed by its post-op's module unless it is identity."""
    dtype = dtype or getattr(torch, spec.layers[0].weight.dtype.name)
    modules: list[nn.Module] = []
    for layer in spec.layers:
        bias = layer.bias is not None
        linear = nn.Linear(layer.in_features, layer.out_features, bias, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(layer.weight))
            if layer.bias is not None:
                cast(torch.Tensor, linear.bias).copy_(torch.tensor(layer.bias))
        modules.append(linear)
        if layer.post_op != IDENTITY:
            modules.append(post_op_module(layer.post_op))
    return nn.Sequential(*modules)
