"""torch.compile and torch.export keep the fused kernel: the custom ops ``fusedae::chain`` and
``fusedae::chain_saving`` in the graph, with PyTorch's outputs and gradients."""

from __future__ import annotations

import copy
import functools
import pickle
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedae
from _seed import AE as SeedAE
from _tensors import relative_error
from fusedae._ops import PostOp
from fusedae.torch import AE, FusedMLP, accelerate, cache

if cache._custom_ops is None:
    pytest.skip(
        "this torch cannot register the custom ops (torch.library.custom_op: 2.4+)",
        allow_module_level=True,
    )
from fusedae.torch import custom_ops as ops

BACKENDS = ["eager", "aot_eager", "inductor"]
OPS = (torch.ops.fusedae.chain.default, torch.ops.fusedae.chain_saving.default)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_one_torch_thread() -> Iterator[None]:
    # Every compiled module of a class shares its code object's recompile limit (8).
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each call of the kernel by the custom ops' implementation, by kind."""
    calls: list[str] = []
    run, run_saving = ops.run, ops.run_saving

    def counting_run(chain, x):
        calls.append("chain")
        return run(chain, x)

    def counting_run_saving(chain, x):
        calls.append("chain_saving")
        return run_saving(chain, x)

    monkeypatch.setattr(ops, "run", counting_run)
    monkeypatch.setattr(ops, "run_saving", counting_run_saving)
    return calls


def issue_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The seed's class, small (its encoder and decoder two fused calls), with a LeakyReLU in
    the decoder and the decoder's last layer without bias."""
    model = SeedAE(20, 3, 9)
    model.decoder[1] = nn.LeakyReLU(0.1)
    model.decoder[2] = nn.Linear(9, 20, bias=False)
    return model.to(dtype)


def op_targets(graph: torch.fx.Graph) -> list[object]:
    return [node.target for node in graph.nodes if node.target in OPS]


@functools.cache
def why_inductor_cannot_compile() -> str | None:
    """None where inductor compiles here; else its error (no C++ compiler on the runner, ...)."""
    try:
        torch.compile(lambda t: t * 2, backend="inductor")(torch.ones(2))
    except Exception as exc:  # whatever stops inductor stops it for every model
        return f"{type(exc).__name__}: {exc}"
    return None


def skip_without_inductor() -> None:
    if why := why_inductor_cannot_compile():
        pytest.skip(f"inductor cannot compile here: {why}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_model_calls_the_kernel_with_pytorchs_outputs_and_gradients(
    backend, dtype, kernel_calls
):
    if backend == "inductor":
        skip_without_inductor()
    plain = issue_model(dtype)
    fused, _ = accelerate(copy.deepcopy(plain))
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x = torch.randn(7, 20, dtype=dtype)
    with torch.no_grad():
        assert relative_error(compiled(x), plain(x)) <= TOLERANCE[dtype]
    assert kernel_calls == ["chain", "chain"]  # encoder and decoder

    kernel_calls.clear()
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (compiled(xs[0]) ** 2).mean().backward()
    (plain(xs[1]) ** 2).mean().backward()
    assert kernel_calls == ["chain_saving", "chain_saving"]
    assert relative_error(xs[0].grad, xs[1].grad) <= TOLERANCE[dtype]
    for (name, got), want in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert relative_error(got.grad, want.grad) <= TOLERANCE[dtype], name


def test_no_graph_break_and_the_op_in_the_graph():
    fused, _ = accelerate(issue_model())
    x = torch.randn(5, 20)
    for grad, name in ((False, "fusedae.chain.default"), (True, "fusedae.chain_saving.default")):
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(fused)(x)
        assert explained.graph_break_count == 0
        (graph,) = explained.graphs
        called = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert [target for target in called if "fusedae" in target] == [name, name], called


@pytest.mark.parametrize(("torch_threads", "op_wanted"), [(1, True), (2, False)])
def test_the_threaded_training_gate_leaves_no_graph_break(monkeypatch, torch_threads, op_wanted):
    """The training gate with several threads (which reads the thread counts) traces without a
    graph break: below it, PyTorch's layers go into the graph; with PyTorch on one thread it
    does not apply, and the op does."""
    monkeypatch.setattr(cache, "THREADED_TRAINING_MIN_ROWS", 10**6)  # on fusedae's pool
    monkeypatch.setattr(cache, "SHARED_THREADS_TRAINING_MIN_ROWS", 10**6)  # on PyTorch's threads
    torch.set_num_threads(torch_threads)  # both thread counts restored by the fixtures
    fusedae.set_num_threads(2)
    fused, _ = accelerate(issue_model())
    explained = torch._dynamo.explain(fused)(torch.randn(5, 20, requires_grad=True))
    assert explained.graph_break_count == 0
    (graph,) = explained.graphs
    called = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert any("fusedae" in target for target in called) == op_wanted, called


def test_sequential_of_sequentials_is_one_op(kernel_calls):
    """``nn.Sequential(encoder, decoder)``, one chain eagerly, is one op in the graph."""
    plain = nn.Sequential(issue_model().encoder, issue_model().decoder)
    fused, _ = accelerate(copy.deepcopy(plain))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(7, 20, requires_grad=True)
    with torch.no_grad():
        assert relative_error(compiled(x), plain(x)) <= 1e-5
    compiled(x).sum().backward()
    assert kernel_calls == ["chain", "chain_saving"]
    x_plain = x.detach().clone().requires_grad_()
    plain(x_plain).sum().backward()
    assert relative_error(x.grad, x_plain.grad) <= 1e-5


@pytest.mark.parametrize("grad", [False, True])
def test_an_accelerated_sequential_of_sequentials_compiles_once(grad, kernel_calls):
    """``accelerate`` replaces the inner Sequentials after the outer FusedMLP read its chain;
    the outer one must read them again then, not on its first call, where a trace saw its state
    change and the second call compiled the whole model again."""
    fused, _ = accelerate(nn.Sequential(issue_model().encoder, issue_model().decoder))
    graphs, backend = graph_counter()
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x = torch.randn(7, 20)
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            compiled(x)
    assert len(graphs) == 1
    assert kernel_calls == ["chain_saving" if grad else "chain"] * 3


def graph_counter() -> tuple[list[torch.fx.GraphModule], object]:
    """A backend that counts the graphs TorchDynamo hands it, and runs them as traced."""
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph: torch.fx.GraphModule, _: object) -> object:
        graphs.append(graph)
        return graph.forward

    return graphs, counting_backend


def assert_compiles_once(module: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """``module`` compiled: three calls on ``x`` give ``reference``'s output, from one graph."""
    graphs, backend = graph_counter()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            assert relative_error(compiled(x), reference(x)) <= 1e-5
    assert len(graphs) == 1


def test_a_sequential_split_around_a_module_compiles_once():
    """A Sequential whose children are not one chain runs its fused runs piece by piece; the
    pieces are read when the module is, so a first traced call changes no state."""
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 5))
    fused, _ = accelerate(copy.deepcopy(model))
    assert_compiles_once(fused, model, torch.randn(7, 20))


@pytest.mark.parametrize("form", ["FusedMLP", "AE"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_compiles_once(form, how):
    """A deep copy or an unpickled module reads its children when it is made (its caches start
    empty), not on its first call, whose trace would see its state change."""
    torch.manual_seed(0)
    model: nn.Module = AE(20, 3, 9) if form == "AE" else FusedMLP(*issue_model().encoder)
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert_compiles_once(copied, model, torch.randn(7, 20))


def test_global_hooks_run_below_the_compiled_gates(monkeypatch):
    """Below the compiled gates a traced call runs the plain layers: a global forward hook (here
    doubling every Sequential's output) must still see the FusedMLP itself, as eagerly."""
    monkeypatch.setattr(cache, "COMPILED_INFERENCE_MIN_FLOPS", 10**12)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    fused, _ = accelerate(copy.deepcopy(plain))

    def double_sequentials(module: nn.Module, _: object, output: torch.Tensor) -> object:
        return output * 2 if isinstance(module, nn.Sequential) else None

    x = torch.randn(8, 20)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    with torch.no_grad():
        unhooked = plain(x)
        handle = nn.modules.module.register_module_forward_hook(double_sequentials)
        try:
            with pytest.warns(UserWarning, match="global hooks"):
                got = compiled(x)
        finally:
            handle.remove()
    assert relative_error(got, 2 * unhooked) <= 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_a_child_replaced_after_a_float_changed_keeps_fullgraph(split):
    """A float that changed between compiled calls is symbolic in the next trace; a child
    replaced then must not make that trace lower the chain (which reads the float), nor the
    runs of a Sequential split around a LayerNorm, but trace plain PyTorch, as for the float
    alone."""
    torch.manual_seed(0)
    norm = [nn.LayerNorm(16)] if split else []
    plain = nn.Sequential(nn.Linear(20, 16), nn.LeakyReLU(0.1), *norm, nn.Linear(16, 5), nn.Tanh())
    fused, _ = accelerate(copy.deepcopy(plain))
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x = torch.randn(33, 20)
    with torch.no_grad():
        for slope in (0.1, 0.2, 0.3):
            for model in (plain, fused):
                model[1].negative_slope = slope
            assert relative_error(compiled(x), plain(x)) <= 1e-5
        for model in (plain, fused):
            model[-1] = nn.Sigmoid()
        assert relative_error(compiled(x), plain(x)) <= 1e-5
        assert relative_error(fused(x), plain(x)) <= 1e-5  # eager: lowered again, fused


def test_the_input_by_keyword_as_nn_sequential_names_it():
    plain = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
    fused, _ = accelerate(copy.deepcopy(plain))
    x = torch.randn(8, 20)
    with torch.no_grad():
        want = plain(input=x)
        assert relative_error(fused(input=x), want) <= 1e-5
        compiled = torch.compile(fused, backend="eager", fullgraph=True)
        assert relative_error(compiled(input=x), want) <= 1e-5


def test_compiled_training_steps_match_plain_ones(kernel_calls):
    """Optimizer steps change the parameters in place between calls: each call packs them
    again. SGD with momentum, not Adam: Adam's first steps move a parameter by about its
    learning rate whatever the size of its gradient, so a gradient within float rounding of 0
    moves it either way (a fresh clone's run read 1.4e-5 against the 1e-5 below; SGD's worst
    over 30 seeds was 1.1e-7)."""
    torch.manual_seed(0)
    plain = issue_model()
    fused, _ = accelerate(copy.deepcopy(plain))
    models = {"plain": plain, "fused": torch.compile(fused, backend="aot_eager", fullgraph=True)}
    optimizers = {
        "plain": torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9),
        "fused": torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9),
    }
    for _ in range(3):
        x = torch.randn(9, 20)
        for key, model in models.items():
            optimizers[key].zero_grad()
            nn.functional.mse_loss(model(x), x).backward()
            optimizers[key].step()
    assert kernel_calls == ["chain_saving"] * 6
    for got, want in zip(fused.parameters(), plain.parameters(), strict=True):
        assert relative_error(got, want) <= 1e-5
    with torch.no_grad():
        x = torch.randn(4, 20)
        assert relative_error(models["fused"](x), plain(x)) <= 1e-5


def test_dynamic_shapes_and_inference_mode(kernel_calls):
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    compiled = torch.compile(FusedMLP.from_sequential(plain), fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for shape in ((0, 12), (1, 12), (3, 12), (2, 5, 12), (12,)):
            x = torch.randn(shape)
            assert compiled(x).shape == plain(x).shape
            assert relative_error(compiled(x), plain(x)) <= 1e-5
    assert set(kernel_calls) == {"chain"}


def test_flatten_and_unflatten_around_the_op(kernel_calls):
    plain = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 12), nn.Unflatten(1, (3, 4))
    )
    compiled = torch.compile(FusedMLP.from_sequential(plain), backend="eager", fullgraph=True)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        assert relative_error(compiled(x), plain(x)) <= 1e-5
    assert kernel_calls == ["chain"]


def test_what_eager_runs_as_plain_pytorch_stays_plain_when_compiled(kernel_calls):
    x = torch.randn(5, 12)

    def check(plain: nn.Module, fused: nn.Module, x: torch.Tensor = x) -> None:
        torch._dynamo.reset()
        compiled = torch.compile(fused, backend="eager", fullgraph=True)
        with torch.no_grad():
            assert relative_error(compiled(x), plain(x)) <= 1e-2

    normalized = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    normalized.eval()
    check(normalized, FusedMLP.from_sequential(normalized))  # BatchNorm: plain under compile
    dropout = nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    fused = FusedMLP.from_sequential(dropout)
    torch.manual_seed(0)
    want = dropout(x)
    torch.manual_seed(0)
    assert torch.equal(torch.compile(fused, backend="eager", fullgraph=True)(x), want)
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    hooked = FusedMLP.from_sequential(plain)
    hooked[0].register_forward_hook(lambda *_: None)
    check(plain, hooked)
    half = copy.deepcopy(plain).bfloat16()
    check(half, FusedMLP.from_sequential(half), x.bfloat16())
    fused = FusedMLP.from_sequential(plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check(plain, fused)
    vmapped = torch.compile(torch.func.vmap(fused), backend="eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(vmapped(x[None]), plain(x)[None]) <= 1e-5
    assert kernel_calls == []


@pytest.mark.parametrize("change", ["no_bias", "bias_broadcast", "wider_input"])
def test_a_tensor_of_another_shape_after_accelerate_traces_and_exports(change):
    """A bias set to None or to one F.linear broadcasts, a weight of another input width, set
    after the chain was lowered: compiled and exported, the model computes what PyTorch does
    (the traced call lowers the chain again: the fake ops refused the old flags and widths)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fused, _ = accelerate(copy.deepcopy(plain))
    for model in (plain, fused):
        if change == "no_bias":
            model[2].bias = None
        elif change == "bias_broadcast":
            model[0].bias = nn.Parameter(torch.linspace(-1, 1, 16).view(1, 16))
        else:
            model[0].weight = nn.Parameter(torch.linspace(-1, 1, 160).view(16, 10))
    x = torch.randn(5, 10 if change == "wider_input" else 8)
    with torch.no_grad():
        want = plain(x)
        compiled = torch.compile(fused, backend="eager", fullgraph=True)
        assert relative_error(compiled(x), want) <= 1e-5
        exported = torch.export.export(fused, (x,), strict=False)
        assert relative_error(exported.module()(x), want) <= 1e-5


def test_an_activations_float_changed_between_compiled_calls():
    """TorchDynamo makes a float attribute that changed between calls symbolic: the call is
    traced as plain PyTorch (lowering again reads it), with fullgraph too, and computes the new
    op."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 10), nn.LeakyReLU(0.1), nn.Linear(10, 5))
    fused, _ = accelerate(copy.deepcopy(plain))
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x = torch.randn(8, 6)
    with torch.no_grad():
        for slope in (0.1, 0.7, 0.35, 0.1):
            for model in (plain, fused):
                model[1].negative_slope = slope
            assert relative_error(compiled(x), plain(x)) <= 1e-5
        for model in (plain, fused):  # a shape changed too: not lowered again while traced
            model[2].bias = None
        assert relative_error(compiled(x), plain(x)) <= 1e-5


@pytest.mark.parametrize("changed", ["output", "input"])
def test_compiled_backward_allows_what_pytorchs_allows(changed, kernel_calls):
    """The op saves the output only where the last op's gradient reads it and the input only
    where the first weight wants a gradient, as eager and PyTorch's modules: a residual added in
    place to the output, an input changed in place with the layers frozen, stop no backward."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fused, _ = accelerate(copy.deepcopy(plain))
    if changed == "input":
        for model in (plain, fused):
            model.requires_grad_(False)
    grads = []
    for model in (plain, torch.compile(fused, backend="aot_eager", fullgraph=True)):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        source = x * 1.0  # (a leaf may not change in place)
        y = model(source)
        (y if changed == "output" else source).add_(1.0)
        wanted = [x, *(p for p in model.parameters() if p.requires_grad)]
        grads.append(torch.autograd.grad(y.square().sum(), wanted))
    for got, want in zip(grads[1], grads[0], strict=True):
        assert relative_error(got, want) <= 1e-5
    assert kernel_calls


@pytest.mark.parametrize("grad", [False, True])
def test_the_compiled_gates_trace_plain_pytorch_below_them(monkeypatch, grad, kernel_calls):
    """Below ``COMPILED_INFERENCE_MIN_FLOPS`` (``COMPILED_TRAINING_MIN_FLOPS`` where gradients
    are needed) operations a chain, a compiled call traces the chain's layers as plain PyTorch
    (no graph break, no op); from it on, the op. With dynamic shapes the gate is a guard: the
    same compiled model takes the op for a large batch and plain PyTorch for a small one."""
    gate = "COMPILED_TRAINING_MIN_FLOPS" if grad else "COMPILED_INFERENCE_MIN_FLOPS"
    plain = issue_model()
    fused, _ = accelerate(copy.deepcopy(plain))
    per_row = fused.encoder._fused.flops_per_row
    monkeypatch.setattr(cache, gate, 6 * per_row)  # the encoder's and the decoder's alike
    name = "fusedae.chain_saving.default" if grad else "fusedae.chain.default"
    for rows, wanted in ((5, []), (6, [name, name])):
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(fused)(torch.randn(rows, 20, requires_grad=grad))
        assert explained.graph_break_count == 0
        (graph,) = explained.graphs
        called = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        assert [target for target in called if "fusedae" in target] == wanted, called

    compiled = torch.compile(fused, dynamic=True, fullgraph=True)
    kind = "chain_saving" if grad else "chain"
    for rows, calls in ((40, [kind, kind]), (3, [])):
        x = torch.randn(rows, 20, requires_grad=grad)
        kernel_calls.clear()
        with torch.set_grad_enabled(grad):
            got, want = compiled(x), plain(x)
        assert relative_error(got, want) <= TOLERANCE[torch.float32]
        assert kernel_calls == calls, rows


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("form", ["FusedMLP", "AE", "accelerated class"])
def test_below_the_compiled_gates_a_trace_reads_little_of_the_modules(monkeypatch, grad, form):
    """Below the compiled gates a traced call goes to the plain layers before the fused path's
    checks: TorchDynamo guards every value a trace reads and checks them all on each call, and
    the whole path read 2.6-3.9x the plain model's guards (1.4-1.6x with the early exit)."""
    for gate in cache.COMPILED_GATES:
        monkeypatch.setattr(cache, gate, 10**12)
    plain: nn.Module = SeedAE(20, 3, 9)
    if form == "FusedMLP":
        plain = nn.Sequential(plain.encoder, plain.decoder)
        fused: nn.Module = accelerate(copy.deepcopy(plain))[0]
    elif form == "AE":
        fused = AE(20, 3, 9)
        fused.load_state_dict(plain.state_dict())
    else:
        fused = accelerate(copy.deepcopy(plain))[0]
    x = torch.randn(7, 20)
    with torch.set_grad_enabled(grad):
        guards = [len(torch._dynamo.explain(model)(x).out_guards) for model in (plain, fused)]
        assert relative_error(torch.compile(fused)(x), plain(x)) <= TOLERANCE[torch.float32]
    assert guards[1] <= 2 * guards[0], guards


@pytest.mark.parametrize("strict", [True, False])
def test_export_holds_the_op(strict, kernel_calls, monkeypatch):
    seed = nn.Sequential(
        nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 10)),
    )
    # An exported program runs the op at every size: no gate applies.
    for gate in (*cache.TRAINING_GATES, *cache.COMPILED_GATES):
        monkeypatch.setattr(cache, gate, 10**12)
    ae = AE(10, 3, 5)
    plain_ae = nn.Sequential(*ae.encoder, *ae.decoder)  # the same modules, run one by one
    x, other = torch.randn(4, 10), torch.randn(6, 10)
    with torch.no_grad():
        wants = (plain_ae(other), seed(other))
    for module, want in zip((ae, accelerate(seed)[0]), wants, strict=True):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                exported = torch.export.export(
                    module, (x,), strict=strict, dynamic_shapes=({0: torch.export.Dim("rows")},)
                )
            kinds = op_targets(exported.graph)
            assert kinds
            assert set(kinds) == {OPS[1] if grad else OPS[0]}
            kernel_calls.clear()
            with torch.no_grad():
                assert relative_error(exported.module()(other), want) <= 1e-5
            assert kernel_calls


@pytest.mark.parametrize("exported_with_grad", [True, False])
def test_the_exported_program_trains(exported_with_grad):
    """Exported under ``no_grad`` (the op without its saved activations, ``fusedae::chain``),
    the program trains too: that op's backward runs the saving forward again."""
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6))
    fused = FusedMLP.from_sequential(copy.deepcopy(plain))
    x = torch.randn(5, 6)
    with torch.set_grad_enabled(exported_with_grad):
        module = torch.export.export(fused, (x,)).module()
    nn.functional.mse_loss(module(x), x).backward()
    nn.functional.mse_loss(plain(x), x).backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    for name, p in plain.named_parameters():
        assert relative_error(grads[name], p.grad) <= 1e-5, name


LAYERS = [(7, 42, "relu"), (42, 5, "identity"), (5, 3, "leaky_relu:0.1")]


def op_arguments(
    dtype: torch.dtype, shape: tuple[int, ...], has_bias: tuple[bool, ...], grad: bool
) -> tuple[object, ...]:
    weights = [torch.randn(out, inp, dtype=dtype) for inp, out, _ in LAYERS]
    biases = [
        torch.randn(w.shape[0], dtype=dtype) for w, b in zip(weights, has_bias, strict=True) if b
    ]
    x = torch.randn(shape, dtype=dtype)
    for t in (x, *weights, *biases):
        t.requires_grad_(grad)
    post_ops = ",".join(op for _, _, op in LAYERS)
    return x, weights, biases, list(has_bias), post_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 7), (1, 7), (5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize(
    "has_bias", [(True, True, True), (False, False, False), (True, False, True)]
)
def test_opcheck(dtype, shape, has_bias):
    for op, grad in ((ops.chain, False), (ops.chain_saving, True), (ops.chain_saving, False)):
        results = torch.library.opcheck(op, op_arguments(dtype, shape, has_bias, grad))
        assert set(results.values()) == {"SUCCESS"}, results
    x, weights, biases, flags, post_ops = op_arguments(dtype, shape, has_bias, False)
    y, saved = ops.chain_saving(x, weights, biases, flags, post_ops)
    for needs_x, needs_params in ((True, [True] * 3), (False, [False, True, False])):
        arguments = (torch.randn_like(y), x, y, saved, weights, biases, flags, post_ops)
        results = torch.library.opcheck(ops.chain_backward, (*arguments, needs_x, needs_params))
        assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("last_op", ["identity", "sigmoid"])
def test_the_ops_autograd_hands_the_backward_the_output_only_where_it_is_read(last_op):
    """The output goes to the backward op only where the last op's gradient reads it: a tensor
    in its place (the loss's gradient, as before) was a second copy of that gradient in a graph
    that compiles the loss too."""
    x, weights, biases, flags, post_ops = op_arguments(torch.float32, (5, 7), (True,) * 3, True)
    post_ops = post_ops.rsplit(",", 1)[0] + "," + last_op
    y, _ = ops.chain_saving(x, weights, biases, flags, post_ops)
    outputs_passed: list[torch.Tensor | None] = []

    class RecordBackwardOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.fusedae.chain_backward.default:
                outputs_passed.append(args[2])
            return func(*args, **(kwargs or {}))

    with RecordBackwardOutputs():
        y.sum().backward()
    assert len(outputs_passed) == 1
    if last_op == "identity":
        assert outputs_passed[0] is None
    else:
        assert outputs_passed[0] is not None
        assert torch.equal(outputs_passed[0], y.detach())


@pytest.mark.parametrize("shape", [(0, 7), (5, 7), (2, 3, 7)])
def test_the_backward_op_takes_no_output_where_no_gradient_reads_it(shape):
    """Without the output (None: the last op is Identity here), the backward op's gradients are
    those it gives with it, and it passes opcheck; where the last op's gradient reads the output
    (Sigmoid), None is refused, on real and fake tensors."""
    x, weights, biases, flags, post_ops = op_arguments(torch.float64, shape, (True,) * 3, False)
    hidden_ops = post_ops.rsplit(",", 1)[0]
    y, saved = ops.chain_saving(x, weights, biases, flags, hidden_ops + ",identity")
    grad = torch.randn_like(y)
    for needs_x, needs_params in ((True, [True] * 3), (False, [False, True, True])):
        rest = (weights, biases, flags, hidden_ops + ",identity", needs_x, needs_params)
        with_output = ops.chain_backward(grad, x, y, saved, *rest)
        without = ops.chain_backward(grad, x, None, saved, *rest)
        for a, b in zip(with_output, without, strict=True):
            assert torch.equal(a, b)
        results = torch.library.opcheck(ops.chain_backward, (grad, x, None, saved, *rest))
        assert set(results.values()) == {"SUCCESS"}, results
    y, saved = ops.chain_saving(x, weights, biases, flags, hidden_ops + ",sigmoid")
    rest = (weights, biases, flags, hidden_ops + ",sigmoid", True, [True] * 3)
    with pytest.raises(ValueError, match="reads the output"):
        ops.chain_backward(torch.randn_like(y), x, None, saved, *rest)
    with FakeTensorMode() as mode:
        fake_grad, fake_x, fake_saved, *fake_params = (
            mode.from_tensor(t) for t in (y, x, saved, *weights, *biases)
        )
        fake_rest = (fake_params[:3], fake_params[3:], *rest[2:])
        with pytest.raises(ValueError, match="reads the output"):
            ops.chain_backward(fake_grad, fake_x, None, fake_saved, *fake_rest)


@pytest.mark.parametrize("has_bias", [(True, True, True), (True, False, False)])
def test_gradcheck_through_the_op(has_bias):
    # A fixed draw whose ReLU inputs stay clear of the kinks gradcheck's differences would cross.
    torch.manual_seed(0)
    x, weights, biases, flags, post_ops = op_arguments(torch.float64, (4, 7), has_bias, True)

    def chain(x, *params):
        weights, biases = list(params[:3]), list(params[3:])
        return ops.chain_saving(x, weights, biases, flags, post_ops)[0]

    assert torch.autograd.gradcheck(chain, (x, *weights, *biases))


def test_post_ops_encode_and_decode():
    post_ops = (PostOp("relu"), PostOp("leaky_relu", (0.1,)), PostOp("elu", (1 / 3,)))
    assert ops.encode_post_ops(post_ops) == "relu,leaky_relu:0.1,elu:0.3333333333333333"
    assert ops.decode_post_ops(ops.encode_post_ops(post_ops)) == post_ops
    with pytest.raises(ValueError, match="activation must be"):
        ops.decode_post_ops("swish")


def test_the_ops_check_their_arguments():
    x, weights, biases, flags, post_ops = op_arguments(torch.float32, (4, 7), (True,) * 3, False)
    with pytest.raises(ValueError, match="has_bias"):
        ops.chain(x, weights, biases, flags[:2], post_ops)
    with pytest.raises(ValueError, match="do not take"):
        ops.chain(x[:, :6], weights, biases, flags, post_ops)
    with pytest.raises(TypeError, match="dtype"):
        ops.chain(x.double(), weights, biases, flags, post_ops)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.chain(x.half(), weights, biases, flags, post_ops)
    # A layer of no width: refused alike by the op and its fake (opcheck needs them to agree;
    # the fake took it).
    narrow = [x, weights[0][:0], weights[1][:, :0], weights[2], biases[0][:0], *biases[1:]]
    with pytest.raises(ValueError, match="layer 0: widths must be at least 1"):
        ops.chain(narrow[0], narrow[1:4], narrow[4:], flags, post_ops)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in narrow]
        with pytest.raises(ValueError, match="layer 0: widths must be at least 1"):
            ops.chain(fake[0], fake[1:4], fake[4:], flags, post_ops)


def _halve_through_data(layer: nn.Linear) -> None:
    layer.weight.data.mul_(0.5)  # bypasses the version counter


def _halve_through_numpy(layer: nn.Linear) -> None:
    layer.weight.detach().numpy()[:] *= 0.5  # (another process's write to shared memory alike)


@pytest.mark.parametrize("edit", [_halve_through_data, _halve_through_numpy])
def test_compiled_calls_see_edits_no_version_counter_tracks(edit):
    """The ops pack on every call: an edit through ``.data`` or the memory (an optimizer that
    writes ``p.data``, another process's write to shared memory) reaches the next compiled
    call without ``invalidate`` (a cache keyed on versions ran the old weights: 0.033 off)."""
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    fused = FusedMLP.from_sequential(copy.deepcopy(plain))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 12)
    with torch.no_grad():
        compiled(x)
        edit(fused[2])
        edit(plain[2])
        assert relative_error(compiled(x), plain(x)) <= 1e-6


def test_weights_computed_in_the_graph_reach_the_op():
    """Weights computed inside an Inductor graph (``functional_call`` with derived
    parameters): Inductor writes each into the buffer of a dead one, same address and version,
    where a cache keyed on them ran the old weights (0.19 off)."""
    skip_without_inductor()
    plain = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh())
    fused, _ = accelerate(copy.deepcopy(plain))
    weight = plain[0].weight.detach()

    def scaled_steps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            scale = x.abs().mean()  # depends on the last output
            x = torch.func.functional_call(model, {"0.weight": weight * scale}, (x,))
        return x

    x = torch.randn(64, 16)
    with torch.no_grad():
        got = torch.compile(scaled_steps, backend="inductor")(fused, x)
        assert relative_error(got, scaled_steps(plain, x)) <= 1e-5


class _HandWrittenSGD(torch.optim.Optimizer):
    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])


def test_an_optimizer_step_compiles_with_fullgraph():
    """fusedae's step hook runs in every optimizer's step, compiled ones too: TorchDynamo must
    trace it (a lock in it failed ``fullgraph=True``, fusedae's modules or not)."""
    model, _ = accelerate(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    optimizer = _HandWrittenSGD(model.parameters(), 0.1)
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    torch.compile(optimizer.step, fullgraph=True, backend="eager")()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_compiled_step_with_a_fused_optimizer_trains():
    """A whole training step compiled, with ``Adam(fused=True)``: the step writes the
    parameters inside the graph with no version bump, and the next step's forward packs them
    (a cache keyed on versions kept the first weights: the loss never moved)."""
    skip_without_inductor()
    plain = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    x = torch.randn(32, 16)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    losses = []
    for model in (copy.deepcopy(plain), accelerate(copy.deepcopy(plain))[0]):
        optimizer = torch.optim.Adam(model.parameters(), 1e-2, fused=True)
        compiled = torch.compile(step)
        losses.append(torch.stack([compiled(model, optimizer) for _ in range(4)]))
    assert losses[0][0] != losses[0][-1]
    assert relative_error(losses[1], losses[0]) <= 1e-4


def test_a_double_backward_through_an_exported_program_says_why_it_fails():
    """As the eager Function says it (``DOUBLE_BACKWARD_ERROR``), not torch's "no autograd
    formula was registered" for ``fusedae::chain_backward``."""
    fused = FusedMLP.from_sequential(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6)))
    x = torch.randn(4, 6, requires_grad=True)
    program = torch.export.export(fused, (x.detach(),)).module()
    (grad,) = torch.autograd.grad(program(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fused backward is not differentiable"):
        grad.sum().backward()


def test_an_exported_program_saves_and_loads_with_the_op(tmp_path):
    ae = AE(10, 3, 5)
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.export.save(torch.export.export(ae, (x,)), tmp_path / "ae.pt2")
        loaded = torch.export.load(tmp_path / "ae.pt2")
        assert op_targets(loaded.graph) == [OPS[0]]
        assert relative_error(loaded.module()(x), ae(x)) <= 1e-6
