"""The native backward (`FusedMLPFunction.backward` on CPU): gradients against plain PyTorch in
float64 (the oracle) for every post-op, dtype, bias or none, `requires_grad` combination and
batch size; the layout of what the forward keeps for it; double backward's error."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from _tensors import relative_error
from fusedae import _native
from fusedae._ops import PostOp, post_op
from fusedae.torch import FusedMLP, FusedMLPFunction, pack_chain
from fusedae.torch.function import run_saving, saved_columns
from fusedae.torch.lower import post_op_module

WIDTHS = (9, 42, 5, 42, 9)
# Where each op's gradient jumps: rows whose pre-activations come this close in float64 are
# redrawn, so a float32 forward rounding to the other side cannot flip a mask.
KINK_MARGIN = 1e-4


def kinks(op: PostOp) -> tuple[float, ...]:
    name = op.op.name
    if name in ("relu", "leaky_relu", "elu"):
        return (0.0,)
    if name == "hardtanh":
        return tuple(op.params)
    return ()


def build(names: tuple[str, ...], bias: bool, dtype: torch.dtype):
    """`(plain, params, packed, ops)`: the chain as plain modules, its parameters, packed."""
    ops = [post_op(name) for name in names]
    layers = [nn.Linear(a, b, bias=bias).to(dtype) for a, b in itertools.pairwise(WIDTHS)]
    plain = nn.Sequential(
        *(m for layer, op in zip(layers, ops, strict=True) for m in (layer, post_op_module(op)))
    )
    params: list[torch.Tensor | None] = []
    for layer in layers:
        params += [layer.weight, layer.bias]
    packed = pack_chain(params[0::2], params[1::2], ops)
    return plain, params, packed, ops


def away_from_kinks(plain: nn.Sequential, ops, rows: int) -> torch.Tensor:
    """`rows` random rows whose float64 pre-activations keep `KINK_MARGIN` from every kink."""
    plain64 = [m.double() if isinstance(m, nn.Linear) else m for m in _copy(plain)]
    kept = [torch.empty(0, WIDTHS[0], dtype=torch.float64)]
    while sum(len(k) for k in kept) < rows:
        x = torch.randn(4 * rows + 8, WIDTHS[0], dtype=torch.float64)
        ok = torch.ones(len(x), dtype=torch.bool)
        h = x
        for index, module in enumerate(plain64):
            h = module(h)
            if isinstance(module, nn.Linear):
                for kink in kinks(ops[index // 2]):
                    ok &= ((h - kink).abs() > KINK_MARGIN).all(dim=1)
        kept.append(x[ok])
    return torch.cat(kept)[:rows]


def _copy(plain: nn.Sequential) -> list[nn.Module]:
    return list(copy.deepcopy(plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", _native.POST_OPS)
def test_gradients_match_pytorch_for_every_op(name, bias, dtype):
    """Every layer carries the op (the last one too): the input's, weights' and biases'
    gradients against plain PyTorch in float64, within 1e-5 of the largest in float32."""
    names = (name,) * (len(WIDTHS) - 1)
    torch.manual_seed(len(name))
    plain, params, packed, ops = build(names, bias, dtype)
    plain64 = nn.Sequential(*_copy(plain)).double()
    for rows in (0, 1, 7, 300):
        x = away_from_kinks(plain, ops, rows).to(dtype).requires_grad_()
        grad_output = torch.randn(rows, WIDTHS[-1], dtype=dtype)
        y = FusedMLPFunction.apply(x, packed, ops, *params)
        wanted = [p for p in params if p is not None]
        got = torch.autograd.grad(y, [x, *wanted], grad_output)
        x64 = x.detach().double().requires_grad_()
        params64 = [p for p in plain64.parameters()]
        want = torch.autograd.grad(plain64(x64), [x64, *params64], grad_output.double())
        bound = 1e-5 if dtype == torch.float32 else 1e-12
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.dtype == dtype
            assert g.shape == w.shape
            assert relative_error(g, w) <= bound, (rows, index)


def test_bias_gradients_summed_over_many_rows_of_one_sign_keep_float32s_rounding():
    """A constant gradient (``y.sum()``'s) over 20,000 rows: every column of the deltas has one
    sign, so each rounding of a sum taken row by row adds up (the bias gradients were 4e-5 off
    against PyTorch's 1e-7). The layers' inputs are whole registers on every ISA, so their bias
    gradients are column sums of their deltas, not a column of ones in the weight gradient's."""
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    params = [t for layer in (plain[0], plain[2]) for t in (layer.weight, layer.bias)]
    ops = [post_op("tanh"), post_op("identity")]
    packed = pack_chain(params[0::2], params[1::2], ops)
    x = torch.randn(20_000, 16)
    grad_output = torch.full((len(x), 16), 0.1)
    got = torch.autograd.grad(FusedMLPFunction.apply(x, packed, ops, *params), params, grad_output)
    plain64 = copy.deepcopy(plain).double()
    want = torch.autograd.grad(
        plain64(x.double()), list(plain64.parameters()), grad_output.double()
    )
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert relative_error(g, w) <= 1e-5, index


@pytest.mark.parametrize("last", ["identity", "gelu", "sigmoid"])
def test_an_output_changed_in_place_stops_the_backward_only_where_pytorchs_would(last):
    """The modules keep the output for the backward only where the last op's gradient reads it
    (as PyTorch's Sigmoid keeps its own): after a last Linear (an in-place activation or a
    residual added in place next) or an op whose gradient reads its input, the backward runs.
    (`FusedMLPFunction` called directly keeps it always: it cannot know the chain's ops.)"""
    torch.manual_seed(1)
    plain, params, _, _ = build(("relu", "relu", "relu", last), True, torch.float32)
    fused = FusedMLP.from_sequential(plain)
    x = torch.randn(16, WIDTHS[0])
    y_plain, y_fused = plain(x), fused(x)
    assert "FusedMLPFunction" in type(y_fused.grad_fn).__name__
    for y in (y_plain, y_fused):
        y.add_(1.0)
    if last == "sigmoid":
        for y in (y_plain, y_fused):
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(y.sum(), params)
        return
    want = torch.autograd.grad(y_plain.sum(), params)
    got = torch.autograd.grad(y_fused.sum(), params)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= 1e-5


@pytest.mark.parametrize(
    "case",
    [
        "input",
        "strided_input",
        "negated_input",
        "frozen_first_weight",
        "frozen_first_weight_only",
        "biases",
        "weights",
        "step",
        "frozen_step",
    ],
)
def test_tensors_changed_in_place_stop_the_backward_only_where_pytorchs_would(case):
    """What the fused call saves for its backward is what PyTorch's modules save: the input
    where the first layer's weight wants a gradient, the weights a gradient flows through to a
    layer or the input below, never a bias. A tensor changed in place between the forward and
    the backward (an optimizer step there, a buffer reused) stops both or neither: an input the
    kernel read through a copy (a transposed or negated view, whose base changes) too."""
    torch.manual_seed(2)
    plain, _, _, _ = build(("relu", "relu", "relu", "identity"), True, torch.float32)
    fused = FusedMLP.from_sequential(copy.deepcopy(plain))
    if case.startswith("frozen"):  # the first layer frozen (fine-tuning the rest)
        for model in (plain, fused):
            model[0].requires_grad_(False)
            if case.endswith("_only"):  # its bias trained: PyTorch's reads no input
                model[0].bias.requires_grad_(True)
    base_plain = torch.randn((WIDTHS[0], 16) if case == "strided_input" else (16, WIDTHS[0]))
    base_fused = base_plain.clone()
    views = {"strided_input": torch.t, "negated_input": torch._neg_view}
    view = views.get(case, lambda base: base)
    y_plain, y_fused = plain(view(base_plain)), fused(view(base_fused))
    assert "FusedMLPFunction" in type(y_fused.grad_fn).__name__
    for model, base in ((plain, base_plain), (fused, base_fused)):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            if "input" in case or case.startswith("frozen_first_weight"):
                base.mul_(2.0)
            elif case == "biases":
                for p in params[1::2]:
                    p.add_(1.0)
            elif case == "weights":
                model[2].weight.add_(1.0)
        if case.endswith("step"):
            for p in params:
                p.grad = torch.ones_like(p)
            torch.optim.SGD(params, lr=0.1).step()
    refused = case in ("input", "strided_input", "negated_input", "weights", "step", "frozen_step")
    if refused:
        for y, model in ((y_plain, plain), (y_fused, fused)):
            params = [p for p in model.parameters() if p.requires_grad]
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(y.sum(), params)
        return
    want = torch.autograd.grad(y_plain.sum(), [p for p in plain.parameters() if p.requires_grad])
    got = torch.autograd.grad(y_fused.sum(), [p for p in fused.parameters() if p.requires_grad])
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= 1e-5


def test_the_kernels_copy_of_an_input_is_a_saved_tensor():
    """The copy the kernel reads of a strided input goes through ``save_for_backward`` beside
    the caller's tensor: saved-tensor hooks (``checkpoint``, ``save_on_cpu``) see it, and the
    backward frees it."""
    fused = FusedMLP(nn.Linear(8, 4))
    packed: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(tensor)
        return tensor

    base = torch.randn(8, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = fused(base.t())
    assert "FusedMLPFunction" in type(y.grad_fn).__name__
    copies = [t for t in packed if t.shape == (16, 8) and t.is_contiguous()]
    assert len(copies) == 1
    assert copies[0].data_ptr() != base.data_ptr()


def test_batched_gradients_are_a_clear_error():
    """``is_grads_batched`` (``jacobian(vectorize=True)``) hands the backward batched tensors,
    whose memory the kernel cannot read."""
    torch.manual_seed(0)
    plain, _, _, _ = build(("relu", "relu", "relu", "identity"), True, torch.float32)
    fused = FusedMLP.from_sequential(plain)
    x = torch.randn(16, WIDTHS[0], requires_grad=True)
    y = fused(x)
    with pytest.raises(RuntimeError, match="does not take batched gradients"):
        torch.autograd.grad(y, x, torch.randn(3, *y.shape), is_grads_batched=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", _native.POST_OPS)
def test_nan_and_inf_reach_the_same_gradients_as_in_pytorch(name, dtype):
    """A diverging run's NaN and infinities (in a weight, in biases) reach the same outputs and
    gradients as they do in PyTorch: a check on the gradients sees the same."""
    torch.manual_seed(0)
    plain, params, _, ops = build((name,) * (len(WIDTHS) - 1), True, dtype)
    with torch.no_grad():
        params[0][3, 2] = float("nan")
        params[3][1] = float("inf")
        params[5][4] = -float("inf")
    packed = pack_chain(params[0::2], params[1::2], ops)
    x = torch.randn(64, WIDTHS[0], dtype=dtype, requires_grad=True)
    grad_output = torch.randn(64, WIDTHS[-1], dtype=dtype)
    got = FusedMLPFunction.apply(x, packed, ops, *params)
    want = plain(x)
    assert torch.equal(got.isnan(), want.isnan())
    got_grads = torch.autograd.grad(got, [x, *params], grad_output)
    want_grads = torch.autograd.grad(want, [x, *params], grad_output)
    for index, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert torch.equal(g.isnan(), w.isnan()), index
        assert torch.equal(g.isinf(), w.isinf()), index


@pytest.mark.parametrize(
    ("needs_x", "trained"),
    [
        (True, ()),  # the input only
        (False, (0, 1, 2, 3)),  # the weights only
        (True, (1, 3)),  # frozen layers between trained ones
        (False, (2,)),  # one layer in the middle: the layers below it are skipped
    ],
)
def test_requires_grad_combinations(needs_x, trained):
    torch.manual_seed(3)
    names = ("gelu", "relu", "tanh", "sigmoid")
    plain, params, packed, ops = build(names, True, torch.float64)
    for index, param in enumerate(params):
        param.requires_grad_(index // 2 in trained)
    x = torch.randn(33, WIDTHS[0], dtype=torch.float64, requires_grad=needs_x)
    # A transposed view: the backward reads non-contiguous gradients.
    grad_output = torch.randn(WIDTHS[-1], 33, dtype=torch.float64).t()
    y = FusedMLPFunction.apply(x, packed, ops, *params)
    leaves = [x, *params]
    wanted = [t for t in leaves if t.requires_grad]
    got = dict(zip(map(id, wanted), torch.autograd.grad(y, wanted, grad_output), strict=True))
    want = dict(
        zip(map(id, wanted), torch.autograd.grad(plain(x), wanted, grad_output), strict=True)
    )
    for tensor in wanted:
        assert relative_error(got[id(tensor)], want[id(tensor)]) <= 1e-12


def test_input_of_any_leading_shape_and_a_negated_gradient():
    torch.manual_seed(4)
    plain, params, packed, ops = build(("silu", "relu", "elu", "identity"), True, torch.float64)
    x = torch.randn(2, 3, 5, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 3, 5, WIDTHS[-1], dtype=torch.float64).neg()
    y = FusedMLPFunction.apply(x, packed, ops, *params)
    got = torch.autograd.grad(y, [x, *params], grad_output)
    want = torch.autograd.grad(plain(x), [x, *params], grad_output.resolve_neg())
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert relative_error(g, w) <= 1e-12


def test_saved_columns_agree_with_the_native_chain():
    """What the forward keeps, and where: the Python layout (the custom op's fake and torch
    backward read it) is the native one, for every op in every position."""
    every = itertools.product(_native.POST_OPS, repeat=2)
    for names in itertools.chain(every, [("gelu", "relu", "silu"), ("tanh", "elu", "identity")]):
        widths = (4, 6, 3, 5)[: len(names) + 1]
        weights = [torch.randn(b, a, dtype=torch.float64) for a, b in itertools.pairwise(widths)]
        ops = [post_op(name) for name in names]
        packed = pack_chain(weights, [None] * len(weights), ops)
        columns, width = saved_columns([w.shape[0] for w in weights], ops)
        assert packed.saved_columns == columns
        assert packed.saved_width == width
        _, saved = run_saving(packed, torch.randn(2, 4, dtype=torch.float64))
        assert saved.shape == (2, width)


def test_double_backward_is_a_clear_error():
    _plain, params, packed, ops = build(("tanh", "relu", "tanh", "identity"), True, torch.float64)
    x = torch.randn(3, WIDTHS[0], dtype=torch.float64, requires_grad=True)
    y = FusedMLPFunction.apply(x, packed, ops, *params)
    with pytest.raises(RuntimeError, match="fused backward is not differentiable"):
        torch.autograd.grad(y.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="fused backward is not differentiable"):
        torch.autograd.gradgradcheck(
            lambda x: FusedMLPFunction.apply(x, packed, ops, *params), (x,)
        )
