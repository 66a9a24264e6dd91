"""``ChainCache``: which chain a module's children form, and its packed native chain, reused
while none of the tensors it was packed from changed; and the per-call gate of the fused
forward (``ChainCache.forward``)."""

from __future__ import annotations

import itertools
import os
import threading
import types
import weakref
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._device import DeviceContext as _DeviceContext

from fusedae import _native
from fusedae._ops import PostOp
from fusedae.chain import Precision
from fusedae.torch.function import (
    CheckedFusedMLPFunction,
    InputDtypeError,
    pack_spec,
    run,
    shape_error,
    to_dlpack,
)
from fusedae.torch.lower import (
    DROPOUTS,
    LoweredChain,
    Settings,
    TensorSlot,
    forward_assigned,
    lower,
    resolved,
    settings,
    settings_changed,
    split,
)

_custom_ops: types.ModuleType | None
try:
    from fusedae.torch import custom_ops as _custom_ops
except (AttributeError, ValueError):
    # torch < 2.4 has no `torch.library.custom_op`, and one that cannot infer the ops' schemas
    # refuses them with a ValueError: compiled, plain PyTorch
    _custom_ops = None
# Whether compiled code runs the fused modules as plain PyTorch (no custom ops): while TorchDynamo
# traces, their calls go straight to `traced_forward` (plain, or the narrow precisions' refusal
# to train), past checks torch 2.1's Dynamo refused under fullgraph=True (a module's `__dict__`,
# `type()` of the input).
_TRACED_PLAIN = _custom_ops is None

_FUSED_DTYPES = (torch.float32, torch.float64)
# Fewest rows, and floating-point operations (rows x `flops_per_row`), for which a call that
# needs gradients goes through the fused forward and backward. Below either, plain PyTorch costs
# less: the fused path's per-call cost (two Function calls' Python, the repacking of weights that
# every optimizer step changes, 30-50 us a chain) is not yet paid back. Where that is depends
# on the CPU (what PyTorch's own kernels make of it), so it is chosen by CPUID's vendor. Measured
# with `tools/training_table.py` (1 thread; a step: forward, MSE, backward, Adam; fused against
# plain), the seed's AE (784-42-16 | 16-42-784, two chains of 6.7e4 operations a row) and the
# digits AE (64-42-2 | 2-42-64, 5.5e3 a row a chain):
# - Zen 4 (2026-12-03): seed 1.06x at 256 rows (1.7e7 operations a chain), 1.13x at 1024; digits
#   0.99x at 1024 rows (5.6e6), 1.11x at 2048. 2026-12-04, with less Python around the kernels
#   (gradients split in numpy): seed 1.04-1.06x at 128 rows (three runs; 8.6e6), 1.02-1.03x at
#   96, 0.97x at 64; digits 1.12x at 1024.
# - Intel Emerald Rapids (2026-12-04, with the backward of 9993426-9e45ca2), the gate of any CPU
#   not measured: seed 0.83-0.86x at 256 rows, 0.95-0.98x at 1024, 1.04-1.19x at 4096 (2.7e8);
#   digits 0.93-1.01x at 2048, 1.06-1.10x at 4096 (2.3e7), 1.10-1.24x at 8192. The gate takes
#   the fused path only where no run measured it slower.
# - Intel Xeon with AMX (2026-12-05, a KVM guest with 2 MiB of L2 a core and 480 MiB of L3, the
#   code of ec476ad): seed 0.95-1.01x at 512 rows, 0.99-1.04x at 1024 (four runs), 1.01-1.18x at
#   2048 (1.4e8); digits 1.00-1.03x at 2048 (1.1e7, three runs), 1.12-1.15x at 4096. 2026-12-05,
#   the seed's class after `repack` (538eb29): 0.98x at 256 rows, 1.02-1.06x at 512 (three runs;
#   3.4e7), 1.09-1.14x at 1024; digits 1.01x at 256, 1.03-1.06x at 512 (two runs; 2.8e6),
#   1.06-1.09x at 1024 (three), 1.13x at 2048.
# - Zen 4 again (2026-12-05, the code of 7478798; two runs of 300 rounds each), the operations a
#   chain: digits, its class 0.99-1.00x at 192 rows (1.1e6), 1.00-1.04x at 256 (1.4e6, four
#   runs), 1.06x at 384 (2.1e6); as one Sequential (1.1e4 a row) 1.04-1.06x at 128 rows (1.4e6);
#   128-42-4 | 4-42-128 0.98-1.00x at 128 rows (1.4e6), 1.05x at 256 (2.8e6); 256-42-8 | 8-42-256
#   1.02-1.03x at 128 rows (2.8e6); the seed's class 0.97-0.99x at 32 rows, 1.00x at 48, 1.01-1.04x
#   at 64 (five runs), 1.03-1.06x at 96; as one Sequential 1.02-1.03x at 32, 1.06-1.07x at 64.
#   The gate went from 128 rows and 5e6 operations to 64 and 2e6. The same day, with the AVX2
#   kernel forced (`FUSEDAE_ISA=avx2`, Zen 3's): the seed's class 0.99-1.00x at 64 rows, 1.05x
#   at 128; digits 1.02-1.05x at 384; in float64: the seed 1.11x at 64 rows, digits 1.19x at 384.
_TRAINING_GATES = {"AuthenticAMD": (64, 2_000_000), "GenuineIntel": (512, 2_500_000)}
_UNMEASURED_CPU_GATE = (4096, 20_000_000)
TRAINING_MIN_ROWS, TRAINING_MIN_FLOPS = _TRAINING_GATES.get(
    _native.cpu_vendor(), _UNMEASURED_CPU_GATE
)
# The gate again, where PyTorch and fusedae both run on several threads (the larger of the two
# applies). After each of its parallel ops, PyTorch's OpenMP threads spin for milliseconds
# (libgomp's default wait policy), on the cores fusedae's pool needs next: in a training step
# every kernel call follows a PyTorch op (Adam, the loss), and its pool threads got little of
# those cores. Measured with both on 2 threads (the Intel Xeon with AMX, 2026-12-05; a step
# as above, fused against plain, both on 2 threads): seed 0.99x at 256 rows, 0.79-0.97x at 1024,
# 0.85-0.86x at 2048, 0.84-1.21x at 4096 (median 0.99x over 14 runs; 2.8e8 operations a chain),
# 1.11-1.34x at 8192 (5.5e8), 1.05-1.26x at 16384; digits 0.95x at 4096, 0.98x at 8192 (4.5e7),
# 1.01-1.03x at 16384 (9.1e7), 1.26x at 32768. With `OMP_WAIT_POLICY=PASSIVE` the seed's fused
# step at 4096 rows ran 1.14x faster, plain PyTorch's 1.38x slower. On Zen 4 (2026-12-05, the
# same way, two runs): seed 0.80-0.96x at 256 rows, 0.84-0.89x at 1024, 1.02-1.15x at 4096
# (0.87x in a bench run), 1.11-1.26x at 8192, 1.27-1.33x at 16384; digits 0.95-1.15x at 256-512,
# 0.98-1.05x at 4096, 0.94-0.96x at 8192, 1.03-1.14x at 16384, 1.10-1.36x at 32768. The cause
# is libgomp's, not the CPU's: every CPU takes this gate while fusedae runs on its own pool
# (`share_torch_threads(False)`, or a PyTorch whose OpenMP runtime it did not find).
THREADED_TRAINING_MIN_ROWS, THREADED_TRAINING_MIN_FLOPS = 8192, 90_000_000
# The gate where both run on several threads and fusedae's calls run on PyTorch's OpenMP
# threads (`share_torch_threads`, the default), which its ops left spinning, ready: twice the
# one-thread gate's rows, as PyTorch's own layers gain from the second thread too. Zen 4
# (2026-12-06, `tools/training_table.py` on 2 threads, 150 rounds, fused against plain): the
# seed's class 0.94x at 48 rows, 0.97x at 64, 1.01x at 96, 1.04x at 128 (8.6e6 operations a
# chain), 1.09x at 192, 1.13x at 256, 1.42x at 1024, 1.67x at 4096; as one Sequential 0.99x at
# 32 and 64 rows, 1.10-1.11x at 96 and 128; digits 0.99x at 64 and 128 rows (7e5), 1.02x at
# 256 (1.4e6), 1.10x at 384 (2.1e6), 1.11x at 512, 1.37x at 1024.
SHARED_THREADS_TRAINING_MIN_ROWS, SHARED_THREADS_TRAINING_MIN_FLOPS = 128, 2_000_000
# Fewest operations a chain (rows x `flops_per_row`) for which a call traced by torch.compile
# runs the custom op, for inference and for training (where the training gates above apply
# too); below, the chain's layers go into the graph as plain PyTorch. Compiled, each custom op
# call costs 150-250 us more than its kernel called eagerly (torch's custom-op dispatch and
# wrappers, the graph's guards, from caches the last kernel flushed), which the compiled plain
# layers do not pay. Measured on the Intel Xeon with AMX (2026-12-05, 1 thread; the model
# compiled, the gates off, against the plain model compiled; the training step's MSE and Adam
# eager): inference: the seed AE as one chain 0.96x at 256 rows (3.4e7 operations), 1.08x at
# 512 (6.9e7); the seed's class (two chains) 0.89x at 512 (3.4e7 a chain), 1.09x at 1024
# (6.9e7), 1.28x at 2048; digits 0.89x at 1024 (5.7e6), 1.03x at 2048 (1.1e7), 1.21x at 4096.
# Training step: the AE 0.92x at 512 rows (6.9e7), 1.02x at 1024 (1.4e8), 1.05-1.10x at 2048
# (2.8e8); the class 0.96x at 1024 (6.9e7), 0.93-1.04x at 2048 (1.4e8, two runs), 1.20x at
# 4096 (2.8e8); digits 0.93x at 4096 (2.3e7), 1.12x at 8192 (4.5e7). Set where no run of the
# seed's forms measured the op slower; the digits AE, whose plain layers are slower for their
# operations, turns earlier and keeps plain PyTorch a while longer. On Zen 4 (2026-12-05, the
# same way, `tools/compile_speed.py compiled --gates-off [--digits]`, two rounds each), where
# PyTorch's own layers are slower, inference turns ten times earlier: the seed AE as one chain
# 0.95-0.98x at 32 rows (4.3e6), 1.00-1.03x at 48 (6.5e6), 1.04-1.12x at 64 (8.6e6), 1.23x at
# 256; the class 0.93-0.95x at 64 rows (4.3e6 a chain), 1.05-1.06x at 128 (8.6e6); digits as
# one chain 0.88-0.91x at 256 (2.8e6), 1.06-1.13x at 768 (8.5e6), the class 0.98x at 768 (4.3e6
# a chain), 1.04x at 1024 (5.7e6), 1.12x at 1536 (8.5e6). Training there: the AE 0.96-1.07x at
# 256 rows (3.4e7), 1.06-1.10x at 512; digits as one chain, the MSE eager, 0.91-1.21x at 6144
# rows (6.8e7) and 0.93-1.22x at 8192 over five rounds: the training gate stays. Other CPUs keep
# Intel's gates. An exported program runs the op at every size.
# Since the ops pack their chain on every call (custom_ops.py: 25-95 us a chain, 130-170 us
# from the caches a 512-row call leaves), both gates moved up, on every CPU (Intel VM,
# 2026-12-07, `--gates-off`, two rounds): inference, the seed's class 0.93x at 768 rows (5.2e7 a
# chain), 0.97-1.03x at 1024 (6.9e7), 1.01x at 1280, 1.04x at 1536 (1.0e8), 1.31x at 2048; the
# AE as one chain 0.89-0.92x at 512 (6.9e7), 1.09-1.17x at 1024 (1.4e8); training, the AE
# 0.99-1.01x at 1024 (1.4e8), 0.99-1.07x at 1536 (2.1e8), 1.06-1.09x at 2048 (2.8e8). Zen 4's
# lower inference gate was not measured again: it takes Intel's.
COMPILED_INFERENCE_MIN_FLOPS = 120_000_000
COMPILED_TRAINING_MIN_FLOPS = 250_000_000
# The names of the size gates above, for the tests and tools that set them (0: the fused path,
# or the custom op, at every size).
TRAINING_GATES = (
    "TRAINING_MIN_ROWS",
    "TRAINING_MIN_FLOPS",
    "THREADED_TRAINING_MIN_ROWS",
    "THREADED_TRAINING_MIN_FLOPS",
    "SHARED_THREADS_TRAINING_MIN_ROWS",
    "SHARED_THREADS_TRAINING_MIN_FLOPS",
)
COMPILED_GATES = ("COMPILED_INFERENCE_MIN_FLOPS", "COMPILED_TRAINING_MIN_FLOPS")
# What the per-call path uses from torch, bound once: each `torch.name` lookup costs ~25 ns.
# `is_dynamo_compiling` is True while TorchDynamo traces (torch.compile, strict torch.export) in
# one trivial call where `torch.compiler.is_compiling` makes two (torch 2.3+; older ones have
# only the latter); non-strict export and AOTAutograd trace fake tensors, which the exact type
# check turns away. Under autocast a Linear computes in its lower precision: any autocast
# (torch 2.4+ has one flag for all devices; older ones, the CPU's) runs plain PyTorch.
# True while TorchDynamo traces and while torch.export traces without it (non-strict).
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", None) or _is_compiling
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_is_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", torch.is_autocast_cpu_enabled)
_tracing_state = torch._C._get_tracing_state
_functorch_transforms_active = torch._C._are_functorch_transforms_active
# A user's TorchFunctionMode or TorchDispatchMode sees (and may change) every op of the plain
# layers, and nothing of a fused call.
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_function_modes = torch._C._len_torch_function_stack
_function_mode_at = torch._C._get_function_stack_at
_dispatch_modes = torch._C._len_torch_dispatch_stack

FLOAT32_MAX = float(np.finfo(np.float32).max)  # (`ChainCache.post_ops_fit_float32`)


def _user_function_mode() -> bool:
    """Whether a TorchFunctionMode is active other than the one ``torch.set_default_device``
    and ``with torch.device(...)`` push for the CPU (which changes nothing a fused call does:
    many scripts set it, and fusedae would stop fusing there)."""
    for index in range(_function_modes()):
        mode = _function_mode_at(index)
        if type(mode) is not _DeviceContext or mode.device.type != "cpu":
            return True
    return False


_is_grad_enabled = torch.is_grad_enabled
# `_current_level` is -1 outside `torch.autograd.forward_ad.dual_level()`.
_forward_ad = torch.autograd.forward_ad
_torch_threads = torch.get_num_threads
_from_numpy = torch.from_numpy
_Tensor = torch.Tensor
_STRIDED = torch.strided


def _threaded_gate() -> tuple[int, int]:
    """The training gate's rows and operations besides ``TRAINING_MIN_ROWS`` and
    ``TRAINING_MIN_FLOPS``: where PyTorch and fusedae both run on several threads,
    ``THREADED_TRAINING_MIN_*`` on fusedae's own pool, ``SHARED_THREADS_TRAINING_MIN_*`` on
    PyTorch's threads; none (zeros) where either runs on one."""
    if _torch_threads() > 1 and _native.get_num_threads() > 1:
        if _native.threads_runtime() == "fusedae":
            return THREADED_TRAINING_MIN_ROWS, THREADED_TRAINING_MIN_FLOPS
        return SHARED_THREADS_TRAINING_MIN_ROWS, SHARED_THREADS_TRAINING_MIN_FLOPS
    return 0, 0


# While torch.compile traces, read once, as a constant of the graph (torch 2.2+): a call of
# these functions there would break the graph. A later change of threads does not retrace.
if hasattr(torch.compiler, "assume_constant_result"):
    _threaded_gate = torch.compiler.assume_constant_result(_threaded_gate)


# The chains that packed each tensor, by its id: an optimizer's step marks those of the
# parameters it stepped (``ChainCache.stepped``), which then pack again from the tensors'
# memory on their next call, whatever the version counters say (many optimizers outside
# torch, LAMB's among them, write `p.data`, which bumps none: the model went on with its first
# weights for a whole run). Only those chains: a step of one model's optimizer leaves another
# model's packing (a teacher's, an EMA copy's) alone.
_packed_by: dict[int, weakref.WeakSet[ChainCache]] = {}
# `_packed_by`'s size above which its entries of chains gone are dropped (doubled each time).
_pruned_above = [1024]
# Held by the writers of `_packed_by`: threads that share no model pack at the same time (four
# such threads raised "dictionary changed size during iteration" and KeyErrors from a forward).
# Its sets are replaced, never changed in place, so the optimizer-step hook reads it without the
# lock, which TorchDynamo cannot trace (a step compiled with fullgraph=True would fail).
_packed_by_lock = threading.Lock()


def _new_packed_by_lock() -> None:
    """A forked child's own lock: a thread of the parent may have held it at the fork."""
    global _packed_by_lock
    _packed_by_lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # (not on Windows)
    os.register_at_fork(after_in_child=_new_packed_by_lock)


def _register_packed(cache: ChainCache, tensors: list[torch.Tensor | None]) -> None:
    """Records in ``_packed_by`` that ``cache`` packed ``tensors`` (and no longer those it
    packed before)."""
    with _packed_by_lock:
        for key in cache.packed_ids:
            caches = _packed_by.get(key)
            if caches is not None and cache in caches:
                rest = weakref.WeakSet(caches)
                rest.discard(cache)
                _packed_by[key] = rest
        cache.packed_ids = [id(tensor) for tensor in tensors if tensor is not None]
        for key in cache.packed_ids:
            more = weakref.WeakSet(_packed_by.get(key, ()))
            more.add(cache)
            _packed_by[key] = more
        if len(_packed_by) > _pruned_above[0]:
            for key in [key for key, caches in _packed_by.items() if not caches]:
                del _packed_by[key]
            _pruned_above[0] = 2 * max(len(_packed_by), 512)


def _after_optimizer_step(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Marks the chains that packed a parameter the step may have written (``_packed_by``).
    After a step of an optimizer built with ``fused=True`` (Adam, AdamW, SGD, Adagrad: one
    kernel writes every parameter), also bumps the version counters of the parameters it
    stepped, as every other optimizer's in-place updates do: the fused kernels bump none (torch
    2.4-2.15), so a backward through tensors saved before the step would not be refused."""
    for group in optimizer.param_groups:
        fused = group.get("fused")
        for param in group["params"]:
            if param.grad is None:
                continue
            for cache in _packed_by.get(id(param), ()):
                cache.stepped = True
            if fused:
                torch.autograd.graph.increment_version(param)


# A hook on every optimizer's step, registered once, on import (torch 2.1+ has both halves; the
# fused CPU optimizers came with 2.4).
if hasattr(torch.autograd.graph, "increment_version"):
    register_optimizer_step_post_hook(_after_optimizer_step)


# Per tensor slot, what was packed: where it lives, the tensor, its version counter and address.
_PackedTensor = tuple[dict[str, Any], str, torch.Tensor | None, int, int]


class _Sources(NamedTuple):
    """What ``ChainCache.repack`` packs from: the arrays the native chain was packed from, each
    its tensor's own memory, the tensors, and each one's shape and strides then (kept together:
    another thread's ``invalidate`` empties ``ChainCache.tensors`` while a repack reads them)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray | None]
    tensors: list[torch.Tensor | None]
    layouts: list[tuple[torch.Size, tuple[int, ...]] | None]


class ChainCache:
    """Which chain a module's children form, and the packed form of every tensor its
    ``ChainSpec`` reads (``LoweredChain.slots``: weights, biases, BatchNorm statistics and
    affine parameters), reused while none of them (nor a BatchNorm's ``num_batches_tracked``,
    ``LoweredChain.counters``) changed.

    A change is seen through each tensor's identity in its slot, storage address and version
    counter, which every in-place op bumps (optimizer steps, the fused optimizers' through
    ``_after_optimizer_step``, ``load_state_dict``, ``copy_`` under ``no_grad``), and each
    optimizer step of one of them (``_packed_by``: an optimizer that writes ``p.data`` bumps
    none);
    ``.to()`` and ``.data = ...`` move the storage. A training-mode
    BatchNorm updates its running statistics without bumping their version counters, but adds
    1 to ``num_batches_tracked`` in place; and a call while one is in training mode forgets the
    packed chain. The packed tensors are kept alive so their addresses cannot be reused.
    Edits through ``.data`` bypass the version counter, as they bypass autograd: call the
    module's ``invalidate()`` after those. A BatchNorm's ``eps`` changed is seen as a post-op's
    attributes are (``settings``). Where only version counters moved (an optimizer step),
    ``repack`` packs again from the arrays ``pack`` kept.
    """

    def __init__(self, precision: Precision = "full") -> None:
        # How the kernel computes ("full": in the input's dtype; "bf16": weights stored as
        # bfloat16, inference only). Kept across copies and pickling, unlike the rest.
        self.precision: Precision = precision
        self.modules: tuple[nn.Module, ...] = ()
        self.containers: tuple[nn.Module, ...] = ()
        self.lowered: LoweredChain | None = None
        self.hook_registries = hook_registries(())
        self.post_ops: tuple[PostOp, ...] = ()
        self.keeps_output = False
        self.in_features = 0
        self.flops_per_row = 0
        self.slots: tuple[TensorSlot, ...] = ()
        # The post-op modules' attributes the chain was lowered with (`lower.settings`).
        self.settings: Settings = ()
        # The `__dict__` of each module the fused call skips, where a `forward` assigned to one
        # means plain PyTorch must call it (`forward_assigned`).
        self.module_dicts: tuple[dict[str, Any], ...] = ()
        self.mode_dependent: tuple[nn.Module, ...] = ()
        # Whether a training call below the gate runs plain (`trains_plain`): a chain at full
        # precision (the narrow ones refuse to train) without mode-dependent modules.
        self.may_train_plain = False
        self.normalized = False
        # Whether the chain starts with nn.Flatten or ends with nn.Unflatten: then callers call
        # `reshaped_forward`.
        self.reshaped = False
        # What the custom ops take besides the tensors (`traced_forward`).
        self.has_bias: list[bool] = []
        self.encoded_post_ops = ""
        # The post-ops as `_native.Chain` takes them (`pack`).
        self.native_post_ops: list[str | tuple[str | float, ...]] = []
        # The ids under which `_packed_by` holds this chain.
        self.packed_ids: list[int] = []
        # Counts `invalidate`'s calls: a packing that another thread's `invalidate` (or
        # `set_precision`) overtook keeps its chain for its own call only (`_record_packed`).
        self.generation = 0
        self.invalidate()

    def __getstate__(self) -> dict[str, Any]:
        # Everything here but the precision is a cache, the packed chain a native one: a deep
        # copy or a pickled module starts empty and packs its own parameters on its first call.
        return {"precision": self.precision}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("precision", "full"))  # type: ignore[misc]

    def trains_plain_below_gate(self) -> bool:
        """``may_train_plain`` for the chain and precision set now."""
        return self.lowered is not None and self.precision == "full" and not self.mode_dependent

    def set_precision(self, precision: Precision) -> None:
        """Packs at ``precision`` from the next call on."""
        if precision != self.precision:
            self.precision = precision
            self.may_train_plain = self.trains_plain_below_gate()
            self.invalidate()

    def invalidate(self) -> None:
        self.generation += 1  # first: a packing that ends meanwhile sees it (`_record_packed`)
        self.dtype: torch.dtype | None = None
        self.chain: _native.Chain | None = None
        # The tensors packed, one per slot, in the order `FusedMLPFunction` takes them.
        self.tensors: list[torch.Tensor | None] = []
        # None: not packed, or packed from inference tensors, which have no version counter
        # (packed again on each call).
        self.packed: list[_PackedTensor] | None = None
        self.stepped = False  # an optimizer stepped a tensor since `packed` was taken
        self.pinned: list[torch.Tensor | None] = []
        # Set where `repack` may pack again from what the last `pack` read.
        self.sources: _Sources | None = None

    def set_modules(
        self, modules: tuple[nn.Module, ...], containers: tuple[nn.Module, ...] = ()
    ) -> LoweredChain | None:
        """The chain ``modules`` form (None if they are not one, or if they are other modules
        than the chain's and TorchDynamo traces: ``can_relower``). ``containers``: modules whose
        ``forward`` the fused call also skips (the AE's encoder and decoder), so their hooks too
        make it run plain PyTorch."""
        if (
            modules != self.modules
            or containers != self.containers
            or (
                self.settings
                and settings_changed(self.settings)
                and self.can_relower()  # (where not, `forward` runs the call plain)
            )
        ):
            if not self.can_relower():
                return None  # this call plain; the state left for an eager call to read them
            self.modules = modules
            # A container's `forward` assigned to it would run instead of the fused call.
            replaced = forward_assigned(vars(container) for container in containers)
            self.lowered = None if replaced else lower(modules)
            self.containers = containers
            self.hook_registries = hook_registries((*containers, *modules))
            self.post_ops = self.lowered.post_ops if self.lowered else ()
            # Whether the training forward keeps its output for the backward.
            self.keeps_output = bool(self.post_ops) and self.post_ops[-1].gradient_reads_output
            self.native_post_ops = [op.native_argument for op in self.post_ops]
            self.in_features = self.lowered.in_features if self.lowered else 0
            widths = self.lowered.widths if self.lowered else [0]
            self.flops_per_row = sum(2 * a * b for a, b in itertools.pairwise(widths))
            self.slots = self.lowered.slots if self.lowered else ()
            self.settings = settings(modules) if self.lowered else ()
            self.module_dicts = (
                tuple(vars(module) for module in (*containers, *modules)) if self.lowered else ()
            )
            self.mode_dependent = self.lowered.mode_dependent if self.lowered else ()
            self.may_train_plain = self.trains_plain_below_gate()
            self.normalized = self.lowered.normalized if self.lowered else False
            self.reshaped = self.lowered is not None and (
                self.lowered.flatten is not None or self.lowered.unflatten is not None
            )
            layers = self.lowered.layers if self.lowered else ()
            self.has_bias = [linear.bias is not None for linear, _ in layers]
            if _custom_ops is not None:
                self.encoded_post_ops = _custom_ops.encode_post_ops(self.post_ops)
            self.invalidate()
        return self.lowered

    def relower(self) -> None:
        """Lowers the same modules again: a post-op's or a BatchNorm's attribute changed
        (``settings``), a ``forward`` was assigned to one of the modules (``forward_assigned``;
        the chain then runs plain), or a tensor moved out of its slot (a Linear reparametrized
        in place, by ``torch.nn.utils.parametrize`` or ``weight_norm``: plain too) or has
        another shape (``stale_shapes``)."""
        modules, containers = self.modules, self.containers
        self.modules = ()
        self.set_modules(modules, containers)

    def stale_shapes(self) -> bool:
        """Whether a tensor the chain reads has moved out of its slot or has another shape than
        when lowered (``LoweredChain.shapes_changed``): then lowered again, for the next call
        (this one runs plain). Off the per-call path: where the input's width does not match,
        and when packing."""
        if self.lowered is None or not self.lowered.shapes_changed():
            return False
        if self.can_relower():
            self.relower()
        return True

    @staticmethod
    def can_relower() -> bool:
        """Whether ``relower`` (or ``set_modules`` or ``SplitCache.pieces_of`` on other modules)
        may run now: not while TorchDynamo traces, where an activation's float that changed
        between calls is symbolic, which lowering would read and the ops cannot take as a
        constant (``fullgraph=True`` raised). Such a call is traced as plain PyTorch, as every
        compiled call of the chain is until an eager call lowers it again."""
        return not _is_dynamo_compiling()

    def trains_faster_plain(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` that needs gradients is below ``TRAINING_MIN_ROWS`` or
        ``TRAINING_MIN_FLOPS``, or, where PyTorch and fusedae both run on several threads,
        the threaded gate (``_threaded_gate``): plain PyTorch trains faster there."""
        rows = x.numel() // self.in_features
        flops = rows * self.flops_per_row
        if rows < TRAINING_MIN_ROWS or flops < TRAINING_MIN_FLOPS:
            return True
        threaded_rows, threaded_flops = _threaded_gate()
        return rows < threaded_rows or flops < threaded_flops

    def trains_plain(self, x: torch.Tensor) -> bool:
        """Whether ``forward`` would run ``x`` plain for the gate alone: a call that needs
        gradients, below the gate, on a chain that may train plain (``may_train_plain``),
        outside ``torch.compile``. Checked before everything else by the modules' ``__call__``,
        so that a training step below the gate pays for little more than plain PyTorch does:
        after an optimizer step these checks run from cold caches, where each one costs several
        times what it does in a loop (the whole fused path's checks took ~10 us a chain, 3% of
        a batch-1 step of the seed AE). The cheapest checks that can say no come first, but
        TorchDynamo's before the gate: traced, the gate's comparisons on the batch size would
        become guards, which a strict ``torch.export`` with a dynamic batch refuses. Plain is
        right whatever the other checks would say."""
        if not (
            self.may_train_plain
            and type(x) is _Tensor
            and not _is_dynamo_compiling()
            and self.trains_faster_plain(x)
            and _is_grad_enabled()
        ):
            return False
        try:
            if not self.needs_gradients(x):
                return False
        except KeyError:  # a tensor moved out of its slot: lowered again, this call plain
            self.relower()
            return True
        # Where `forward` would raise for the input's width or dtype, it goes there: it raises,
        # or runs plain PyTorch where that takes the input (autocast, a hook that converts it).
        # A nested tensor has no one shape, nor a Flatten chain's input its width.
        if not (x.is_nested or self.reshaped):
            shape = x.shape
            if not shape or shape[-1] != self.in_features:
                return False
        return x.dtype == self.lowered.layers[0][0].weight.dtype  # type: ignore[union-attr]

    def check_dtype(self, x: torch.Tensor) -> None:
        """Raises ``InputDtypeError`` where ``x`` is not of the parameters' dtype, for a call
        below the gate that runs plain (whose error from PyTorch is a bare RuntimeError: which
        error a wrong input gets must not depend on the batch size)."""
        weight = self.lowered.layers[0][0].weight  # type: ignore[union-attr]
        if weight.dtype != x.dtype:
            raise InputDtypeError(
                f"expected input of dtype {weight.dtype} (the parameters' dtype), got {x.dtype}"
            )

    def needs_gradients(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` with grad mode on must record for autograd: ``x`` or one of
        the chain's tensors as they are now requires gradients."""
        if x.requires_grad:
            return True
        for owner, key in self.slots:
            tensor = owner[key]
            if tensor is not None and tensor.requires_grad:
                return True
        return False

    def pack(self, dtype: torch.dtype) -> _native.Chain | None:
        """Packs the tensors for inputs of ``dtype`` (the caller found the packed chain stale)
        and returns the chain, or None if the tensors do not allow it (another
        device or dtype)."""
        assert self.lowered is not None  # `set_modules` found a chain
        generation = self.generation
        if self.stale_shapes():
            # This call plain: the caller checked the input against the old chain.
            return None
        tensors = self.lowered.tensors()
        # What is packed, taken before the memory is read: a write that ends during the packing
        # (an optimizer step in another thread) then leaves a newer version, or the step hook's
        # mark, and the next call packs again (taken after, such a chain kept the old weights).
        counters = self.lowered.counters
        try:
            packed: list[_PackedTensor] | None = [
                (owner, key, tensor, *((0, 0) if tensor is None else _state(tensor)))
                for (owner, key), tensor in zip(
                    (*self.slots, *counters), (*tensors, *(o[k] for o, k in counters)), strict=True
                )
            ]
        except RuntimeError:  # inference tensors have no version counter: pack every time
            packed = None
        # Tensors in shared memory (`model.share_memory()`: Hogwild, an actor and a learner)
        # change in other processes, whose writes bump no counter here: packed every time.
        if any(t is not None and t.is_shared() for t in tensors):
            packed = None
        self.stepped = False
        # Registered before the read too: a step that writes `p.data` meanwhile marks this chain.
        _register_packed(self, tensors)
        try:
            return self._build(generation, dtype, tensors, packed)
        except BaseException:
            self.packed = None  # packed again on the next call
            raise

    def _build(
        self,
        generation: int,
        dtype: torch.dtype,
        tensors: list[torch.Tensor | None],
        packed: list[_PackedTensor] | None,
    ) -> _native.Chain | None:
        """``pack``'s packing of ``tensors`` into ``self.chain``, which it returns, then
        ``packed`` recorded as what it packed (``_record_packed``)."""
        assert self.lowered is not None  # `pack` checked
        usable = all(
            t is None or (t.is_cpu and t.dtype is dtype and t.layout is _STRIDED) for t in tensors
        ) and (dtype is not torch.float32 or self.post_ops_fit_float32())
        # Holds the packed storages: no later tensor takes one's address while the chain is
        # current (the staleness check compares addresses). Also what the arrays read below.
        pinned = [None if t is None else t.detach() for t in tensors]
        sources = None
        precision = self.precision  # (read once: another thread may set it meanwhile)
        chain: _native.Chain | None = None
        if not usable:
            pass
        elif precision != "full":
            if dtype != torch.float32:
                raise TypeError(
                    f"precision {precision!r} takes float32 input and parameters, got {dtype}"
                )
            chain = pack_spec(replace(self.lowered.spec(tensors), precision=precision))
        elif self.lowered.normalized:
            chain = pack_spec(self.lowered.spec(tensors))
        else:
            # Straight to the native chain, which checks the shapes itself: a training step
            # repacks every step, and the ChainSpec on the way cost twice the packing.
            values = [None if t is None else resolved(t) for t in pinned]
            views = [None if t is None else t.numpy() for t in values]
            arrays = [
                None if view is None else np.require(view, requirements=("C", "A"))
                for view in views
            ]
            weights = [array for array in arrays[0::2] if array is not None]
            biases = arrays[1::2]
            chain = _native.Chain(weights, biases, self.native_post_ops)
            # Where every array is its tensor's own memory (no negative bit, contiguous and
            # aligned: no copy above), as a model's parameters are, a change in place shows
            # through them.
            if all(
                value is t and array is view
                for t, value, view, array in zip(pinned, values, views, arrays, strict=True)
            ):
                layouts = [None if t is None else (t.shape, t.stride()) for t in tensors]
                sources = _Sources(weights, biases, tensors, layouts)
        self.packed = None  # first: a call between these stores packs for itself
        self.chain, self.dtype, self.tensors = chain, dtype, tensors
        self.pinned, self.sources = pinned, sources
        self._record_packed(generation, chain, packed)
        return chain

    def _record_packed(
        self, generation: int, chain: _native.Chain | None, packed: list[_PackedTensor] | None
    ) -> None:
        """Records ``packed`` as what ``chain``, just stored, was packed from, unless
        ``invalidate`` ran since ``generation`` was read (another thread's ``set_precision``,
        or its ``invalidate`` after a ``.data`` edit, and maybe its call packing after it) or
        another packing stored its chain over this one: then the next call packs again, where
        a chain recorded as current would have kept the old precision or weights until the
        next change the versions see. The caller cleared ``packed`` before storing the chain,
        so a call in between packed for itself; checked before the store and again after it
        (``invalidate`` bumps the generation first)."""
        if self.generation != generation or self.chain is not chain:
            return
        self.packed = packed
        if self.generation != generation or self.chain is not chain:
            self.packed = None

    def post_ops_fit_float32(self) -> bool:
        """Whether every post-op parameter is within float32's range: PyTorch refuses one
        beyond it for a float32 tensor ("cannot be converted ... without overflow"), and so do
        the plain layers, which run such a chain."""
        return all(
            abs(float(param)) <= FLOAT32_MAX
            for op in self.native_post_ops
            if isinstance(op, tuple)
            for param in op[1:]
        )

    def repack(self, dtype: torch.dtype, packed: list[_PackedTensor]) -> _native.Chain | None:
        """``pack`` where the packed tensors changed in place only (the same objects at the same
        addresses: an optimizer step): a new native chain from the arrays ``pack`` kept, which
        read the tensors' memory, while each tensor keeps its shape and strides. About 35 us a
        chain less than ``pack`` after an optimizer step (``pack``'s Python, from cold caches):
        the seed AE's training step 1.03x at 64 and 256 rows on Intel. The chain packed before
        is left as it was, for a backward still to run on it. ``packed``: what the caller found
        packed (``self.packed`` as it read it: another thread may pack meanwhile)."""
        generation = self.generation
        sources = self.sources
        if sources is None or any(
            t is not None and (t.shape, t.stride()) != layout
            for t, layout in zip(sources.tensors, sources.layouts, strict=True)
        ):
            return self.pack(dtype)
        # The versions before the memory is read, as `pack` takes them.
        now = [
            (owner, key, tensor, version if tensor is None else tensor._version, address)
            for owner, key, tensor, version, address in packed
        ]
        self.stepped = False
        chain = _native.Chain(sources.weights, sources.biases, self.native_post_ops)
        self.packed = None  # as in `_build`
        self.chain = chain
        self._record_packed(generation, chain, now)
        return chain

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused forward of the chain (``set_modules`` found one) on ``x``, or None where only
        plain PyTorch computes what PyTorch would (CUDA, other dtypes, tensor subclasses,
        autocast, ``torch.jit.trace`` tracing, ``torch.func`` transforms, hooks, a
        TorchFunctionMode or TorchDispatchMode) or runs faster
        (a call that needs gradients below the training gate: ``trains_faster_plain``), and
        under forward-mode AD (the kernel computes no tangents). Modules changed in place since
        they were lowered (a post-op's or BatchNorm's attribute: ``settings``; a ``forward``
        assigned to one; a tensor moved out of its slot, or of another shape where the input's
        width does not match or when packing) are lowered again (``relower``). While
        ``torch.compile`` or ``torch.export`` traces, ``traced_forward``. Every check here runs
        on each call, so they are ordered and written for speed."""
        if _TRACED_PLAIN and _is_dynamo_compiling():
            return self.traced_forward(x)
        if (self.settings and settings_changed(self.settings)) or forward_assigned(
            self.module_dicts
        ):
            if not self.can_relower():
                return None
            self.relower()
            if self.lowered is None:
                return None
        if (
            type(x) is not _Tensor
            or any(self.hook_registries)
            or _is_dynamo_compiling()
            or _tracing_state() is not None
            or _functorch_transforms_active()
            or _forward_ad._current_level >= 0  # forward-mode AD: the kernel has no tangents
            or _is_autocast_enabled()
            or (_function_mode_enabled() and _user_function_mode())
            or _dispatch_modes()
            or not x.is_cpu
            or x.layout is not _STRIDED
            or x.is_nested  # strided too, but without one shape: nn.Linear takes it row by row
        ):
            return self.traced_forward(x) if _is_compiling() else None
        try:
            records = _is_grad_enabled() and self.needs_gradients(x)
        except KeyError:  # a tensor moved out of its slot: lowered again, this call plain
            self.relower()
            return None
        if self.mode_dependent and self.training_differs():
            # Plain PyTorch's training-mode Dropout or BatchNorm, at fp32: a call that would
            # train a narrow precision is refused here too, whatever the modes.
            if records and self.precision != "full":
                raise self.narrow_training_error()
            return None
        in_features = self.in_features
        shape = x.shape
        if not shape or shape[-1] != in_features:
            if self.stale_shapes():
                return None
            raise shape_error(in_features, shape)
        if records:
            if self.precision != "full":
                raise self.narrow_training_error()
            if self.trains_faster_plain(x):
                self.check_dtype(x)
                return None  # before packing: a training step changes every parameter
        dtype = x.dtype
        # Still the packed chain if every tensor is the one packed, at the same address and
        # version; read straight from each slot's dict (`linear.weight` goes through
        # `nn.Module.__getattr__`) in one pass, inlined: this runs on every call.
        packed = self.packed if dtype is self.dtype else None
        changed_in_place = False
        if packed is not None:
            try:
                for owner, key, tensor, version, address in packed:
                    if owner[key] is not tensor or (
                        tensor is not None and tensor.data_ptr() != address
                    ):
                        packed = None
                        break
                    if tensor is not None and tensor._version != version:
                        changed_in_place = True
            except KeyError:  # a tensor moved out of its slot: lowered again, this call plain
                self.relower()
                return None
        if packed is not None:
            changed_in_place = changed_in_place or self.stepped
            chain = self.repack(dtype, packed) if changed_in_place else self.chain
        elif dtype in _FUSED_DTYPES:
            chain = self.pack(dtype)
        else:
            chain = None
        if chain is None:  # parameters elsewhere or of another dtype, or a dtype we do not fuse
            if self.lowered is None:  # lowered again by `pack`: not a chain now
                return None
            self.check_dtype(x)
            return None
        if self.normalized and len(shape) != 2:
            return None  # BatchNorm1d normalizes dimension 1, the features only in 2-D input
        if records:  # the packed tensors are the slots' now: `needs_gradients` read them
            if self.normalized:
                # The backward through the kernel's (float64-folded) weights goes on through
                # the same fold in torch ops to the Linear's and the BatchNorms' parameters.
                folded = self.lowered.folded(self.tensors)  # type: ignore[union-attr]
                return CheckedFusedMLPFunction.apply(x, chain, self.keeps_output, *folded)
            return CheckedFusedMLPFunction.apply(x, chain, self.keeps_output, *self.tensors)
        if len(shape) == 2 and not x.is_neg():
            # `run`'s common case, inlined: a 2-D tensor without the negative bit (DLPack would
            # hand over a negated view's raw memory), read where it lies; the kernel refuses a
            # strided or misaligned one, which `run` copies.
            try:  # (not `contextlib.suppress`: this is batch-1 inference's path, and try is free)
                return _from_numpy(chain._forward_dlpack(to_dlpack(x)))
            except ValueError:
                pass  # `run` copies it, or raises what no copy mends
        return run(chain, x)

    def narrow_training_error(self) -> RuntimeError:
        """A call that needs gradients at a precision for inference."""
        return RuntimeError(
            f"precision {self.precision!r} is for inference: call under torch.no_grad() or "
            "torch.inference_mode(), or set_precision('fp32') to train"
        )

    def traced_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``forward`` while ``torch.compile`` or ``torch.export`` traces: a call of the custom
        op (``fusedae::chain``, or ``fusedae::chain_saving`` where gradients are needed) on the
        Linear layers' tensors, which the graph keeps; None (plain PyTorch, traced as such)
        where ``forward`` would run it, for chains with BatchNorm, and, under torch.compile,
        below the compiled gates (``compiles_faster_plain``)."""
        if self.stale_shapes():
            return None
        lowered = self.lowered
        assert lowered is not None  # `set_modules` found a chain
        weights = [linear.weight for linear, _ in lowered.layers]
        biases = [linear.bias for linear, _ in lowered.layers if linear.bias is not None]
        records = _is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in (*weights, *biases))
        )
        if self.precision != "full":
            # The custom ops are fp32 / fp64 only: traced plain, at fp32. A call that would
            # train is refused where `forward` refuses it (it trained at fp32).
            if (
                records
                and x.is_cpu
                and x.layout is _STRIDED
                and not x.is_nested
                and not any(self.hook_registries)
                and not _is_autocast_enabled()
            ):
                raise self.narrow_training_error()
            return None
        if (
            _custom_ops is None
            or any(self.hook_registries)
            or lowered.normalized
            or _functorch_transforms_active()
            or (not _is_dynamo_compiling() and _tracing_state() is not None)
            or torch.is_autocast_enabled("cpu")
            or not x.is_cpu
            or x.layout is not _STRIDED
            or x.is_nested
            or x.dtype not in _FUSED_DTYPES
            or any(
                module.training and (type(module) not in DROPOUTS or cast(nn.Dropout, module).p > 0)
                for module in lowered.mode_dependent
            )
        ):
            return None
        if any(
            t.dtype != x.dtype or not t.is_cpu or t.layout is not _STRIDED
            for t in (*weights, *biases)
        ):
            return None  # PyTorch's error, or its run on another device
        in_features = self.in_features
        if not x.shape or x.shape[-1] != in_features:
            raise shape_error(in_features, x.shape)
        compiling = not _is_exporting()  # an exported program runs the op at every size
        if records:
            if compiling and (
                self.trains_faster_plain(x)
                or self.compiles_faster_plain(x, COMPILED_TRAINING_MIN_FLOPS)
            ):
                return None
            y, _ = _custom_ops.chain_saving(
                x, weights, biases, self.has_bias, self.encoded_post_ops
            )
            return y
        if compiling and self.compiles_faster_plain(x, COMPILED_INFERENCE_MIN_FLOPS):
            return None
        return _custom_ops.chain(x, weights, biases, self.has_bias, self.encoded_post_ops)

    def compiles_plain(self, x: torch.Tensor) -> bool:
        """While TorchDynamo traces: whether a call on ``x`` is below the compiled gates, and so
        sure to be traced as plain PyTorch (``traced_forward``), whatever else the full path
        would check: plain computes the right thing anywhere. The modules ask this first, so
        that such a call reads little of theirs while traced: TorchDynamo guards every value a
        trace reads, and checks them all on each call of the compiled model (through the whole
        path the seed's forms had 2.6-3.9x the plain model's guards, 1.4-1.6x through this).
        The chain is the one last lowered (construction, or the last call on the full path):
        children replaced since then only move the gate. A strict ``torch.export`` keeps the
        op at every size."""
        if (
            self.lowered is None
            or not isinstance(x, _Tensor)
            or _is_exporting()
            or self.precision != "full"  # (`traced_forward` refuses to train it)
        ):
            return False
        return self.compiles_faster_plain(x, COMPILED_INFERENCE_MIN_FLOPS) or (
            _is_grad_enabled()
            and self.compiles_faster_plain(x, COMPILED_TRAINING_MIN_FLOPS)
            and self.needs_gradients(x)
        )

    def compiles_faster_plain(self, x: torch.Tensor, min_flops: int) -> bool:
        """Whether a call on ``x`` traced by torch.compile is below ``min_flops`` operations
        (``COMPILED_INFERENCE_MIN_FLOPS`` or ``COMPILED_TRAINING_MIN_FLOPS``): the compiled
        plain layers run faster there than the custom op. With dynamic shapes the comparison
        becomes a guard of the graph: a call on the other side of it compiles again."""
        return x.numel() // self.in_features * self.flops_per_row < min_flops

    def training_differs(self) -> bool:
        """Whether a module of the chain is in training mode where that computes something else
        than eval mode: a BatchNorm (batch statistics, running statistics updated: the packed
        chain is forgotten) or a Dropout with ``p > 0``."""
        differs = False
        for module in self.mode_dependent:
            if module.training:
                if type(module) not in DROPOUTS:
                    self.packed = None
                    return True
                differs = differs or cast(nn.Dropout, module).p > 0
        return differs

    def reshaped_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """``forward`` between the chain's ``nn.Flatten`` and ``nn.Unflatten`` (callers use it
        where ``reshaped``; ``forward`` does not check, on its per-call path); None where
        PyTorch must run it, or raise its own error."""
        assert self.lowered is not None
        flatten, unflatten = self.lowered.flatten, self.lowered.unflatten
        if flatten is not None:
            try:
                x = x.flatten(flatten.start_dim, flatten.end_dim)
            except (IndexError, RuntimeError):
                return None
            if not x.shape or x.shape[-1] != self.in_features:
                self.stale_shapes()  # (a weight of another width since: lowered again)
                return None  # not the shape the Linear takes: PyTorch's error, not ours
        y = self.forward(x)
        if y is None or unflatten is None:
            return y
        return y.unflatten(unflatten.dim, unflatten.unflattened_size)


class SplitCache:
    """The pieces a container's children split into (``lower.split``): each run the kernels
    take with its own ``ChainCache``, each other child alone (cache None). Recomputed when the
    children change."""

    def __init__(self, precision: Precision = "full") -> None:
        self.precision: Precision = precision
        self.modules: tuple[nn.Module, ...] = ()
        self.pieces: tuple[tuple[tuple[nn.Module, ...], ChainCache | None], ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        return {"precision": self.precision}  # the rest is a cache, as ChainCache's

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("precision", "full"))  # type: ignore[misc]

    def set_precision(self, precision: Precision) -> None:
        """Each run packs at ``precision`` from the next call on."""
        self.precision = precision
        for _, cache in self.pieces:
            if cache is not None:
                cache.set_precision(precision)

    def pieces_of(
        self, modules: tuple[nn.Module, ...]
    ) -> tuple[tuple[tuple[nn.Module, ...], ChainCache | None], ...]:
        """``modules`` in pieces, each with the cache of its fused run (None if it is not one);
        other modules than those read before, while TorchDynamo traces, one plain piece
        (``ChainCache.can_relower``)."""
        if modules != self.modules:
            if not ChainCache.can_relower():
                return ((modules, None),)
            precision = self.precision
            pieces = []
            for start, stop, lowered in split(modules):
                cache = None
                if lowered is not None:
                    cache = ChainCache(precision)
                    cache.set_modules(modules[start:stop])
                pieces.append((modules[start:stop], cache))
            self.modules, self.pieces = modules, tuple(pieces)
            if self.precision != precision:  # another thread's `set_precision` set the old ones
                self.set_precision(self.precision)
        return self.pieces


def _state(tensor: torch.Tensor) -> tuple[int, int]:
    """A tensor's version counter and address: an in-place op changes the one, `.data = ...`
    the other."""
    return tensor._version, tensor.data_ptr()


def hook_registries(modules: Iterable[nn.Module]) -> list[dict[int, Any]]:
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
        if m is not None:  # (a Sequential may hold None: it fails when called)
            registries += own_hooks(m)
    return registries


def own_hooks(module: nn.Module) -> tuple[dict[int, Any], ...]:
    """``module``'s own hook dicts, which ``nn.Module.__call__`` runs."""
    return (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    )


def has_hooks(modules: Iterable[nn.Module]) -> bool:
    return any(hook_registries(modules))
