"""Torch modules -> ``ChainSpec``: which modules form a chain, and where each tensor it reads
lives; and back, a ``ChainSpec`` as plain PyTorch modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fusedae._ops import IDENTITY, OPS, Op, PostOp
from fusedae.chain import ChainSpec, Normalization, Position

# Where a tensor lives: a module's `_parameters` (or `_buffers`) dict and its key there. A cache
# reads the tensor through it on every call, so a parameter replaced on the module is seen.
TensorSlot = tuple[dict[str, Any], str]


# The op table's module names resolved (its entries name them: `import fusedae` imports no torch);
# one module type may stand for several ops (nn.GELU: gelu and gelu_tanh).
_OPS_BY_MODULE_TYPE: dict[type[nn.Module], tuple[Op, ...]] = {}
for _op in OPS.values():
    for _module_type in (getattr(nn, name) for name in _op.torch_modules):
        _OPS_BY_MODULE_TYPE[_module_type] = (*_OPS_BY_MODULE_TYPE.get(_module_type, ()), _op)
# Identity in eval mode; in training mode they compute what the kernels do not, unless p == 0.
DROPOUTS = (nn.Dropout, nn.AlphaDropout)
# The tensors of a BatchNorm1d a Normalization reads, in the order it takes them.
_NORMALIZATION_SLOTS = (
    ("_buffers", "running_mean"),
    ("_buffers", "running_var"),
    ("_parameters", "weight"),
    ("_parameters", "bias"),
)


def _post_op(module: nn.Module) -> PostOp | None:
    """The post-op ``module`` applies (an op of the table with the module's parameter
    attributes), or None if it applies none the kernel takes (``_post_op_refused`` says why)."""
    try:
        return _module_post_op(module)
    except ValueError:
        return None


def _module_post_op(module: nn.Module) -> PostOp | None:
    """``_post_op``, where parameters the kernel does not take (PyTorch's Softplus takes a
    negative ``beta``) are the ValueError of ``PostOp``."""
    for op in _OPS_BY_MODULE_TYPE.get(type(module), ()):
        if all(getattr(module, name, None) == value for name, value in op.torch_settings):
            return PostOp(op.name, tuple(float(getattr(module, name)) for name, _ in op.params))
    return None


def _post_op_refused(module: nn.Module) -> str | None:
    """Why the kernel does not take ``module``'s parameters, if it does not."""
    try:
        _module_post_op(module)
    except ValueError as error:
        return str(error)
    return None


# The attributes a lowered chain is read from, for ``settings``: a post-op module's, its op's
# (``_post_op``), and a BatchNorm1d's, which decide whether it folds (``_foldable``) and what
# it folds to (``eps``).
_SETTINGS_BY_MODULE_TYPE: dict[type[nn.Module], tuple[str, ...]] = {
    **{
        module_type: tuple(
            dict.fromkeys(name for op in ops for name, _ in (*op.torch_settings, *op.params))
        )
        for module_type, ops in _OPS_BY_MODULE_TYPE.items()
    },
    nn.BatchNorm1d: ("eps", "track_running_stats"),
}
# Where an attribute lives (a module's `__dict__`), its name, and its value when read.
Settings = tuple[tuple[dict[str, Any], str, Any], ...]


def settings(modules: Iterable[nn.Module]) -> Settings:
    """The attributes that set the chain lowered from ``modules`` (a LeakyReLU's
    ``negative_slope``, a GELU's ``approximate``, a BatchNorm's ``eps``), with their values now:
    the chain is stale once ``settings_changed`` says so. Empty where no module has any (Linear,
    ReLU, Sigmoid, Tanh)."""
    return tuple(
        (vars(module), name, vars(module).get(name))
        for module in modules
        for name in _SETTINGS_BY_MODULE_TYPE.get(type(module), ())
    )


def forward_assigned(attributes: Iterable[dict[str, Any]]) -> bool:
    """Whether a module whose ``__dict__`` is among ``attributes`` has a ``forward`` assigned to
    it, which ``nn.Module.__call__`` calls instead of its class's (``lower`` takes none)."""
    for attribute_dict in attributes:  # noqa: SIM110 (a loop: `any` of a generator costs more)
        if "forward" in attribute_dict:
            return True
    return False


def settings_changed(read: Settings) -> bool:
    """Whether an attribute ``settings`` read has another value now (read from the module's
    dict, as ``nn.Module`` keeps them: ``getattr`` costs several times as much per call)."""
    for attributes, name, value in read:
        now = attributes.get(name)
        if now is not value and now != value:  # (`is`: a NaN the same as it was read)
            return True
    return False


def _foldable(norm: nn.Module) -> bool:
    """An exact ``nn.BatchNorm1d`` with running statistics: in eval mode, a fixed affine map. And
    with its ``num_batches_tracked``, which a training-mode forward bumps where it updates the
    statistics without bumping their version counters (the cache's one sign of it)."""
    return (
        type(norm) is nn.BatchNorm1d
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm._buffers.get("num_batches_tracked") is not None
    )


@dataclass(frozen=True)
class LoweredChain:
    """A run of modules as the kernels see it.

    ``layers``: each ``nn.Linear`` with the post-op after it; ``normalizations``: for each layer,
    the ``nn.BatchNorm1d`` modules folded into it, with their ``Normalization.position``, in the
    order they apply. ``slots``: every tensor the chain's ``ChainSpec`` reads, in the order
    ``spec`` takes them: each layer's weight and bias (the order in which the modules hand them
    to ``FusedMLPFunction``), then each BatchNorm's running mean and variance, weight and bias.
    ``counters``: each BatchNorm's ``num_batches_tracked``, which the spec does not read but a
    training-mode forward (the only change to its running statistics that bumps no version
    counter) increments in place. ``mode_dependent``: the BatchNorm and Dropout modules, which
    compute something else in training mode. ``flatten`` and ``unflatten``: an ``nn.Flatten``
    that was the first module and an ``nn.Unflatten`` that was the last, reshapes around the
    fused call. ``shapes``: the shape of each slot's tensor when lowered (None for None), which
    the layers' widths are read from (``shapes_changed``).
    """

    layers: tuple[tuple[nn.Linear, PostOp], ...]
    slots: tuple[TensorSlot, ...]
    normalizations: tuple[tuple[tuple[Position, nn.BatchNorm1d], ...], ...] = ()
    counters: tuple[TensorSlot, ...] = ()
    mode_dependent: tuple[nn.Module, ...] = ()
    flatten: nn.Flatten | None = None
    unflatten: nn.Unflatten | None = None
    shapes: tuple[torch.Size | None, ...] = ()

    @property
    def in_features(self) -> int:
        return self.widths[0]

    @property
    def widths(self) -> list[int]:
        """The chain's input width, then each layer's output width, from the weights lowered."""
        weights = cast(tuple[torch.Size, ...], self.shapes[0 : 2 * len(self.layers) : 2])
        return [weights[0][1], *(shape[0] for shape in weights)]

    def shapes_changed(self) -> bool:
        """Whether a tensor in ``slots`` now has another shape (or is None, or no longer None)
        than when lowered, or a BatchNorm's ``num_batches_tracked`` is None: a Linear's weight
        replaced by one of another width, a BatchNorm's statistics set to None. The chain must
        be lowered again."""
        if not all(key in owner for owner, key in (*self.slots, *self.counters)):
            return True  # moved out (reparametrized, pruned, deleted): `lower` refuses it
        return _shapes(self.tensors()) != self.shapes or any(
            owner[key] is None for owner, key in self.counters
        )

    @property
    def post_ops(self) -> tuple[PostOp, ...]:
        return tuple(op for _, op in self.layers)

    @property
    def normalized(self) -> bool:
        """Whether a BatchNorm is folded into a layer."""
        return any(self.normalizations)

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensors in ``slots`` now."""
        return [owner[key] for owner, key in self.slots]

    def spec(
        self, tensors: Sequence[torch.Tensor | None], encoder_layers: int | None = None
    ) -> ChainSpec:
        """The ChainSpec over ``tensors`` (CPU tensors numpy can read, one per slot), whose
        arrays share the tensors' memory where they can; ``encoder_layers`` defaults as in
        ``ChainSpec.from_pairs``. BatchNorms become ``Normalization``s, not yet folded."""
        arrays = [None if tensor is None else as_array(tensor) for tensor in tensors]
        count = len(self.layers)
        pairs = [(cast(np.ndarray, arrays[2 * i]), arrays[2 * i + 1]) for i in range(count)]
        spec = ChainSpec.from_pairs(pairs, self.post_ops, encoder_layers)
        if not self.normalized:
            return spec
        statistics = iter(arrays[2 * count :])
        layers = []
        for layer, norms in zip(spec.layers, self.normalizations, strict=True):
            folded = []
            for position, norm in norms:
                mean, var, weight, bias = (next(statistics) for _ in _NORMALIZATION_SLOTS)
                # `lower` took only BatchNorms with running statistics.
                assert mean is not None
                assert var is not None
                folded.append(Normalization(position, mean, var, float(norm.eps), weight, bias))
            layers.append(dataclasses.replace(layer, normalization=tuple(folded)))
        return ChainSpec(tuple(layers), spec.encoder_layers, spec.precision)

    def folded(self, tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each layer's weight and bias with its BatchNorms folded in, computed in torch ops
        from ``tensors`` (one per slot), so differentiable in the Linear's and the BatchNorms'
        parameters; in the order ``FusedMLPFunction`` takes them."""
        count = len(self.layers)
        statistics = iter(tensors[2 * count :])
        folded: list[torch.Tensor | None] = []
        for index, norms in enumerate(self.normalizations):
            weight, bias = cast(torch.Tensor, tensors[2 * index]), tensors[2 * index + 1]
            if not norms:
                folded += [weight, bias]
                continue
            maps = []
            for position, norm in norms:
                mean, var, scale, shift = (next(statistics) for _ in _NORMALIZATION_SLOTS)
                inverse = torch.rsqrt(cast(torch.Tensor, var) + norm.eps)
                scale = inverse if scale is None else inverse * scale
                offset = -cast(torch.Tensor, mean) * scale
                maps.append((position, scale, offset if shift is None else offset + shift))
            total = weight.new_zeros(weight.shape[0]) if bias is None else bias
            for position, scale, offset in reversed(maps):
                if position == "before":
                    total = total + weight @ offset
                    weight = weight * scale
            for position, scale, offset in maps:
                if position == "after":
                    weight = weight * scale[:, None]
                    total = total * scale + offset
            folded += [weight, total]
        return folded


def resolved(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the conjugate and negative bits (a lazily conjugated or negated view
    holds its values un-negated): itself where it has neither, which two reads tell for less
    than the two dispatched ops resolving would cost."""
    if tensor.is_conj() or tensor.is_neg():
        return tensor.resolve_conj().resolve_neg()
    return tensor


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """The values of a CPU ``tensor`` as numpy (sharing memory where the tensor holds them as
    they are: not for a conjugated or negated view)."""
    return resolved(tensor.detach()).numpy()


def lower(modules: Iterable[nn.Module]) -> LoweredChain | None:
    """The chain ``modules`` form, in order, or None if they are not one: ``nn.Linear`` layers,
    each followed by at most one post-op module of the op table (``fusedae._ops.OPS``), or by
    several applying one idempotent op; ``nn.BatchNorm1d`` with running statistics right before
    or after a Linear (after: before its post-op), or after a post-op and before the next
    Linear; ``nn.Identity``, ``nn.Dropout`` and ``nn.AlphaDropout`` anywhere; an ``nn.Flatten``
    first and an ``nn.Unflatten`` last. Only exact types qualify (a subclass may compute
    something else). Training mode is not read here: ``ChainCache.forward`` reads it on each
    call."""
    layers: list[tuple[nn.Linear, PostOp]] = []
    normalizations: list[list[tuple[Position, nn.BatchNorm1d]]] = []
    waiting: list[nn.BatchNorm1d] = []  # after a post-op: they normalize the next Linear's input
    mode_dependent: list[nn.Module] = []
    flatten: nn.Flatten | None = None
    unflatten: nn.Unflatten | None = None
    for index, module in enumerate(modules):
        if unflatten is not None or module is None or "forward" in vars(module):
            # Only last; a `forward` assigned to the module, which PyTorch calls; a None child
            # (a Sequential holds it, and fails when called).
            return None
        kind = type(module)
        if kind is nn.Linear:
            layers.append((cast(nn.Linear, module), IDENTITY))
            normalizations.append([("before", norm) for norm in waiting])
            waiting = []
        elif kind is nn.BatchNorm1d:
            norm = cast(nn.BatchNorm1d, module)
            if not _foldable(norm):
                return None
            mode_dependent.append(norm)
            if layers and layers[-1][1] == IDENTITY and not waiting:
                normalizations[-1].append(("after", norm))
            else:
                waiting.append(norm)
        elif kind in DROPOUTS:
            mode_dependent.append(module)
        elif kind is nn.Flatten:
            if index:
                return None  # only first
            flatten = cast(nn.Flatten, module)
        elif kind is nn.Unflatten:
            unflatten = cast(nn.Unflatten, module)
        else:
            post_op = _post_op(module)
            if post_op is None:
                return None
            if post_op == IDENTITY:
                continue
            if not layers or waiting:
                return None  # a post-op before any Linear, or after a normalized post-op
            linear, current = layers[-1]
            if current == IDENTITY:
                layers[-1] = (linear, post_op)
            elif current != post_op or not post_op.op.idempotent:
                return None  # two post-ops in a row that are not one
    if not layers or waiting:
        return None
    slots: list[TensorSlot] = [
        (linear._parameters, key) for linear, _ in layers for key in ("weight", "bias")
    ]
    slots += [
        (getattr(norm, owner), key)
        for norms in normalizations
        for _, norm in norms
        for owner, key in _NORMALIZATION_SLOTS
    ]
    if not all(key in owner for owner, key in slots):
        return None  # a tensor moved out of its module (reparametrized, pruned): a hook has it
    shapes = _shapes([owner[key] for owner, key in slots])
    if not _linear_shapes(shapes[0 : 2 * len(layers)]):
        return None  # a bias PyTorch broadcasts, a weight of another width than its input's
    counters = tuple(
        (norm._buffers, "num_batches_tracked") for norms in normalizations for _, norm in norms
    )
    return LoweredChain(
        tuple(layers),
        tuple(slots),
        tuple(tuple(norms) for norms in normalizations),
        counters,
        tuple(mode_dependent),
        flatten,
        unflatten,
        shapes,
    )


def _shapes(tensors: Iterable[torch.Tensor | None]) -> tuple[torch.Size | None, ...]:
    return tuple(None if tensor is None else tensor.shape for tensor in tensors)


def _linear_shapes(shapes: Sequence[torch.Size | None]) -> bool:
    """Whether the weights and biases of ``shapes`` (each layer's weight then bias) are a chain
    the kernel takes: 2-d weights, none 0 wide, each taking the width the one before gives, and
    biases None or one value per output (``F.linear`` broadcasts others)."""
    width = None
    for weight, bias in zip(shapes[0::2], shapes[1::2], strict=True):
        if weight is None or len(weight) != 2 or min(weight) < 1:
            return False
        if (width is not None and weight[1] != width) or (
            bias is not None and tuple(bias) != (weight[0],)
        ):
            return False
        width = weight[0]
    return True


def split(modules: Sequence[nn.Module]) -> list[tuple[int, int, LoweredChain | None]]:
    """``modules`` as consecutive ``(start, stop, chain)`` pieces covering them in order: each
    longest run (from the left) that ``lower`` takes, and each module outside one alone with
    chain None."""
    pieces: list[tuple[int, int, LoweredChain | None]] = []
    start = 0
    while start < len(modules):
        for stop in range(len(modules), start, -1):
            lowered = lower(modules[start:stop])
            if lowered is not None:
                pieces.append((start, stop, lowered))
                start = stop
                break
        else:
            pieces.append((start, start + 1, None))
            start += 1
    return pieces


def why_not_fused(module: nn.Module) -> str:
    """Why ``split`` left ``module`` out of every run."""
    if module is None:
        return "None, not a module"
    kind = type(module)
    if kind is nn.BatchNorm1d and not _foldable(module):
        return "no running statistics: it normalizes each batch by its own"
    if "forward" in vars(module):
        return "a forward assigned to it, which PyTorch calls instead of its class's"
    refused = _post_op_refused(module)
    if refused is not None:
        return f"parameters the kernel does not take ({refused})"
    if kind in (nn.Linear, nn.BatchNorm1d, nn.Flatten, nn.Unflatten, *DROPOUTS) or _post_op(module):
        return "not where a chain of Linear layers can take it"
    return "not a module the kernels run"


def describe(lowered: LoweredChain) -> str:
    """``"Linear 64->42, ReLU, Linear 42->2"``; BatchNorms, Flatten and Unflatten named too."""
    parts = ["Flatten"] if lowered.flatten is not None else []
    widths = lowered.widths  # the weights' (a Linear's `in_features` is not what it computes)
    for index, ((_, post_op), norms) in enumerate(
        zip(lowered.layers, lowered.normalizations or [()] * len(lowered.layers), strict=True)
    ):
        parts += [f"BatchNorm1d({norm.num_features})" for p, norm in norms if p == "before"]
        parts.append(f"Linear {widths[index]}->{widths[index + 1]}")
        parts += [f"BatchNorm1d({norm.num_features})" for p, norm in norms if p == "after"]
        if post_op != IDENTITY:
            module = post_op_module(post_op)
            # "GELU", "Softplus"; "LeakyReLU(negative_slope=0.1)" where a setting is not the
            # default. (Compared as ops, not as reprs: torch 2.1's default Softplus prints
            # beta=1, ours beta=1.0.)
            default = _post_op(type(module)())
            parts.append(type(module).__name__ if default == post_op else repr(module))
    if lowered.unflatten is not None:
        parts.append("Unflatten")
    return ", ".join(parts)


def post_op_module(post_op: PostOp) -> nn.Module:
    """The ``torch.nn`` module that applies ``post_op``."""
    op = post_op.op
    module_type: type[nn.Module] = getattr(nn, op.torch_modules[0])
    return module_type(**post_op.keyword_params(), **dict(op.torch_settings))


def _batch_norm(norm: Normalization, dtype: torch.dtype) -> nn.BatchNorm1d:
    """``norm`` as an eval-mode ``nn.BatchNorm1d``."""
    module = nn.BatchNorm1d(len(norm.mean), norm.eps, affine=norm.weight is not None, dtype=dtype)
    with torch.no_grad():
        for name in ("mean", "var"):
            getattr(module, f"running_{name}").copy_(torch.from_numpy(getattr(norm, name)))
        if norm.weight is not None and norm.bias is not None:
            module.weight.copy_(torch.from_numpy(norm.weight))
            module.bias.copy_(torch.from_numpy(norm.bias))
    return module.eval()


def to_sequential(spec: ChainSpec, dtype: torch.dtype | None = None) -> nn.Sequential:
    """``spec`` as plain PyTorch modules: ``nn.Linear`` (copies of the weights, in ``dtype``,
    default the first weight's), each between its normalizations (eval-mode
    ``nn.BatchNorm1d``) and followed by its post-op's module unless it is identity."""
    dtype = dtype or getattr(torch, spec.layers[0].weight.dtype.name)
    modules: list[nn.Module] = []
    for layer in spec.layers:
        before = [n for n in layer.normalization if n.position == "before"]
        after = [n for n in layer.normalization if n.position == "after"]
        modules += [_batch_norm(norm, dtype) for norm in before]
        bias = layer.bias is not None
        linear = nn.Linear(layer.in_features, layer.out_features, bias, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(layer.weight))
            if layer.bias is not None:
                cast(torch.Tensor, linear.bias).copy_(torch.tensor(layer.bias))
        modules.append(linear)
        modules += [_batch_norm(norm, dtype) for norm in after]
        if layer.post_op != IDENTITY:
            modules.append(post_op_module(layer.post_op))
    return nn.Sequential(*modules)
