"""The PyTorch front end against plain PyTorch and the seed's own class."""

from __future__ import annotations

import copy
import inspect
import itertools
import os
import re
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import fusedae
from _address_space import run_limited
from _seed import AE as SeedAE
from _tensors import relative_error
from _threads import run_at_once
from fusedae._ops import post_op
from fusedae.torch import (
    AE,
    FusedMLP,
    FusedMLPFunction,
    accelerate,
    cache,
    invalidate,
    pack_chain,
    share_torch_threads,
)
from fusedae.torch.cache import ChainCache
from fusedae.torch.lower import lower, post_op_module

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
FORCED_ISA = os.environ.get("FUSEDAE_ISA")


@pytest.fixture(autouse=True)
def _fresh_seed_and_one_torch_thread():
    # PyTorch's OpenMP threads beside fusedae's on a 2-core machine slow tiny ops 10-100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    yield
    torch.set_num_threads(threads)


def away_from_relu_kinks(model: nn.Module, rows: int, x: torch.Tensor, margin=1e-4) -> torch.Tensor:
    """``rows`` rows of ``x`` at which no ReLU of ``model`` gets an input within ``margin`` of 0
    (relative to that layer's largest, in float64). The gradient follows the forward's own
    rounding: where a ReLU's input is within rounding of 0, the fused kernel and PyTorch may land
    on opposite sides, each gradient right for its forward, differing by that row's whole
    contribution (in about 1% of float32 batches of 1000 rows here)."""
    keep = torch.ones(x.shape[0], dtype=torch.bool)

    def check(_module: nn.Module, inputs: tuple[torch.Tensor], _output: torch.Tensor) -> None:
        pre = inputs[0].abs()
        if pre.numel():
            keep.logical_and_((pre >= margin * pre.max()).all(1))

    model64 = copy.deepcopy(model).double()
    relus = [m for m in model64.modules() if isinstance(m, nn.ReLU)]
    hooks = [relu.register_forward_hook(check) for relu in relus]
    with torch.no_grad():
        model64(x.double())
    for hook in hooks:
        hook.remove()
    kept = x[keep]
    assert kept.shape[0] >= rows, "too few rows away from the kinks: draw more"
    return kept[:rows].contiguous()


def seed_and_fused(x_dim=784, z_dim=16, h_dim=42, dtype=torch.float32):
    seed = SeedAE(x_dim, z_dim, h_dim).to(dtype)
    fused = AE(x_dim, z_dim, h_dim).to(dtype)
    fused.load_state_dict(seed.state_dict())
    return seed, fused


def test_ae_has_the_seed_constructor_keys_and_printout():
    seed, fused = seed_and_fused(30, 2, 7)
    assert list(fused.state_dict()) == list(seed.state_dict())
    assert next(iter(fused.state_dict())) == "encoder.0.weight"
    assert repr(fused) == repr(seed)
    assert isinstance(fused.encoder, nn.Sequential)
    assert AE(5, 3).encoder[0].out_features == 42  # h_dim defaults to 42


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [0, 1, 2, 7, 64, 1000])
def test_seed_state_dict_gives_the_same_outputs_and_gradients(dtype, batch):
    seed, fused = seed_and_fused(dtype=dtype)
    x = away_from_relu_kinks(seed, batch, torch.randn(2 * batch, 784, dtype=dtype))
    with torch.no_grad():
        assert relative_error(fused(x), seed(x)) <= TOLERANCE[dtype]
        assert relative_error(fused.encoder(x), seed.encoder(x)) <= TOLERANCE[dtype]
    x_seed, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(batch, 784, dtype=dtype)
    (seed(x_seed) * grad_out).sum().backward()
    out = fused(x_fused)
    assert "FusedMLPFunction" in type(out.grad_fn).__name__
    (out * grad_out).sum().backward()
    assert relative_error(x_fused.grad, x_seed.grad) <= TOLERANCE[dtype]
    for (name, p_seed), p_fused in zip(seed.named_parameters(), fused.parameters(), strict=True):
        assert relative_error(p_fused.grad, p_seed.grad) <= TOLERANCE[dtype], name


def test_ae_forward_on_cpu_is_one_fused_call(monkeypatch):
    seed, fused = seed_and_fused()
    calls = []
    real_pack = ChainCache.pack

    def counting_pack(state, dtype):
        chain = real_pack(state, dtype)
        calls.append((chain.in_features, chain.out_features))
        return chain

    monkeypatch.setattr(ChainCache, "pack", counting_pack)
    x = torch.randn(5, 784)
    with torch.inference_mode():
        y = fused(x)
    assert calls == [(784, 784)]
    assert relative_error(y, seed(x)) <= 1e-5


@pytest.mark.parametrize("shape", [(784,), (3, 784), (2, 3, 784), (0, 784), (4, 0, 784), (1, 784)])
def test_input_of_any_leading_shape(shape):
    seed, fused = seed_and_fused()
    x = torch.randn(shape)
    with torch.inference_mode():
        got, want = fused.encoder(x), seed.encoder(x)
        assert got.shape == want.shape == (*shape[:-1], 16)
        assert relative_error(got, want) <= 1e-5
        assert fused(x).shape == shape


def test_non_contiguous_and_expanded_input():
    seed, fused = seed_and_fused()
    base = torch.randn(10, 1568)
    for x in (base[:, ::2], base[::2, :784], base.t()[:784].t(), torch.randn(784).expand(6, 784)):
        with torch.no_grad():
            assert relative_error(fused(x), seed(x)) <= 1e-5
    # Through autograd too: the fused forward reads a strided input that requires grad.
    fused_base, seed_base = base.clone().requires_grad_(), base.clone().requires_grad_()
    fused(fused_base[:, ::2]).sum().backward()
    seed(seed_base[:, ::2]).sum().backward()
    assert relative_error(fused_base.grad, seed_base.grad) <= 1e-5


def test_input_with_the_negative_bit_set():
    """A lazily negated view (`conj().imag` of a complex tensor) holds the values un-negated:
    the fused call must read what the tensor means, not what its memory holds."""
    seed, fused = seed_and_fused()
    strided = torch.randn(3, 784, dtype=torch.complex64).conj().imag
    contiguous = torch._neg_view(torch.randn(3, 784))
    for x in (strided, contiguous, contiguous[:1]):
        assert x.is_neg()
        with torch.inference_mode():
            assert relative_error(fused(x), seed(x)) <= 1e-5
            assert relative_error(fused.encoder(x), seed.encoder(x)) <= 1e-5


def test_no_grad_and_inference_mode_bypass_autograd():
    _, fused = seed_and_fused()
    x = torch.randn(3, 784)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = fused(x)
        assert y.grad_fn is None
        assert not y.requires_grad
    y = fused(x)
    assert y.requires_grad


class TestNeverStale:
    """The packed weights follow every change of the parameters."""

    def check(self, fused: nn.Module, plain: nn.Module, dtype=torch.float32):
        x = torch.randn(4, plain.encoder[0].in_features, dtype=dtype)
        with torch.inference_mode():
            assert relative_error(fused(x), plain(x)) <= TOLERANCE[dtype]
            assert relative_error(fused.encoder(x), plain.encoder(x)) <= TOLERANCE[dtype]

    @staticmethod
    def check_outputs_and_gradients(fused: nn.Module, plain: nn.Module, x: torch.Tensor) -> None:
        with torch.no_grad():
            assert relative_error(fused(x), plain(x)) <= 1e-5
        got = torch.autograd.grad(fused(x).sum(), list(fused.parameters()))
        want = torch.autograd.grad(plain(x).sum(), list(plain.parameters()))
        for g, w in zip(got, want, strict=True):
            assert relative_error(g, w) <= 1e-5

    def test_optimizer_steps(self):
        seed, fused = seed_and_fused(20, 3, 8)
        self.check(fused, seed)  # packs
        optimizer = torch.optim.SGD(fused.parameters(), lr=0.5)
        x = torch.randn(16, 20)
        for _ in range(3):
            optimizer.zero_grad()
            ((fused(x) - x) ** 2).mean().backward()
            optimizer.step()
            seed.load_state_dict(fused.state_dict())
            self.check(fused, seed)

    @pytest.mark.parametrize(
        ("optimizer_class", "options"),
        [
            (torch.optim.Adam, {"foreach": True}),
            (torch.optim.Adam, {"foreach": False}),
            # The fused kernels bump no version counter (`_after_optimizer_step`).
            (torch.optim.Adam, {"fused": True}),
            (torch.optim.AdamW, {"fused": True}),
            (torch.optim.SGD, {"fused": True, "momentum": 0.9}),
            (torch.optim.Adagrad, {"fused": True}),
        ],
    )
    def test_foreach_and_fused_optimizer_steps(self, optimizer_class, options):
        seed, fused = seed_and_fused(20, 3, 8)
        self.check(fused, seed)
        try:
            optimizer = optimizer_class(fused.parameters(), lr=0.1, **options)
        # torch < 2.4: no fused optimizers on the CPU (a RuntimeError), or none of this kind at
        # all (2.1's SGD and Adagrad: a TypeError).
        except (RuntimeError, TypeError) as error:
            if hasattr(torch.library, "custom_op"):  # (2.4 and later)
                raise
            pytest.skip(str(error))
        x = torch.randn(8, 20)
        for _ in range(2):
            optimizer.zero_grad()
            ((fused(x) - x) ** 2).mean().backward()
            optimizer.step()
            seed.load_state_dict(fused.state_dict())
            self.check(fused, seed)

    @pytest.mark.parametrize("path", ["pack", "repack"])
    @pytest.mark.parametrize("change", ["write", "data edit", "precision"])
    def test_a_change_while_the_chain_packs_is_seen_next_call(self, monkeypatch, path, change):
        """Changes in another thread while a call packs. An in-place write that ended after the
        packing read the memory, but before it took the versions (an optimizer step): the chain
        kept the old weights (34 of 200 racing trials); the versions are taken first. An
        ``invalidate`` after a ``.data`` edit, or a ``set_precision``, and the other thread's
        call: the packing recorded its chain as current, which kept the old weights or
        precision until the next change the versions see (3 to 29 of 100 racing trials; a
        review found the repack path still did, once the other thread's call had packed after
        the change)."""
        plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        x = torch.randn(4, 6)
        build, changes = cache._native.Chain, []

        def build_then_change(*args: object) -> object:
            chain = build(*args)
            if not changes:
                changes.append(1)
                if change == "write":
                    for model in (fused, plain):
                        model[0].weight.mul_(0.5)
                    return chain
                if change == "precision":
                    fused.set_precision("bf16")
                else:
                    for model in (fused, plain):
                        model[0].weight.data.mul_(0.5)  # no version counter sees it
                    fused.invalidate()
                fused(x)  # the other thread's call, packing after the change
            return chain

        with torch.no_grad():
            if path == "repack":
                fused(x)
                for model in (fused, plain):
                    model[0].weight.add_(1)  # in place: the next call packs again
            monkeypatch.setattr(cache._native, "Chain", build_then_change)
            fused(x)
            monkeypatch.undo()
            assert changes
            if change == "precision":
                at_bf16 = FusedMLP.from_sequential(copy.deepcopy(plain), precision="bf16")
                assert torch.equal(fused(x), at_bf16(x))
            else:
                assert relative_error(fused(x), plain(x)) <= 1e-5

    def test_a_set_precision_while_the_children_split_reaches_the_new_pieces(self, monkeypatch):
        """Another thread's ``set_precision`` while a call split the children into pieces (a
        LayerNorm between two runs) set the pieces of before: the new ones made before it kept
        fp32 until the children changed again."""
        fused = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.LayerNorm(5), nn.Linear(5, 3))
        x = torch.randn(4, 6)
        set_modules, changes = cache.ChainCache.set_modules, []

        def set_modules_then_set_precision(self, *args, **kwargs):
            set_modules(self, *args, **kwargs)
            if self is not fused._fused and not changes:  # a piece's, the first
                changes.append(1)
                fused.set_precision("bf16")

        monkeypatch.setattr(cache.ChainCache, "set_modules", set_modules_then_set_precision)
        fused[2] = nn.LayerNorm(5)  # new children: split again
        with torch.no_grad():
            fused(x)
            monkeypatch.undo()
            assert changes
            at_bf16 = FusedMLP(*copy.deepcopy(list(fused)), precision="bf16")
            assert torch.equal(fused(x), at_bf16(x))

    def test_load_state_dict_and_in_place_edits(self):
        seed, fused = seed_and_fused(20, 3, 8)
        self.check(fused, seed)
        other = SeedAE(20, 3, 8)
        fused.load_state_dict(other.state_dict())
        self.check(fused, other)
        with torch.no_grad():
            fused.encoder[0].weight.mul_(-2)
            fused.decoder[2].bias.add_(1)
            other.encoder[0].weight.mul_(-2)
            other.decoder[2].bias.add_(1)
        self.check(fused, other)

    def test_replaced_parameters_and_dtype_moves(self):
        seed, fused = seed_and_fused(20, 3, 8)
        self.check(fused, seed)
        fused.encoder[0].weight = nn.Parameter(torch.randn(8, 20))
        seed.encoder[0].weight = nn.Parameter(fused.encoder[0].weight.detach().clone())
        self.check(fused, seed)
        fused.decoder[2].bias = nn.Parameter(torch.randn(20))
        seed.decoder[2].bias = nn.Parameter(fused.decoder[2].bias.detach().clone())
        self.check(fused, seed)
        fused.encoder[2].bias = seed.encoder[2].bias = None
        self.check(fused, seed)
        fused.double()
        seed.double()
        self.check(fused, seed, torch.float64)
        fused.float()
        seed.float()
        self.check(fused, seed)
        for _ in range(3):  # .data swaps may reuse freed addresses; the cache pins its tensors
            new = torch.randn(8, 20)
            fused.encoder[0].weight.data = new.clone()
            seed.encoder[0].weight.data = new.clone()
            self.check(fused, seed)

    @pytest.mark.parametrize("split", [False, True])
    @pytest.mark.parametrize("reparametrize", ["parametrize", "weight_norm", "old_weight_norm"])
    def test_a_linear_reparametrized_after_the_first_call(self, reparametrize, split):
        """`parametrize` moves the weight out of the Linear's parameters (and changes its class);
        the old `weight_norm` computes it in a hook: the chain runs plain PyTorch from then on,
        training as the plain model does."""

        class Doubled(nn.Module):
            def forward(self, weight: torch.Tensor) -> torch.Tensor:
                return 2 * weight

        reparametrizations = {
            "parametrize": lambda linear: torch.nn.utils.parametrize.register_parametrization(
                linear, "weight", Doubled()
            ),
            "weight_norm": torch.nn.utils.parametrizations.weight_norm,
            "old_weight_norm": torch.nn.utils.weight_norm,
        }
        # Split: a module the kernels do not run (Softsign) leaves two fused runs.
        tail = (nn.Softsign(), nn.Linear(3, 3)) if split else ()
        plain = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3), *tail)
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        x = torch.randn(16, 20)
        fused(x).sum().backward()  # packed, and trained through the kernel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm's deprecation
            for model in (plain, fused):
                reparametrizations[reparametrize](model[0])
        for _ in range(2):  # the call that finds the change, and the next
            got, want = fused(x), plain(x)
            assert relative_error(got, want) <= 1e-5
            params = [p for p in fused.parameters()]
            got_grads = torch.autograd.grad(got.sum(), params)
            want_grads = torch.autograd.grad(want.sum(), list(plain.parameters()))
            for g, w in zip(got_grads, want_grads, strict=True):
                assert relative_error(g, w) <= 1e-5
        if reparametrize != "old_weight_norm":  # (that one's hook already runs them plain)
            assert fused.fused_runs() == ([(4, 5)] if split else [(2, 3)])

    @pytest.mark.parametrize(
        ("module", "attribute", "value"),
        [
            (nn.LeakyReLU(), "negative_slope", 0.5),
            (nn.ELU(), "alpha", 0.3),
            (nn.GELU(), "approximate", "tanh"),
            (nn.Hardtanh(), "max_val", 0.25),
            (nn.Softplus(), "beta", 3.0),
            # Values the kernel does not take: the module runs plain from then on.
            (nn.Softplus(), "beta", -2.0),
            (nn.Hardtanh(), "min_val", 1.0),
        ],
    )
    def test_an_activations_attributes_changed_after_the_first_call(self, module, attribute, value):
        plain = nn.Sequential(nn.Linear(20, 8), module, nn.Linear(8, 3))
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        x = torch.randn(16, 20)
        for _ in range(2):
            self.check_outputs_and_gradients(fused, plain, x)
            setattr(fused[1], attribute, value)
            setattr(plain[1], attribute, value)

    @pytest.mark.parametrize(
        "change", ["wider_input", "bias_broadcast", "scalar_bias", "forward_assigned"]
    )
    def test_modules_changed_after_the_first_call_into_what_the_kernel_does_not_take(self, change):
        """A weight replaced by one of another input width (the chain is lowered again), a bias
        that ``F.linear`` broadcasts, a ``forward`` assigned to a child (PyTorch calls it): the
        next calls compute what PyTorch does, forward and backward."""
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        x = torch.randn(16, 8)
        fused(x).sum().backward()  # packed, and trained through the kernel
        for model in (plain, fused):
            with torch.no_grad():
                if change == "wider_input":
                    model[0].weight = nn.Parameter(torch.linspace(-1, 1, 160).view(16, 10))
                    model[0].in_features = 10
                elif change == "bias_broadcast":
                    model[0].bias = nn.Parameter(torch.linspace(-1, 1, 16).view(1, 16))
                elif change == "scalar_bias":
                    model[0].bias = nn.Parameter(torch.tensor(0.7))
                else:
                    model[1].forward = lambda t: t * 2  # no longer a ReLU
        x = torch.randn(16, 10 if change == "wider_input" else 8)
        for _ in range(2):
            self.check_outputs_and_gradients(fused, plain, x)

    @pytest.mark.parametrize("flatten", [False, True])
    def test_a_wider_weight_then_inputs_of_either_width(self, flatten):
        """After a first weight 10 wide replaced an 8-wide one: an 8-wide input raises PyTorch's
        RuntimeError (the packed chain took it), a 10-wide one computes, fused again from the
        next call on (a chain led by a Flatten too)."""
        torch.manual_seed(0)
        head = [nn.Flatten()] if flatten else []
        plain = nn.Sequential(*head, nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        first = len(head)
        with torch.no_grad():
            fused(torch.randn(5, 8))  # packed
            for model in (plain, fused):
                model[first].weight = nn.Parameter(torch.linspace(-1, 1, 160).view(16, 10))
            for model in (plain, fused):
                with pytest.raises(RuntimeError, match="cannot be multiplied"):
                    model(torch.randn(5, 8))
            x = torch.randn(5, 10)
            for _ in range(2):
                assert relative_error(fused(x), plain(x)) <= 1e-5
        assert fused.fused_runs() == [(0, first + 3)]

    def test_a_reparametrization_of_another_width(self):
        """``parametrize`` (``unsafe``) widening a weight: its tensor leaves the slot, and the
        chain runs plain at the new width (it raised KeyError)."""

        class Widen(nn.Module):
            def forward(self, weight: torch.Tensor) -> torch.Tensor:
                return torch.cat([weight, weight], dim=1)

        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        with torch.no_grad():
            fused(torch.randn(5, 8))
        for model in (plain, fused):
            torch.nn.utils.parametrize.register_parametrization(
                model[0], "weight", Widen(), unsafe=True
            )
        x = torch.randn(5, 16)
        with torch.no_grad():
            for _ in range(2):
                assert relative_error(fused(x), plain(x)) <= 1e-5

    def test_a_nan_batch_norm_eps_is_lowered_once(self):
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        plain.eval()
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        for model in (plain, fused):
            model[1].eps = float("nan")
        x = torch.randn(5, 8)
        with torch.no_grad():
            fused(x)
            lowered, chain = fused._fused.lowered, fused._fused.chain
            for _ in range(3):
                torch.testing.assert_close(fused(x), plain(x), equal_nan=True)
            assert fused._fused.lowered is lowered
            assert fused._fused.chain is chain

    def test_a_forward_assigned_before_accelerate_or_to_an_inner_sequential(self):
        torch.manual_seed(0)
        x = torch.randn(5, 8)
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        plain[1].forward = lambda t: t * 2
        fused, report = accelerate(copy.deepcopy(plain))
        assert "a forward assigned to it" in str(report)
        with torch.no_grad():
            assert relative_error(fused(x), plain(x)) <= 1e-5
        plain = nn.Sequential(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 4))
        )
        fused, _ = accelerate(copy.deepcopy(plain))
        with torch.no_grad():
            fused(x)  # packed as one chain
            for model in (plain, fused):
                inner = model[1]
                inner.forward = lambda t, inner=inner: -inner[0](t)
            assert relative_error(fused(x), plain(x)) <= 1e-5

    def test_edits_through_data_need_invalidate(self):
        seed, fused = seed_and_fused(20, 3, 8)
        self.check(fused, seed)
        fused.encoder[0].weight.data.mul_(
            3
        )  # bypasses the version counter, as it bypasses autograd
        seed.encoder[0].weight.data.mul_(3)
        fused.invalidate()
        self.check(fused, seed)


def _cpu_multiplies(dtype: torch.dtype) -> bool:
    """Whether this torch's CPU matmul takes ``dtype``."""
    try:
        torch.ones(1, 1, dtype=dtype) @ torch.ones(1, 1, dtype=dtype)
    except RuntimeError:
        return False
    return True


class TestFusedMLP:
    def test_is_a_drop_in_sequential(self):
        plain = nn.Sequential(nn.Linear(10, 42), nn.ReLU(), nn.Linear(42, 4))
        fused = FusedMLP.from_sequential(plain)
        assert isinstance(fused, nn.Sequential)
        assert repr(fused) == repr(plain)
        assert list(fused.state_dict()) == list(plain.state_dict())
        assert fused[0] is plain[0]
        assert fused[0].weight is plain[0].weight
        assert len(fused) == 3
        assert isinstance(fused[1:], FusedMLP)
        fresh = FusedMLP(nn.Linear(10, 42), nn.ReLU(), nn.Linear(42, 4))
        fresh.load_state_dict(plain.state_dict())
        x = torch.randn(5, 10)
        with torch.no_grad():
            assert relative_error(fresh(x), plain(x)) <= 1e-5
            tail = torch.randn(5, 42)  # ReLU runs as a module, the Linear after it fused
            assert fused[1:].fused_runs() == [(1, 2)]
            assert relative_error(fused[1:](tail), plain[2](torch.relu(tail))) <= 1e-5

    def test_deep_asymmetric_chain_with_identity_and_no_bias(self):
        plain = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 42, bias=False), nn.Identity(),
            nn.Linear(42, 2), nn.Linear(2, 42), nn.ReLU(), nn.Linear(42, 64), nn.ReLU(),
        )  # fmt: skip
        fused = FusedMLP.from_sequential(copy.deepcopy(plain))
        assert fused.fused_layers() is not None
        x = torch.randn(33, 64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        assert relative_error(fused(x), plain(x2)) <= 1e-5
        fused(x).sum().backward()
        plain(x2).sum().backward()
        assert relative_error(x.grad, x2.grad) <= 1e-5
        for p_fused, p_plain in zip(fused.parameters(), plain.parameters(), strict=True):
            assert relative_error(p_fused.grad, p_plain.grad) <= 1e-5

    def test_other_modules_and_dtypes_run_as_plain_sequential(self):
        without_linear = FusedMLP(nn.Softsign(), nn.LayerNorm(6))
        assert without_linear.fused_layers() is None
        assert without_linear.fused_runs() == []
        x = torch.randn(3, 6)
        want = without_linear[1](nn.functional.softsign(x))
        assert torch.equal(without_linear(x), want)
        relu_first = FusedMLP(nn.ReLU(), nn.Linear(6, 2))
        assert relu_first.fused_layers() is None
        for dtype in (torch.bfloat16, torch.float16):
            if not _cpu_multiplies(dtype):  # (float16 on torch 2.1)
                continue
            half = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(dtype)
            plain = nn.Sequential(*half)
            x = torch.randn(3, 6, dtype=dtype)
            assert torch.equal(half(x), plain(x))

    def test_hooks_on_children_still_run(self):
        fused = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        seen = []
        handle = fused[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        x = torch.randn(3, 6)
        with torch.no_grad():
            want = fused[2](torch.relu(fused[0](x)))
            seen.clear()
            assert torch.equal(fused(x), want)
        assert seen == [(3, 5)]
        handle.remove()
        with torch.no_grad():
            assert relative_error(fused(x), want) <= 1e-5
        assert seen == [(3, 5)]

    def test_hooks_on_the_ae_encoder_and_decoder_still_run(self):
        seed, fused = seed_and_fused(20, 3, 8)
        x = torch.randn(4, 20)
        seen = []
        with torch.no_grad():
            fused(x)  # fused, with the chain and its hook registries cached
            for part in (fused.encoder, fused.decoder):
                handle = part.register_forward_hook(lambda m, args, out: seen.append(out.shape))
                assert relative_error(fused(x), seed(x)) <= 1e-5
                handle.remove()
        assert seen == [(4, 3), (4, 20)]

    def test_hooks_on_the_module_itself_run_around_the_fused_call(self, monkeypatch):
        seed, fused = seed_and_fused(20, 3, 8)
        x = torch.randn(4, 20)
        packs = []
        real_pack = ChainCache.pack
        monkeypatch.setattr(
            ChainCache,
            "pack",
            lambda state, dtype: packs.append(dtype) or real_pack(state, dtype),
        )
        for module, reference in ((fused, seed), (fused.encoder, seed.encoder)):
            packs.clear()
            pre = module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
            post = module.register_forward_hook(lambda m, args, out: out + 1)
            with torch.no_grad():
                assert relative_error(module(x), reference(x * 2) + 1) <= 1e-5
            assert packs  # the forward between the hooks still ran fused
            pre.remove()
            post.remove()

    def test_a_forward_overridden_or_replaced_is_the_one_called(self):
        class Doubled(FusedMLP):
            def forward(self, x):
                return 2 * super().forward(x)

        class Shifted(AE):
            def forward(self, x):
                return super().forward(x) + 1

        _, ae = seed_and_fused(20, 3, 8)
        doubled = Doubled(*ae.encoder)
        shifted = Shifted(20, 3, 8)
        shifted.load_state_dict(ae.state_dict())
        x = torch.randn(4, 20)
        with torch.no_grad():
            for _ in range(2):  # before and after the packed chain is cached
                assert relative_error(doubled(x), 2 * ae.encoder(x)) <= 1e-5
                assert relative_error(shifted(x), ae(x) + 1) <= 1e-5
            for module in (ae, ae.encoder):
                want = module(x)
                module.forward = lambda x, forward=module.forward: forward(x) - 1
                assert relative_error(module(x), want - 1) <= 1e-5
                del module.forward
                assert relative_error(module(x), want) <= 1e-5

    def test_hooks_added_after_a_fused_call_still_run(self):
        fused = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        x = torch.randn(3, 6)
        calls = []
        with torch.no_grad():
            want = fused(x)  # fused, with the chain and its hook registries cached
            for register in (
                fused[1].register_forward_pre_hook,
                nn.modules.module.register_module_forward_hook,
            ):
                handle = register(lambda module, *args: calls.append(type(module).__name__))
                assert relative_error(fused(x), want) <= 1e-5
                handle.remove()
        # The pre-hook runs on the ReLU; the global hook on each child and on the container.
        assert calls == ["ReLU", "Linear", "ReLU", "Linear", "FusedMLP"]

    def test_deep_copies_and_pickles_of_a_used_module_pack_their_own_weights(self, tmp_path):
        seed, fused = seed_and_fused(20, 3, 8)
        x = torch.randn(5, 20)
        with torch.no_grad():
            want = fused(x)  # packed: the cache holds a native chain
            clone = copy.deepcopy(fused)
            torch.save(fused, tmp_path / "ae.pt")
            loaded = torch.load(tmp_path / "ae.pt", weights_only=False)
            assert relative_error(clone(x), want) <= 1e-5
            assert relative_error(loaded(x), want) <= 1e-5
            assert relative_error(copy.deepcopy(fused.encoder)(x), seed.encoder(x)) <= 1e-5
            clone.encoder[0].weight.mul_(2)  # the copy's own parameters, not the original's
            assert torch.equal(fused(x), want)
            assert not torch.equal(clone(x), want)

    @pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
    def test_tracers_see_plain_pytorch_and_compilers_the_fused_op(self):
        # torch.jit.trace and torch.fx record the chain's torch ops, not a constant computed by
        # the kernel; torch.compile and torch.export, the custom op (tests/test_compile.py), or,
        # on a torch without custom ops (< 2.4), the chain's torch ops.
        op_in_graph = hasattr(torch.library, "custom_op")
        plain = nn.Sequential(nn.Linear(6, 42), nn.ReLU(), nn.Linear(42, 3))
        fused = FusedMLP.from_sequential(plain)
        x, other = torch.randn(4, 6), torch.randn(4, 6)
        with torch.no_grad():
            traced = torch.jit.trace(fused, x)
            assert relative_error(traced(other), plain(other)) <= 1e-5
            assert "fusedae::" not in str(traced.inlined_graph)
            graph = torch.fx.symbolic_trace(fused)
            assert relative_error(graph(other), plain(other)) <= 1e-5
            assert sum(node.op == "call_module" for node in graph.graph.nodes) == 3
            torch._dynamo.reset()
            compiled = torch.compile(fused, backend="eager", fullgraph=True)
            assert relative_error(compiled(other), plain(other)) <= 1e-5
            if hasattr(nn.Module, "compile"):  # (torch 2.2+)
                in_place = copy.deepcopy(fused)
                in_place.compile(backend="eager", fullgraph=True)  # `__call__` must defer to it
                assert relative_error(in_place(other), plain(other)) <= 1e-5
            explained = torch._dynamo.explain(fused)(other)
            assert explained.graph_break_count == 0
            assert ("fusedae.chain" in str(explained.graphs[0].code)) == op_in_graph
            _, ae = seed_and_fused(6, 2, 5)
            traced_ae = torch.jit.trace(ae, x)
            assert relative_error(traced_ae(other), ae.decoder(ae.encoder(other))) <= 1e-5
        # TorchDynamo, then fake tensors through plain Python (torch 2.3+; before, Dynamo only).
        takes_strict = "strict" in inspect.signature(torch.export.export).parameters
        for options in ({"strict": True}, {"strict": False}) if takes_strict else ({},):
            for module in (fused, ae):
                exported = torch.export.export(module, (x,), **options)
                assert ("fusedae.chain" in str(exported.graph)) == op_in_graph
                with torch.no_grad():
                    want = plain(other) if module is fused else ae.decoder(ae.encoder(other))
                    assert relative_error(exported.module()(other), want) <= 1e-5
        torch._dynamo.reset()

    @pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
    @pytest.mark.filterwarnings("ignore:`torch.jit.trace_method:FutureWarning")
    @pytest.mark.parametrize("rows", [1, 600])
    def test_jit_trace_with_gradients_checks_its_trace(self, rows):
        """With gradients on, ``check_trace``'s second trace took another route to plain
        PyTorch through nested fused modules ("Graphs differed across invocations")."""
        plain = nn.Sequential(
            nn.Sequential(nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 3)),
            nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 20)),
        )
        fused, _ = accelerate(copy.deepcopy(plain))
        x = torch.randn(rows, 20)
        for module, want in ((fused, plain(x)), (AE(20, 3, 9), None)):
            traced = torch.jit.trace(module, x)
            if want is None:
                want = module.decoder(module.encoder(x))
            assert relative_error(traced(x), want) <= 1e-5

    def test_torch_func_transforms_run_plain_pytorch(self):
        plain = nn.Sequential(nn.Linear(6, 42), nn.ReLU(), nn.Linear(42, 3))
        fused = FusedMLP.from_sequential(plain)
        x = torch.randn(5, 6)
        with torch.no_grad():
            fused(x)  # packed before the transforms run
            assert relative_error(torch.func.vmap(fused)(x), plain(x)) <= 1e-5

        def per_sample_grads(module: nn.Module) -> dict[str, torch.Tensor]:
            def loss(params: dict[str, torch.Tensor], row: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(module, params, (row[None],)).sum()

            params = {name: p.detach() for name, p in module.named_parameters()}
            return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

        want = per_sample_grads(plain)
        for name, grad in per_sample_grads(fused).items():
            assert relative_error(grad, want[name]) <= 1e-5, name

    def test_forward_mode_ad_runs_plain_pytorch(self):
        plain = nn.Sequential(nn.Linear(6, 42), nn.ReLU(), nn.Linear(42, 3))
        fused = FusedMLP.from_sequential(plain)
        x, tangent = torch.randn(5, 6), torch.randn(5, 6)
        for grad in (False, True):
            with torch.set_grad_enabled(grad), torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(x, tangent)
                got = torch.autograd.forward_ad.unpack_dual(fused(dual))
                want = torch.autograd.forward_ad.unpack_dual(plain(dual))
            assert got.tangent is not None, grad
            assert relative_error(got.tangent, want.tangent) <= 1e-5
            assert relative_error(got.primal, want.primal) <= 1e-5

    def test_gradcheck_through_the_function(self):
        layers = [nn.Linear(7, 42), nn.Linear(42, 5), nn.Linear(5, 3)]
        params = [
            p.detach().double().requires_grad_() for layer in layers for p in layer.parameters()
        ]
        activations = ("relu", "identity", "relu")

        def chain(x, *params):
            packed = pack_chain(params[0::2], params[1::2], activations)
            return FusedMLPFunction.apply(x, packed, activations, *params)

        # gradcheck's central differences (eps 1e-6) across a ReLU's kink disagree with any
        # one-sided gradient: rows whose ReLU inputs are that close to 0 are left out.
        plain = nn.Sequential(layers[0], nn.ReLU(), layers[1], layers[2], nn.ReLU())
        x = away_from_relu_kinks(plain, 4, torch.randn(64, 7, dtype=torch.float64), margin=1e-3)
        x.requires_grad_()
        assert torch.autograd.gradcheck(chain, (x, *params))

    @pytest.mark.parametrize(
        "activations",
        [("relu", "identity", "relu", "sigmoid"), ("tanh", "gelu_tanh", "relu", "silu")],
    )
    def test_the_backward_reads_the_saved_activations(self, monkeypatch, activations):
        """The forward keeps what the backward reads from the fused pass (hidden outputs, and
        the pre-activations an op's gradient reads): the backward computes no Linear again, and
        its gradients are PyTorch's."""
        widths = (9, 42, 5, 42, 9)
        layers = [nn.Linear(a, b).double() for a, b in itertools.pairwise(widths)]
        plain = nn.Sequential(
            *(
                m
                for layer, name in zip(layers, activations, strict=True)
                for m in (layer, post_op_module(post_op(name)))
            )
        )
        params = [p for layer in layers for p in layer.parameters()]
        packed = pack_chain(params[0::2], params[1::2], activations)
        x = torch.randn(13, 9, dtype=torch.float64, requires_grad=True)
        grad_output = torch.randn(13, 9, dtype=torch.float64).t().contiguous().t()
        y = FusedMLPFunction.apply(x, packed, activations, *params)
        assert relative_error(y, plain(x)) <= 1e-12
        linear = nn.functional.linear
        calls = []
        monkeypatch.setattr(nn.functional, "linear", lambda *args: calls.append(1) or linear(*args))
        got = torch.autograd.grad(y, [x, *params], grad_output)
        monkeypatch.undo()
        assert not calls
        want = torch.autograd.grad(plain(x), [x, *params], grad_output)
        for g, w in zip(got, want, strict=True):
            assert relative_error(g, w) <= 1e-12

    def test_small_training_calls_run_plain_pytorch(self, monkeypatch):
        """Below `TRAINING_MIN_ROWS` rows or `TRAINING_MIN_FLOPS` per call a call that needs
        gradients runs plain PyTorch (faster there); at or above both, the fused forward;
        without gradients, always fused."""

        fused = FusedMLP.from_sequential(
            nn.Sequential(nn.Linear(6, 42), nn.ReLU(), nn.Linear(42, 3))
        )
        flops_per_row = 2 * (6 * 42 + 42 * 3)
        monkeypatch.setattr(cache, "TRAINING_MIN_FLOPS", 10 * flops_per_row)
        monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", 12)
        for rows, fused_path in ((9, False), (11, False), (12, True)):
            out = fused(torch.randn(rows, 6, requires_grad=True))
            assert ("FusedMLPFunction" in type(out.grad_fn).__name__) == fused_path, rows
            out.sum().backward()
        with torch.no_grad():
            plain = fused[2](fused[1](fused[0](torch.ones(1, 6))))
            assert relative_error(fused(torch.ones(1, 6)), plain) <= 1e-6

    def test_the_threaded_gate_applies_where_torch_and_fusedae_both_run_threads(self, monkeypatch):
        """`THREADED_TRAINING_MIN_ROWS` and `..._FLOPS` hold a call that needs gradients to plain
        PyTorch only while PyTorch and fusedae both run on more than one thread, fusedae's on its
        own pool (on PyTorch's threads: `test_threads.py`)."""
        share_torch_threads(False)  # conftest restores the runtime
        fused = FusedMLP.from_sequential(
            nn.Sequential(nn.Linear(6, 42), nn.ReLU(), nn.Linear(42, 3))
        )
        flops_per_row = 2 * (6 * 42 + 42 * 3)
        monkeypatch.setattr(cache, "THREADED_TRAINING_MIN_ROWS", 12)
        monkeypatch.setattr(cache, "THREADED_TRAINING_MIN_FLOPS", 20 * flops_per_row)
        torch_threads = torch.get_num_threads()  # fusedae's: conftest restores them
        try:
            for torch_count, fusedae_count, rows, fused_path in (
                (2, 2, 11, False),
                (2, 2, 19, False),
                (2, 2, 20, True),
                (1, 2, 11, True),
                (2, 1, 11, True),
            ):
                torch.set_num_threads(torch_count)
                fusedae.set_num_threads(fusedae_count)
                out = fused(torch.randn(rows, 6, requires_grad=True))
                got = "FusedMLPFunction" in type(out.grad_fn).__name__
                assert got == fused_path, (torch_count, fusedae_count, rows)
        finally:
            torch.set_num_threads(torch_threads)

    def test_a_call_that_runs_plain_pytorch_asks_the_gate_once(self, monkeypatch):
        """A training call below `TRAINING_MIN_ROWS` goes from the gate (`trains_plain`, asked
        before the fused path's other checks) straight to the plain modules (not through
        `forward`, nor `nn.Module.__call__` and the gate again), unless a global hook asks for
        `nn.Module.__call__`, which then runs it."""

        seed, fused = seed_and_fused(20, 3, 8)
        monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", 1000)
        asked, forwarded = [], []
        real_gate, real_forward = ChainCache.trains_plain, ChainCache.forward
        monkeypatch.setattr(
            ChainCache, "trains_plain", lambda state, x: asked.append(1) or real_gate(state, x)
        )
        monkeypatch.setattr(
            ChainCache, "forward", lambda state, x: forwarded.append(1) or real_forward(state, x)
        )
        x = torch.randn(4, 20, requires_grad=True)
        for module, reference, chains in ((fused, seed, 3), (fused.encoder, seed.encoder, 1)):
            asked.clear()
            out = module(x)
            assert type(out.grad_fn).__name__ == "AddmmBackward0"  # plain PyTorch's Linear
            assert relative_error(out, reference(x)) <= 1e-6
            assert len(asked) == chains  # the AE's whole chain, then its encoder's and decoder's
            assert not forwarded
        calls = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, *args: calls.append(type(module).__name__)
        )
        try:
            fused.encoder(x)
        finally:
            handle.remove()
        assert calls == ["Linear", "ReLU", "Linear", "FusedMLP"]

    def test_the_function_checks_its_input(self):
        """`FusedMLPFunction` is public: what the kernel would misread is an error."""
        weights = [torch.randn(5, 7, dtype=torch.float64)]
        packed = pack_chain(weights, [None], ["relu"])
        bad = [
            (torch.randn(4, 7), TypeError, "dtype float64 .* got torch.float32"),
            (torch.randn(4, 7).to(torch.float16), TypeError, "got torch.float16"),
            (torch.randn(4, 6, dtype=torch.float64), ValueError, r"\(\*, 7\), got shape \(4, 6\)"),
            (torch.tensor(1.0, dtype=torch.float64), ValueError, r"got shape \(\)"),
            (torch.randn(4, 7, dtype=torch.float64, device="meta"), ValueError, "on meta"),
            (torch.randn(4, 7, dtype=torch.float64).to_sparse(), ValueError, "sparse_coo"),
        ]
        for x, error, message in bad:
            with pytest.raises(error, match=message):
                FusedMLPFunction.apply(x, packed, ("relu",), *weights, None)
        x = torch.randn(2, 3, 7, dtype=torch.float64)
        want = torch.relu(x @ weights[0].T)
        got = FusedMLPFunction.apply(x, packed, ("relu",), *weights, None)
        assert relative_error(got, want) <= 1e-12


class TestBadInput:
    @pytest.fixture(params=["fused", "below the training gate"])
    def gate(self, request, monkeypatch):
        """Training calls fused, or below the gate, where they run plain PyTorch: which error
        a wrong input gets does not depend on the batch size (below the gate it was PyTorch's
        bare RuntimeError)."""
        if request.param != "fused":
            monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", 10**6)

    @pytest.mark.parametrize("grad", [False, True])
    def test_feature_size_mismatch(self, gate, grad):
        _, fused = seed_and_fused(20, 3, 8)
        fused.requires_grad_(grad)
        with pytest.raises(
            ValueError, match=r"expected input of shape \(\*, 20\), got shape \(4, 19\)"
        ):
            fused(torch.randn(4, 19))
        with pytest.raises(ValueError, match=r"got shape \(\)"):
            fused.encoder(torch.tensor(1.0))
        with pytest.raises(RuntimeError):  # what code written for nn.Linear catches
            fused(torch.randn(4, 19))

    @pytest.mark.parametrize("grad", [False, True])
    @pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.float16, torch.bool])
    def test_wrong_dtype(self, gate, grad, dtype):
        _, fused = seed_and_fused(20, 3, 8)
        fused.requires_grad_(grad)
        with pytest.raises(TypeError, match=f"expected input of dtype torch.float32.*got {dtype}"):
            fused(torch.zeros(4, 20, dtype=dtype))
        with pytest.raises(RuntimeError):  # what code written for nn.Linear catches
            fused(torch.zeros(4, 20, dtype=dtype))

    def test_nan_and_inf_propagate_like_pytorch(self):
        seed, fused = seed_and_fused(20, 3, 8)
        x = torch.randn(3, 20)
        x[1, 2], x[2, 5] = float("nan"), float("inf")
        with torch.no_grad():
            got, want = fused(x), seed(x)
        assert torch.equal(got.isnan(), want.isnan())
        assert relative_error(got[0], want[0]) <= 1e-5

    def test_sizes_that_would_overflow(self):
        fused = FusedMLP(nn.Linear(1, 64))
        huge = torch.zeros(1).expand(2**58, 1)
        with torch.no_grad(), pytest.raises(ValueError, match="larger than memory can address"):
            fused(huge)


def test_four_python_threads_share_one_module():
    seed, fused = seed_and_fused()
    inputs = [torch.randn(n, 784) for n in (1, 17, 300, 2000)]
    with torch.no_grad():
        wants = [seed(x) for x in inputs]

    def check(index: int) -> bool:
        with torch.inference_mode():
            return all(relative_error(fused(inputs[index]), wants[index]) <= 1e-5 for _ in range(5))

    assert run_at_once(check, len(inputs)) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_plain_pytorch_and_trains():
    seed, fused = seed_and_fused(64, 2)
    seed, fused = seed.cuda(), fused.cuda()
    x = torch.randn(256, 64, device="cuda")
    with torch.no_grad():
        assert relative_error(fused(x), seed(x)) <= 1e-5
    optimizer = torch.optim.Adam(fused.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        loss = ((fused(x) - x) ** 2).mean()
        loss.backward()
        optimizer.step()
    assert fused.encoder[0].weight.device.type == "cuda"
    cpu = fused.cpu()
    seed.load_state_dict(cpu.state_dict())
    seed = seed.cpu()
    with torch.inference_mode():
        assert relative_error(cpu(x.cpu()), seed(x.cpu())) <= 1e-5


def test_forced_isa_is_the_one_running():
    expected = FORCED_ISA or fusedae.info()["available_isas"][0]
    _, fused = seed_and_fused(20, 3, 8)
    assert fused.encoder.fused_layers() is not None
    chain = fused.encoder._fused.pack(torch.float32)
    assert chain is not None
    assert chain.isa == expected


class TestCacheKeys:
    """The packed chain is keyed on every tensor its spec reads: a change to any one repacks."""

    def test_repacks_when_any_tensor_it_reads_changes(self):
        fused = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        plain = nn.Sequential(*fused)  # the same modules, run by PyTorch
        x = torch.randn(4, 6)

        def check(repacked: bool) -> None:
            before = fused._fused.chain
            with torch.no_grad():
                assert relative_error(fused(x), plain(x)) <= 1e-5
            assert (fused._fused.chain is not before) == repacked

        check(True)
        check(False)
        slots = fused._fused.lowered.slots
        tensors = {id(t) for t in fused._fused.lowered.tensors()}
        assert tensors == {id(t) for t in (*fused.parameters(), *fused.buffers())}
        for owner, key in slots:
            with torch.no_grad():
                owner[key].mul_(-1.5)  # in place: the version counter moves
            check(True)
            check(False)
            owner[key] = nn.Parameter(torch.randn_like(owner[key]))  # `linear.<key> = ...`
            check(True)
            check(False)
            owner[key].data = torch.randn_like(owner[key])  # the storage moves
            check(True)
            check(False)
        fused[2].bias = None  # another shape: one call plain, then lowered again and packed
        check(True)
        check(True)
        check(False)

    def test_changes_in_place_repack_from_the_tensors_memory(self, monkeypatch):
        """After an optimizer step (the same tensors, changed in place) the chain is packed again
        from the arrays the last full packing kept; where those could not be the tensors' own
        memory (a transposed parameter), or a tensor's layout changed in place, it packs in
        full."""
        full = []
        real_pack = ChainCache.pack
        monkeypatch.setattr(
            ChainCache, "pack", lambda state, dtype: full.append(dtype) or real_pack(state, dtype)
        )
        fused = FusedMLP(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
        plain = nn.Sequential(*fused)
        optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
        x = torch.randn(4, 5)

        def step_and_check(full_packs: int) -> None:
            optimizer.zero_grad()
            fused(torch.randn(8, 5)).square().sum().backward()
            optimizer.step()
            full.clear()
            before = fused._fused.chain
            with torch.no_grad():
                assert relative_error(fused(x), plain(x)) <= 1e-5
            assert fused._fused.chain is not before
            assert len(full) == full_packs

        step_and_check(full_packs=0)
        step_and_check(full_packs=0)
        fused[0].weight.requires_grad_(False)
        with torch.no_grad():
            fused[0].weight.t_()  # same memory, same shape, in place: the strides swap
        step_and_check(full_packs=1)
        fused[0].weight = nn.Parameter(torch.randn(5, 5).t())  # not contiguous: packed a copy
        optimizer = torch.optim.SGD(fused.parameters(), lr=0.1)
        step_and_check(full_packs=1)
        step_and_check(full_packs=1)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("gate", [(0, 0), (10**9, 10**9)])
def test_nested_tensors_run_as_nn_linear_runs_them(monkeypatch, grad, gate):
    """A nested tensor (strided, but without one shape) runs plain, as nn.Linear takes it,
    on either side of the training gate: each of its rows comes out as nn.Linear's."""
    monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", gate[0])
    monkeypatch.setattr(cache, "TRAINING_MIN_FLOPS", gate[1])
    fused = FusedMLP(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plain = nn.Sequential(*fused)
    rows = [torch.randn(2, 6), torch.randn(3, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
        nested = torch.nested.nested_tensor(rows)
    with torch.set_grad_enabled(grad):
        got, want = fused(nested), plain(nested)
    assert got.is_nested
    for row_got, row_want in zip(got.unbind(), want.unbind(), strict=True):
        assert torch.equal(row_got, row_want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_computes_what_nn_linear_computes(dtype, grad):
    """Under CPU autocast a Linear runs in the lower precision: so do the modules, with or
    without a gradient (where they would otherwise go through FusedMLPFunction)."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            pass
    except RuntimeError as error:  # torch 2.1: CPU autocast takes bfloat16 only
        pytest.skip(str(error))
    seed, fused = seed_and_fused(20, 3, 8)
    x = torch.randn(5, 20)
    for module, plain in ((fused, seed), (fused.encoder, seed.encoder)):
        inputs = [x.clone().requires_grad_(grad) for _ in range(2)]
        with torch.autocast("cpu", dtype=dtype), torch.set_grad_enabled(grad):
            got, want = module(inputs[0]), plain(inputs[1])
        assert want.dtype == dtype
        assert got.dtype == dtype
        assert torch.equal(got, want)
        if grad:
            assert "FusedMLPFunction" not in type(got.grad_fn).__name__
            got.float().sum().backward()
            want.float().sum().backward()
            assert torch.equal(inputs[0].grad, inputs[1].grad)
            for p_fused, p_seed in zip(module.parameters(), plain.parameters(), strict=True):
                assert torch.equal(p_fused.grad, p_seed.grad)
                p_fused.grad = p_seed.grad = None
    with torch.autocast("cpu", dtype=dtype, enabled=False), torch.no_grad():
        assert fused(x).dtype == torch.float32


def misaligned(values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into contiguous memory that is not aligned to its element size, as
    ``torch.frombuffer`` at an odd offset gives (a record out of a packed buffer)."""
    size = values.numel() * values.element_size()
    out = torch.frombuffer(bytearray(size + 1), dtype=values.dtype, offset=1, count=values.numel())
    out = out.view(values.shape)
    out.copy_(values)
    assert out.is_contiguous()
    assert out.data_ptr() % values.element_size()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_misaligned_tensors_compute_as_in_pytorch(dtype, monkeypatch):
    """Input, gradient and parameters in contiguous memory at an odd address: PyTorch computes
    them; the fused calls refused them ("not that of aligned values"), where they now copy."""
    monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", 0)
    monkeypatch.setattr(cache, "TRAINING_MIN_FLOPS", 0)
    seed, fused = seed_and_fused(20, 3, dtype=dtype)
    x = torch.randn(9, 20, dtype=dtype)
    grad = torch.randn(9, 20, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(misaligned(x)), seed(x))
    fused(misaligned(x)).backward(misaligned(grad))
    seed(x).backward(grad)
    for ours, theirs in zip(fused.parameters(), seed.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    layers = nn.Sequential(nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 2)).to(dtype)
    plain = copy.deepcopy(layers)
    layers[0].weight = nn.Parameter(misaligned(layers[0].weight.detach()))
    layers[2].bias = nn.Parameter(misaligned(layers[2].bias.detach()))
    accelerated, _ = accelerate(layers)
    with torch.no_grad():
        torch.testing.assert_close(accelerated(x), plain(x))
    pairs = [(misaligned(linear.weight.detach()).numpy(), linear.bias) for linear in plain[::2]]
    mlp = fusedae.MLP(
        [(weight, bias.detach().numpy()) for weight, bias in pairs], ["relu", "identity"]
    )
    torch.testing.assert_close(torch.from_numpy(mlp(x.numpy())), plain(x).detach())


def test_a_torch_function_or_dispatch_mode_sees_the_layers_as_in_pytorch():
    """A mode that changes ``F.linear`` changed the plain model's output and not the fused
    one's; a dispatch mode saw no op of a fused call (a tester's)."""

    class DoubledLinear(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out * 2 if func is nn.functional.linear else out

    class Recorded(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    seed, fused_ae = seed_and_fused(20, 3)
    accelerated, _ = accelerate(copy.deepcopy(seed))
    x = torch.randn(4, 20)
    with torch.no_grad():
        for module in (fused_ae, accelerated):
            with DoubledLinear():
                want = seed(x)
                torch.testing.assert_close(module(x), want)
            plain, fused = Recorded(), Recorded()
            with plain:
                seed(x)
            with fused:
                module(x)
            assert fused.ops == plain.ops
        # The mode torch.device's context and set_default_device push for the CPU changes
        # nothing a fused call does: it still fuses (it stopped, a reviewer found).
        with torch.device("cpu"):
            assert fused_ae._fused.forward(x) is not None
        torch.set_default_device("cpu")
        try:
            assert fused_ae._fused.forward(x) is not None
        finally:
            torch.set_default_device(None)
        with torch.device("meta"):
            assert fused_ae._fused.forward(x) is None


def test_set_precision_reaches_inner_fused_modules():
    """``accelerate(Sequential(encoder, decoder), precision=...)`` set every FusedMLP;
    ``set_precision`` on the outer one left the halves, called alone, at the old one."""
    outer, _ = accelerate(
        nn.Sequential(
            nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
            nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 8)),
        ),
        precision="int8",
    )
    assert [module.precision for module in (outer, *outer)] == ["int8"] * 3
    outer.set_precision("fp32")
    assert [module.precision for module in (outer, *outer)] == ["fp32"] * 3


@pytest.mark.parametrize(
    "activation",
    [nn.LeakyReLU(1e40), nn.ELU(1e40), nn.Hardtanh(-1e40, 1e40), nn.Softplus(1.0, 1e40)],
    ids=lambda module: type(module).__name__,
)
def test_an_activation_parameter_beyond_float32_is_an_error_as_in_pytorch(activation):
    """PyTorch refuses it for float32 tensors ("cannot be converted ... without overflow"); the
    fused call rounded it to an infinity and gave an answer (a tester's). The accelerated
    module gives PyTorch's error, the native chain its own; float64 takes it."""
    model = nn.Sequential(nn.Linear(3, 3), activation).eval()
    accelerated, _ = accelerate(copy.deepcopy(model))
    x = torch.tensor([[-2.0, -1e-3, 0.5]])
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="overflow"):
            model(x)
        with pytest.raises(RuntimeError, match="overflow"):
            accelerated(x)
        torch.testing.assert_close(accelerated.double()(x.double()), model.double()(x.double()))
    ((linear, post_op),) = lower(model).layers
    with pytest.raises(ValueError, match=r"post-op parameter -?1e40 overflows fp32"):
        fusedae.MLP([(linear.weight.detach().float().numpy(), None)], [post_op])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_compiles_the_plain_layers():
    """``torch.jit.script`` raised "Unknown type annotation: 'ChainCache'" (a tester's); it now
    scripts the same children as plain PyTorch, and the module itself is left as it was."""
    seed, fused_ae = seed_and_fused(20, 3)
    nested = nn.Sequential(copy.deepcopy(seed.encoder), copy.deepcopy(seed.decoder)).eval()
    accelerated, _ = accelerate(copy.deepcopy(nested))
    x = torch.randn(5, 20)
    for module, plain in ((fused_ae, seed), (accelerated, nested)):
        scripted = torch.jit.script(module)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), plain(x))
            torch.testing.assert_close(module(x), plain(x))
        assert not any(isinstance(child, FusedMLP) for child in scripted.modules())
    assert type(accelerated[0]) is FusedMLP

    class Shifted(nn.Module):  # reads what the Sequential itself holds
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
            self.net.register_buffer("shift", torch.full((4,), 0.5))
            self.net.scale: float = 2.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x - self.net.shift) * self.net.scale

    model = Shifted().eval()
    plain_model = copy.deepcopy(model)
    accelerate(model)
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(plain_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x[:, :4]), plain_model(x[:, :4]))


def test_invalidate_reaches_every_fused_module_below():
    """After an edit the version counters miss (``.data``), ``invalidate()`` on the outer
    module left its inner FusedMLPs' packed weights (the encoder alone off by 0.82, a
    tester's); ``fusedae.torch.invalidate`` takes any module holding them."""
    plain = nn.Sequential(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
        nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8)),
    ).eval()
    holder = nn.Module()
    holder.model, _ = accelerate(copy.deepcopy(plain))
    model = holder.model
    x = torch.randn(5, 8)
    with torch.no_grad():
        model(x), model[0](x)  # packed
        for edit, forget in ((2.0, model.invalidate), (0.5, lambda: invalidate(holder))):
            for module in (plain, model):
                module[0][0].weight.data.mul_(edit)
            forget()
            torch.testing.assert_close(model(x), plain(x))
            torch.testing.assert_close(model[0](x), plain[0](x))


def test_parameters_in_shared_memory_are_read_on_every_call():
    """Another process's writes to shared parameters (Hogwild, an actor and a learner) bump no
    version counter here: the accelerated model kept its first packing (a tester's actor never
    saw the learner's updates). Here the write goes through a numpy view, as unseen."""
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    model, _ = accelerate(copy.deepcopy(plain))
    model.share_memory()
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model(x)
        model[0].weight.detach().numpy()[:] *= 3  # (bumps no counter)
        plain[0].weight.mul_(3)
        assert not torch.equal(model(x), before)
        torch.testing.assert_close(model(x), plain(x))


def test_threads_sharing_no_model_pack_at_once():
    """Threads that each build and run their own model share ``_packed_by``: pruning it while
    another thread added to it raised "dictionary changed size during iteration" or a KeyError
    from a forward (18 errors in 2 s here, pruned on every packing)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors: list[str] = []
    stop = time.monotonic() + 2

    def build_and_run() -> None:
        x = torch.randn(4, 16)
        while time.monotonic() < stop:
            cache._pruned_above[0] = 0  # prune on every packing
            model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
            try:
                with torch.no_grad():
                    accelerate(model)[0](x)
            except Exception as error:  # any of them fails the test
                errors.append(repr(error))

    threads = [threading.Thread(target=build_and_run) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        cache._pruned_above[0] = 1024
    assert errors == []


GRADIENT_SUMS_BEYOND_THE_LIMIT = """
import torch, fusedae
from torch import nn
from fusedae.torch import accelerate, cache
torch.set_num_threads(1)
fusedae.set_num_threads(1)
cache.TRAINING_MIN_ROWS = cache.TRAINING_MIN_FLOPS = 0
width = 4096  # 64 MB of weights: as much for the thread's gradient sums, 64 MB of gradients
model, _ = accelerate(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)))
x = torch.ones(1, width)
model(x).sum().backward()
first = model[0].weight.grad.clone()
limit_address_space(100)
try:
    model(x).sum().backward()
except MemoryError as error:
    print("MemoryError:", error)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
model(x).sum().backward()
print("accumulated twice:", torch.equal(model[0].weight.grad, 2 * first))
"""


def test_gradient_sums_beyond_the_limit_are_a_memory_error():
    """A backward whose per-thread weight gradient sums (as large as the weights) cannot be
    allocated raises MemoryError and adds nothing to ``.grad`` (it aborted the process)."""
    done = run_limited(GRADIENT_SUMS_BEYOND_THE_LIMIT)
    assert done.returncode == 0, done.stderr
    allocation = r"MemoryError: could not allocate \d+ MB for a thread's weight gradient sums"
    assert re.search(allocation, done.stdout), done.stdout
    assert done.stdout.strip().endswith("accumulated twice: True"), done.stdout


@pytest.mark.parametrize(
    "unpack",
    [
        lambda t: t.t().contiguous().t() if t.dim() == 2 else t,  # column-major
        lambda t: torch._neg_view(-t),  # the same values, negated memory
        lambda t: t.repeat_interleave(2, -1)[..., ::2] if t.dim() == 2 else t,  # strided
    ],
    ids=["column-major", "negated view", "strided"],
)
def test_saved_tensors_unpacked_in_another_layout_give_the_same_gradients(unpack):
    """``saved_tensors_hooks`` (activation offloading, compression) may unpack what the forward
    saved with other strides or as a negated view of the same values: the column-major one was
    refused ("reads C-contiguous tensors"), the negated one gave gradients of the wrong sign."""
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 6), nn.Tanh()).double()
    fused, _ = accelerate(copy.deepcopy(plain))
    x = torch.randn(9, 6, dtype=torch.float64)
    for model in (plain, fused):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            loss = ((model(x) - x) ** 2).mean()
        loss.backward()
    for want, got in zip(plain.parameters(), fused.parameters(), strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-12


class TestBelowTheTrainingGate:
    """Where a training call runs plain PyTorch below the gate, an input plain PyTorch takes
    is taken, and the shortcut past the fused path's checks holds for a Flatten chain."""

    @pytest.fixture(autouse=True)
    def _below_the_gate(self, monkeypatch):
        monkeypatch.setattr(cache, "TRAINING_MIN_ROWS", 10**6)

    def test_input_plain_pytorch_takes_under_autocast_or_through_a_hook(self):
        """A bf16 input under CPU autocast, and a float64 one a pre-hook converts, were
        refused with InputDtypeError below the gate (above it they ran plain)."""
        plain = nn.Sequential(nn.Linear(20, 7), nn.ReLU(), nn.Linear(7, 3))
        fused, _ = accelerate(copy.deepcopy(plain))
        x = torch.randn(4, 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = plain(x.bfloat16()), fused(x.bfloat16())
        assert torch.equal(got, want)
        for model in (plain, fused):
            model[0].register_forward_pre_hook(lambda _, args: (args[0].float(),))
        assert torch.equal(fused(x.double()), plain(x.double()))

    def test_a_flatten_chain_takes_the_shortcut(self):
        fused, _ = accelerate(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU()))
        x = torch.randn(4, 3, 4)
        assert fused._fused.trains_plain(x)
        assert fused(x).shape == (4, 5)
