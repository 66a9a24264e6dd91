"""Plain-numpy float64 forward and backward of a Linear chain: the Python test oracle.

Written for clarity, not speed: one matrix product per layer, in float64 whatever the input; each
post-op's function and gradient come from the op table (``fusedae._ops``).
"""

from __future__ import annotations

from collections.abc import Sequence

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
