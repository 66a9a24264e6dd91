"""The post-ops: what a layer applies to its outputs, each named once for all of fusedae.

``OPS`` holds one ``Op`` per post-op: its parameters, the ``torch.nn`` modules it lowers from,
its float64 numpy reference and gradient (the test oracle, ``_reference.py``), its torch
function and gradient (``FusedMLPFunction.backward``) and its ONNX nodes (the benches' and the
CLI's ONNX Runtime graph). The Rust side exports its own list as ``_native.POST_OPS``; a
test keeps the two equal. A name not in ``OPS`` is an error everywhere, never identity.

A ``PostOp`` is one use of an op: its name and parameter values. torch is imported only by the
torch functions, which only ``fusedae.torch`` calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

# An op's parameter values, in the order of its `Op.params`.
Params = tuple[float, ...]
# A numpy array or a torch tensor: identity is the same function for both.
Array = TypeVar("Array", "np.ndarray", "torch.Tensor")
# An op's ONNX nodes for opset 17: ``onnx(x, y, params, dtype)`` reads the tensor named ``x``
# and writes ``y`` (intermediate names start with ``y``); constants are ``Constant`` nodes of the
# graph's ``dtype``.
OnnxBuilder = Callable[[str, str, Params, np.dtype], "list[onnx.NodeProto]"]


@dataclass(frozen=True)
class Op:
    """One post-op, as every part of fusedae needs it.

    ``params``: ``(name, default)`` per parameter, named as the torch module's constructor
    argument and attribute (``negative_slope`` for LeakyReLU). ``torch_modules``: the
    ``torch.nn`` classes it lowers from, by name (exact types only; the first is the one it
    becomes); ``torch_settings``: attributes those modules must have, beside the parameters, to
    compute this op (``nn.GELU``'s ``approximate`` tells ``gelu`` from ``gelu_tanh``). The three
    functions take ``params`` last; the reference gradient maps the gradient of a layer's
    output to that of its pre-activation from the pre-activation and the output, by PyTorch's
    own autograd formulas (as the native backward does: ``rust/kernels/gradient.rs``).
    ``onnx``: the ONNX nodes computing it (``onnx_nodes``). ``idempotent``: applying it twice is
    applying it once (``Linear, ReLU, ReLU`` is one fused layer). ``gradient_reads_pre``: the
    gradient reads the pre-activation (else only the output), so the saving forward keeps it
    (the native ``PostOp::gradient_reads_pre`` says the same; a test holds them together).
    """

    name: str
    params: tuple[tuple[str, float], ...]
    torch_modules: tuple[str, ...]
    reference: Callable[[np.ndarray, Params], np.ndarray]
    reference_gradient: Callable[[np.ndarray, np.ndarray, np.ndarray, Params], np.ndarray]
    torch_function: Callable[[torch.Tensor, Params], torch.Tensor]
    onnx: OnnxBuilder
    torch_settings: tuple[tuple[str, str], ...] = ()
    idempotent: bool = False
    gradient_reads_pre: bool = True


# --- ONNX -------------------------------------------------------------------------------------
# onnx is imported only here, where a graph is built.


class _Graph:
    """Nodes under construction, each named after the op's output ``y``."""

    def __init__(self, y: str, dtype: np.dtype) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.y, self.dtype = y, dtype
        self.nodes: list[onnx.NodeProto] = []

    def node(self, op_type: str, *inputs: str, output: str | None = None, **attributes: Any) -> str:
        output = output or f"{self.y}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], **attributes))
        return output

    def constant(self, value: float) -> str:
        array = np.array(value, dtype=self.dtype)
        return self.node("Constant", value=self.numpy_helper.from_array(array))


def _onnx_operator(op_type: str, *attributes: str) -> OnnxBuilder:
    """One ONNX operator with an attribute for each parameter."""

    def build(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
        graph = _Graph(y, dtype)
        graph.node(op_type, x, output=y, **dict(zip(attributes, params, strict=True)))
        return graph.nodes

    return build


def _onnx_hardtanh(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
    graph = _Graph(y, dtype)
    low, high = params  # Clip's bounds are inputs since opset 11
    graph.node("Clip", x, graph.constant(low), graph.constant(high), output=y)
    return graph.nodes


def _onnx_gelu(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
    # (x * (1 + erf(x / sqrt 2))) * 0.5: ONNX Runtime's graph optimizations fuse this form (with
    # Div, not Mul by 1 / sqrt 2) into its Gelu kernel (the Gelu operator needs opset 20).
    graph = _Graph(y, dtype)
    erf = graph.node("Erf", graph.node("Div", x, graph.constant(math.sqrt(2.0))))
    product = graph.node("Mul", x, graph.node("Add", erf, graph.constant(1.0)))
    graph.node("Mul", product, graph.constant(0.5), output=y)
    return graph.nodes


def _onnx_gelu_tanh(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
    # x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), which ONNX Runtime's CPU graph
    # optimizations leave as it is.
    graph = _Graph(y, dtype)
    cube = graph.node("Mul", graph.node("Mul", x, x), x)
    inner = graph.node("Add", x, graph.node("Mul", cube, graph.constant(_GELU_KAPPA)))
    tanh = graph.node("Tanh", graph.node("Mul", inner, graph.constant(_GELU_BETA)))
    half_x = graph.node("Mul", x, graph.constant(0.5))
    graph.node("Mul", half_x, graph.node("Add", tanh, graph.constant(1.0)), output=y)
    return graph.nodes


def _onnx_silu(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
    # ONNX Runtime fuses x * Sigmoid(x) into one kernel (QuickGelu with alpha 1).
    graph = _Graph(y, dtype)
    graph.node("Mul", x, graph.node("Sigmoid", x), output=y)
    return graph.nodes


def _onnx_softplus(x: str, y: str, params: Params, dtype: np.dtype) -> list[onnx.NodeProto]:
    # PyTorch's: x where beta * x > threshold, else log(1 + exp(beta * x)) / beta.
    graph = _Graph(y, dtype)
    beta, threshold = params
    scaled = x if beta == 1.0 else graph.node("Mul", x, graph.constant(beta))
    softplus = graph.node("Softplus", scaled)
    if beta != 1.0:
        softplus = graph.node("Div", softplus, graph.constant(beta))
    above = graph.node("Greater", scaled, graph.constant(threshold))
    graph.node("Where", above, x, softplus, output=y)
    return graph.nodes


# --- the functions ----------------------------------------------------------------------------
# Each numpy reference computes in float64 what PyTorch computes (NaN in, NaN out); each torch
# gradient is the function PyTorch's autograd runs for the module.


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


def _leaky_relu(x: np.ndarray, params: Params) -> np.ndarray:
    return np.where(x > 0, x, x * params[0])


def _leaky_relu_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    return np.where(pre > 0, grad, grad * params[0])


def _torch_leaky_relu(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().leaky_relu(x, params[0])


def _sigmoid(x: np.ndarray, params: Params) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) is inf for x < -709: the sigmoid is 0
        return 1.0 / (1.0 + np.exp(-x))


def _sigmoid_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    return grad * (1.0 - post) * post


def _torch_sigmoid(x: torch.Tensor, params: Params) -> torch.Tensor:
    return x.sigmoid()


def _tanh(x: np.ndarray, params: Params) -> np.ndarray:
    return np.tanh(x)


def _tanh_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    return grad * (1.0 - post * post)


def _torch_tanh(x: torch.Tensor, params: Params) -> torch.Tensor:
    return x.tanh()


# numpy has no erf; math.erf is correctly rounded to within an ulp or so.
_erf = np.vectorize(math.erf, otypes=[np.float64])
_GELU_KAPPA = 0.044715
_GELU_BETA = math.sqrt(2.0 / math.pi)


def _gelu(x: np.ndarray, params: Params) -> np.ndarray:
    return x * 0.5 * (1.0 + _erf(x * math.sqrt(0.5)))


def _gelu_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    cdf = 0.5 * (1.0 + _erf(pre * math.sqrt(0.5)))
    pdf = np.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
    return grad * (cdf + pre * pdf)


def _torch_gelu(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().gelu(x)


def _gelu_tanh(x: np.ndarray, params: Params) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(_GELU_BETA * (x + _GELU_KAPPA * x * x * x)))


def _gelu_tanh_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    squared = pre * pre
    tanh = np.tanh(_GELU_BETA * (pre + _GELU_KAPPA * squared * pre))
    inner_derivative = _GELU_BETA * (1.0 + 3.0 * _GELU_KAPPA * squared)
    return grad * (0.5 * (1.0 + tanh) + 0.5 * pre * (1.0 - tanh * tanh) * inner_derivative)


def _torch_gelu_tanh(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().gelu(x, approximate="tanh")


def _silu(x: np.ndarray, params: Params) -> np.ndarray:
    return x * _sigmoid(x, ())


def _silu_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    sigmoid = _sigmoid(pre, ())
    return grad * sigmoid * (1.0 + pre * (1.0 - sigmoid))


def _torch_silu(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().silu(x)


def _elu(x: np.ndarray, params: Params) -> np.ndarray:
    with np.errstate(over="ignore"):  # expm1 of a large x, which the where drops
        return np.where(x > 0, x, params[0] * np.expm1(x))


def _elu_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    # A NaN input passes NaN, as PyTorch's vectorized kernel (its `> 0` select takes the
    # exponential's side) does.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(pre > 0, grad, grad * params[0] * np.exp(np.minimum(pre, 0)))


def _torch_elu(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().elu(x, params[0])


def _hardtanh(x: np.ndarray, params: Params) -> np.ndarray:
    return np.minimum(np.maximum(x, params[0]), params[1])  # keeps NaN, as torch.clamp does


def _hardtanh_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    return np.where((pre <= params[0]) | (pre >= params[1]), 0.0, grad)


def _torch_hardtanh(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().hardtanh(x, params[0], params[1])


def _softplus(x: np.ndarray, params: Params) -> np.ndarray:
    beta, threshold = params
    scaled = x * beta
    with np.errstate(over="ignore"):  # exp of what is above the threshold, which the where drops
        return np.where(scaled > threshold, x, np.log1p(np.exp(scaled)) / beta)


def _softplus_gradient(
    grad: np.ndarray, pre: np.ndarray, post: np.ndarray, params: Params
) -> np.ndarray:
    beta, threshold = params
    scaled = pre * beta
    with np.errstate(over="ignore", invalid="ignore"):  # inf / inf where the where drops it
        exp = np.exp(scaled)
        return np.where(scaled > threshold, grad, grad * exp / (exp + 1.0))


def _torch_softplus(x: torch.Tensor, params: Params) -> torch.Tensor:
    return _functional().softplus(x, params[0], params[1])


def _functional() -> Any:
    import torch.nn.functional

    return torch.nn.functional


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
            onnx=_onnx_operator("Relu"),
            idempotent=True,
            gradient_reads_pre=False,
        ),
        Op(
            name="identity",
            params=(),
            torch_modules=("Identity",),
            reference=_identity,
            reference_gradient=_identity_gradient,
            torch_function=_identity,
            onnx=_onnx_operator("Identity"),
            idempotent=True,
            gradient_reads_pre=False,
        ),
        Op(
            name="leaky_relu",
            params=(("negative_slope", 0.01),),
            torch_modules=("LeakyReLU",),
            reference=_leaky_relu,
            reference_gradient=_leaky_relu_gradient,
            torch_function=_torch_leaky_relu,
            onnx=_onnx_operator("LeakyRelu", "alpha"),
        ),
        Op(
            name="sigmoid",
            params=(),
            torch_modules=("Sigmoid",),
            reference=_sigmoid,
            reference_gradient=_sigmoid_gradient,
            torch_function=_torch_sigmoid,
            onnx=_onnx_operator("Sigmoid"),
            gradient_reads_pre=False,
        ),
        Op(
            name="tanh",
            params=(),
            torch_modules=("Tanh",),
            reference=_tanh,
            reference_gradient=_tanh_gradient,
            torch_function=_torch_tanh,
            onnx=_onnx_operator("Tanh"),
            gradient_reads_pre=False,
        ),
        Op(
            name="gelu",
            params=(),
            torch_modules=("GELU",),
            torch_settings=(("approximate", "none"),),
            reference=_gelu,
            reference_gradient=_gelu_gradient,
            torch_function=_torch_gelu,
            onnx=_onnx_gelu,
        ),
        Op(
            name="gelu_tanh",
            params=(),
            torch_modules=("GELU",),
            torch_settings=(("approximate", "tanh"),),
            reference=_gelu_tanh,
            reference_gradient=_gelu_tanh_gradient,
            torch_function=_torch_gelu_tanh,
            onnx=_onnx_gelu_tanh,
        ),
        Op(
            name="silu",
            params=(),
            torch_modules=("SiLU",),
            reference=_silu,
            reference_gradient=_silu_gradient,
            torch_function=_torch_silu,
            onnx=_onnx_silu,
        ),
        Op(
            name="elu",
            params=(("alpha", 1.0),),
            torch_modules=("ELU",),
            reference=_elu,
            reference_gradient=_elu_gradient,
            torch_function=_torch_elu,
            onnx=_onnx_operator("Elu", "alpha"),
        ),
        Op(
            name="hardtanh",
            params=(("min_val", -1.0), ("max_val", 1.0)),
            torch_modules=("Hardtanh", "ReLU6"),  # nn.ReLU6 is Hardtanh(0, 6)
            reference=_hardtanh,
            reference_gradient=_hardtanh_gradient,
            torch_function=_torch_hardtanh,
            onnx=_onnx_hardtanh,
            idempotent=True,
        ),
        Op(
            name="softplus",
            params=(("beta", 1.0), ("threshold", 20.0)),
            torch_modules=("Softplus",),
            reference=_softplus,
            reference_gradient=_softplus_gradient,
            torch_function=_torch_softplus,
            onnx=_onnx_softplus,
        ),
    )
}


def _choices() -> str:
    """``"'relu' or 'identity'"``."""
    names = [repr(name) for name in OPS]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# The smallest Softplus beta the kernels take (rust/ops.rs's SOFTPLUS_MIN_BETA says why).
SOFTPLUS_MIN_BETA = 2.0**-24


@dataclass(frozen=True)
class PostOp:
    """An op applied to a layer's outputs, with its parameter values (``params`` in the order of
    ``Op.params``; empty for ops without). Params other than a tuple of numbers are a TypeError;
    an unknown name, a wrong parameter count or values the kernel does not take (as the native
    ``PostOp::parse`` refuses them: not finite, Hardtanh's ``min_val >= max_val``, Softplus's
    ``beta`` below ``SOFTPLUS_MIN_BETA``) are a ValueError."""

    name: str
    params: Params = ()

    def __post_init__(self) -> None:
        op = OPS.get(self.name)
        if op is None:
            raise ValueError(f"activation must be {_choices()}, got {self.name!r}")
        # (A string's comparison below failed as "'<' not supported between 'float' and 'str'".)
        if not isinstance(self.params, tuple) or not all(
            isinstance(value, numbers.Real) for value in self.params
        ):
            raise TypeError(
                f"post-op {self.name!r}: params must be a tuple of numbers, got {self.params!r}"
            )
        if len(self.params) != len(op.params):
            raise ValueError(
                f"{self.name} takes {len(op.params)} parameters "
                f"({', '.join(name for name, _ in op.params) or 'none'}), got {self.params!r}"
            )
        values = dict(zip((name for name, _ in op.params), self.params, strict=True))
        # (Comparisons, not `math.isfinite`: TorchDynamo traces them on its symbolic floats.)
        if not all(-math.inf < value < math.inf for value in self.params):
            raise ValueError(f"post-op {self.name!r}: parameters must be finite, got {values}")
        if self.name == "hardtanh" and not values["min_val"] < values["max_val"]:
            raise ValueError(
                f"post-op 'hardtanh': min_val ({values['min_val']}) must be below max_val "
                f"({values['max_val']})"
            )
        if self.name == "softplus" and not values["beta"] > 0:
            raise ValueError(f"post-op 'softplus': beta must be positive, got {values['beta']}")
        if self.name == "softplus" and values["beta"] < SOFTPLUS_MIN_BETA:
            raise ValueError(
                f"post-op 'softplus': beta must be at least 2^-24 ({SOFTPLUS_MIN_BETA:.3g}), got "
                f"{values['beta']:.3g}: the kernels' exponential, 0 below exp(-87) in float32, "
                "is divided by beta"
            )

    @property
    def op(self) -> Op:
        return OPS[self.name]

    @property
    def gradient_reads_output(self) -> bool:
        """Whether the op's gradient is computed from its output (ReLU, Sigmoid, Tanh): the
        identity's reads nothing, the others' read their input (``Op.gradient_reads_pre``)."""
        return self.name != "identity" and not self.op.gradient_reads_pre

    def reference(self, x: np.ndarray) -> np.ndarray:
        return self.op.reference(x, self.params)

    def reference_gradient(self, grad: np.ndarray, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        return self.op.reference_gradient(grad, pre, post, self.params)

    def torch_function(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.torch_function(x, self.params)

    @property
    def native_argument(self) -> str | tuple[str | float, ...]:
        """The op as ``_native.Chain`` takes it: its name, or ``(name, *params)``."""
        return (self.name, *self.params) if self.params else self.name

    def onnx_nodes(self, x: str, y: str, dtype: np.dtype) -> list[onnx.NodeProto]:
        """The ONNX nodes (opset 17) computing ``y`` from ``x`` of ``dtype``; intermediate names
        start with ``y``."""
        return self.op.onnx(x, y, self.params, np.dtype(dtype))

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
