"""``fusedae.torch.accelerate``: chains become FusedMLP in place, holding the same parameters,
with outputs, gradients and optimizer steps unchanged against an untouched copy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fusedae.torch as ft
from _seed import AE, AENetwork
from fusedae.torch import FusedMLP, accelerate


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These matrices are tiny; PyTorch's OpenMP workers, spinning beside fusedae's own threads,
    only slow the tests down (by 10x to 100x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Asymmetric(nn.Module):
    """A deep encoder, a one-layer decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(100, 64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Identity(),
            nn.Linear(32, 8),
        )
        self.decoder = nn.Sequential(nn.Linear(8, 100, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Mixed(nn.Module):
    """Chains nested in containers that are not chains, beside modules that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 20)),
            nn.Tanh(),
            nn.ModuleList([nn.Sequential(nn.Linear(20, 10), nn.ReLU())]),
        )
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks[1](self.blocks[0](x))
        return self.head(self.blocks[2][0](hidden))


def root_sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 12))


def encoder_decoder() -> nn.Sequential:
    """The seed's AE written as ``nn.Sequential(encoder, decoder)``."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 42), nn.ReLU(), nn.Linear(42, 2)),
        nn.Sequential(nn.Linear(2, 42), nn.ReLU(), nn.Linear(42, 64)),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    # name: (builder, input shape, names of the Sequentials replaced)
    "seed AE": (lambda: AE(64, 2), (33, 64), ["encoder", "decoder"]),
    "seed single Sequential": (lambda: AENetwork(64, 2), (33, 64), ["network"]),
    "root Sequential": (root_sequential, (7, 12), [""]),
    "deep asymmetric, 3-D input": (Asymmetric, (3, 11, 100), ["encoder", "decoder"]),
    "nested": (Mixed, (9, 20), ["blocks.0", "blocks.2.0"]),
    "Sequential of Sequentials": (encoder_decoder, (33, 64), ["", "0", "1"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MODELS)
def test_outputs_gradients_and_optimizer_unchanged(name: str, dtype: torch.dtype) -> None:
    build, shape, replaced = MODELS[name]
    torch.manual_seed(0)
    model = build().to(dtype)
    reference = copy.deepcopy(model)
    parameters = list(model.parameters())
    keys = list(model.state_dict())
    printout = repr(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # built before
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)

    model, report = accelerate(model)

    assert [name for name, _ in report.replaced] == replaced
    fused = [module for module in model.modules() if isinstance(module, FusedMLP)]
    assert len(fused) == len(replaced)
    assert all(a is b for a, b in zip(model.parameters(), parameters, strict=True))
    assert list(model.state_dict()) == keys
    assert repr(model) == printout
    # float32 rounding differs between the kernels and PyTorch, and optimizer steps amplify it:
    # several steps are compared in float64 only.
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    for _ in range(3 if dtype == torch.float64 else 1):
        x = torch.randn(shape, dtype=dtype)
        weights = torch.randn_like(reference(x))
        results = []
        for module, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            leaf = x.clone().requires_grad_()
            out = module(leaf)
            (out * weights).sum().backward()
            opt.step()
            results.append((out.detach(), leaf.grad, [p.grad for p in module.parameters()]))
        (out, grad_x, grads), (out_ref, grad_x_ref, grads_ref) = results
        torch.testing.assert_close(out, out_ref, **tolerance)
        torch.testing.assert_close(grad_x, grad_x_ref, **tolerance)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, **tolerance)
    for param, param_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, param_ref, **tolerance)


def test_seed_ae_in_place_and_report() -> None:
    model = AE(64, 2)
    model.eval()
    linear = model.encoder[0]
    same, report = accelerate(model)
    assert same is model
    assert type(model.encoder) is FusedMLP
    assert type(model.decoder) is FusedMLP
    assert model.encoder[0] is linear
    assert not model.encoder.training
    assert str(report) == (
        "replaced 2 nn.Sequential with FusedMLP\n"
        "  encoder: Linear 64->42, ReLU, Linear 42->2\n"
        "  decoder: Linear 2->42, ReLU, Linear 42->64"
    )


def test_root_sequential_is_replaced_by_a_new_module() -> None:
    model = root_sequential()
    children = list(model)
    fused, report = accelerate(model)
    assert type(fused) is FusedMLP
    assert list(fused) == children
    assert report.replaced == [("", "Linear 12->5, ReLU, Linear 5->2, Linear 2->12")]
    assert "(the model itself): Linear 12->5" in str(report)


def test_sequential_of_sequentials_is_one_fused_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nn.Sequential(encoder, decoder)`` runs as one chain (one kernel call, one autograd
    node); each half called alone runs as its own; a hook on a half, or a half's child
    replaced, is seen on the next call."""
    torch.manual_seed(0)
    reference = encoder_decoder()
    model, report = accelerate(copy.deepcopy(reference))
    assert report.replaced[0] == (
        "",
        "Linear 64->42, ReLU, Linear 42->2, Linear 2->42, ReLU, Linear 42->64",
    )
    assert not report.unfused
    assert model.fused_runs() == [(0, 2)]
    assert [layer.out_features for layer, _ in model.fused_layers()] == [42, 2, 42, 64]

    calls: list[int] = []
    forward = ft.cache.ChainCache.forward

    def counted(self: ft.cache.ChainCache, x: torch.Tensor) -> torch.Tensor | None:
        calls.append(self.in_features)
        return forward(self, x)

    monkeypatch.setattr(ft.cache.ChainCache, "forward", counted)
    x = torch.randn(5, 64, requires_grad=True)
    out = model(x)
    assert calls == [64]
    assert "FusedMLPFunction" in type(out.grad_fn).__name__
    # One node, straight from x (two chains would chain two).
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    for param, param_ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, param_ref.grad, rtol=1e-4, atol=1e-5)

    calls.clear()
    torch.testing.assert_close(model[0](x), reference[0](x), rtol=1e-4, atol=1e-5)
    assert calls == [64]

    seen: list[torch.Tensor] = []
    handle = model[1].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)

    reference[1][2] = nn.Linear(42, 64)
    model[1][2] = copy.deepcopy(reference[1][2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
        model[1][1] = nn.LayerNorm(42)  # no longer one chain: each half as it can
        reference[1][1] = nn.LayerNorm(42)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert model.fused_layers() is None


def test_idempotent() -> None:
    model, _ = accelerate(AE(16, 3))
    encoder, decoder = model.encoder, model.decoder
    again, report = accelerate(model)
    assert again is model
    assert model.encoder is encoder
    assert model.decoder is decoder
    assert report.replaced == []
    assert report.already_fused == ["encoder", "decoder"]
    root, _ = accelerate(root_sequential())
    assert accelerate(root)[0] is root


def test_fusedae_ae_needs_nothing() -> None:
    model = ft.AE(16, 3)
    _, report = accelerate(model)
    assert report.replaced == []
    assert report.already_fused == ["encoder", "decoder"]


def test_other_modules_left_alone() -> None:
    class MyLinear(nn.Linear):
        pass

    class MySequential(nn.Sequential):
        pass

    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    hooked[0].register_forward_hook(lambda module, args, out: None)
    model = nn.Module()
    model.no_linear = nn.Sequential(nn.Softsign(), nn.LayerNorm(4))
    model.subclass_layer = nn.Sequential(MyLinear(4, 4), nn.ReLU())
    model.subclass = MySequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model.hooked = hooked
    model.empty = nn.Sequential()
    before = dict(model.named_children())

    _, report = accelerate(model)

    assert dict(model.named_children()) == before
    assert all(type(child) is not FusedMLP for child in model.modules())
    assert report.replaced == []
    reasons = dict(report.kept)
    assert reasons["no_linear"] == "no Linear chain the kernels take (Softsign, LayerNorm)"
    assert reasons["subclass_layer"] == "no Linear chain the kernels take (MyLinear, ReLU)"
    assert reasons["hooked"] == "has hooks, which the fused call would skip"
    assert set(reasons) == {"no_linear", "subclass_layer", "hooked", "empty"}
    assert "kept 4 nn.Sequential unchanged" in str(report)


def test_a_sequential_whose_calls_run_more_than_its_forward_is_kept() -> None:
    """Compiled in place, or with a ``forward`` assigned: a FusedMLP took that over and kept
    running the old Sequential (a child replaced afterwards was never run, a hook never fired),
    while the report said it was fused. ``from_sequential`` refuses them, and hooks of its own
    (it dropped them)."""
    compiled = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    compiled.compile(backend="eager")
    assigned = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    assigned.forward = lambda x: nn.Sequential.forward(assigned, x)
    hooked = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    hooked.register_forward_hook(lambda module, args, out: out * 0)
    model = nn.Module()
    model.compiled, model.assigned = compiled, assigned
    _, report = accelerate(model)
    reasons = dict(report.kept)
    assert reasons["compiled"].startswith("was compiled in place (.compile())")
    assert reasons["assigned"].startswith("has a forward assigned to it")
    assert type(model.compiled) is nn.Sequential
    assert type(model.assigned) is nn.Sequential
    model.compiled[2] = nn.Linear(32, 3)
    assert model.compiled(torch.randn(8, 16)).shape == (8, 3)
    # Inside an outer Sequential: not reported as part of one fused chain (it runs plain).
    inner = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    inner.forward = lambda x: nn.Sequential.forward(inner, x) * 2
    plain = nn.Sequential(inner, nn.Sequential(nn.Linear(8, 16)))
    x = torch.randn(3, 16)
    want = plain(x)
    outer, report = accelerate(plain)
    assert dict(report.kept)["0"].startswith("has a forward assigned to it")
    assert [name for name, _ in report.replaced] == ["1"]
    torch.testing.assert_close(outer(x), want)
    for sequential in (compiled, assigned, hooked):
        with pytest.raises(ValueError, match=r"FusedMLP\.from_sequential: the Sequential "):
            FusedMLP.from_sequential(sequential)


def test_a_none_child_is_left_as_it_is() -> None:
    """``nn.Sequential`` holds None (and fails when called): accelerate and FusedMLP raised a
    TypeError from ``vars(None)``."""
    model = nn.Module()
    model.layers = nn.Sequential(nn.Linear(4, 4), None, nn.Linear(4, 4))
    _, report = accelerate(model)
    assert ("layers.1", "None, not a module") in report.unfused
    fused = FusedMLP(nn.Linear(4, 4), None)
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        fused(torch.randn(2, 4))


def test_shared_sequential_becomes_one_fused_module() -> None:
    shared = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 6))
    model = nn.Module()
    model.first = shared
    model.second = nn.Sequential(shared, nn.Softsign())
    _, report = accelerate(model)
    assert type(model.first) is FusedMLP
    assert model.second[0] is model.first
    assert [name for name, _ in report.replaced] == ["first"]
    assert [name for name, _ in report.kept] == ["second"]


def test_children_keep_their_own_training_modes() -> None:
    """A frozen BatchNorm (eval) in a model that trains, and MC dropout (a Dropout training in
    an eval model): ``accelerate`` set every child to the Sequential's mode, so the BatchNorm
    normalized with batch statistics and overwrote its running ones, and the Dropout stopped."""
    torch.manual_seed(0)
    frozen = nn.BatchNorm1d(16)
    frozen.running_mean.uniform_(-1, 1)
    frozen.running_var.uniform_(0.2, 3)
    model = nn.Sequential(nn.Linear(8, 16), frozen, nn.ReLU(), nn.Linear(16, 3))
    model[1].eval()
    plain = copy.deepcopy(model)
    fused, _ = accelerate(model)
    assert fused.training
    assert not fused[1].training
    x = torch.randn(64, 8)
    for module in (plain, fused):
        module(x).square().sum().backward()
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
    for ours, theirs in zip(fused.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)

    sampled = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    sampled.eval()
    sampled[1].train()
    sampled, _ = accelerate(sampled)
    assert not sampled.training
    assert sampled[1].training
    with torch.no_grad():
        assert not torch.equal(sampled(x), sampled(x))


def test_what_the_sequential_itself_holds_goes_with_it() -> None:
    """Its own buffers and parameters (in the state_dict), attributes a parent's forward
    reads, and state-dict hooks: ``accelerate`` kept only the children."""

    class Centered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            self.encoder.register_buffer("center", torch.full((4,), 0.5))
            self.encoder.scale = nn.Parameter(torch.tensor(2.0))
            self.encoder.tag = "encoder-v1"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x - self.encoder.center) * self.encoder.scale

    torch.manual_seed(1)
    model = Centered()
    loaded: list[str] = []
    model.encoder._register_load_state_dict_pre_hook(lambda *args: loaded.append("pre"))
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    accelerate(model)
    assert type(model.encoder) is FusedMLP
    assert list(model.state_dict()) == keys
    assert model.encoder.tag == "encoder-v1"
    assert len(list(model.parameters())) == len(list(plain.parameters()))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), plain(x))
    model.load_state_dict(plain.state_dict())
    assert loaded == ["pre"]
    # References held outside the tree still see the old Sequential, whose later buffers stay
    # its own (the parameter and buffer dicts are copies, of the same tensors).
    old = plain.encoder
    replaced, _ = accelerate(old)
    old.register_buffer("later", torch.zeros(1))
    assert "later" not in replaced.state_dict()
    assert replaced.center is old.center
