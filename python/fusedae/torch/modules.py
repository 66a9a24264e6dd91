"""``FusedMLP`` and ``AE``: drop-in modules whose call runs the fused kernel where it computes
what PyTorch would, and plain PyTorch everywhere else."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from fusedae.chain import Precision, PrecisionName, precision_name, spec_precision
from fusedae.torch.cache import (
    _TRACED_PLAIN,
    ChainCache,
    SplitCache,
    _is_dynamo_compiling,
    _is_grad_enabled,
    _tracing_state,
    hook_registries,
    own_hooks,
)
from fusedae.torch.lower import LoweredChain

# A chain as `FusedMLP.fused_layers` shows it: each Linear with its post-op's name.
Layers = tuple[tuple[nn.Linear, str], ...]

# The global hook dicts, which `nn.Module.__call__` reads besides the module's own (PyTorch adds
# and removes hooks in place in these same objects).
_GLOBAL_HOOKS = tuple(hook_registries(()))


class _FusedCall(nn.Module):
    """The ``__call__`` of ``FusedMLP`` and ``AE``: the one gate in front of the fused forward.

    Where ``nn.Module.__call__`` would do nothing but call the class's own ``forward`` on one
    argument (``forward`` neither overridden by a subclass nor replaced on the instance, no
    hooks on the module, not compiled by ``.compile()``), it calls ``_fused_forward`` directly:
    ``nn.Module.__call__`` costs about as much as the fused kernel on one row (so these modules
    do not show in the profiler's module view). Global hooks, the children's, tracing and the
    rest are ``ChainCache.forward``'s to check. Attributes are read from the instance dict,
    where ``nn.Module`` keeps them (a third faster than ``module.name``).
    """

    _fused: ChainCache
    # The `forward` of the class that defines `_fused_forward`; a subclass overriding `forward`
    # inherits this one, and so is called through `nn.Module.__call__`.
    _gated_forward: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _TRACED_PLAIN and _is_dynamo_compiling():
            # Without the custom ops, compiled code is plain PyTorch: `nn.Module.__call__`'s
            # route, which the TorchDynamo of those torches follows (it refused to trace
            # `__dict__` below: torch 2.1, fullgraph=True).
            return super().__call__(*args, **kwargs)
        attributes = self.__dict__
        cls = type(self)
        if (
            len(args) == 1
            and not kwargs
            and cls.forward is cls._gated_forward
            and "forward" not in attributes
            and not (
                attributes["_forward_hooks"]
                or attributes["_forward_pre_hooks"]
                or attributes["_backward_hooks"]
                or attributes["_backward_pre_hooks"]
            )
            and attributes.get("_compiled_call_impl") is None  # set by `.compile()`, torch 2.2+
        ):
            x = args[0]
            if (
                _is_dynamo_compiling()
                and not any(_GLOBAL_HOOKS)  # (`nn.Module.__call__` runs them)
                and attributes["_fused"].compiles_plain(x)
            ):
                return self._plain_forward(x)
            # An inference call pays one C call here, not the method's.
            trains_plain = False
            if _is_grad_enabled():
                if _tracing_state() is not None:
                    # torch.jit.trace: plain PyTorch by one route, which `check_trace`'s second
                    # trace takes too (the gate below differed between them: "Graphs differed
                    # across invocations").
                    return super().__call__(*args, **kwargs)
                trains_plain = attributes["_fused"].trains_plain(x)
            result = None if trains_plain else self._fused_forward(x)
            if result is not None:
                return result
            if not (any(_GLOBAL_HOOKS) or _is_dynamo_compiling() or _tracing_state() is not None):
                # All that `nn.Module.__call__` would do: call `forward`, which would run the
                # gate above again before the plain modules (a training call below
                # `TRAINING_MIN_ROWS` paid the gate twice).
                return self._plain_forward(x)
        return super().__call__(*args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused forward on ``x``, or None where plain PyTorch must run it."""
        raise NotImplementedError

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` where ``_fused_forward`` returned None."""
        raise NotImplementedError


# What a FusedMLP takes over from the Sequential it replaces, and gives the Sequential that
# stands for it, besides the attributes the other does not have (the hooks the kernel would
# skip keep a Sequential from being replaced). The hook dicts are shared: a hook's handle
# removes it from the dict it was registered in. Parameters and buffers are the same objects
# in dicts of their own: one registered on the replaced module later stays there.
SEQUENTIAL_STATE = (
    "training",
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
COPIED_STATE = ("_parameters", "_buffers", "_non_persistent_buffers_set")
FUSED_STATE = ("_fused", "_pieces")  # a FusedMLP's own


HAS_HOOKS = "has hooks, which the fused call would skip"


def why_kept(sequential: nn.Module) -> str | None:
    """Why a call of ``sequential`` does more than its class's ``forward`` on its children, or
    None: hooks of its own (a FusedMLP would skip them), a ``.compile()`` in place or a
    ``forward`` assigned to it (either runs the old module, with its old children)."""
    if any(own_hooks(sequential)):
        return HAS_HOOKS
    own = vars(sequential)
    if own.get("_compiled_call_impl") is not None:
        return "was compiled in place (.compile()): accelerate first, then compile"
    if "forward" in own:
        return "has a forward assigned to it, which PyTorch calls instead of its class's"
    return None


def take_state(module: nn.Module, source: nn.Module, leave: tuple[str, ...] = ()) -> None:
    """Gives ``module`` (with ``source``'s children) the rest of what ``source`` holds:
    ``SEQUENTIAL_STATE``, and the attributes ``module`` does not have, but those in
    ``leave``."""
    own = vars(module)
    for name, value in vars(source).items():
        if name not in leave and (name in SEQUENTIAL_STATE or name not in own):
            own[name] = copy.copy(value) if name in COPIED_STATE else value


# What a torch module's `precision=` takes (fusedae.MLP takes "fp64" too).
MODULE_PRECISIONS = ("fp32", "bf16", "int8")


def module_precision(name: str | None) -> Precision:
    """The chain precision for a torch module's ``precision=``: ``"fp32"`` (or None) is full
    precision, in the parameters' own dtype (float64 parameters compute in float64), and
    ``"fp64"``, which the numpy ``MLP`` takes for its dtype, is refused here: a module's dtype
    is its parameters'."""
    if name == "fp64":
        raise ValueError(
            "precision 'fp64' is fusedae.MLP's: a torch module computes in its parameters' "
            "dtype (model.double() for float64); pass 'fp32' (full precision), 'bf16' or 'int8'"
        )
    if name is not None and name not in MODULE_PRECISIONS:
        raise ValueError(f"precision must be one of {MODULE_PRECISIONS}, got {name!r}")
    return spec_precision(name)


class FusedMLP(_FusedCall, nn.Sequential):
    """An ``nn.Sequential`` whose runs of modules the kernels take (``lower.lower``: Linear
    layers with post-ops, BatchNorm1d, Dropout, Identity, a leading Flatten and a trailing
    Unflatten) each run as one fused call on CPU; every other child runs as the module it is.
    Children that are Sequentials themselves (an encoder and a decoder) count as their own
    children in order (``chain_modules``): where all of those form one chain, the whole runs
    as one fused call.

    Same constructor, children, ``state_dict`` keys and printout as ``nn.Sequential``. CPU
    float32/float64 input runs fused (autograd through ``FusedMLPFunction`` when a gradient is
    needed); anything else (CUDA, half precision, autocast, BatchNorm in training mode) runs as
    plain ``nn.Sequential``.

    ``precision="bf16"`` or ``"int8"`` (or ``set_precision``) runs the fused calls with the
    weights stored as bfloat16, or as int8 with a scale per output and each layer's input rows
    quantized to uint8, for inference (float32 in and out; a call that needs gradients raises
    RuntimeError: train at ``"fp32"``); under ``torch.compile`` / ``torch.export`` the traced
    op computes at fp32.
    """

    def __init__(self, *args: Any, precision: PrecisionName | None = None) -> None:
        super().__init__(*args)
        self._fused = ChainCache(module_precision(precision))  # the whole Sequential, if a chain
        self._pieces = SplitCache(module_precision(precision))  # where it is not
        # Lowered now, so that a first call traced by torch.compile or torch.export finds the
        # chain and changes no state (the calls look again: the children may change).
        self.read_children()

    @classmethod
    def from_sequential(
        cls, sequential: nn.Sequential, precision: PrecisionName | None = None
    ) -> FusedMLP:
        """A FusedMLP holding the same child modules (and so the same parameters), each in its
        own training mode; and whatever else the Sequential holds: its own parameters and
        buffers, state-dict hooks, and attributes (which a parent's forward may read). A
        ValueError where the Sequential's own calls do more than its class's (``why_kept``)."""
        if (reason := why_kept(sequential)) is not None:
            raise ValueError(f"FusedMLP.from_sequential: the Sequential {reason}")
        # An OrderedDict: a plain dict would be read as one module.
        fused = cls(OrderedDict(sequential._modules), precision=precision)
        take_state(fused, sequential)
        return fused

    def _get_name(self) -> str:
        return "Sequential"  # prints exactly like the nn.Sequential it replaces

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in this module's place: an ``nn.Sequential`` of
        the same children, holding what this module holds besides (TorchScript does not take
        the fused call's Python): plain PyTorch's values."""
        plain = nn.Sequential(OrderedDict(self._modules))
        take_state(plain, self, leave=FUSED_STATE)
        return plain

    @property
    def precision(self) -> PrecisionName:
        """``"bf16"``, ``"int8"``, or ``"fp32"`` (the parameters' own dtype: fp64 for float64
        ones)."""
        return precision_name(self._fused.precision)

    def set_precision(self, precision: PrecisionName) -> FusedMLP:
        """Runs the fused calls at ``precision`` (``"fp32"``, ``"bf16"``, ``"int8"``) from the
        next call on (packing again), its inner FusedMLPs' too (``nn.Sequential(encoder,
        decoder)``'s halves, called alone; an inner one's own ``set_precision`` changes its calls
        alone, not this module's); returns the module."""
        set_precision_below(self, precision)
        return self

    def fused_layers(self) -> Layers | None:
        """The chain the kernel runs, as ``(linear, post-op name)`` pairs; None if the children
        do not form one chain (then ``fused_runs`` says which of them run fused)."""
        lowered = self.read_children()
        return (
            None if lowered is None else tuple((linear, op.name) for linear, op in lowered.layers)
        )

    def read_children(self) -> LoweredChain | None:
        """Reads the children's chain again (as each eager call does), or the runs of them
        fused where they are not one: after children are replaced, so that the next call, traced
        or not, finds them read and changes no state (a compiled call would trace plain
        PyTorch, or its state change would make the next one compile again)."""
        modules: tuple[nn.Module, ...] = tuple(self._modules.values())  # type: ignore[arg-type]
        lowered = self._fused.set_modules(*chain_modules(modules))
        if lowered is None:
            self._pieces.pieces_of(modules)
        return lowered

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy or an unpickled module starts with empty caches: read now, as `__init__` does.
        super().__setstate__(state)
        self.read_children()

    def fused_runs(self) -> list[tuple[int, int]]:
        """The ``(start, stop)`` child indices of each run of children called as one fused
        call."""
        modules: tuple[nn.Module, ...] = tuple(self._modules.values())  # type: ignore[arg-type]
        if self.fused_layers() is not None:
            return [(0, len(modules))]
        runs, start = [], 0
        for piece, cache in self._pieces.pieces_of(modules):
            if cache is not None and cache.lowered is not None:
                runs.append((start, start + len(piece)))
            start += len(piece)
        return runs

    def invalidate(self) -> None:
        """``fusedae.torch.invalidate`` on this module."""
        invalidate(self)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        state = self._fused
        modules = tuple(self._modules.values())
        # New children, or Sequentials among them, read again on each call (theirs may change
        # too).
        lowered = (
            state.set_modules(*chain_modules(modules))
            if modules != state.modules
            else state.lowered
        )
        if lowered is None:
            return None
        return state.reshaped_forward(x) if state.reshaped else state.forward(x)

    # `input`, as `nn.Sequential.forward` names it: a call by keyword works on both.
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self._fused_forward(input)
        return self._plain_forward(input) if result is None else result

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused.lowered is not None:  # one chain, which PyTorch must run
            return super().forward(x)
        modules: tuple[nn.Module, ...] = tuple(self._modules.values())  # type: ignore[arg-type]
        for piece, cache in self._pieces.pieces_of(modules):
            fused = None
            if cache is not None and cache.lowered is not None:  # (None: lowered again, plain)
                fused = cache.reshaped_forward(x) if cache.reshaped else cache.forward(x)
            if fused is None:
                for module in piece:
                    x = module(x)
            else:
                x = fused
        return x

    _gated_forward = forward


# Containers whose forward is exactly "apply the children in order".
SEQUENTIALS = (nn.Sequential, FusedMLP)


def chain_modules(
    children: tuple[nn.Module | None, ...],
) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...]]:
    """What a Sequential of ``children`` (its ``_modules`` values) runs, in order: ``children``
    with each (exact) Sequential among them replaced by its own children, recursively; and
    those Sequentials, whose hooks the fused call would skip (``ChainCache.set_modules``)."""
    if not any(type(child) in SEQUENTIALS for child in children):
        return cast(tuple[nn.Module, ...], children), ()
    leaves: list[nn.Module] = []
    containers: list[nn.Module] = []
    for child in cast(tuple[nn.Module, ...], children):  # a None child: `lower` refuses it
        if type(child) in SEQUENTIALS:
            inner, nested = chain_modules(tuple(child._modules.values()))
            leaves += inner
            containers += (child, *nested)
        else:
            leaves.append(child)
    return tuple(leaves), tuple(containers)


class _ScriptableAE(nn.Module):
    """``AE`` as TorchScript takes it: the decoder on the encoder's output."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AE(_FusedCall):
    """The seed's autoencoder: ``encoder`` = Linear(x, h), ReLU, Linear(h, z); ``decoder`` =
    Linear(z, h), ReLU, Linear(h, x). Same constructor and ``state_dict`` keys as the seed's
    class, so its checkpoints load unchanged. On CPU, ``forward`` runs encoder and decoder as one
    fused call (identity at the bottleneck); ``encoder(x)`` alone gives the codes.
    ``precision`` as for ``FusedMLP``, for the whole model and each half; a half's own
    ``set_precision`` (``model.encoder.set_precision("int8")``) changes only that half's calls
    (``model.encoder(x)``), not the whole model's fused call.
    """

    def __init__(
        self, x_dim: int, z_dim: int, h_dim: int = 42, *, precision: PrecisionName | None = None
    ) -> None:
        super().__init__()
        layers = (nn.Linear(x_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, z_dim))
        self.encoder = FusedMLP(*layers, precision=precision)
        layers = (nn.Linear(z_dim, h_dim), nn.ReLU(), nn.Linear(h_dim, x_dim))
        self.decoder = FusedMLP(*layers, precision=precision)
        self._fused = ChainCache(module_precision(precision))
        self._read_children()

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles in this module's place: the same halves, called
        one after the other (as plain Sequentials: ``FusedMLP.__prepare_scriptable__``)."""
        plain = _ScriptableAE(self.encoder, self.decoder)
        take_state(plain, self, leave=FUSED_STATE)
        return plain

    def _read_children(self) -> LoweredChain | None:
        """The whole chain, read again (as ``FusedMLP.read_children`` reads its children), or
        None where it is not one."""
        # Children read from the module dict directly: `self.encoder` goes through
        # `nn.Module.__getattr__`, slow on a per-call path.
        encoder = cast(nn.Sequential, self._modules["encoder"])
        decoder = cast(nn.Sequential, self._modules["decoder"])
        if type(encoder) in SEQUENTIALS and type(decoder) in SEQUENTIALS:
            modules = (*encoder._modules.values(), *decoder._modules.values())
            return self._fused.set_modules(modules, (encoder, decoder))  # type: ignore[arg-type]
        return None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # As FusedMLP's.
        super().__setstate__(state)
        self._read_children()

    def invalidate(self) -> None:
        """``fusedae.torch.invalidate`` on this module."""
        invalidate(self)

    @property
    def precision(self) -> PrecisionName:
        """As ``FusedMLP.precision``, for the whole model."""
        return precision_name(self._fused.precision)

    def set_precision(self, precision: PrecisionName) -> AE:
        """``FusedMLP.set_precision`` for the whole model and both halves; returns it."""
        set_precision_below(self, precision)
        return self

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole chain as one fused call on ``x``, or None where plain PyTorch must run it."""
        if self._read_children() is None:
            return None
        state = self._fused
        return state.reshaped_forward(x) if state.reshaped else state.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, x_dim)`` -> reconstruction of shape ``(*, x_dim)``."""
        result = self._fused_forward(x)
        return self._plain_forward(x) if result is None else result

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder = cast(nn.Module, self._modules["encoder"])
        decoder = cast(nn.Module, self._modules["decoder"])
        return cast(torch.Tensor, decoder(encoder(x)))

    _gated_forward = forward


def invalidate(model: nn.Module) -> None:
    """Forgets the packed weights of every FusedMLP and AE in ``model`` (itself included): only
    needed after edits the version counters do not see (through ``.data``, a numpy view or the
    storage; see the README), and only for eager calls (compiled and exported calls pack on
    every call). ``model`` may be any module holding them (an inner FusedMLP's were kept)."""
    for module in fused_below(model):
        module._fused.invalidate()
        if isinstance(module, FusedMLP):
            for _, cache in module._pieces.pieces:
                if cache is not None:
                    cache.invalidate()


def set_precision_below(model: nn.Module, precision: PrecisionName) -> None:
    """``FusedMLP.set_precision`` on every FusedMLP and AE in ``model``."""
    chain_precision = module_precision(precision)
    for module in fused_below(model):
        module._fused.set_precision(chain_precision)
        if isinstance(module, FusedMLP):
            module._pieces.set_precision(chain_precision)


def fused_below(model: nn.Module) -> Iterator[FusedMLP | AE]:
    """Every FusedMLP and AE in ``model``, itself included."""
    for module in model.modules():
        if isinstance(module, FusedMLP | AE):
            yield module
