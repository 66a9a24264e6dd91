"""The models people have: every activation of the op table, BatchNorm folded into the Linear
layers, Dropout, Flatten/Unflatten, and Sequentials holding modules the kernels do not run,
each against eval-mode (or training-mode) PyTorch."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from fusedae._ops import OPS, PostOp, post_op
from fusedae.chain import ChainSpec, Layer, Normalization
from fusedae.torch import FusedMLP, FusedMLPFunction, accelerate, pack_chain
from fusedae.torch.lower import lower, to_sequential

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "ReLU(inplace)": lambda: nn.ReLU(inplace=True),
    "LeakyReLU": nn.LeakyReLU,
    "LeakyReLU(0.2)": lambda: nn.LeakyReLU(0.2),
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "GELU": nn.GELU,
    "GELU(tanh)": lambda: nn.GELU(approximate="tanh"),
    "SiLU": nn.SiLU,
    "ELU": nn.ELU,
    "ELU(0.5)": lambda: nn.ELU(alpha=0.5),
    "Hardtanh": nn.Hardtanh,
    "Hardtanh(-2, 3)": lambda: nn.Hardtanh(-2.0, 3.0),
    "ReLU6": nn.ReLU6,
    "Softplus": nn.Softplus,
    "Softplus(2, 5)": lambda: nn.Softplus(beta=2.0, threshold=5.0),
    "Identity": nn.Identity,
}
WANT: dict[str, PostOp] = {
    "ReLU": post_op("relu"),
    "ReLU(inplace)": post_op("relu"),
    "LeakyReLU": PostOp("leaky_relu", (0.01,)),
    "LeakyReLU(0.2)": PostOp("leaky_relu", (0.2,)),
    "Sigmoid": post_op("sigmoid"),
    "Tanh": post_op("tanh"),
    "GELU": post_op("gelu"),
    "GELU(tanh)": post_op("gelu_tanh"),
    "SiLU": post_op("silu"),
    "ELU": PostOp("elu", (1.0,)),
    "ELU(0.5)": PostOp("elu", (0.5,)),
    "Hardtanh": PostOp("hardtanh", (-1.0, 1.0)),
    "Hardtanh(-2, 3)": PostOp("hardtanh", (-2.0, 3.0)),
    "ReLU6": PostOp("hardtanh", (0.0, 6.0)),
    "Softplus": PostOp("softplus", (1.0, 20.0)),
    "Softplus(2, 5)": PostOp("softplus", (2.0, 5.0)),
    "Identity": post_op("identity"),
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """PyTorch's OpenMP workers only slow these tiny matrices down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float64 within rounding; float32 within the kernels' and PyTorch's different sums."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- every activation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_module_lowers_to_its_post_op(name: str):
    lowered = lower([nn.Linear(4, 3), ACTIVATIONS[name](), nn.Linear(3, 2)])
    assert lowered is not None
    assert lowered.post_ops == (WANT[name], post_op("identity"))


def test_gelu_with_another_approximation_is_not_lowered():
    gelu = nn.GELU()
    gelu.approximate = "something else"
    assert lower([nn.Linear(4, 3), gelu]) is None


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_forward_and_gradients_match_pytorch(name: str):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 5), ACTIVATIONS[name](), nn.Linear(5, 4)).double()
    fused = FusedMLP.from_sequential(copy.deepcopy(plain))
    x = torch.randn(13, 6, dtype=torch.float64) * 2
    with torch.no_grad():
        assert_close(fused(x), plain(x))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(13, 4, dtype=torch.float64)
    fused(x1).backward(grad_out)
    plain(x2).backward(grad_out)
    assert_close(x1.grad, x2.grad)
    for got, want in zip(fused.parameters(), plain.parameters(), strict=True):
        assert_close(got.grad, want.grad)


@pytest.mark.parametrize("op", [post_op(name) for name in OPS], ids=str)
def test_gradcheck_through_the_function(op: PostOp):
    torch.manual_seed(1)
    weights = [torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    biases = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params = [t.requires_grad_() for pair in zip(weights, biases, strict=True) for t in pair]
    activations = (op, post_op("identity"))
    chain = pack_chain(weights, biases, activations)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the parameters, which the packed chain does not see: the function's
    # input gradient is checked against the chain as packed, and the parameter gradients
    # against PyTorch's below.
    assert torch.autograd.gradcheck(
        lambda x: FusedMLPFunction.apply(x, chain, activations, *params), (x,)
    )
    plain = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for linear, weight, bias in zip(plain, weights, biases, strict=True):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)

    def reference(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        hidden = op.torch_function(nn.functional.linear(x, params[0], params[1]))
        return nn.functional.linear(hidden, params[2], params[3])

    y = FusedMLPFunction.apply(x, chain, activations, *params)
    grads = torch.autograd.grad(y.sum(), (x, *params))
    want = torch.autograd.grad(reference(x, *params).sum(), (x, *params))
    for got, expected in zip(grads, want, strict=True):
        assert_close(got, expected)


# --- models -----------------------------------------------------------------------------------


def mnist_ae(output: nn.Module) -> nn.Module:
    """784-128-64-12 and back, taking (N, 1, 28, 28) images and giving them back."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 12),
        nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 784),
        output,
        nn.Unflatten(1, (1, 28, 28)),
    )  # fmt: skip


class Tabular(nn.Module):
    """A tabular autoencoder: BatchNorm and Dropout in the encoder, which ends in ReLU, and in
    the decoder."""

    def __init__(self, features: int = 20, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(32, 16), nn.ReLU(), nn.BatchNorm1d(16),
            nn.Linear(16, code), nn.ReLU(),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(code, 16), nn.ReLU(), nn.AlphaDropout(0.1),
            nn.Linear(16, 32), nn.BatchNorm1d(32, affine=False), nn.ReLU(inplace=True),
            nn.Linear(32, features),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Viewed(nn.Module):
    """A model whose forward reshapes before its encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 64), nn.GELU(), nn.Linear(64, 8))
        self.decoder = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 784), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.view(-1, 784)))


def with_layer_norm() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.Tanh(),
        nn.Linear(8, 4),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    # name: (builder, input shape)
    "MNIST AE, sigmoid output": (lambda: mnist_ae(nn.Sigmoid()), (9, 1, 28, 28)),
    "MNIST AE, tanh output": (lambda: mnist_ae(nn.Tanh()), (3, 1, 28, 28)),
    "LeakyReLU MLP": (
        lambda: nn.Sequential(nn.Linear(12, 24), nn.LeakyReLU(0.1), nn.Linear(24, 3)),
        (7, 12),
    ),
    "ReLU6, ELU, Softplus MLP": (
        lambda: nn.Sequential(
            nn.Linear(12, 24),
            nn.ReLU6(),
            nn.Linear(24, 16),
            nn.ELU(),
            nn.Linear(16, 8),
            nn.Softplus(),
            nn.Linear(8, 3),
            nn.GELU(approximate="tanh"),
        ),
        (7, 12),
    ),
    "tabular AE with BatchNorm and Dropout": (Tabular, (11, 20)),
    "x.view(-1, 784) with GELU": (Viewed, (5, 28, 28)),
    "LayerNorm in the middle": (with_layer_norm, (6, 10)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODELS)
def test_models_match_eval_mode_pytorch(name: str, dtype: torch.dtype):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.train()(torch.randn(64, *shape[1:], dtype=dtype))
    model.eval()
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    keys = list(model.state_dict())
    printout = repr(model)

    model, report = accelerate(model)

    assert report.replaced
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert list(model.state_dict()) == keys
    assert repr(model) == printout
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert got.shape == want.shape
    assert_close(got, want)
    # With a gradient: the fused backward, or PyTorch's own where BatchNorm is folded.
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn_like(want)
    model(x1).backward(grad_out)
    reference(x2).backward(grad_out)
    assert_close(x1.grad, x2.grad)
    for got_param, want_param in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(got_param.grad, want_param.grad)


# --- BatchNorm --------------------------------------------------------------------------------

RELU = post_op("relu")


def test_batch_norm_positions():
    before, first, after, between, second = (
        nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.Linear(5, 3),
    )  # fmt: skip
    lowered = lower([before, first, after, nn.ReLU(), between, second])
    assert lowered is not None
    assert lowered.post_ops == (RELU, post_op("identity"))
    assert lowered.normalizations == (
        (("before", before), ("after", after)),
        (("before", between),),
    )
    # Where a normalization would apply after a post-op and no Linear follows, there is no chain.
    assert lower([first, nn.ReLU(), after]) is None
    assert lower([first, after]) is not None
    # Without running statistics a BatchNorm normalizes with the batch's: not foldable.
    assert lower([first, nn.BatchNorm1d(5, track_running_stats=False)]) is None
    assert lower([first, nn.ReLU(), after, nn.ReLU(), second]) is None


def test_folding_in_float64_matches_the_unfolded_computation():
    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((4, 3)), rng.standard_normal(4)
    before = Normalization(
        "before", rng.standard_normal(3), rng.random(3) + 0.1, 1e-5,
        rng.standard_normal(3), rng.standard_normal(3),
    )  # fmt: skip
    after = Normalization("after", rng.standard_normal(4), rng.random(4) + 0.1, 1e-3)
    layer = Layer(weight, None, RELU, (before, after))
    x = rng.standard_normal((5, 3))

    def normalize(norm: Normalization, x: np.ndarray) -> np.ndarray:
        y = (x - norm.mean) / np.sqrt(norm.var + norm.eps)
        return y if norm.weight is None else y * norm.weight + norm.bias

    folded_weight, folded_bias = layer.folded()
    np.testing.assert_allclose(
        x @ folded_weight.T + folded_bias, normalize(after, normalize(before, x) @ weight.T)
    )
    with pytest.raises(ValueError, match="before the Linear come first"):
        Layer(weight, bias, RELU, (after, before))
    ChainSpec((Layer(weight, bias, RELU, (after,)),), 1).check_shapes()
    misplaced = Normalization("after", before.mean, before.var, before.eps)
    spec = ChainSpec((Layer(weight, bias, RELU, (misplaced,)),), 1)
    with pytest.raises(ValueError, match=r"layer 0: after normalization: mean must have shape"):
        spec.native_arguments()


def tabular_eval() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Tabular()
    with torch.no_grad():
        model.train()(torch.randn(64, 20))
    model.eval()
    fused, _ = accelerate(copy.deepcopy(model))
    return model, fused


def test_batch_norm_refolds_after_its_statistics_change():
    plain, fused = tabular_eval()
    x = torch.randn(8, 20)

    def check() -> None:
        with torch.no_grad():
            assert_close(fused(x), plain(x))

    check()
    # Running statistics updated by a training-mode forward.
    for model in (plain, fused):
        torch.manual_seed(1)
        with torch.no_grad():
            out = model.train()(torch.randn(32, 20) * 3 + 1)
        model.eval()
    check()
    # load_state_dict, of another model's statistics and parameters.
    other = Tabular()
    with torch.no_grad():
        other.train()(torch.randn(32, 20) * 2)
    plain.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    check()
    # An optimizer step on the BatchNorm's affine parameters.
    for model in (plain, fused):
        optimizer = torch.optim.SGD(model.encoder[1].parameters(), lr=0.5)
        model.encoder[1].weight.grad = torch.ones(32)
        model.encoder[1].bias.grad = torch.ones(32)
        optimizer.step()
    check()
    assert out.shape == (32, 20)


@pytest.mark.parametrize(
    ("module", "refusal"),
    [
        (nn.Softplus(beta=-1.0), "beta must be positive"),
        (nn.Softplus(beta=1e-9), r"beta must be at least 2\^-24"),
        (nn.Hardtanh(0.0, 0.5), r"min_val \(0.5\) must be below max_val \(0.5\)"),
    ],
)
def test_activation_parameters_the_kernel_does_not_take_run_plain(module, refusal):
    """PyTorch takes them (a negative Softplus beta, Hardtanh's bounds set equal: its
    constructor refuses them, its forward does not): accelerate leaves the module plain, says
    why, and the model computes what PyTorch does."""
    if isinstance(module, nn.Hardtanh):
        module.min_val = 0.5
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 6), module, nn.Linear(6, 3))
    fused, report = accelerate(copy.deepcopy(plain))
    assert re.search(refusal, str(report)), str(report)
    x = torch.randn(5, 8)
    assert_close(fused(x), plain(x))


def test_batch_norm_settings_changed_after_the_first_call():
    """``eps`` and ``track_running_stats`` set on a module already folded: an attribute, no
    tensor's version moves, yet PyTorch's eval output changes (without running statistics it
    normalizes by the batch's)."""
    plain, fused = tabular_eval()
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert_close(fused(x), plain(x))
        for model in (plain, fused):
            model.encoder[1].eps = 0.5
        assert_close(fused(x), plain(x))
        for model in (plain, fused):
            model.decoder[4].track_running_stats = False
        assert_close(fused(x), plain(x))


def test_batch_norm_statistics_set_to_none_after_the_first_call():
    """Both statistics None: PyTorch normalizes by the batch's, and so does the model (plain);
    the mean alone: PyTorch's own RuntimeError. And a ``num_batches_tracked`` set to None (the
    cache's sign that a training-mode forward updated the statistics): that BatchNorm runs
    plain, so statistics updated through it alone are seen."""
    x = torch.randn(8, 20)
    for names in (("running_mean", "running_var"), ("running_mean",)):
        plain, fused = tabular_eval()
        with torch.no_grad():
            fused(x)  # packed
            for model in (plain, fused):
                for name in names:
                    setattr(model.encoder[1], name, None)
            if len(names) == 2:
                assert_close(fused(x), plain(x))
            else:
                with pytest.raises(RuntimeError, match="running_mean must be defined"):
                    fused(x)
    plain, fused = tabular_eval()
    for model in (plain, fused):
        model.encoder[1].num_batches_tracked = None
    batch = torch.randn(32, 32) * 2 + 1
    with torch.no_grad():
        assert_close(fused(x), plain(x))
        for model in (plain, fused):
            model.encoder[1].train()(batch)
            model.encoder[1].eval()
        assert_close(fused(x), plain(x))


def test_batch_norm_without_its_counter_buffer_runs_plain():
    """Eval-mode PyTorch does not read ``num_batches_tracked``; deleted, it is not there to
    count training-mode updates, so the BatchNorm is not folded."""
    plain, _ = tabular_eval()
    del plain.encoder[1].num_batches_tracked
    fused, _ = accelerate(copy.deepcopy(plain))
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert_close(fused(x), plain(x))


def test_zero_wide_layers_run_plain():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(42, 0), nn.ReLU(), nn.Linear(0, 16))
    fused, _ = accelerate(copy.deepcopy(plain))
    x = torch.randn(8, 42)
    assert_close(fused(x), plain(x))
    got = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
    want = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_batch_norm_trained_through_another_container_refolds():
    """Running statistics update with no version counter moving: the cache also keys on
    ``num_batches_tracked``, which a training-mode forward increments in place."""
    plain, _ = tabular_eval()
    encoder = FusedMLP.from_sequential(plain.encoder)
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert_close(encoder(x), plain.encoder(x))
        nn.Sequential(*plain.encoder).train()(torch.randn(32, 20) * 2 + 1)  # the same modules
        plain.encoder.eval()
        assert_close(encoder(x), plain.encoder(x))


@pytest.mark.parametrize("bias", [True, False])
def test_eval_mode_batch_norm_trains_fused_with_pytorchs_gradients(bias: bool):
    """With a gradient needed, the kernel runs the folded chain and autograd goes on through
    the fold to the Linear's and the BatchNorms' parameters."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.BatchNorm1d(6), nn.Linear(6, 5, bias=bias), nn.BatchNorm1d(5), nn.ReLU(),
        nn.BatchNorm1d(5, affine=False), nn.Linear(5, 3),
    ).double()  # fmt: skip
    with torch.no_grad():
        plain.train()(torch.randn(64, 6, dtype=torch.float64) * 3 + 1)
        for norm in (plain[0], plain[2]):
            norm.weight.uniform_(0.5, 2)
            norm.bias.normal_()
    plain.eval()
    fused = FusedMLP.from_sequential(copy.deepcopy(plain))
    x = torch.randn(9, 6, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fused(x1)
    assert "FusedMLPFunction" in type(got.grad_fn).__name__
    grad_out = torch.randn(9, 3, dtype=torch.float64)
    got.backward(grad_out)
    plain(x2).backward(grad_out)
    assert_close(x1.grad, x2.grad)
    for (name, got_param), want_param in zip(
        fused.named_parameters(), plain.parameters(), strict=True
    ):
        assert got_param.grad is not None, name
        assert_close(got_param.grad, want_param.grad)


def test_training_mode_runs_plain_pytorch():
    plain, fused = tabular_eval()
    plain.train()
    fused.train()
    x = torch.randn(8, 20, requires_grad=True)
    torch.manual_seed(5)
    want = plain(x)
    torch.manual_seed(5)
    got = fused(x)
    assert torch.equal(got, want)  # the same modules, the same dropout masks
    for model in (plain, fused):
        assert model.encoder[1].num_batches_tracked.item() == 2
    # Dropout with p == 0 is the identity in training mode too.
    chain = FusedMLP(nn.Linear(4, 3), nn.Dropout(0.0), nn.ReLU(), nn.Linear(3, 2)).train()
    assert chain.fused_layers() is not None
    plain_chain = nn.Sequential(*chain)
    with torch.no_grad():
        x = torch.randn(5, 4)
        assert_close(chain(x), plain_chain(x))


def test_batch_norm_needs_two_dimensional_input():
    """BatchNorm1d on (N, C, L) normalizes C, not the last dimension the Linear reads."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3)
    with torch.no_grad():
        norm.train()(torch.randn(16, 3) * 2 + 1)
    plain = nn.Sequential(norm, nn.Linear(3, 3), nn.ReLU()).eval()
    fused = FusedMLP.from_sequential(plain)
    with torch.no_grad():
        x = torch.randn(4, 3, 3)
        assert torch.equal(fused(x), plain(x))
        x = torch.randn(4, 3)
        assert_close(fused(x), plain(x))


def test_spec_keeps_batch_norm_unfolded_and_rebuilds_it():
    plain, _ = tabular_eval()
    lowered = lower(plain.encoder)
    assert lowered is not None
    spec = lowered.spec(lowered.tensors())
    norms = [layer.normalization for layer in spec.layers]
    assert [[n.position for n in layer] for layer in norms] == [["after"], [], ["before"]]
    np.testing.assert_array_equal(norms[0][0].mean, plain.encoder[1].running_mean.numpy())
    rebuilt = to_sequential(spec).eval()
    x = torch.randn(6, 20)
    with torch.no_grad():
        assert_close(rebuilt(x), plain.encoder.eval()(x))


# --- accelerate -------------------------------------------------------------------------------


def test_layer_norm_in_the_middle_splits_the_sequential():
    model = with_layer_norm()
    fused, report = accelerate(model)
    assert type(fused) is FusedMLP
    assert fused.fused_layers() is None
    assert fused.fused_runs() == [(0, 2), (3, 6)]
    assert str(report) == (
        "replaced 1 nn.Sequential with FusedMLP\n"
        "  (the model itself): [Linear 10->16, ReLU], LayerNorm, [Linear 16->8, Tanh, "
        "Linear 8->4]\n"
        "  ([...]: one fused call; other modules run as they are)\n"
        "not fused, in them: 1\n"
        "  2: not a module the kernels run"
    )


def test_sequentials_without_a_linear_are_left_alone():
    model = nn.Module()
    model.norms = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    model.convolutions = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten())
    model.batch_statistics = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    model.batch_statistics[1].track_running_stats = False
    model.batch_statistics[1].running_mean = None
    _, report = accelerate(model)
    assert dict(report.kept) == {
        "norms": "no Linear chain the kernels take (LayerNorm, ReLU)",
        "convolutions": "no Linear chain the kernels take (Conv1d, ReLU, Flatten)",
    }
    assert report.replaced == [("batch_statistics", "[Linear 4->4], BatchNorm1d")]
    assert report.unfused == [
        ("batch_statistics.1", "no running statistics: it normalizes each batch by its own")
    ]
    model.leading = nn.Sequential(nn.ReLU(), nn.Linear(4, 4))
    _, report = accelerate(model)
    assert report.unfused[-1] == ("leading.0", "not where a chain of Linear layers can take it")


def test_report_names_activations_with_their_settings_where_not_the_defaults():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4), nn.GELU(approximate="tanh"),
        nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.Softplus(),
    )  # fmt: skip
    _, report = accelerate(model)
    assert report.replaced == [
        (
            "",
            "Linear 4->4, GELU, Linear 4->4, GELU(approximate='tanh'), Linear 4->4, "
            "LeakyReLU(negative_slope=0.1), Linear 4->4, Softplus",
        )
    ]


def test_report_notes_training_mode():
    model = Tabular()  # in training mode
    _, report = accelerate(model)
    assert report.notes == [
        ("encoder", "BatchNorm1d, Dropout in training mode (fused in eval mode)"),
        ("decoder", "AlphaDropout, BatchNorm1d in training mode (fused in eval mode)"),
    ]
    assert "runs plain PyTorch for now\n  encoder: BatchNorm1d, Dropout" in str(report)
    assert report.replaced[0] == (
        "encoder",
        "Linear 20->32, BatchNorm1d(32), ReLU, Linear 32->16, ReLU, BatchNorm1d(16), "
        "Linear 16->4, ReLU",
    )


def test_flatten_and_unflatten_around_the_fused_call():
    torch.manual_seed(0)
    model = mnist_ae(nn.Sigmoid())
    fused, report = accelerate(copy.deepcopy(model))
    assert report.replaced[0][1].startswith("Flatten, Linear 784->128, ReLU")
    assert report.replaced[0][1].endswith("Sigmoid, Unflatten")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        got = fused(x)
        assert got.shape == (4, 1, 28, 28)
        assert_close(got, model(x))
        # What PyTorch refuses, it refuses here too.
        with pytest.raises((RuntimeError, IndexError)):
            fused(torch.rand(784))


def test_modules_changed_after_accelerate_are_seen():
    model, _ = accelerate(with_layer_norm())
    assert isinstance(model, FusedMLP)
    model[2] = nn.Identity()
    assert model.fused_layers() is not None
    assert model.fused_runs() == [(0, 6)]


def test_mlp_runs_and_pickles_a_spec_with_batch_norm():
    import pickle

    from fusedae import MLP, _reference

    plain, _ = tabular_eval()
    plain.double()
    lowered = lower(plain.encoder)
    assert lowered is not None
    spec = lowered.spec(lowered.tensors())
    mlp = MLP.from_spec(spec)
    x = np.random.default_rng(0).standard_normal((7, 20))
    folded = spec.folded()
    assert all(layer.normalization == () for layer in folded.layers)
    want, _ = _reference.forward(*folded.part("all"), x)
    np.testing.assert_allclose(mlp(x), want, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(mlp(x), plain.encoder(torch.from_numpy(x)), rtol=1e-10)
    clone = pickle.loads(pickle.dumps(mlp))
    assert [layer.normalization != () for layer in clone.spec.layers] == [True, False, True]
    np.testing.assert_array_equal(clone(x), mlp(x))


def test_folded_float32_is_as_close_to_exact_as_pytorch_is():
    """Folding in float64 and rounding once: the fused float32 output is about as far from the
    float64 result as eval-mode PyTorch's own float32 one."""
    torch.manual_seed(0)
    errors = []
    for _ in range(5):
        model = nn.Sequential(
            nn.BatchNorm1d(64), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 32),
        )  # fmt: skip
        with torch.no_grad():
            model.train()(torch.randn(256, 64) * torch.rand(64) * 10 + torch.randn(64) * 5)
            for norm in (model[0], model[2]):
                norm.weight.uniform_(0.5, 2)
                norm.bias.normal_()
        model.eval()
        x = torch.randn(512, 64) * 5
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(x.double())
            plain = model(x).double()
            fused = FusedMLP.from_sequential(model)(x).double()
        errors.append(((fused - exact).abs().max(), (plain - exact).abs().max()))
    fused_error, plain_error = torch.tensor(errors).mean(0)
    assert fused_error <= 1.5 * plain_error


def test_split_sequential_copies_pickles_and_runs_hooks():
    import pickle

    torch.manual_seed(0)
    model = FusedMLP(
        nn.Linear(10, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.ReLU(),
        nn.Linear(8, 4),
    )  # fmt: skip
    plain = nn.Sequential(*model)
    x = torch.randn(5, 10)
    with torch.no_grad():
        want = plain(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert clone.fused_runs() == [(0, 2), (3, 6)]
            assert_close(clone(x), want)
        seen = []
        model[3].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        assert_close(model(x), want)
        assert seen == [(5, 8)]  # the run with a hooked module ran module by module
