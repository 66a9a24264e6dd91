"""The post-ops: what a layer applies to its outputs, each named once for all of fusedae.

``OPS`` holds one ``Op`` per post-op: its parameters, the ``torch.nn`` modules it lowers from,
its float64 numpy reference and gradient (the test oracle, ``_reference.py``), its torch
function and gradient (``FusedMLPFunction.backward``) and its ONNX operator (the benches' and
the CLI's ONNX Runtime graph). The Rust side exports its own list as ``_native.POST_OPS``; a
test keeps the two equal. A name not in ``OPS`` is an error everywhere, never identity.

A ``PostOp`` is one use of an op: its name and parameter values. torch is imported only by the
torch functions, which only ``fusedae.torch`` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

# An op's parameter values, in the order of its `Op.params`.
Params = tuple[float, ...]
# A numpy array or a torch tensor: identity is the same function for both.
Array = TypeVar("Array", "np.ndarray", "torch.Tensor")


@dataclass(frozen=True)
class Op:
    """One post-op, as every part of fusedae needs it.

    ``params``: ``(name, default)`` per parameter, named as the torch module's constructor
    argument and attribute (``negative_slope`` for LeakyReLU). ``torch_modules``: the
    ``torch.nn`` classes it lowers from, by name (exact types only). The four functions take
    ``params`` last; the gradients map the gradient of a layer's output to that of its
    pre-activation from the pre-activation and the output. ``onnx_op``: the ONNX operator, with
    ``onnx_attributes`` naming its attribute for each parameter. ``idempotent``: applying it
    twice is applying it once (``Linear, ReLU, ReLU`` is one fused layer).
    """

    name: str
    params: tuple[tuple[str, float], ...]
    torch_modules: tuple[str, ...]
    reference: Callable[[np.ndarray, Params], np.ndarray]
    reference_gradient: Callable[[np.ndarray, np.ndarray, np.ndarray, Params], np.ndarray]
    torch_function: Callable[[torch.Tensor, Params], torch.Tensor]
    torch_gradient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Params], torch.Tensor]
    onnx_op: str
    onnx_attributes: tuple[str, ...] = ()
    idempotent: bool = False


def _identity(x: Array, params: Params) -> Array:
    return x


def _identity_gradient(grad: Array, pre: Array, post: Array, params: Params) -> Array:
    return grad


def _relu(x: np.ndarray, params: Params) -> np.ndarray:
    return np.where(x < 0, 0.0, x)  # keeps NaN, as torch.relu does


def _relu_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    return np.where(post <= 0, 0.0, grad)  # NaN passes the gradient, as threshold_backward


def _torch_relu(x: torch.Tensor, params: Params) -> torch.Tensor:
    return x.relu()


def _torch_relu_gradient(
    grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, params: Params
) -> torch.Tensor:
    import torch

    return torch.ops.aten.threshold_backward(grad, post, 0)  # what autograd runs for torch.relu


# The order error messages list them in.
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            name="relu",
            params=(),
            torch_modules=("ReLU",),
            reference=_relu,
            reference_gradient=_relu_gradient,
            torch_function=_torch_relu,
            torch_gradient=_torch_relu_gradient,
            onnx_op="Relu",
            idempotent=True,
        ),
        Op(
            name="identity",
            params=(),
            torch_modules=("Identity",),
            reference=_identity,
            reference_gradient=_identity_gradient,
            torch_function=_identity,
            torch_gradient=_identity_gradient,
            onnx_op="Identity",
            idempotent=True,
        ),
    )
}


def _choices() -> str:
    """``"'relu' or 'identity'"``."""
    names = [repr(name) for name in OPS]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class PostOp:
    """An op applied to a layer's outputs, with its parameter values (``params`` in the order of
    ``Op.params``; empty for ops without). An unknown name or a wrong parameter count is a
    ValueError."""

    name: str
    params: Params = ()

    def __post_init__(self) -> None:
        op = OPS.get(self.name)
        if op is None:
            raise ValueError(f"activation must be {_choices()}, got {self.name!r}")
        if len(self.params) != len(op.params):
            raise ValueError(
                f"{self.name} takes {len(op.params)} parameters "
                f"({', '.join(name for name, _ in op.params) or 'none'}), got {self.params!r}"
            )

    @property
    def op(self) -> Op:
        return OPS[self.name]

    def reference(self, x: np.ndarray) -> np.ndarray:
        return self.op.reference(x, self.params)

    def reference_gradient(self, grad: np.ndarray, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        return self.op.reference_gradient(grad, pre, post, self.params)

    def torch_function(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.torch_function(x, self.params)

    def torch_gradient(
        self, grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor
    ) -> torch.Tensor:
        return self.op.torch_gradient(grad, pre, post, self.params)

    def keyword_params(self) -> dict[str, float]:
        """The parameters by name: the torch module's constructor arguments."""
        return {name: value for (name, _), value in zip(self.op.params, self.params, strict=True)}

    def __str__(self) -> str:
        """``"relu"``, or ``"leaky_relu(negative_slope=0.1)"`` for an op with parameters."""
        if not self.params:
            return self.name
        values = ", ".join(f"{name}={value!r}" for name, value in self.keyword_params().items())
        return f"{self.name}({values})"


IDENTITY = PostOp("identity")
RELU = PostOp("relu")


def post_op(value: str | PostOp) -> PostOp:
    """``value`` as a PostOp: a name stands for the op with its default parameters."""
    if isinstance(value, PostOp):
        return value
    if not isinstance(value, str):
        raise TypeError(f"activation must be a name or a PostOp, got {type(value).__name__}")
    op = OPS.get(value)
    return PostOp(value, tuple(default for _, default in op.params) if op else ())


def post_ops(values: Iterable[str | PostOp]) -> tuple[PostOp, ...]:
    """``post_op`` of each value; an error names the layer it is for."""
    resolved = []
    for index, value in enumerate(values):
        try:
            resolved.append(post_op(value))
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {index}: {error}") from None
    return tuple(resolved)
