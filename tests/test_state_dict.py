"""A state_dict and a layers text (the CLI's ``--layers``) as a ``ChainSpec``: the grammar, which
module each item takes, where BatchNorms fold, and errors that name the item at fault."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from _seed import AE, AENetwork
from fusedae._ops import IDENTITY, OPS, RELU, PostOp
from fusedae.state_dict import from_state_dict, parse_layers, state_modules
from fusedae.torch.saving import chain_spec


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in module.state_dict().items()}


def test_parse_layers_grammar() -> None:
    items = parse_layers(
        " linear(784, 256) ,batchnorm(eps=1e-3), leaky_relu(0.2),linear,hardtanh(min_val=0,"
        "max_val=6),relu(),linear , elu"
    )
    assert [item.kind for item in items] == [
        "linear",
        "batchnorm",
        "leaky_relu",
        "linear",
        "hardtanh",
        "relu",
        "linear",
        "elu",
    ]
    assert items[0].arguments == {"in_features": 784, "out_features": 256}
    assert items[1].arguments == {"eps": 1e-3}
    assert items[2].post_op == PostOp("leaky_relu", (0.2,))
    assert items[4].post_op == PostOp("hardtanh", (0.0, 6.0))
    assert items[5].post_op == RELU
    assert items[7].post_op == PostOp("elu", (1.0,))  # PyTorch's default
    assert str(items[2]) == "--layers item 3 (leaky_relu(0.2))"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linear,swish", r"item 2 \(swish\): unknown name 'swish'; items are linear, batchnorm,"),
        ("linear,leaky_relu(0.1,2)", r"item 2 .*: takes at most 1 arguments \(negative_slope\)"),
        ("linear,leaky_relu(slope=0.1)", "no argument 'slope'; it takes negative_slope"),
        ("linear,hardtanh(0,min_val=1)", "min_val given twice"),
        ("linear,relu(0)", r"item 2 \(relu\(0\)\): takes no arguments"),
        ("linear,elu(one)", "alpha must be a number, got 'one'"),
        ("linear,relu(", r"unbalanced '\('"),
        ("linear),relu", r"unbalanced '\)'"),
        ("linear,,relu", r"item 2 \(\): expected a name"),
        ("linear,2relu", r"item 2 \(2relu\): expected a name"),
        ("linear,dropout(2)", r"item 2 \(dropout\(2\)\): p must be between 0 and 1, got 2.0"),
        ("linear,dropout(p=-0.5)", "p must be between 0 and 1, got -0.5"),
    ],
)
def test_parse_layers_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layers(text)


def test_state_modules_in_stored_order() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2, False))
    modules = state_modules(numpy_state(model))
    assert [(m.path, m.kind, m.features) for m in modules] == [
        ("0", "linear", (6, 5)),
        ("1", "batchnorm", (5, 5)),
        ("3", "linear", (5, 2)),
    ]
    assert [str(m) for m in modules] == [
        "0 (Linear 6 -> 5)",
        "1 (BatchNorm1d 5)",
        "3 (Linear 5 -> 2)",
    ]


def test_a_reordered_state_dict_is_refused() -> None:
    """Keys sorted (as a merged checkpoint or a safetensors file may hold them) put layer 10
    before layer 2: a chain of equal widths passed every shape check and ran scrambled."""
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(12)))
    state = numpy_state(model)
    with pytest.raises(ValueError, match=r"numbered 0, 1, 10, 11, 2, 3, ... at the top level"):
        state_modules(dict(sorted(state.items())))
    # Numbered names in another order, or not a Sequential's: the order they were registered.
    dicts = nn.ModuleDict({"64": nn.Linear(8, 8), "32": nn.Linear(8, 8), "²": nn.Linear(8, 8)})
    assert [module.path for module in state_modules(numpy_state(dicts))] == ["64", "32", "²"]
    nested = {
        f"{part}.{key}": value for part in ("encoder", "decoder") for key, value in state.items()
    }
    assert len(state_modules(nested)) == 24  # each parent's children in order


def _asymmetric_ae() -> nn.Module:
    """Encoder 8-4-4, decoder 4-8: the default guess of the boundary (the first narrowest
    layer) is one layer short of it."""
    torch.manual_seed(0)
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4))
    model.decoder = nn.Sequential(nn.Linear(4, 8))
    return model


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "model.net."])
def test_the_encoder_under_a_prefix_all_keys_share(prefix: str) -> None:
    """DataParallel's ``module.``, torch.compile's ``_orig_mod.`` or a wrapper's attribute
    before ``encoder``/``decoder``: the encoder is still theirs (it fell back to the guess, 8-4,
    and `encode` gave codes 0.95 off with status 0)."""
    state = {prefix + key: value for key, value in numpy_state(_asymmetric_ae()).items()}
    assert from_state_dict(state, "linear,relu,linear,linear").encoder_layers == 2


@pytest.mark.parametrize("prefix", ["", "module."])
def test_two_blocks_of_a_sequential_are_encoder_and_decoder(prefix: str) -> None:
    """``nn.Sequential(encoder, decoder)``'s state_dict (modules under ``0.`` then ``1.``) ends
    the encoder where ``save`` and a pickled model do: after the first block. An autoencoder
    whose output is wider than its input (a decoder giving a mean and a log-variance) ran all its
    layers as the encoder before, and the symmetric one below was cut at its narrowest layer,
    one layer short of its block."""
    torch.manual_seed(0)
    gaussian = nn.Sequential(
        nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 16)),
    )
    asymmetric = _asymmetric_ae()
    blocks = nn.Sequential(asymmetric.encoder, asymmetric.decoder)
    for model, layers in ((gaussian, "linear,relu,linear,linear,relu,linear"), (blocks, None)):
        state = {prefix + key: value for key, value in numpy_state(model).items()}
        spec = from_state_dict(state, layers or "linear,relu,linear,linear")
        assert spec.encoder_layers == 2 == chain_spec(model).encoder_layers
    # Not two Sequentials: the narrowest layer, as before. Blocks that are single Linears; a
    # third module beside the blocks; blocks of named attributes (a class of its own, which
    # `save` refuses).
    flat = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
    assert from_state_dict(numpy_state(flat), "linear,linear").encoder_layers == 1
    third = nn.Sequential(blocks[0], blocks[1], nn.BatchNorm1d(8))
    spec = from_state_dict(numpy_state(third), "linear,relu,linear,linear,batchnorm")
    assert spec.encoder_layers == 1
    named = nn.Sequential(nn.Module(), nn.Module())
    named[0].linear = nn.Linear(8, 2)
    named[1].first, named[1].last = nn.Linear(2, 4), nn.Linear(4, 16)
    assert from_state_dict(numpy_state(named), "linear,linear,linear").encoder_layers == 3
    # A BatchNorm first in the decoder's block, after the encoder's last Linear, folds into that
    # Linear's outputs: no layer boundary is the encoder's, as for halves named encoder and
    # decoder.
    folded = nn.Sequential(
        nn.Sequential(nn.Linear(8, 4)), nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 8))
    )
    with pytest.raises(ValueError, match=r"1\.0 is folded into .* across the boundary"):
        from_state_dict(numpy_state(folded), "linear,batchnorm,linear")


def test_a_batchnorm_outside_the_prefixed_halves_is_in_neither() -> None:
    """A BatchNorm at the top level, folded into the last decoder layer of halves under a
    prefix: the boundary error, as without the prefix (an IndexError before)."""
    model = nn.Module()
    model.body = _asymmetric_ae()
    model.final_bn = nn.BatchNorm1d(8)
    with pytest.raises(ValueError, match=r"final_bn is folded into .* across the boundary"):
        from_state_dict(numpy_state(model), "linear,relu,linear,linear,batchnorm")


def test_a_decoder_before_its_encoder_is_refused() -> None:
    """Keys sorted as text put ``decoder`` first: the decoder ran first, status 0."""
    state = numpy_state(_asymmetric_ae())
    for prefix in ("", "module."):
        ordered = {prefix + key: state[key] for key in sorted(state)}
        with pytest.raises(ValueError, match="decoder comes before its encoder"):
            from_state_dict(ordered, "linear,linear,relu,linear")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"conv.weight": np.ones((3, 3, 3))}, r"module conv holds weight \(3, 3, 3\): neither"),
        ({"norm.weight": np.ones(3), "norm.bias": np.ones(3)}, "module norm holds weight"),
        ({"emb.weight": np.ones((3, 4), np.int64)}, "module emb holds"),
        ({}, "holds no tensors"),
    ],
)
def test_state_modules_refuses_other_modules(state: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        state_modules(state)


def test_seed_layouts_with_their_layers() -> None:
    seed = numpy_state(AE(64, 2))
    spec = from_state_dict(seed, "linear,relu,linear,linear,relu,linear")
    assert spec.post_ops == (RELU, IDENTITY, RELU, IDENTITY)
    assert spec.encoder_layers == 2  # the modules named encoder, then decoder
    single = numpy_state(AENetwork(64, 2))
    spec = from_state_dict(single, "linear,relu,linear,identity,linear,relu,linear")
    assert spec.encoder_layers == 2  # the narrowest layer of a chain as wide out as in
    for layer, key in zip(spec.layers, ("0", "2", "3", "5"), strict=True):
        assert layer.weight is single[f"network.{key}.weight"]


def test_batchnorm_positions_and_eps() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(6, eps=1e-3),  # first: the first Linear's input
        nn.Linear(6, 5),
        nn.BatchNorm1d(5, affine=False),  # right after a Linear: its output
        nn.Tanh(),
        nn.BatchNorm1d(5),  # after an activation: the next Linear's input
        nn.Linear(5, 3),
    )
    state = numpy_state(model)
    spec = from_state_dict(state, "batchnorm(6,eps=0.001),linear,batchnorm,tanh,batchnorm,linear")
    first, second = spec.layers
    assert [norm.position for norm in first.normalization] == ["before", "after"]
    assert [norm.position for norm in second.normalization] == ["before"]
    assert first.normalization[0].eps == 1e-3
    assert first.normalization[1].eps == 1e-5
    assert first.normalization[1].weight is None
    assert first.normalization[0].mean is state["0.running_mean"]
    assert second.normalization[0].var is state["4.running_var"]
    assert first.post_op == PostOp("tanh")


@pytest.mark.parametrize("eps", ["nan", "inf", "-1"])
def test_an_eps_that_is_not_a_finite_number_at_least_zero_is_refused(eps: str) -> None:
    state = numpy_state(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5)))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        from_state_dict(state, f"batchnorm(eps={eps}),linear")


def test_same_spec_as_lowering_the_module() -> None:
    model = nn.Sequential(
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.LeakyReLU(0.2),
        nn.Linear(6, 4),
        nn.Hardtanh(0.0, 6.0),
        nn.BatchNorm1d(4),
        nn.Linear(4, 3),
        nn.Softplus(2.0, 10.0),
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    layers = "linear,batchnorm,leaky_relu(0.2),linear,hardtanh(0,6),batchnorm,linear,softplus(2,10)"
    from_text = from_state_dict(numpy_state(model), layers)
    lowered = chain_spec(model)
    assert from_text.post_ops == lowered.post_ops
    assert from_text.encoder_layers == lowered.encoder_layers
    for mine, theirs in zip(from_text.layers, lowered.layers, strict=True):
        np.testing.assert_array_equal(mine.weight, theirs.weight)
        assert [n.position for n in mine.normalization] == [
            n.position for n in theirs.normalization
        ]
        for norm, want in zip(mine.normalization, theirs.normalization, strict=True):
            np.testing.assert_array_equal(norm.mean, want.mean)
            assert norm.eps == want.eps


TWO_LAYERS = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ("linear,relu,linear", r"names 2 modules with tensors .* but the state_dict holds 3"),
        (
            "linear,linear,relu,linear",
            r"item 2 \(linear\) is a linear, but the module it takes is 1 \(BatchNorm1d 5\)",
        ),
        (
            "linear(6,4),batchnorm,relu,linear",
            r"item 1 \(linear\(6,4\)\) gives out_features=4, but the module it takes is "
            r"0 \(Linear 6 -> 5\)",
        ),
        ("linear,batchnorm(4),relu,linear", "gives num_features=4, but the module it takes is"),
        ("relu,linear,batchnorm,linear", r"item 1 \(relu\) comes before any linear"),
        (
            "linear,batchnorm,relu,sigmoid,linear",
            r"item 4 \(sigmoid\) is a second activation after --layers item 1 \(linear\) \(the "
            r"first is relu\)",
        ),
    ],
)
def test_layers_that_do_not_fit(layers: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_state_dict(numpy_state(TWO_LAYERS), layers)


def test_shapes_are_checked_between_modules() -> None:
    state = numpy_state(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(
        ValueError,
        match=r"item 3 \(linear\) is 2 \(Linear 4 -> 2\), which takes 4 features, but the layer "
        r"before it, --layers item 1 \(linear\), is 0 \(Linear 6 -> 5\), which gives 5",
    ):
        from_state_dict(state, "linear,relu,linear")
    state = numpy_state(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match="no Linear to fold it into"):
        from_state_dict(state, "linear,relu,batchnorm")
    state = numpy_state(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(4), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match=r"is 1 \(BatchNorm1d 4\), but it normalizes 5 features"):
        from_state_dict(state, "linear,batchnorm,linear")


def test_activation_after_a_normalized_activation_is_refused() -> None:
    state = numpy_state(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match=r"item 4 \(relu\) follows --layers item 3 \(batchnorm\)"):
        from_state_dict(state, "linear,relu,batchnorm,relu,linear")


def test_every_op_by_name() -> None:
    state = numpy_state(nn.Sequential(nn.Linear(4, 4)))
    for name in OPS:
        assert from_state_dict(state, f"linear,{name}").post_ops[0].name == name


def test_a_batchnorm_across_the_encoder_boundary_is_refused() -> None:
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.BatchNorm1d(3))
    model.decoder = nn.Sequential(nn.Linear(3, 6))
    with pytest.raises(
        ValueError,
        match=r"encoder.2 is folded into --layers item 4 \(linear\), decoder.0 \(Linear 3 -> 6\), "
        "across the boundary between encoder and decoder",
    ):
        from_state_dict(numpy_state(model), "linear,relu,batchnorm,linear")
    # Right after the Linear (no activation between), it folds into the encoder's layer.
    spec = from_state_dict(numpy_state(model), "linear,batchnorm,linear")
    assert spec.encoder_layers == 1
