"""PyTorch front end: the fused kernels behind ``nn.Module``s that are drop-in for the seed's.

* ``FusedMLPFunction``: a ``torch.autograd.Function`` running a chain of Linear layers through
  the fused CPU kernel, with a backward in torch ops.
* ``FusedMLP``: an ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` / ``nn.Identity`` with the
  same children, ``state_dict`` keys and printout, fused on CPU for float32/float64, plain
  PyTorch everywhere else (CUDA, other dtypes, ``torch.compile`` tracing).
* ``AE``: the seed's autoencoder, encoder and decoder run as one fused call on CPU.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules import module as _torch_module

from fusedae import _native, serialization
from fusedae.mlp import check_output_size

__all__ = [
    "AE",
    "AccelerateReport",
    "FusedMLP",
    "FusedMLPFunction",
    "accelerate",
    "pack_chain",
    "save",
]

_FUSED_DTYPES = (torch.float32, torch.float64)
# What the per-call path uses from torch, bound once: each `torch.name` lookup costs ~25 ns.
# `is_dynamo_compiling` is True while TorchDynamo traces (torch.compile, strict torch.export) in
# one trivial call where `torch.compiler.is_compiling` makes two (torch 2.3+; older ones have
# only the latter); non-strict export and AOTAutograd trace fake tensors, which the exact type
# check turns away.
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_tracing_state = torch._C._get_tracing_state
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_is_grad_enabled = torch.is_grad_enabled
_from_numpy = torch.from_numpy
_to_dlpack = torch.utils.dlpack.to_dlpack
_Tensor = torch.Tensor
_STRIDED = torch.strided
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}

# A chain as the kernels see it: each Linear with the activation applied to its outputs.
Layers = tuple[tuple[nn.Linear, str], ...]
# A layer's parameter dict, weight, weight version, weight address, bias, bias version, address.
_PackedLayer = tuple[dict[str, Any], torch.Tensor, int, int, torch.Tensor | None, int, int]


def _chain_layers(modules: Iterable[nn.Module]) -> Layers | None:
    """The Linear layers and activations of a chain, or None if it holds anything else
    (a subclass of nn.Linear may compute something else, so only exact types qualify)."""
    layers: list[tuple[nn.Linear, str]] = []
    for module in modules:
        kind = type(module)
        if kind is nn.Linear:
            layers.append((cast(nn.Linear, module), "identity"))
        elif kind is nn.ReLU and layers:
            layers[-1] = (layers[-1][0], "relu")
        elif kind is not nn.Identity:
            return None
    return tuple(layers) if layers else None


def pack_chain(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
) -> _native.Chain:
    """Packs CPU float32/float64 tensors (``weights[i]`` of shape ``(out, in)``) for the kernels."""

    def as_array(tensor: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().resolve_conj().resolve_neg().numpy())

    return _native.Chain(
        [as_array(w) for w in weights],
        [None if b is None else as_array(b) for b in biases],
        list(activations),
    )


def _check_input(chain: _native.Chain, x: torch.Tensor) -> None:
    """What `_run` relies on, for callers of `FusedMLPFunction` (the modules check it on their
    way there): a strided CPU tensor of the chain's dtype and shape ``(*, in_features)``."""
    if x.device.type != "cpu" or x.layout != torch.strided or x.is_nested:
        nested = "nested " if x.is_nested else ""
        raise ValueError(
            f"the fused kernel takes strided CPU tensors, got a {nested}{x.layout} tensor "
            f"on {x.device}"
        )
    as_numpy = _NUMPY_DTYPES.get(x.dtype)
    if as_numpy is None or as_numpy != chain.dtype:  # (numpy reads None as float64)
        raise TypeError(f"expected input of dtype {chain.dtype} (the chain's), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != chain.in_features:
        raise _shape_error(chain.in_features, x.shape)


def _shape_error(in_features: int, shape: torch.Size) -> ValueError:
    return ValueError(f"expected input of shape (*, {in_features}), got shape {tuple(shape)}")


def _run(chain: _native.Chain, x: torch.Tensor) -> torch.Tensor:
    """The kernel on CPU ``x`` of shape ``(*, in_features)`` and the chain's dtype; no autograd."""
    x = x.resolve_neg()  # the values the tensor stands for, not the negated memory
    rows = x.numel() // chain.in_features
    if not x.is_contiguous():
        # A strided view (an expand) may stand for more rows than a copy or output could hold.
        width = max(chain.in_features, chain.out_features)
        check_output_size(rows, width, _NUMPY_DTYPES[x.dtype])
        x = x.contiguous()
    # The kernel reads the tensor's memory where it lies, through a DLPack capsule that keeps it
    # alive (the GIL held for the call keeps it unresized); `x.numpy()` costs more on one row.
    result = chain._forward_dlpack(_to_dlpack(x))
    shape = x.shape
    if len(shape) != 2:
        result = result.reshape(*shape[:-1], chain.out_features)
    return torch.from_numpy(result)


class FusedMLPFunction(torch.autograd.Function):
    """``y = chain(x)`` through the fused CPU kernel, differentiable in ``x`` and the parameters.

    ``apply(x, chain, activations, w0, b0, w1, b1, ...)``: ``x`` of shape ``(*, in_features)``,
    ``chain`` packed from exactly these weights and biases (``pack_chain``), ``b_i`` may be
    None. The backward recomputes the hidden activations with torch ops, so gradients are
    PyTorch's own.
    """

    @staticmethod
    def forward(
        x: torch.Tensor, chain: _native.Chain, activations: tuple[str, ...], *params: Any
    ) -> torch.Tensor:
        _check_input(chain, x)
        return _run(chain, x)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, _chain, activations, *params = inputs
        ctx.activations = activations  # type: ignore[attr-defined]
        ctx.save_for_backward(x, *params)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        weights, biases = params[0::2], params[1::2]
        activations: tuple[str, ...] = ctx.activations
        inputs = [x.reshape(-1, x.shape[-1])]
        outputs = []
        for weight, bias, activation in zip(weights, biases, activations, strict=True):
            hidden = torch.nn.functional.linear(inputs[-1], weight, bias)
            if activation == "relu":
                hidden = torch.relu(hidden)
            outputs.append(hidden)
            inputs.append(hidden)
        needs = ctx.needs_input_grad
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grads: list[torch.Tensor | None] = [None] * len(params)
        for index in reversed(range(len(weights))):
            if activations[index] == "relu":
                grad = torch.ops.aten.threshold_backward(grad, outputs[index], 0)
            if needs[3 + 2 * index]:
                grads[2 * index] = grad.t().mm(inputs[index])
            if biases[index] is not None and needs[4 + 2 * index]:
                grads[2 * index + 1] = grad.sum(0)
            if index == 0 and not needs[0]:
                break
            grad = grad.mm(weights[index])
        grad_x = grad.reshape(x.shape) if needs[0] else None
        return (grad_x, None, None, *grads)


class _ChainState:
    """Which chain a module's children form, and the packed form of its parameters, reused while
    none of them changed.

    A change is seen through each parameter's identity, storage address and version counter,
    which every in-place op bumps (optimizer steps, ``load_state_dict``, ``copy_`` under
    ``no_grad``); ``.to()`` and ``.data = ...`` move the storage. The packed tensors are kept
    alive so their addresses cannot be reused. Edits through ``.data`` bypass the version
    counter, as they bypass autograd: call the module's ``invalidate()`` after those.
    """

    def __init__(self) -> None:
        self.modules: tuple[nn.Module, ...] = ()
        self.containers: tuple[nn.Module, ...] = ()
        self.layers: Layers | None = None
        self.hook_registries = _hook_registries(())
        self.activations: tuple[str, ...] = ()
        self.in_features = 0
        self.parameter_dicts: list[dict[str, Any]] = []
        self.invalidate()

    def __getstate__(self) -> dict[str, Any]:
        # Everything here is a cache, the packed chain a native one: a deep copy or a pickled
        # module starts empty and packs its own parameters on its first call.
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def invalidate(self) -> None:
        self.dtype: torch.dtype | None = None
        self.chain: _native.Chain | None = None
        self.params: list[torch.Tensor | None] = []
        # Per layer, what was packed: its parameter dict, then the weight and the bias, each
        # with its version counter and address at packing time (None: inference tensors, which
        # have no version counter; packed again on each call).
        self.packed: list[_PackedLayer] | None = None
        self.pinned: list[torch.Tensor | None] = []

    def set_modules(
        self, modules: tuple[nn.Module, ...], containers: tuple[nn.Module, ...] = ()
    ) -> Layers | None:
        """The chain ``modules`` form (None if they are not one). ``containers``: modules whose
        ``forward`` the fused call also skips (the AE's encoder and decoder), so their hooks too
        make it run plain PyTorch."""
        if modules != self.modules or containers != self.containers:
            self.modules, self.layers = modules, _chain_layers(modules)
            self.containers = containers
            self.hook_registries = _hook_registries((*containers, *modules))
            self.activations = tuple(activation for _, activation in self.layers or ())
            self.in_features = self.layers[0][0].in_features if self.layers else 0
            self.parameter_dicts = [linear._parameters for linear, _ in self.layers or ()]
            self.invalidate()
        return self.layers

    def unchanged(self) -> bool:
        """Whether every parameter is still the one packed, at the same address and version."""
        # Read straight from each Linear's parameter dict (`linear.weight` goes through
        # `nn.Module.__getattr__`) in one pass: this runs on every call.
        if self.packed is None:
            return False
        for (
            parameters,
            weight,
            weight_version,
            weight_address,
            bias,
            bias_version,
            bias_address,
        ) in self.packed:
            if (
                parameters["weight"] is not weight
                or weight._version != weight_version
                or weight.data_ptr() != weight_address
                or parameters["bias"] is not bias
            ):
                return False
            if bias is not None and (
                bias._version != bias_version or bias.data_ptr() != bias_address
            ):
                return False
        return True

    def pack(self, dtype: torch.dtype) -> _native.Chain | None:
        """Packs the parameters for inputs of ``dtype`` (the caller found the packed chain stale,
        see `unchanged`) and returns the chain, or None if the parameters do not allow it
        (another device or dtype)."""
        params = [p for d in self.parameter_dicts for p in (d["weight"], d["bias"])]
        usable = all(
            p is None or (p.device.type == "cpu" and p.dtype == dtype and p.layout == torch.strided)
            for p in params
        )
        self.chain = (
            pack_chain(
                params[0::2],  # type: ignore[arg-type]  # an nn.Linear always has a weight
                params[1::2],
                self.activations,
            )
            if usable
            else None
        )
        try:
            packed: list[_PackedLayer] = []
            for parameters in self.parameter_dicts:
                weight, bias = parameters["weight"], parameters["bias"]
                bias_state = (0, 0) if bias is None else _state(bias)
                packed.append((parameters, weight, *_state(weight), bias, *bias_state))
            self.packed = packed
        except RuntimeError:  # inference tensors have no version counter: pack every time
            self.packed = None
        self.dtype, self.params = dtype, params
        self.pinned = [None if p is None else p.detach() for p in params]
        return self.chain

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused forward of the chain (``set_modules`` found one) on ``x``, or None where only
        plain PyTorch computes what PyTorch would (CUDA, other dtypes, tensor subclasses,
        ``torch.compile`` or ``torch.jit.trace`` tracing, ``torch.func`` transforms, hooks).
        Every check here runs on each call, so they are ordered and written for speed."""
        if (
            type(x) is not _Tensor
            or any(self.hook_registries)
            or _is_dynamo_compiling()
            or _tracing_state() is not None
            or _functorch_transforms_active()
            or not x.is_cpu
            or x.layout is not _STRIDED
        ):
            return None
        in_features = self.in_features
        shape = x.shape
        if not shape or shape[-1] != in_features:
            raise _shape_error(in_features, shape)
        dtype = x.dtype
        if dtype is self.dtype and self.unchanged():
            chain = self.chain
        else:
            chain = self.pack(dtype) if dtype in _FUSED_DTYPES else None
        if chain is None:  # parameters elsewhere or of another dtype, or a dtype we do not fuse
            weight = self.parameter_dicts[0]["weight"]
            if weight is not None and weight.dtype != dtype:
                raise TypeError(
                    f"expected input of dtype {weight.dtype} (the parameters' dtype), got {dtype}"
                )
            return None
        if _is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in self.params)
        ):
            return FusedMLPFunction.apply(x, chain, self.activations, *self.params)
        if len(shape) == 2 and not x.requires_grad and x.is_contiguous() and not x.is_neg():
            # `_run`'s common case, inlined: the tensor checked above, read where it lies.
            return _from_numpy(chain._forward_dlpack(_to_dlpack(x)))
        return _run(chain, x)


def _state(tensor: torch.Tensor) -> tuple[int, int]:
    """A tensor's version counter and address: an in-place op changes the one, `.data = ...`
    the other."""
    return tensor._version, tensor.data_ptr()


def _hook_registries(modules: Iterable[nn.Module]) -> list[dict[int, Any]]:
    """The hook dicts, global and these modules' own, whose hooks running the modules one by one
    would call and a fused call (running no child's ``forward``) would skip. PyTorch adds and
    removes hooks in place in these same dict objects."""
    registries = [
        _torch_module._global_forward_hooks,
        _torch_module._global_forward_pre_hooks,
        _torch_module._global_backward_hooks,
        _torch_module._global_backward_pre_hooks,
    ]
    for m in modules:
        registries += (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
        )
    return registries


def _has_hooks(modules: Iterable[nn.Module]) -> bool:
    return any(_hook_registries(modules))


def _only_forward(
    module: nn.Module, fused_forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether ``nn.Module.__call__`` on ``module`` would do nothing but call its class's
    ``fused_forward`` on ``args``: one argument, ``forward`` neither overridden by a subclass nor
    replaced on the instance, no hooks on the module, not compiled by ``.compile()``. Global
    hooks, the children's and ``torch.jit.trace`` are the fused call's to check. Where this
    holds, FusedMLP and AE skip ``nn.Module.__call__``, which costs about as much as the fused
    kernel on one row (and so do not show in the profiler's module view). Attributes are read
    from the instance dict, where ``nn.Module`` keeps them (a third faster than
    ``module.name``)."""
    attributes = module.__dict__
    return (
        len(args) == 1
        and not kwargs
        and type(module).forward is fused_forward
        and "forward" not in attributes
        and not (
            attributes["_forward_hooks"]
            or attributes["_forward_pre_hooks"]
            or attributes["_backward_hooks"]
            or attributes["_backward_pre_hooks"]
        )
        and attributes.get("_compiled_call_impl") is None  # set by `.compile()`, torch 2.2+
    )


class FusedMLP(nn.Sequential):
    """An ``nn.Sequential`` of ``nn.Linear`` with ``nn.ReLU`` / ``nn.Identity`` between them,
    run by the fused kernel on CPU.

    Same constructor, children, ``state_dict`` keys and printout as ``nn.Sequential``; input of
    shape ``(*, in_features)``. CPU float32/float64 input runs fused (autograd through
    ``FusedMLPFunction`` when a gradient is needed); anything else (CUDA, half precision, a
    chain holding other modules) runs as plain ``nn.Sequential``.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._fused = _ChainState()

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> FusedMLP:
        """A FusedMLP holding the same child modules (and so the same parameters)."""
        fused = cls(OrderedDict(sequential._modules))  # a plain dict would be read as one module
        fused.train(sequential.training)
        return fused

    def _get_name(self) -> str:
        return "Sequential"  # prints exactly like the nn.Sequential it replaces

    def fused_layers(self) -> Layers | None:
        """The chain the kernel runs, as ``(linear, activation)`` pairs; None if a child is not
        ``nn.Linear`` / ``nn.ReLU`` / ``nn.Identity`` (then it runs as plain nn.Sequential)."""
        return self._fused.set_modules(tuple(self._modules.values()))  # type: ignore[arg-type]

    def invalidate(self) -> None:
        """Forget the packed weights (only needed after edits through ``.data``)."""
        self._fused.invalidate()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attributes = self.__dict__
        if (  # `_only_forward(self, FusedMLP.forward, args, kwargs)` inlined: the batch-1 path
            len(args) == 1
            and not kwargs
            and type(self).forward is FusedMLP.forward
            and "forward" not in attributes
            and not (
                attributes["_forward_hooks"]
                or attributes["_forward_pre_hooks"]
                or attributes["_backward_hooks"]
                or attributes["_backward_pre_hooks"]
            )
            and attributes.get("_compiled_call_impl") is None
        ):
            state = attributes["_fused"]  # `_fused_forward` inlined too
            modules = tuple(attributes["_modules"].values())
            if modules != state.modules:
                state.set_modules(modules)
            if state.layers is not None:
                result = state.forward(args[0])
                if result is not None:
                    return result
        return super().__call__(*args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.fused_layers() is None else self._fused.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._fused_forward(x)
        return super().forward(x) if result is None else result


# Containers whose forward is exactly "apply the children in order".
_SEQUENTIALS = (nn.Sequential, FusedMLP)


class AE(nn.Module):
    """The seed's autoencoder: ``encoder`` = Linear(x, h), ReLU, Linear(h, z); ``decoder`` =
    Linear(z, h), ReLU, Linear(h, x). Same constructor and ``state_dict`` keys as the seed's
    class, so its checkpoints load unchanged. On CPU, ``forward`` runs encoder and decoder as one
    fused call (identity at the bottleneck); ``encoder(x)`` alone gives the codes.
    """

    def __init__(self, x_dim: int, z_dim: int, h_dim: int = 42) -> None:
        super().__init__()
        self.encoder = FusedMLP(nn.Linear(x_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, z_dim))
        self.decoder = FusedMLP(nn.Linear(z_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, x_dim))
        self._fused = _ChainState()

    def invalidate(self) -> None:
        """Forget the packed weights (only needed after edits through ``.data``)."""
        self._fused.invalidate()
        self.encoder.invalidate()
        self.decoder.invalidate()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _only_forward(self, AE.forward, args, kwargs):
            result = self._fused_forward(args[0])
            if result is not None:
                return result
        return super().__call__(*args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole chain as one fused call on ``x``, or None where plain PyTorch must run it."""
        # Children read from the module dict directly: `self.encoder` goes through
        # `nn.Module.__getattr__`, slow on a per-call path.
        encoder = cast(nn.Sequential, self._modules["encoder"])
        decoder = cast(nn.Sequential, self._modules["decoder"])
        if type(encoder) in _SEQUENTIALS and type(decoder) in _SEQUENTIALS:
            modules = (*encoder._modules.values(), *decoder._modules.values())
            if self._fused.set_modules(modules, (encoder, decoder)) is not None:
                return self._fused.forward(x)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, x_dim)`` -> reconstruction of shape ``(*, x_dim)``."""
        result = self._fused_forward(x)
        if result is None:
            encoder = cast(nn.Module, self._modules["encoder"])
            decoder = cast(nn.Module, self._modules["decoder"])
            result = decoder(encoder(x))
        return result


def _describe(layers: Layers) -> str:
    """``"Linear 64->42, ReLU, Linear 42->2"``."""
    parts = []
    for linear, activation in layers:
        parts.append(f"Linear {linear.in_features}->{linear.out_features}")
        if activation == "relu":
            parts.append("ReLU")
    return ", ".join(parts)


@dataclass
class AccelerateReport:
    """What ``accelerate`` did, by qualified module name (``""`` is the model itself).

    ``replaced``: ``(name, layers)`` for each ``nn.Sequential`` turned into a ``FusedMLP``;
    ``already_fused``: ``FusedMLP``s found; ``kept``: ``(name, reason)`` for each
    ``nn.Sequential`` left as it was. ``str(report)`` is a readable account.
    """

    replaced: list[tuple[str, str]] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        def label(name: str) -> str:
            return name or "(the model itself)"

        lines = [f"replaced {len(self.replaced)} nn.Sequential with FusedMLP"]
        lines += [f"  {label(name)}: {layers}" for name, layers in self.replaced]
        if self.already_fused:
            lines.append(f"already fused: {', '.join(map(label, self.already_fused))}")
        if self.kept:
            lines.append(f"kept {len(self.kept)} nn.Sequential unchanged")
            lines += [f"  {label(name)}: {reason}" for name, reason in self.kept]
        return "\n".join(lines)


def accelerate(model: nn.Module) -> tuple[nn.Module, AccelerateReport]:
    """Replaces, in place, every ``nn.Sequential`` in ``model`` that is a chain of ``nn.Linear``
    with ``nn.ReLU`` / ``nn.Identity`` between them by a ``FusedMLP`` holding the same child
    modules, and so the same parameter objects: an optimizer built before keeps working, and
    ``state_dict`` keys and printout do not change.

    Every other module is left alone, as is a chain with forward or backward hooks on it or its
    layers (the fused call would skip them). Calling it again changes nothing. A Sequential
    reachable from several parents is replaced by one FusedMLP everywhere; references held
    outside the module tree (plain attributes, lists) still see the old one.

    Returns the model (a new ``FusedMLP`` if ``model`` is itself such a chain: use the returned
    one) and an ``AccelerateReport``; ``print`` it for a readable account.
    """
    report = AccelerateReport()
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        result = module
        if type(module) is nn.Sequential:
            layers = _chain_layers(module._modules.values())  # type: ignore[arg-type]
            if layers is None:
                kinds = ", ".join(type(child).__name__ for child in module)
                report.kept.append((name, f"not a Linear/ReLU/Identity chain ({kinds})"))
            elif _has_hooks(module.modules()):
                report.kept.append((name, "has hooks, which the fused call would skip"))
            else:
                result = FusedMLP.from_sequential(module)
                report.replaced.append((name, _describe(layers)))
        elif isinstance(module, FusedMLP):
            report.already_fused.append(name)
        done[id(module)] = result
        if result is module:
            for key, child in list(module._modules.items()):
                if child is not None:
                    module._modules[key] = visit(child, f"{name}.{key}" if name else key)
        return result

    return visit(model, ""), report


def save(
    module: nn.Module, path: str | os.PathLike[str], *, encoder_layers: int | None = None
) -> None:
    """Writes ``module``'s weights and layer structure to one ``.safetensors`` file, which
    ``fusedae.MLP.load(path)`` reads with numpy alone (no PyTorch).

    ``module`` is either a chain (``nn.Sequential`` or ``FusedMLP`` of ``nn.Linear`` with
    ``nn.ReLU`` / ``nn.Identity`` between, such as an AE's ``encoder`` alone), or a module whose
    only children are two such chains ``encoder`` and ``decoder`` and whose forward is
    ``decoder(encoder(x))`` (the seed's ``AE``, ``fusedae.torch.AE``): then the file holds one
    chain and records the encoder's length as ``encoder_layers``. Otherwise ``encoder_layers``
    defaults to the narrowest inner layer if the chain's output is as wide as its input (an
    autoencoder), else to all layers. Parameters are saved as float64 if the first weight is
    float64, else as float32.
    """
    if isinstance(module, nn.Sequential):
        chains: list[tuple[str, nn.Module | None]] = [("module", module)]
    elif list(module._modules) == ["encoder", "decoder"] and not module._parameters:
        chains = list(module._modules.items())
    else:
        raise TypeError(
            "save takes an nn.Sequential of Linear/ReLU/Identity layers, or a module whose only "
            f"children are such chains 'encoder' and 'decoder'; got {type(module).__name__} "
            f"with children {list(module._modules)}"
        )
    layers: list[tuple[nn.Linear, str]] = []
    for name, chain in chains:
        found = _chain_layers(chain) if type(chain) in _SEQUENTIALS else None  # type: ignore[arg-type]
        if found is None:
            raise TypeError(f"{name} is not an nn.Sequential of Linear/ReLU/Identity: {chain}")
        if encoder_layers is None and name == "decoder":
            encoder_layers = len(layers)
        layers.extend(found)
    dtype = torch.float64 if layers[0][0].weight.dtype == torch.float64 else torch.float32

    def as_array(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", dtype).numpy()

    arrays = [
        (as_array(linear.weight), None if linear.bias is None else as_array(linear.bias))
        for linear, _ in layers
    ]
    serialization.write(path, arrays, [activation for _, activation in layers], encoder_layers)
