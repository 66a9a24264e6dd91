"""The fused forward as ``torch.library`` custom ops, which ``torch.compile`` and
``torch.export`` keep in their graphs: ``fusedae::chain`` (no autograd: inference) and
``fusedae::chain_saving``, which also returns what its backward reads, and whose backward
(``register_autograd``) is ``fusedae::chain_backward``, the native backward.

Both take the chain's tensors and its post-ops (``encode_post_ops``), not a packed native chain, and
pack them on every call (``native_chain``): nothing about a tensor in a compiled graph says reliably
that its values are the ones packed before. Inductor reuses a dead buffer for a weight computed in
the graph (same address, no version bump), a compiled fused optimizer step writes the parameters
without bumping their versions, as do writes through ``.data`` and another process's writes to
shared memory; a cache keyed on addresses and versions ran stale weights in all four. Packing costs
about 25 us a chain from warm caches, 80-95 in a compiled call of the seed AE (the call's data has
evicted the weights): 4% of its 4096-row forward. ``ChainCache.forward`` calls the ops only while a
graph is traced (eager calls keep its direct path and its own packed chain, faster on small
batches), and only for CPU float32/float64 chains without BatchNorm.
"""

import functools
import math
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fusedae import _native
from fusedae._ops import PostOp
from fusedae.torch.function import (
    DOUBLE_BACKWARD_ERROR,
    check_input,
    kernel_input,
    layer_shapes,
    native_gradients,
    run,
    run_saving,
    saved_columns,
    split_gradients,
    unread_input,
)
from fusedae.torch.lower import as_array


def encode_post_ops(ops: Sequence[PostOp]) -> str:
    """The post-ops as the custom ops take them: ``"relu,identity,leaky_relu:0.1"`` (a float's
    ``repr`` reads back exactly)."""
    return ",".join(":".join((op.name, *map(repr, op.params))) for op in ops)


@functools.lru_cache(maxsize=256)
def decode_post_ops(text: str) -> tuple[PostOp, ...]:
    """``encode_post_ops`` undone (an unknown name is a ValueError)."""
    ops = []
    for part in text.split(","):
        name, *params = part.split(":")
        ops.append(PostOp(name, tuple(map(float, params))))
    return tuple(ops)


@functools.lru_cache(maxsize=256)
def native_post_ops(text: str) -> tuple[str | tuple[str | float, ...], ...]:
    """The post-ops ``encode_post_ops`` wrote, as ``_native.Chain`` takes them (in a list)."""
    return tuple(op.native_argument for op in decode_post_ops(text))


def native_chain(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
    post_ops: str,
) -> _native.Chain:
    """The native chain of these tensors, packed now from their values (see the module's
    docs), the arguments checked against ``x``."""
    per_layer = _check(x, weights, biases, has_bias, post_ops)
    for t in (*weights, *biases):
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise ValueError(f"the fused kernel takes strided CPU tensors, got one on {t.device}")
    chain = _native.Chain(
        [_packable(weight) for weight in weights],
        [None if bias is None else _packable(bias) for bias in per_layer],
        list(native_post_ops(post_ops)),
    )
    check_input(chain, x)
    return chain


def _packable(tensor: torch.Tensor) -> np.ndarray:
    """``tensor``'s values as ``_native.Chain`` reads them: C-contiguous and aligned (a view of
    the tensor where it is so already)."""
    return np.require(as_array(tensor), requirements=("C", "A"))


def layer_biases(
    biases: Sequence[torch.Tensor], has_bias: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Each layer's bias or None: the ops take only the biases there are, and ``has_bias`` (a
    list of optional tensors gets no gradients through a custom op's autograd)."""
    present = iter(biases)
    return [next(present) if flag else None for flag in has_bias]


def _check(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    has_bias: Sequence[bool],
    post_ops: str,
) -> list[torch.Tensor | None]:
    """What the kernels need, checked on real and fake tensors alike; each layer's bias or
    None."""
    ops = decode_post_ops(post_ops)
    if (
        not weights
        or len(has_bias) != len(weights)
        or sum(has_bias) != len(biases)
        or len(ops) != len(weights)
    ):
        raise ValueError(
            f"expected one has_bias flag and post-op per weight (at least one), and a bias for "
            f"each flag set; got {len(weights)} weights, {len(has_bias)} flags, "
            f"{len(biases)} biases, {len(ops)} post-ops"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the fused kernel takes float32 or float64, got {x.dtype}")
    per_layer = layer_biases(biases, has_bias)
    features = x.shape[-1] if x.dim() else None
    for index, (weight, bias) in enumerate(zip(weights, per_layer, strict=True)):
        if (
            weight.dim() != 2
            or weight.shape[1] != features
            or (bias is not None and tuple(bias.shape) != (weight.shape[0],))
        ):
            raise ValueError(
                f"layer {index}: weight {tuple(weight.shape)}, bias "
                f"{None if bias is None else tuple(bias.shape)} do not take {features} features"
            )
        if 0 in weight.shape:  # (the native chain's own check, for fake tensors too)
            raise ValueError(
                f"layer {index}: widths must be at least 1, got weight shape {tuple(weight.shape)}"
            )
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"layer {index}: expected the input's dtype {x.dtype}")
        features = weight.shape[0]
    return per_layer


def _check_output(y: torch.Tensor | None, post_ops: str) -> None:
    """``chain_backward``'s output argument may be None only where no gradient reads it."""
    if y is None and decode_post_ops(post_ops)[-1].gradient_reads_output:
        raise ValueError(
            f"the last post-op's gradient reads the output ({post_ops.rsplit(',', 1)[-1]}): "
            "pass the output"
        )


# The ops' list arguments are `typing.Sequence`s: torch 2.4 and 2.5 infer a schema from `typing`'s
# generics only, and refused `list[torch.Tensor]` with a ValueError on import. No `from __future__
# import annotations` here: torch 2.4 cannot read annotations that are strings.
@torch.library.custom_op("fusedae::chain", mutates_args=(), device_types="cpu")
def chain(
    x: torch.Tensor,
    weights: typing.Sequence[torch.Tensor],
    biases: typing.Sequence[torch.Tensor],
    has_bias: typing.Sequence[bool],
    post_ops: str,
) -> torch.Tensor:
    """The chain's output ``(*, out_features)`` on ``x`` of shape ``(*, in_features)``: layer i
    computes ``post_ops[i](x @ weights[i].T + biases[i])``. Traced where no gradient is wanted;
    its backward (a graph traced without gradients run with them) runs ``chain_saving`` again."""
    return run(native_chain(x, weights, biases, has_bias, post_ops), x)


@chain.register_fake
def _chain_fake(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    post_ops: str,
) -> torch.Tensor:
    _check(x, weights, biases, has_bias, post_ops)
    return x.new_empty((*x.shape[:-1], weights[-1].shape[0]))


@torch.library.custom_op("fusedae::chain_saving", mutates_args=(), device_types="cpu")
def chain_saving(
    x: torch.Tensor,
    weights: typing.Sequence[torch.Tensor],
    biases: typing.Sequence[torch.Tensor],
    has_bias: typing.Sequence[bool],
    post_ops: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chain`` that also returns what its backward reads (``saved_columns``: every hidden
    layer's output, after its post-op, and the pre-activations the ops' gradients read), ``(rows,
    width)``; differentiable in ``x``, the weights and the biases (not in ``saved``)."""
    return run_saving(native_chain(x, weights, biases, has_bias, post_ops), x)


@chain_saving.register_fake
def _chain_saving_fake(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    post_ops: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weights, biases, has_bias, post_ops)
    rows = math.prod(x.shape[:-1])
    _, width = saved_columns([weight.shape[0] for weight in weights], decode_post_ops(post_ops))
    return x.new_empty((*x.shape[:-1], weights[-1].shape[0])), x.new_empty((rows, width))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """Saves the input only where the first layer's weight wants a gradient and the output only
    where the last op's gradient reads it, as the eager Function (``_forward_saving``) and
    PyTorch's modules do: either changed in place before the backward stops it only there. The
    weights and biases are saved: the backward packs its chain from them."""
    x, weights, biases, has_bias, post_ops = inputs
    y, saved = output
    _keep_arguments(ctx, weights, has_bias, post_ops)
    ctx.input_shape = x.shape
    ctx.mark_non_differentiable(saved)
    # The first weight's flag: flat here (the input's, then each weight's, ...), a list of flags
    # for the list of weights where torch hands them as the backward gets them.
    first_weight = ctx.needs_input_grad[1]
    reads_input = bool(first_weight[0] if isinstance(first_weight, list) else first_weight)
    keeps_output = decode_post_ops(post_ops)[-1].gradient_reads_output
    ctx.save_for_backward(
        x if reads_input else None, y if keeps_output else None, saved, *weights, *biases
    )


@torch.library.custom_op("fusedae::chain_backward", mutates_args=(), device_types="cpu")
def chain_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: typing.Optional[torch.Tensor],  # noqa: UP045 (torch 2.4-2.5 infer only `typing`'s)
    saved: torch.Tensor,
    weights: typing.Sequence[torch.Tensor],
    biases: typing.Sequence[torch.Tensor],
    has_bias: typing.Sequence[bool],
    post_ops: str,
    needs_x: bool,
    needs_params: typing.Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chain_saving``'s backward: ``(grad_x, grads)`` from what it returned, ``grad_x`` of
    ``x``'s shape (empty unless ``needs_x``), ``grads`` 1-d, each layer's weight gradient (``out
    x in``) then bias gradient (``out``, whether or not it has a bias), zeros where
    ``needs_params`` is false. ``y`` may be None where the last op's gradient does not read the
    output."""
    _check_output(y, post_ops)
    chain = native_chain(x, weights, biases, has_bias, post_ops)
    x = kernel_input(chain, x)
    grad_x, grads = native_gradients(chain, grad_output, x, y, saved, needs_x, needs_params)
    return (x.new_empty(0) if grad_x is None else grad_x), torch.from_numpy(grads)


@chain_backward.register_fake
def _chain_backward_fake(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    saved: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    post_ops: str,
    needs_x: bool,
    needs_params: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weights, biases, has_bias, post_ops)
    _check_output(y, post_ops)
    values = sum(weight.shape[0] * (weight.shape[1] + 1) for weight in weights)
    return x.new_empty(x.shape if needs_x else (0,)), x.new_empty((values,))


def _backward(
    ctx: Any, grad_output: torch.Tensor, _grad_saved: torch.Tensor | None
) -> tuple[Any, ...]:
    x, y, saved, *params = ctx.saved_tensors
    if x is None:
        x = unread_input(ctx.input_shape, saved.dtype)
    layers = ctx.layers
    return _gradients(ctx, grad_output, x, y, saved, params[:layers], params[layers:])


def _chain_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """``chain``'s autograd, for a graph traced without gradients (``torch.export`` under
    ``no_grad``) run with them: saves the op's inputs, from which the backward runs the saving
    forward again."""
    x, weights, biases, has_bias, post_ops = inputs
    _keep_arguments(ctx, weights, has_bias, post_ops)
    ctx.save_for_backward(x, *weights, *biases)


def _keep_arguments(
    ctx: Any, weights: Sequence[torch.Tensor], has_bias: Sequence[bool], post_ops: str
) -> None:
    """What both ops' backwards read of their arguments besides the tensors saved."""
    ctx.post_ops_text = post_ops
    ctx.has_bias = tuple(has_bias)
    ctx.layers = len(weights)


def _chain_backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
    x, *params = ctx.saved_tensors
    weights, biases = params[: ctx.layers], params[ctx.layers :]
    y, saved = torch.ops.fusedae.chain_saving(x, weights, biases, ctx.has_bias, ctx.post_ops_text)
    return _gradients(ctx, grad_output, x, y, saved, weights, biases)


def _gradients(
    ctx: Any,
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    saved: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
) -> tuple[Any, ...]:
    """The backward of ``chain_saving`` (or ``chain``) on what its forward returned."""
    has_bias = ctx.has_bias
    # Lists of tensors come as lists of flags; an empty list of biases, as one flag.
    needs_x, needs_weights, needs_biases, _, _ = ctx.needs_input_grad
    if not isinstance(needs_biases, list):
        needs_biases = []
    needs_each_bias = iter(needs_biases)
    needs_layer_biases = [flag and next(needs_each_bias) for flag in has_bias]
    needs_params = [w or b for w, b in zip(needs_weights, needs_layer_biases, strict=True)]
    grad_x, grads = torch.ops.fusedae.chain_backward(
        grad_output,
        x,
        y,
        saved,
        weights,
        biases,
        has_bias,
        ctx.post_ops_text,
        needs_x,
        needs_params,
    )
    grad_weights, grad_biases = split_gradients(
        grads,
        layer_shapes(weights, layer_biases(biases, has_bias)),
        needs_weights,
        needs_layer_biases,
    )
    return (
        grad_x if needs_x else None,
        grad_weights,
        [grad for grad, flag in zip(grad_biases, has_bias, strict=True) if flag],
        None,
        None,
    )


def _no_double_backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
    """``chain_backward``'s backward, which a double backward reaches (``create_graph=True``
    through an exported program): fusedae's error, not torch's for an op without one."""
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


chain_saving.register_autograd(_backward, setup_context=_setup_context)
chain.register_autograd(_chain_backward, setup_context=_chain_setup_context)
chain_backward.register_autograd(_no_double_backward)
