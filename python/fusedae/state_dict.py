"""A PyTorch state_dict as a ``ChainSpec``, given the layers it cannot record. numpy only.

A state_dict holds tensors by module path (``encoder.0.weight``), in the order the modules were
registered, which for ``nn.Sequential`` chains is the order they run in. It does not hold the
modules without tensors (ReLU, GELU, ...), nor a BatchNorm's ``eps``: those the caller spells
in a layers text, such as the CLI's ``--layers``::

    linear,batchnorm,leaky_relu(0.2),linear(256,64),gelu_tanh,linear,hardtanh(min_val=0,max_val=6)

Items are separated by commas; each is a name with, optionally, arguments in parentheses as the
torch module's constructor takes them (positional in its order, or by keyword):

* ``linear`` / ``linear(in_features, out_features)``: the next Linear module of the state_dict
  (its ``weight`` and, if present, ``bias``); given, the features are checked against it.
* ``batchnorm`` / ``batchnorm(num_features, eps=1e-5)``: the next BatchNorm1d module (its
  ``running_mean``, ``running_var``, ``weight``, ``bias``), in eval mode; ``eps`` is not in a
  state_dict: PyTorch's default, 1e-5, unless given.
* an activation of ``fusedae._ops.OPS`` (``relu``, ``leaky_relu(0.2)``, ``hardtanh(0, 6)``,
  ...): applied after the Linear before it (and its BatchNorm, if one follows the Linear);
  parameters not given take PyTorch's defaults. ``identity`` stands for no activation.
* ``dropout`` / ``dropout(p)``: nothing, as ``nn.Dropout`` in eval mode (it holds no tensors).

Linear and BatchNorm items take the state_dict's modules one by one, in order; a module is a
Linear if its tensors are ``weight`` (2-D) and ``bias``, a BatchNorm if they include
``running_mean`` and ``running_var``. Anything else in the state_dict is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fusedae._ops import IDENTITY, OPS, PostOp
from fusedae.chain import ChainSpec, Layer, Normalization, Position, default_encoder_layers

__all__ = ["Item", "StateModule", "from_state_dict", "parse_layers", "state_modules"]

ModuleKind = Literal["linear", "batchnorm"]
# Each module kind's constructor arguments as the layers text takes them (the torch
# constructor's, in its order), with defaults; None: required where given, checked.
_MODULE_ARGUMENTS: dict[str, tuple[tuple[str, float | None], ...]] = {
    "linear": (("in_features", None), ("out_features", None)),
    "batchnorm": (("num_features", None), ("eps", 1e-5)),
}
# Modules without tensors that compute nothing in eval mode, with their arguments.
_NOTHING_IN_EVAL: dict[str, tuple[tuple[str, float | None], ...]] = {"dropout": (("p", 0.5),)}
_LINEAR_TENSORS = {"weight", "bias"}
_BATCHNORM_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_ITEM = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*", re.DOTALL)
_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)", re.DOTALL)


@dataclass(frozen=True)
class Item:
    """One item of a layers text: ``kind`` (``"linear"``, ``"batchnorm"`` or an op name) and
    its arguments by name, with defaults filled in (a module's features only where given);
    ``number`` counts items from 1 and ``text`` is the item as written, for messages."""

    number: int
    text: str
    kind: str
    arguments: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"--layers item {self.number} ({self.text})"

    @property
    def post_op(self) -> PostOp:
        """The activation this item names (not for a module)."""
        op = OPS[self.kind]
        return PostOp(self.kind, tuple(self.arguments[name] for name, _ in op.params))


def _split(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' at character {index + 1} of {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return parts


def parse_layers(text: str) -> list[Item]:
    """The items of a layers text (module docstring); a ValueError names the item at fault and
    what it should be."""
    items = []
    for number, part in enumerate(_split(text), 1):
        written = part.strip()
        match = _ITEM.fullmatch(part)
        if match is None:
            raise ValueError(
                f"--layers item {number} ({written}): expected a name with optional "
                "arguments in parentheses, such as linear, relu or leaky_relu(0.2)"
            )
        kind, inside = match.group(1), match.group(2)
        if kind in _MODULE_ARGUMENTS:
            parameters = _MODULE_ARGUMENTS[kind]
        elif kind in _NOTHING_IN_EVAL:
            parameters = _NOTHING_IN_EVAL[kind]
        elif kind in OPS:
            parameters = OPS[kind].params
        else:
            raise ValueError(
                f"--layers item {number} ({written}): unknown name {kind!r}; items are linear, "
                f"batchnorm, dropout or an activation: {', '.join(OPS)}"
            )
        try:
            arguments = _arguments(inside, parameters)
            if kind == "dropout" and not 0 <= arguments["p"] <= 1:  # (nn.Dropout refuses it)
                raise ValueError(f"p must be between 0 and 1, got {arguments['p']}")
        except ValueError as error:
            raise ValueError(f"--layers item {number} ({written}): {error}") from None
        items.append(Item(number, written, kind, arguments))
    return items


def _arguments(
    inside: str | None, parameters: Sequence[tuple[str, float | None]]
) -> dict[str, float]:
    """The arguments written ``inside`` the parentheses, by name, with the defaults of the
    ``(name, default)`` parameters that are not written (those with default None are left
    out)."""
    names = [name for name, _ in parameters]
    given: dict[str, float] = {}
    if inside is not None and inside.strip():
        for position, argument in enumerate(inside.split(",")):
            keyword = _KEYWORD.fullmatch(argument)
            name = keyword.group(1) if keyword else names[position] if position < len(names) else ""
            if not name:
                raise ValueError(
                    f"takes at most {len(names)} arguments ({', '.join(names)})"
                    if names
                    else "takes no arguments"
                )
            if keyword and name not in names:
                raise ValueError(f"no argument {name!r}; it takes {', '.join(names) or 'none'}")
            if name in given:
                raise ValueError(f"{name} given twice")
            value = keyword.group(2) if keyword else argument
            try:
                given[name] = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value.strip()!r}") from None
    defaults = {name: default for name, default in parameters if default is not None}
    return {**defaults, **given}


@dataclass(frozen=True)
class StateModule:
    """The tensors of one module of a state_dict, ``path`` its name there (``encoder.0``), by
    tensor name (``weight``, ``running_mean``, ...)."""

    path: str
    kind: ModuleKind
    tensors: dict[str, np.ndarray]

    @property
    def features(self) -> tuple[int, int]:
        """``(in, out)``: a BatchNorm's are both its number of features."""
        if self.kind == "linear":
            out_features, in_features = self.tensors["weight"].shape
            return int(in_features), int(out_features)
        features = int(self.tensors["running_mean"].shape[0])
        return features, features

    def __str__(self) -> str:
        name = self.path or "(top level)"
        in_features, out_features = self.features
        if self.kind == "linear":
            return f"{name} (Linear {in_features} -> {out_features})"
        return f"{name} (BatchNorm1d {in_features})"


def state_modules(state: Mapping[str, np.ndarray]) -> list[StateModule]:
    """The modules of ``state`` in the order their first tensor comes, each a Linear or a
    BatchNorm1d with running statistics; anything else is a ValueError naming the module."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        grouped.setdefault(path, {})[name] = np.asarray(value)
    if not grouped:
        raise ValueError("the state_dict holds no tensors")
    check_registration_order(list(grouped))
    modules = []
    for path, tensors in grouped.items():
        kind = _module_kind(tensors)
        if kind is None:
            shapes = ", ".join(f"{name} {tuple(array.shape)}" for name, array in tensors.items())
            raise ValueError(
                f"module {path or '(top level)'} holds {shapes}: neither a Linear (2-D weight, "
                "bias) nor a BatchNorm1d with running statistics, the modules fusedae runs"
            )
        modules.append(StateModule(path, kind, tensors))
    return modules


def check_registration_order(paths: Sequence[str]) -> None:
    """A ValueError where the module paths were sorted as text: a parent's numbered children
    (a Sequential's) in the order of their names as strings and not as numbers (``0``, ``10``,
    ``2``), as in a state_dict whose keys were sorted. The modules run in the order they were
    registered, which is the state_dict's; sorted, it is lost (nor can it be mended: named
    children's order cannot be told, ``decoder`` sorts before ``encoder``), so it is refused,
    not guessed. Numbered children in another order (a ModuleDict's keys ``"64"``, ``"32"``)
    are the order they were registered in."""
    children: dict[tuple[str, ...], list[str]] = {}
    for path in paths:
        parts = path.split(".")
        for depth, part in enumerate(parts):
            siblings = children.setdefault(tuple(parts[:depth]), [])
            if part.isascii() and part.isdigit() and part not in siblings:
                siblings.append(part)
    for parent, numbered in children.items():
        as_numbers = sorted(numbered, key=int)
        if numbered != as_numbers and numbered == sorted(numbered):
            where = f"under {'.'.join(parent)}" if parent else "at the top level"
            listed = ", ".join(numbered[:6]) + (", ..." if len(numbered) > 6 else "")
            raise ValueError(
                f"the state_dict's modules numbered {listed} {where} come in text order, not "
                "in the order they run (were its keys sorted?); fusedae reads the order from "
                "it: save the state_dict as model.state_dict() returns it"
            )


def _module_kind(tensors: dict[str, np.ndarray]) -> ModuleKind | None:
    names = set(tensors)
    floats = {name: array for name, array in tensors.items() if name != "num_batches_tracked"}
    if not all(array.dtype.kind == "f" for array in floats.values()):
        return None
    if names <= _LINEAR_TENSORS and "weight" in names:
        weight, bias = tensors["weight"], tensors.get("bias")
        if weight.ndim == 2 and (bias is None or bias.shape == weight.shape[:1]):
            return "linear"
    if {"running_mean", "running_var"} <= names <= _BATCHNORM_TENSORS:
        shape = tensors["running_mean"].shape
        if len(shape) == 1 and all(array.shape == shape for array in floats.values()):
            return "batchnorm"
    return None


@dataclass
class _Building:
    """A layer whose items are still being read."""

    item: Item
    module: StateModule
    before: list[Normalization]
    after: list[Normalization] = field(default_factory=list)
    post_op: PostOp | None = None
    # The state_dict modules folded into the layer, the Linear's first.
    paths: list[str] = field(default_factory=list)


def from_state_dict(state: Mapping[str, np.ndarray], layers: str | Sequence[Item]) -> ChainSpec:
    """The chain of ``state``'s modules as ``layers`` (a layers text or its parsed items) spells
    it. A ValueError names the item and the module that do not agree.

    A BatchNorm right after a Linear (before its activation) normalizes its output; one after an
    activation, or first, normalizes the next Linear's input. If the layers' modules are under
    ``encoder`` then ``decoder``, or under ``0`` then ``1`` (``nn.Sequential(encoder,
    decoder)``), after any prefix all of them share, the encoder is the layers of the first;
    otherwise ``default_encoder_layers`` places it.
    """
    items = parse_layers(layers) if isinstance(layers, str) else list(layers)
    modules = state_modules(state)
    module_items = [item for item in items if item.kind in _MODULE_ARGUMENTS]
    if len(module_items) != len(modules):
        listed = "\n".join(f"  {module}" for module in modules)
        raise ValueError(
            f"--layers names {len(module_items)} modules with tensors (linear and batchnorm "
            f"items), but the state_dict holds {len(modules)}, in order:\n{listed}"
        )
    assigned = dict(zip((item.number for item in module_items), modules, strict=True))
    for item in module_items:
        _check_module(item, assigned[item.number])
    built: list[_Building] = []
    pending: list[tuple[Item, Normalization]] = []  # normalizing the next Linear's input
    for item in items:
        if item.kind == "linear":
            module = assigned[item.number]
            in_features = module.features[0]
            if built and built[-1].module.features[1] != in_features:
                previous = built[-1]
                raise ValueError(
                    f"{item} is {module}, which takes {in_features} features, but the layer "
                    f"before it, {previous.item}, is {previous.module}, which gives "
                    f"{previous.module.features[1]}"
                )
            for norm_item, _ in pending:
                _check_features(norm_item, assigned[norm_item.number], item, module, in_features)
            paths = [module.path, *(assigned[norm_item.number].path for norm_item, _ in pending)]
            built.append(_Building(item, module, [norm for _, norm in pending], paths=paths))
            pending = []
        elif item.kind == "batchnorm":
            module = assigned[item.number]
            current = built[-1] if built else None
            if current is not None and current.post_op is None and not pending:
                _check_features(
                    item, module, current.item, current.module, current.module.features[1]
                )
                current.after.append(_normalization(item, module, "after"))
                current.paths.append(module.path)
            else:
                pending.append((item, _normalization(item, module, "before")))
        elif item.kind != "identity" and item.kind not in _NOTHING_IN_EVAL:
            if pending:
                raise ValueError(
                    f"{item} follows {pending[-1][0]}, which normalizes the next Linear's "
                    "input: an activation there cannot be folded into a layer"
                )
            if not built:
                raise ValueError(f"{item} comes before any linear: nothing to apply it to")
            current = built[-1]
            if current.post_op is not None:
                raise ValueError(
                    f"{item} is a second activation after {current.item} (the first is "
                    f"{current.post_op}): a layer applies one"
                )
            current.post_op = item.post_op
    if pending:
        raise ValueError(
            f"{pending[0][0]} comes after the last layer's activation: there is no Linear to "
            "fold it into"
        )
    if not built:
        raise ValueError("--layers names no linear")
    spec_layers = tuple(
        Layer(
            layer.module.tensors["weight"],
            layer.module.tensors.get("bias"),
            layer.post_op or IDENTITY,
            (*layer.before, *layer.after),
        )
        for layer in built
    )
    widths = [spec_layers[0].in_features, *(layer.out_features for layer in spec_layers)]
    encoder_layers = _encoder_layers(built)
    if encoder_layers is None:
        encoder_layers = default_encoder_layers(widths)
    spec = ChainSpec(spec_layers, encoder_layers)
    spec.check_shapes()
    return spec


def _check_module(item: Item, module: StateModule) -> None:
    """``item`` and the state_dict ``module`` it takes are the same kind, of the features the
    item gives (if any)."""
    if item.kind != module.kind:
        raise ValueError(f"{item} is a {item.kind}, but the module it takes is {module}")
    in_features, out_features = module.features
    expected = {"in_features": in_features, "out_features": out_features}
    if module.kind == "batchnorm":
        expected = {"num_features": in_features}
    for name, value in expected.items():
        if name in item.arguments and item.arguments[name] != value:
            raise ValueError(
                f"{item} gives {name}={item.arguments[name]:g}, but the module it takes is {module}"
            )


def _check_features(
    item: Item, module: StateModule, layer_item: Item, layer: StateModule, features: int
) -> None:
    """The batchnorm ``item`` (state_dict ``module``) normalizes ``features`` values of the
    linear ``layer_item`` (``layer``)."""
    if module.features[0] != features:
        raise ValueError(
            f"{item} is {module}, but it normalizes {features} features of {layer_item}, {layer}"
        )


def _normalization(item: Item, module: StateModule, position: Position) -> Normalization:
    tensors = module.tensors
    eps = item.arguments["eps"]
    # (`batchnorm(eps=nan)`, `inf` or `-1` made every output NaN or every row the same, and a
    # file that `MLP.load` refuses; NaN fails both comparisons.)
    if not 0 <= eps < math.inf:
        raise ValueError(f"{item}: eps must be a finite number >= 0, got {eps}")
    return Normalization(
        position,
        tensors["running_mean"],
        tensors["running_var"],
        eps,
        tensors.get("weight"),
        tensors.get("bias"),
    )


def _encoder_layers(built: Sequence[_Building]) -> int | None:
    """How many layers the first half holds, if the modules are those of ``encoder`` then
    ``decoder``, or of the blocks ``0`` then ``1`` of ``nn.Sequential(encoder, decoder)`` (each
    holding modules of its own, as ``save`` and a pickled model read that form), under any
    prefix all of them share (``module.`` of DataParallel, ``_orig_mod.`` of torch.compile, a
    wrapper's attribute); else None. A BatchNorm of one half folded into a layer of the other
    (the encoder ending in activation, BatchNorm) is a ValueError: no layer boundary is the
    encoder's; so is ``decoder`` before ``encoder``, which would run the decoder first (keys
    sorted as text)."""
    paths = [layer.module.path.split(".") for layer in built]
    depth = 0  # how many leading parts every layer's path shares
    while all(len(path) > depth + 1 and path[depth] == paths[0][depth] for path in paths) and (
        paths[0][depth] not in ("encoder", "decoder")
    ):
        depth += 1
    prefix = paths[0][:depth]
    names = [path[depth] for path in paths]
    encoder = names.count("encoder")
    decoder = names.count("decoder")
    if encoder and decoder and names == ["decoder"] * decoder + ["encoder"] * encoder:
        raise ValueError(
            "the state_dict's decoder comes before its encoder, so the decoder would run first "
            "(were its keys sorted?); fusedae reads the order from it: save the state_dict as "
            "model.state_dict() returns it"
        )
    blocks = names.count("0")
    # Every module (folded BatchNorms too) inside block 0 or 1, each a Sequential's numbered
    # child: nothing at the top level beside them, and no block of named attributes.
    module_paths = [path.split(".") for layer in built for path in layer.paths]
    if (
        0 < blocks < len(names)
        and names == ["0"] * blocks + ["1"] * (len(names) - blocks)
        and all(
            len(path) > depth + 1
            and path[:depth] == prefix
            and path[depth] in ("0", "1")
            and path[depth + 1].isdigit()
            for path in module_paths
        )
    ):
        encoder = blocks
    elif names != ["encoder"] * encoder + ["decoder"] * (len(names) - encoder):
        return None
    for layer, name in zip(built, names, strict=True):
        for path in layer.paths[1:]:
            # (A BatchNorm outside both halves, the prefix's too, is in neither.)
            if path.split(".")[: depth + 1] != [*prefix, name]:
                raise ValueError(
                    f"{path} is folded into {layer.item}, {layer.module}, across the boundary "
                    "between encoder and decoder, so the encoder could not run alone"
                )
    return encoder
