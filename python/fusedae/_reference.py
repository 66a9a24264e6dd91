"""Plain-numpy float64 forward and backward of a Linear chain: the Python test oracle.

Written for clarity, not speed: one matrix product per layer, in float64 whatever the input; each
post-op's function and gradient come from the op table (``fusedae._ops``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from fusedae._ops import PostOp, post_ops

Layer = tuple[npt.ArrayLike, npt.ArrayLike | None]


def _pre_and_post(
    layers: Sequence[Layer], activations: Sequence[str | PostOp], x: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each layer's output before and after its post-op, for ``x`` of shape ``(rows, in)``."""
    ops = post_ops(activations)
    if len(ops) != len(layers):
        raise ValueError(f"need one activation per layer: got {len(ops)} for {len(layers)} layers")
    h = x
    pres, posts = [], []
    for (weight, bias), op in zip(layers, ops, strict=True):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs are allowed
            pre = h @ np.asarray(weight, dtype=np.float64).T
        if bias is not None:
            pre = pre + np.asarray(bias, dtype=np.float64)
        h = op.reference(pre)
        pres.append(pre)
        posts.append(h)
    return pres, posts


def forward(
    layers: Sequence[Layer], activations: Sequence[str | PostOp], x: npt.ArrayLike
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Returns the output for ``x`` of shape ``(*, in)`` and every layer's post-activation output
    (flattened to 2-D), all float64."""
    x64 = np.asarray(x, dtype=np.float64)
    lead = x64.shape[:-1]
    _, outputs = _pre_and_post(layers, activations, x64.reshape(-1, x64.shape[-1]))
    h = outputs[-1]
    return h.reshape(*lead, h.shape[-1]), outputs


def backward(
    layers: Sequence[Layer],
    activations: Sequence[str | PostOp],
    x: npt.ArrayLike,
    grad_out: npt.ArrayLike,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray | None]]]:
    """Gradients of ``sum(forward(x) * grad_out)`` for ``x`` and each ``(weight, bias)``."""
    ops = post_ops(activations)
    x64 = np.asarray(x, dtype=np.float64)
    flat_x = x64.reshape(-1, x64.shape[-1])
    pres, posts = _pre_and_post(layers, ops, flat_x)
    inputs = [flat_x, *posts[:-1]]
    grad = np.asarray(grad_out, dtype=np.float64).reshape(-1, posts[-1].shape[-1])
    grads: list[tuple[np.ndarray, np.ndarray | None]] = []
    for index in reversed(range(len(layers))):
        weight, bias = layers[index]
        grad = ops[index].reference_gradient(grad, pres[index], posts[index])
        grads.append((grad.T @ inputs[index], None if bias is None else grad.sum(axis=0)))
        grad = grad @ np.asarray(weight, dtype=np.float64)
    grads.reverse()
    return grad.reshape(x64.shape), grads


# The bf16 precision's error bound (docs/precision.md): bf16's and f32's unit roundoffs, and the
# float32 ops' own error (what tests/test_activations.py holds them to).
BF16_UNIT = 2.0**-8
F32_UNIT = 2.0**-24
OP_RELATIVE = 1e-6
OP_ABSOLUTE = 1e-30
# At least every op's Lipschitz constant (GELU's 1.13 the largest), but for the ops whose slope
# is a parameter.
LIPSCHITZ = 1.13
SLOPE_PARAMETERS = {"leaky_relu": 0, "elu": 0}


def _jump(op: PostOp) -> tuple[float, float] | None:
    """Where an op is discontinuous, and by how much: Softplus returns ``x`` where ``beta x >
    threshold`` (PyTorch's switch), ``(softplus(threshold) - threshold) / beta`` below its value
    there (2e-9 at the defaults, 3.13 at ``beta=0.1, threshold=1``). A pre-activation within its
    error of the point may land on either side."""
    if op.name != "softplus":
        return None
    beta, threshold = op.params
    # softplus(t) - t, without overflow either side
    gap = math.log1p(math.exp(-abs(threshold))) + max(-threshold, 0.0)
    return threshold / beta, gap / beta


def _with_jump(
    error: np.ndarray, op: PostOp, exact_pre: np.ndarray, pre_error: np.ndarray
) -> np.ndarray:
    """``error`` plus the op's jump (``_jump``) where the exact pre-activation lies within
    ``pre_error`` of it."""
    jump = _jump(op)
    if jump is None:
        return error
    point, size = jump
    return np.where(np.abs(exact_pre - point) <= pre_error, error + size, error)


def bf16_bound(
    layers: Sequence[Layer], activations: Sequence[str | PostOp], x: npt.ArrayLike
) -> np.ndarray:
    """Per output, a first-order bound on how far the bf16 precision's result (weights, and
    where the kernel multiplies bf16 the layer inputs, rounded to bf16; float32 sums and ops)
    may be from the exact float64 ``forward`` of ``x`` (finite, ``(rows, in)``)::

        pre_err = |W| err_in + (2 u_bf16 + 2 (k + 1) u_f32) (|W| (|x| + err_in) + |b|)
        err_out = L pre_err + OP_RELATIVE (|y| + L pre_err) + OP_ABSOLUTE

    layer by layer, ``L`` bounding the op's Lipschitz constant; plus, where the exact
    pre-activation is within ``pre_err`` of a point where the op jumps (``_jump``), the jump."""
    return rounding_bound(layers, activations, x, lambda k: 2 * BF16_UNIT + 2 * (k + 1) * F32_UNIT)


def rounding_bound(
    layers: Sequence[Layer],
    activations: Sequence[str | PostOp],
    x: npt.ArrayLike,
    relative: Callable[[int], float],
) -> np.ndarray:
    """The bound of ``bf16_bound``, with ``relative(k)`` in place of its factor of the
    magnitudes for a layer of ``k`` inputs (``2 (k + 1) u`` for a float format's worst case)."""
    ops = post_ops(activations)
    x64 = np.asarray(x, dtype=np.float64)
    pres, posts = _pre_and_post(layers, activations, x64)
    below, error = np.abs(x64), np.zeros_like(x64)
    for (weight, bias), op, exact_pre, y in zip(layers, ops, pres, posts, strict=True):
        w = np.abs(np.asarray(weight, dtype=np.float64))
        magnitude = (below + error) @ w.T
        if bias is not None:
            magnitude = magnitude + np.abs(np.asarray(bias, dtype=np.float64))
        pre = error @ w.T + relative(w.shape[1]) * magnitude
        at = SLOPE_PARAMETERS.get(op.name)
        slope = LIPSCHITZ if at is None else max(LIPSCHITZ, abs(op.params[at]))
        error = slope * pre + OP_RELATIVE * (np.abs(y) + slope * pre) + OP_ABSOLUTE
        error = _with_jump(error, op, exact_pre, pre)
        below = np.abs(y)
    return error


def int8_bound(
    layers: Sequence[Layer], activations: Sequence[str | PostOp], x: npt.ArrayLike
) -> np.ndarray:
    """Per output, a first-order bound on how far the int8 precision's result may be from the
    exact float64 ``forward`` of ``x`` (finite, ``(rows, in)``): each output's weights rounded
    to a multiple of ``s_w = max |W_j| / 127``, each layer's input row to one of ``s_x =
    (max(x, 0) - min(x, 0)) / 255`` (widened by ``err_in``; at least float32's smallest normal),
    exact int32 sums, float32 scaling::

        pre_err = |W| err_in + (2 (k + 1) u_f32) (|W| (|x| + err_in) + |b|)
                  + h s_x sum|W_j| + h s_w sum(|x| + err_in + h s_x)
                  + 8 u_f32 (|W| + h s_w) (|x| + err_in + h s_x + |min x|)
        err_out = L pre_err + OP_RELATIVE (|y| + L pre_err) + OP_ABSOLUTE

    with ``h`` a half (and a margin for the float32 ``x / s + z``): the rounding of each weight and
    input, then the conversion and zero-point correction of the int32 sums (``rust/oracle.rs``
    ``int8_error``); the ops' jumps added as in ``bf16_bound``."""
    half = 0.5 * (1 + 1e-4)
    ops = post_ops(activations)
    x64 = np.asarray(x, dtype=np.float64)
    pres, posts = _pre_and_post(layers, activations, x64)
    below, error = x64, np.zeros_like(x64)
    for (weight, bias), op, exact_pre, y in zip(layers, ops, pres, posts, strict=True):
        w = np.abs(np.asarray(weight, dtype=np.float64))
        k = w.shape[1]
        lowest = np.minimum((below - error).min(axis=1, initial=0.0), 0.0)
        highest = np.maximum((below + error).max(axis=1, initial=0.0), 0.0)
        # At least the smallest normal float32, as the kernel (its inverse must be finite).
        row_scale = np.maximum((highest - lowest) / 255, np.finfo(np.float32).tiny)[:, None]
        weight_scale = (w.max(axis=1, initial=0.0) / 127)[None, :]
        inputs = np.abs(below) + error + half * row_scale
        magnitude = (np.abs(below) + error) @ w.T
        if bias is not None:
            magnitude = magnitude + np.abs(np.asarray(bias, dtype=np.float64))
        pre = (
            error @ w.T
            + 2 * (k + 1) * F32_UNIT * magnitude
            + half * row_scale * w.sum(axis=1)[None, :]
            + half * weight_scale * inputs.sum(axis=1)[:, None]
            + 8 * F32_UNIT * ((inputs + np.abs(lowest)[:, None]) @ (w + half * weight_scale.T).T)
        )
        at = SLOPE_PARAMETERS.get(op.name)
        slope = LIPSCHITZ if at is None else max(LIPSCHITZ, abs(op.params[at]))
        error = slope * pre + OP_RELATIVE * (np.abs(y) + slope * pre) + OP_ABSOLUTE
        error = _with_jump(error, op, exact_pre, pre)
        below = y
    return error
