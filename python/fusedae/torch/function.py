"""``FusedMLPFunction``: the fused forward as a ``torch.autograd.Function``, its backward in
torch ops on the activations the forward kept, each post-op's gradient from the op table; and
the kernel call on a tensor."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from fusedae import _native
from fusedae._ops import PostOp, post_ops
from fusedae.chain import ChainSpec
from fusedae.mlp import check_output_size
from fusedae.torch.lower import as_array

# The kernel's way into a tensor's memory, bound once (it runs on every call; the same function
# as `torch.utils.dlpack.to_dlpack`).
to_dlpack = torch._C._to_dlpack
NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


def pack_spec(spec: ChainSpec) -> _native.Chain:
    """The native chain running ``spec``."""
    return _native.Chain(*spec.native_arguments())


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


def shape_error(in_features: int, shape: torch.Size) -> ValueError:
    return ValueError(f"expected input of shape (*, {in_features}), got shape {tuple(shape)}")


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
        raise TypeError(f"expected input of dtype {chain.dtype} (the chain's), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != chain.in_features:
        raise shape_error(chain.in_features, x.shape)


def _kernel_input(chain: _native.Chain, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel reads it: its values (not a negated view's memory), contiguous."""
    x = x.resolve_neg()  # the values the tensor stands for, not the negated memory
    if not x.is_contiguous():
        # A strided view (an expand) may stand for more rows than a copy or output could hold.
        rows = x.numel() // chain.in_features
        width = max(chain.in_features, chain.out_features)
        check_output_size(rows, width, NUMPY_DTYPES[x.dtype])
        x = x.contiguous()
    return x


def run(chain: _native.Chain, x: torch.Tensor) -> torch.Tensor:
    """The kernel on CPU ``x`` of shape ``(*, in_features)`` and the chain's dtype; no autograd."""
    x = _kernel_input(chain, x)
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
    x = _kernel_input(chain, x)
    result, saved = chain._forward_saving_dlpack(to_dlpack(x))
    return _output(chain, x, result), torch.from_numpy(saved)


class FusedMLPFunction(torch.autograd.Function):
    """``y = chain(x)`` through the fused CPU kernel, differentiable in ``x`` and the parameters.

    ``apply(x, chain, activations, w0, b0, w1, b1, ...)``: ``x`` of shape ``(*, in_features)``,
    ``chain`` packed from exactly these weights and biases (``pack_chain``), ``b_i`` may be
    None, ``activations`` one name or ``PostOp`` per layer (an unknown one is a ValueError).

    The forward keeps every hidden layer's output from the fused pass, so the backward does not
    compute the forward again: it runs PyTorch's matrix products and each post-op's gradient from
    the op table on them, so gradients are PyTorch's own formulas. A post-op whose gradient reads
    its pre-activation (GELU, SiLU, ...; ``Op.gradient_reads_pre``) has that layer's Linear
    computed again, from the saved input of the layer.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        chain: _native.Chain,
        activations: Sequence[str | PostOp],
        *params: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = post_ops(activations)
        if len(params) != 2 * len(ops):
            raise ValueError(
                f"expected a weight and a bias (or None) for each of the {len(ops)} layers, "
                f"got {len(params)} tensors"
            )
        check_input(chain, x)
        return run_saving(chain, x)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: Any) -> None:
        x, _chain, activations, *params = inputs
        y, saved = output
        ctx.post_ops = post_ops(activations)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y, saved, *params)

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """The chain's output (the hidden outputs the forward also returns stay inside)."""
        return super().apply(*args, **kwargs)[0]

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_output: torch.Tensor | None, _grad_saved: None
    ) -> tuple[torch.Tensor | None, ...]:
        x, y, saved, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_output is None:
            return (None,) * len(needs)
        grad_x, grad_weights, grad_biases = chain_backward(
            grad_output,
            x,
            y,
            saved,
            params[0::2],
            params[1::2],
            ctx.post_ops,
            needs[0],
            needs[3::2],
            needs[4::2],
        )
        grads = [grad for pair in zip(grad_weights, grad_biases, strict=True) for grad in pair]
        return (grad_x, None, None, *grads)


def chain_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    saved: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    ops: Sequence[PostOp],
    needs_x: bool,
    needs_weights: Sequence[bool],
    needs_biases: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The gradients of a chain's input, weights and biases (each None where not needed) from
    ``grad_output``, in torch ops on what the saving forward (``run_saving``) kept: its input
    ``x``, output ``y`` and hidden outputs ``saved``. The backward of ``FusedMLPFunction`` and
    of the ``fusedae::chain_saving`` custom op (traceable: torch ops only)."""
    # Each layer's output: the hidden ones side by side in `saved`, the last one `y`.
    bounds = itertools.accumulate((weight.shape[0] for weight in weights[:-1]), initial=0)
    posts = [saved[:, start:end] for start, end in itertools.pairwise(bounds)]
    posts.append(y.reshape(-1, y.shape[-1]))
    inputs = [x.reshape(-1, x.shape[-1]), *posts[:-1]]
    grad = grad_output.reshape(-1, grad_output.shape[-1])
    grad_weights: list[torch.Tensor | None] = [None] * len(weights)
    grad_biases: list[torch.Tensor | None] = [None] * len(weights)
    for index in reversed(range(len(weights))):
        op = ops[index]
        pre = (
            torch.nn.functional.linear(inputs[index], weights[index], biases[index])
            if op.op.gradient_reads_pre
            else None
        )
        grad = op.torch_gradient(grad, pre, posts[index])
        if needs_weights[index]:
            weight = weights[index]
            # The product with the fewer output rows, transposed where that is the input's side:
            # (42, 4096) @ (4096, 784) runs 12% faster than (784, 4096) @ (4096, 42) here.
            if weight.shape[0] > weight.shape[1]:
                grad_weights[index] = inputs[index].t().mm(grad).t()
            else:
                grad_weights[index] = grad.t().mm(inputs[index])
        if biases[index] is not None and needs_biases[index]:
            grad_biases[index] = grad.sum(0)
        if index == 0 and not needs_x:
            break
        grad = grad.mm(weights[index])
    grad_x = grad.reshape(x.shape) if needs_x else None
    return grad_x, grad_weights, grad_biases
