"""Plain-numpy float64 forward and backward of a Linear chain: the Python test oracle.

Written for clarity, not speed: one matrix product per layer, in float64 whatever the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Layer = tuple[npt.ArrayLike, npt.ArrayLike | None]


def forward(
    layers: Sequence[Layer], activations: Sequence[str], x: npt.ArrayLike
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Returns the output for ``x`` of shape ``(*, in)`` and every layer's post-activation output
    (flattened to 2-D), all float64."""
    x64 = np.asarray(x, dtype=np.float64)
    lead = x64.shape[:-1]
    h = x64.reshape(-1, x64.shape[-1])
    outputs = []
    for (weight, bias), activation in zip(layers, activations, strict=True):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf inputs are allowed
            h = h @ np.asarray(weight, dtype=np.float64).T
        if bias is not None:
            h = h + np.asarray(bias, dtype=np.float64)
        if activation == "relu":
            h = np.where(h < 0, 0.0, h)  # keeps NaN, as torch.relu does
        outputs.append(h)
    return h.reshape(*lead, h.shape[-1]), outputs


def backward(
    layers: Sequence[Layer], activations: Sequence[str], x: npt.ArrayLike, grad_out: npt.ArrayLike
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray | None]]]:
    """Gradients of ``sum(forward(x) * grad_out)`` for ``x`` and each ``(weight, bias)``."""
    x64 = np.asarray(x, dtype=np.float64)
    flat_x = x64.reshape(-1, x64.shape[-1])
    _, outputs = forward(layers, activations, flat_x)
    inputs = [flat_x, *outputs[:-1]]
    grad = np.asarray(grad_out, dtype=np.float64).reshape(-1, outputs[-1].shape[-1])
    grads: list[tuple[np.ndarray, np.ndarray | None]] = []
    for index in reversed(range(len(layers))):
        weight, bias = layers[index]
        if activations[index] == "relu":
            grad = grad * (outputs[index] > 0)
        grads.append((grad.T @ inputs[index], None if bias is None else grad.sum(axis=0)))
        grad = grad @ np.asarray(weight, dtype=np.float64)
    grads.reverse()
    return grad.reshape(x64.shape), grads
