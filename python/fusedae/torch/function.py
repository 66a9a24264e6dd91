"""``FusedMLPFunction``: the fused forward as a ``torch.autograd.Function``, its backward one
call of the native backward on what the forward kept (``saved_columns``); and the kernel calls
on a tensor."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch

from fusedae import _native
from fusedae._ops import PostOp, post_ops
from fusedae.chain import ChainSpec
from fusedae.mlp import check_output_size
from fusedae.torch.lower import as_array, resolved

# The kernel's way into a tensor's memory, bound once (it runs on every call; the same function
# as `torch.utils.dlpack.to_dlpack`).
to_dlpack = torch._C._to_dlpack
NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


def pack_spec(spec: ChainSpec) -> _native.Chain:
    """The native chain running ``spec``, at its precision."""
    precision = None if spec.precision == "full" else spec.precision
    return _native.Chain(*spec.native_arguments(), None, precision)


def pack_chain(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str | PostOp],
) -> _native.Chain:
    """Packs CPU float32/float64 tensors (``weights[i]`` of shape ``(out, in)``, ``biases[i]``
    ``(out,)`` or None) with one activation per layer (a name or a ``PostOp``) for the
    kernels."""
    pairs = [
        (as_array(weight), None if bias is None else as_array(bias))
        for weight, bias in zip(weights, biases, strict=True)
    ]
    return pack_spec(ChainSpec.from_pairs(pairs, activations))


class InputShapeError(ValueError, RuntimeError):
    """An input of the wrong width: a ValueError, and a RuntimeError as ``nn.Linear``'s own (so
    code that catches PyTorch's error catches ours)."""


class InputDtypeError(TypeError, RuntimeError):
    """An input of another dtype than the parameters': a TypeError, and a RuntimeError as
    ``nn.Linear``'s own."""


def shape_error(in_features: int, shape: torch.Size) -> InputShapeError:
    return InputShapeError(f"expected input of shape (*, {in_features}), got shape {tuple(shape)}")


def check_input(chain: _native.Chain, x: torch.Tensor) -> None:
    """What `run` relies on, for callers of `FusedMLPFunction` (the modules check it on their
    way there): a strided CPU tensor of the chain's dtype and shape ``(*, in_features)``."""
    if x.device.type != "cpu" or x.layout != torch.strided or x.is_nested:
        nested = "nested " if x.is_nested else ""
        raise ValueError(
            f"the fused kernel takes strided CPU tensors, got a {nested}{x.layout} tensor "
            f"on {x.device}"
        )
    as_numpy = NUMPY_DTYPES.get(x.dtype)
    if as_numpy is None or as_numpy != chain.dtype:  # (numpy reads None as float64)
        raise InputDtypeError(f"expected input of dtype {chain.dtype} (the chain's), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != chain.in_features:
        raise shape_error(chain.in_features, x.shape)


def kernel_input(chain: _native.Chain, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel reads it: its values (not a negated view's memory), contiguous and
    aligned."""
    x = resolved(x)  # the values the tensor stands for, not the negated memory
    if not x.is_contiguous():
        # A strided view (an expand) may stand for more rows than a copy or output could hold.
        rows = x.numel() // chain.in_features
        width = max(chain.in_features, chain.out_features)
        check_output_size(rows, width, NUMPY_DTYPES[x.dtype])
    return aligned(x)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy where it is not contiguous or not aligned (``torch.frombuffer`` at an
    odd offset), as the kernel reads it."""
    if not x.is_contiguous():  # (a read, where `contiguous` is a dispatched op)
        return x.contiguous()
    if x.data_ptr() % x.element_size():
        return x.clone()
    return x


def run(chain: _native.Chain, x: torch.Tensor) -> torch.Tensor:
    """The kernel on CPU ``x`` of shape ``(*, in_features)`` and the chain's dtype; no autograd."""
    x = kernel_input(chain, x)
    # The kernel reads the tensor's memory where it lies, through a DLPack capsule that keeps it
    # alive; the GIL, held for the call, keeps other threads from resizing it. DLPack has no
    # negative bit: `x` holds its values as they are (resolved above).
    return _output(chain, x, chain._forward_dlpack(to_dlpack(x)))


def _output(chain: _native.Chain, x: torch.Tensor, result: np.ndarray) -> torch.Tensor:
    """The kernel's ``(rows, out_features)`` result as a tensor of ``x``'s leading shape."""
    if x.dim() != 2:
        result = result.reshape(*x.shape[:-1], chain.out_features)
    return torch.from_numpy(result)


def run_saving(chain: _native.Chain, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``run`` that also returns every hidden layer's outputs (after its post-op) for the
    backward: ``(rows, sum of the hidden widths)``, the layers side by side in each row."""
    return _saving_call(chain, kernel_input(chain, x))


def _saving_call(chain: _native.Chain, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``run_saving`` on ``x`` as the kernel reads it (``kernel_input``)."""
    result, saved = chain._forward_saving_dlpack(to_dlpack(x))
    return _output(chain, x, result), torch.from_numpy(saved)


DOUBLE_BACKWARD_ERROR = (
    "fusedae's fused backward is not differentiable: a double backward (create_graph=True, a "
    "gradient penalty, gradgradcheck) needs the layers run as plain PyTorch, e.g. "
    "torch.nn.Sequential(*fused_module)"
)


# (Private, and not in every torch this package takes: before it, a legacy batched tensor is the
# one kind here without storage.)
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None) or (
    lambda tensor: not torch._C._has_storage(tensor)
)
BATCHED_BACKWARD_ERROR = (
    "fusedae's fused backward does not take batched gradients (torch.autograd.grad with "
    "is_grads_batched=True, torch.autograd.functional.jacobian with vectorize=True, a vmap "
    "over the backward): pass vectorize=False, or run the layers as plain PyTorch, e.g. "
    "torch.nn.Sequential(*fused_module)"
)


class FusedMLPFunction(torch.autograd.Function):
    """``y = chain(x)`` through the fused CPU kernel, differentiable in ``x`` and the parameters.

    ``apply(x, chain, activations, w0, b0, w1, b1, ...)``: ``x`` of shape ``(*, in_features)``,
    ``chain`` packed from exactly these weights and biases (``pack_chain``), ``b_i`` may be
    None, ``activations`` one name or ``PostOp`` per layer (an unknown one is a ValueError).

    The forward keeps what the backward reads from the fused pass (every hidden layer's
    output, and the pre-activations of the layers whose op's gradient reads them:
    ``Chain.saved_columns``), so nothing is computed twice; the backward is one call of the
    native kernel (``native_backward``), which returns the input's gradient and every wanted
    layer's weight and bias gradients, each post-op's gradient in PyTorch's formula.
    """

    # The old style (`forward(ctx, ...)`, no `setup_context`): with `setup_context`, every
    # `apply` binds its arguments to the forward's signature through `inspect` (50 us a call, a
    # quarter of a batch-1 training step). torch.func transforms do not reach this Function: the
    # modules run plain PyTorch under them.
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        chain: _native.Chain,
        activations: Sequence[str | PostOp],
        *params: torch.Tensor | None,
    ) -> torch.Tensor:
        ops = post_ops(activations)
        if len(params) != 2 * len(ops):
            raise ValueError(
                f"expected a weight and a bias (or None) for each of the {len(ops)} layers, "
                f"got {len(params)} tensors"
            )
        check_input(chain, x)
        return _forward_saving(ctx, chain, x, params, keeps_output=True)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        # (The weights: saved to be checked unchanged.)
        x, read, y, saved, *_ = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_output is None:
            return (None,) * len(needs)
        if _is_legacy_batched(grad_output):  # (`is_grads_batched` batches the legacy way)
            raise RuntimeError(BATCHED_BACKWARD_ERROR)
        if x is None:
            x = unread_input(ctx.input_shape, saved.dtype)
        grad_x, grad_weights, grad_biases = native_backward(
            ctx.chain,
            grad_output,
            x if read is None else read,
            y,
            saved,
            ctx.shapes,
            needs[0],
            needs[3::2],
            needs[4::2],
        )
        grads = [grad for pair in zip(grad_weights, grad_biases, strict=True) for grad in pair]
        return (grad_x, None, None, *grads)


class CheckedFusedMLPFunction(FusedMLPFunction):
    """``FusedMLPFunction`` for the modules, whose ``ChainCache.forward`` has checked the input
    and packed ``chain`` from these parameters: the same backward, and a forward without the
    checks (about 8 us of each half of the seed AE's 64-row training forward).
    ``apply(x, chain, keeps_output, *params)``: ``keeps_output``, whether the chain's last
    post-op's gradient reads its output (``PostOp.gradient_reads_output``), in the place of the
    activations."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        chain: _native.Chain,
        keeps_output: bool,
        *params: torch.Tensor | None,
    ) -> torch.Tensor:
        return _forward_saving(ctx, chain, x, params, keeps_output)


def unread_input(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Memory of the input's shape, for a backward that does not read the input's values: the
    kernel reads them only for the first layer's weight gradient (also where only its bias
    wants one, which does not depend on them: that weight gradient is thrown away)."""
    return torch.empty(shape, dtype=dtype)


def _forward_saving(
    ctx: Any,
    chain: _native.Chain,
    x: torch.Tensor,
    params: Sequence[torch.Tensor | None],
    keeps_output: bool,
) -> torch.Tensor:
    """``FusedMLPFunction.forward`` on a checked input: runs the saving forward and keeps for the
    backward the input as the kernel read it (the backward does not copy a strided one again;
    the caller's tensor is saved beside such a copy),
    the output if ``keeps_output`` (the modules keep it only where the last post-op's gradient
    reads it, as PyTorch's ReLU, Sigmoid and Tanh keep theirs), the saved columns, and each
    layer's ``(out, in, has bias)``.

    Saved for backward (a tensor changed in place before the backward is then an error) is what
    PyTorch's own modules save, no more, so that the backwards PyTorch allows ours does, and the
    ones it refuses ours refuses: the input where the first layer's weight wants a gradient,
    each layer's weight where a gradient flows through the layer to a layer or the input below
    (the backward reads the chain's copy of it), and the output as above; no bias."""
    read = kernel_input(chain, x)
    y, saved = _saving_call(chain, read)
    ctx.chain = chain
    ctx.set_materialize_grads(False)
    # (The chain was packed from these: no weight is None.)
    weights, biases = cast(Sequence[torch.Tensor], params[0::2]), params[1::2]
    ctx.shapes = layer_shapes(weights, biases)
    needs = ctx.needs_input_grad
    # The weights of the layers a gradient flows through to a layer or the input below.
    read_weights = []
    flows_below = needs[0]
    for weight, needs_weight, needs_bias in zip(weights, needs[3::2], needs[4::2], strict=True):
        if flows_below:
            read_weights.append(weight)
        flows_below = flows_below or needs_weight or needs_bias
    reads_input = needs[3]
    if not reads_input:
        ctx.input_shape = x.shape  # the kernel checks it, and `grad_x` takes it
    # `saved` is neither input nor output, so not differentiable through: the backward
    # refuses to be differentiated (`DOUBLE_BACKWARD_ERROR`).
    # Where the kernel read a copy of the input, the backward reads it too; the caller's tensor
    # is saved beside it, so that a change to it in place before the backward is refused, as
    # PyTorch refuses it.
    ctx.save_for_backward(
        x if reads_input else None,
        read if reads_input and read is not x else None,
        y if keeps_output else None,
        saved,
        *read_weights,
    )
    return y


def saved_columns(
    out_widths: Sequence[int], ops: Sequence[PostOp]
) -> tuple[list[tuple[int | None, int | None]], int]:
    """Where a row of the saving forward's ``saved`` keeps each layer's values, as the native
    ``Chain.saved_columns`` says (a test holds the two together): per layer ``(outputs, pre)``,
    the column its outputs start at (every layer but the last) and that of its pre-activations
    (where its op's gradient reads them), or None; and the row's width. The hidden outputs come
    first, side by side, then the pre-activations kept, layer after layer."""
    last = len(out_widths) - 1
    outputs = list(itertools.accumulate(out_widths[:last], initial=0))
    width = outputs.pop()
    columns: list[tuple[int | None, int | None]] = []
    for index, (out, op) in enumerate(zip(out_widths, ops, strict=True)):
        pre = None
        if op.op.gradient_reads_pre:
            pre, width = width, width + out
        columns.append((outputs[index] if index < last else None, pre))
    return columns, width


# A layer's ``(out_features, in_features, has a bias)``.
LayerShape = tuple[int, int, bool]


def layer_shapes(
    weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]
) -> list[LayerShape]:
    """Each layer's ``LayerShape``: what the backward reads of the parameters, besides the
    weights the chain holds."""
    return [(*weight.shape, bias is not None) for weight, bias in zip(weights, biases, strict=True)]


def native_backward(
    chain: _native.Chain,
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    saved: torch.Tensor,
    shapes: Sequence[LayerShape],
    needs_x: bool,
    needs_weights: Sequence[bool],
    needs_biases: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The gradients of the chain's input, weights and biases (None where not needed) from
    ``grad_output`` and what ``run_saving`` kept, in one call of the native kernel; ``shapes``
    the layers' (``layer_shapes``)."""
    needs_params = [
        needs_weight or (has_bias and needs_bias)
        for (_, _, has_bias), needs_weight, needs_bias in zip(
            shapes, needs_weights, needs_biases, strict=True
        )
    ]
    grad_x, grads = native_gradients(chain, grad_output, x, y, saved, needs_x, needs_params)
    grad_weights, grad_biases = split_gradients(grads, shapes, needs_weights, needs_biases)
    return grad_x, grad_weights, grad_biases


def native_gradients(
    chain: _native.Chain,
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    saved: torch.Tensor,
    needs_x: bool,
    needs_params: Sequence[bool],
) -> tuple[torch.Tensor | None, np.ndarray]:
    """The native backward's ``(grad_x or None, grads)`` for ``x`` as the kernel read it
    (``kernel_input``: the Function saves it so): ``grads`` a 1-d numpy array, each layer's
    weight gradient then bias gradient (see ``Chain._backward_dlpack``). ``y`` None: the last
    post-op's gradient does not read the output (the Function kept none), and the kernel is
    handed ``grad_output`` in its place, of the same shape, for the checks. Each tensor is
    read as the kernel reads it (``aligned``, ``resolved``): what the forward saved comes back
    through ``saved_tensors_hooks``' unpack, which may hand over other strides or a negated view
    of the same values."""
    grad = aligned(resolved(grad_output))
    x, saved = aligned(resolved(x)), aligned(resolved(saved))
    y = grad if y is None else aligned(resolved(y))
    grad_x, grads = chain._backward_dlpack(
        to_dlpack(x), to_dlpack(saved), to_dlpack(y), to_dlpack(grad), list(needs_params), needs_x
    )
    # Shaped in numpy: a tensor's reshape is a dispatched op.
    grad_input = None if grad_x is None else torch.from_numpy(grad_x.reshape(x.shape))
    return grad_input, grads.reshape(-1)


def split_gradients(
    flat: np.ndarray | torch.Tensor,
    shapes: Sequence[LayerShape],
    needs_weights: Sequence[bool],
    needs_biases: Sequence[bool],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The native backward's one array of gradients as each weight's and bias's (views of it),
    None where not needed. ``flat`` is the numpy array of the eager backward, sliced in numpy
    (a tensor's slice costs several times as much, and the autograd engine took longer over
    the views: a 256-row backward of the seed AE 30 us against 7), or the custom op's tensor."""
    if isinstance(flat, np.ndarray):
        array = flat

        def piece(start: int, end: int, *shape: int) -> torch.Tensor:
            return torch.from_numpy(array[start:end].reshape(shape))
    else:
        tensor = flat

        def piece(start: int, end: int, *shape: int) -> torch.Tensor:
            return tensor[start:end].view(shape)

    grad_weights: list[torch.Tensor | None] = []
    grad_biases: list[torch.Tensor | None] = []
    start = 0
    for (out_features, in_features, has_bias), needs_weight, needs_bias in zip(
        shapes, needs_weights, needs_biases, strict=True
    ):
        end = start + out_features * in_features
        grad_weights.append(piece(start, end, out_features, in_features) if needs_weight else None)
        start, end = end, end + out_features
        grad_biases.append(piece(start, end, out_features) if has_bias and needs_bias else None)
        start = end
    return grad_weights, grad_biases
