"""The README's training table: one step (forward, MSE, backward, Adam) of the seed's
AE(784, 16) (or, with `digits`, the digits AE 64-42-2 | 2-42-64; with `WIDTHxCODE`, the
WIDTH-42-CODE | CODE-42-WIDTH AE) on one thread (or `--threads`), plain PyTorch against
`accelerate()`d copies of the same weights. The model is the seed's class, whose
`forward` calls its encoder and decoder (two fused calls); with `sequential`, the same layers
as `nn.Sequential(encoder, decoder)` (one fused call).
"fused" forces the fused path at every batch size, "as shipped" keeps `TRAINING_MIN_ROWS`;
"no kernel" is the step through the same `autograd.Function` calls (one per fused call) whose
kernels take no time: the most any kernel could give this design. The last three columns time
the model's forward and backward alone. Every peer runs once per round, in an
order shuffled per round (on a shared VM whichever runs first or after a given peer is
otherwise favoured), medians over the rounds after three of warm-up:

    .venv/bin/python tools/training_table.py [ROUNDS] [seed|digits|WIDTHxCODE] [class|sequential]
        [--rows 64,128,...] [--threads N] [--own-pool] [--burst N]

`--rows` replaces the model's batch sizes (required for `WIDTHxCODE`); `--threads` sets
PyTorch's and fusedae's threads alike (both several: the threaded gates apply); `--own-pool` runs
fusedae's calls on its own pool instead of PyTorch's OpenMP threads. With `--burst`,
each peer makes that many calls in a row per round and the first is not timed: each call then
finds the caches as its own last call left them, as in a training loop, instead of as another
peer's did (the seed at 256 rows, Zen 4: every peer faster, the ratios the same).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

import fusedae
from fusedae.torch import accelerate, cache, share_torch_threads

WARM_UP = 3
# Per model: its input width, its code width and the batch sizes of its table.
MODELS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "seed": (784, 16, (1, 64, 256, 1024, 4096)),
    "digits": (64, 2, (256, 1024, 2048, 4096, 8192)),
}


class SeedAE(nn.Module):
    """The seed's class: hidden layers of 42, `forward` calling the encoder then the decoder."""

    def __init__(self, width: int, code: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, 42), nn.ReLU(), nn.Linear(42, code))
        self.decoder = nn.Sequential(nn.Linear(code, 42), nn.ReLU(), nn.Linear(42, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


_ZEROS: dict[tuple[int, ...], torch.Tensor] = {}


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A view of the zeros of ``shape`` kept for `_NoKernel`."""
    buffer = _ZEROS.get(shape)
    if buffer is None:
        buffer = _ZEROS[shape] = torch.zeros(shape)
    return buffer.view(shape)


class _NoKernel(torch.autograd.Function):
    """A fused call's `autograd.Function` without its kernels: ``apply(x, out_features, *params)``
    returns zeros of shape ``(rows, out_features)``, and its backward zero gradients, each a view
    of a buffer kept per shape (so no kernel's time, no memset, and gradients that
    `AccumulateGrad` takes as they are, as it does the fused backward's). It saves what
    `FusedMLPFunction` saves, but for its own outputs."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_features: int, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, *params)
        return _zeros((x.shape[0], out_features))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [
            _zeros(tuple(t.shape)) if need else None
            for t, need in zip((x, *params), (needs[0], *needs[2:]), strict=True)
        ]
        return (grads[0], None, *grads[1:])


class NoKernelChain(nn.Module):
    """What `accelerate()` makes of `layers` (one fused call), through `_NoKernel`."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers
        self.linears = [module for module in layers.modules() if isinstance(module, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [t for linear in self.linears for t in (linear.weight, linear.bias)]
        return cast(torch.Tensor, _NoKernel.apply(x, self.linears[-1].out_features, *params))


def no_kernel(model: nn.Module) -> nn.Module:
    """``model`` (from `autoencoder`) with each of its fused calls a `NoKernelChain`."""
    if isinstance(model, SeedAE):
        # `add_module`: the attributes are typed as the Sequentials they replace.
        model.add_module("encoder", NoKernelChain(model.encoder))
        model.add_module("decoder", NoKernelChain(model.decoder))
        return model
    return NoKernelChain(cast(nn.Sequential, model))


def autoencoder(width: int, code: int, sequential: bool = False) -> nn.Module:
    """The seed's AE for `width` inputs and a `code`-wide code, as its class or (`sequential`)
    as `nn.Sequential(encoder, decoder)`."""
    torch.manual_seed(0)
    model = SeedAE(width, code)
    return nn.Sequential(model.encoder, model.decoder) if sequential else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rounds", nargs="?", type=int, default=60)
    parser.add_argument("model", nargs="?", default="seed", help="seed, digits or WIDTHxCODE")
    parser.add_argument("form", nargs="?", default="class", choices=("class", "sequential"))
    parser.add_argument("--rows", help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--own-pool",
        action="store_true",
        help="fusedae's calls on its own thread pool, not PyTorch's OpenMP threads",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=1,
        help="calls a peer makes in a row each round, the first not timed (warm caches)",
    )
    args = parser.parse_args()
    rounds, form, threads, burst = args.rounds, args.form, args.threads, args.burst
    if args.model in MODELS:
        width, code, batches = MODELS[args.model]
    else:
        try:
            width, code = map(int, args.model.split("x"))
        except ValueError:
            parser.error(f"expected seed, digits or WIDTHxCODE, got {args.model!r}")
        if args.rows is None:
            parser.error("a WIDTHxCODE model needs --rows")
    if args.rows is not None:
        batches = tuple(int(rows) for rows in args.rows.split(","))
    torch.set_num_threads(threads)
    fusedae.set_num_threads(threads)
    if args.own_pool:
        share_torch_threads(False)
    # The training gate's limits, set to 0 to force the fused path.
    shipped_gates = {name: getattr(cache, name) for name in cache.TRAINING_GATES}

    def forced(force: bool) -> None:
        for name in cache.TRAINING_GATES:
            setattr(cache, name, 0 if force else shipped_gates[name])

    plain = autoencoder(width, code, form == "sequential")
    fused, _ = accelerate(copy.deepcopy(plain))
    shipped, _ = accelerate(copy.deepcopy(plain))
    # Its own copy: on `fused`, a forward + backward after `fused`'s optimizer step packed the
    # stepped weights, and the next step found them packed (half the rounds, shuffled), so its
    # column left out part of the packing every step pays.
    fused_alone, _ = accelerate(copy.deepcopy(plain))
    # The same for plain: a forward + backward of `plain` just before its step left the step
    # its weights and code paths warm (a fifth of the rounds), and "as shipped" read 0.95x plain
    # at 1 and 64 rows where it runs plain PyTorch behind a gate of a few microseconds.
    plain_alone = copy.deepcopy(plain)
    floor = no_kernel(copy.deepcopy(plain))
    floor_alone = no_kernel(copy.deepcopy(plain))
    optimizers = {
        id(m): torch.optim.Adam(m.parameters(), 1e-4) for m in (plain, fused, shipped, floor)
    }

    def step(module: nn.Module, x: torch.Tensor, _: torch.Tensor) -> None:
        optimizer = optimizers[id(module)]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(module(x), x).backward()
        optimizer.step()

    def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        for parameter in module.parameters():
            parameter.grad = None
        module(x).backward(grad)

    Run = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
    peers: list[tuple[str, nn.Module, bool, Run]] = [
        ("plain", plain, False, step),
        ("fused", fused, True, step),
        ("shipped", shipped, False, step),
        ("floor", floor, False, step),
        ("fb_plain", plain_alone, False, forward_backward),
        ("fb_fused", fused_alone, True, forward_backward),
        ("fb_floor", floor_alone, False, forward_backward),
    ]
    print(
        f"{fusedae.info()['isa']}, {threads} thread{'s' if threads > 1 else ''}, "
        f"{width}-42-{code}, the {form} form, median of {rounds} rounds, "
        f"fusedae on {fusedae.info()['threads_runtime']}"
        + (f" of {burst} calls in a row a peer (the first not timed)" if burst > 1 else "")
    )
    print(
        "| batch | plain eager | fused | as shipped | no kernel | "
        "forward + backward alone: plain | fused | no kernel |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        x, grad = torch.randn(batch, width), torch.randn(batch, width)
        times: dict[str, list[float]] = {name: [] for name, *_ in peers}
        for index in range(WARM_UP + rounds):
            order = peers.copy()
            random.Random(index).shuffle(order)
            for name, module, force, run in order:
                forced(force)
                for call in range(burst):
                    start = time.perf_counter()
                    run(module, x, grad)
                    if index >= WARM_UP and (call > 0 or burst == 1):
                        times[name].append(time.perf_counter() - start)
        forced(False)
        median = {name: statistics.median(values) for name, values in times.items()}
        plain_step = median["plain"]
        print(
            f"| {batch} | {plain_step * 1e3:.2f} ms | {plain_step / median['fused']:.2f}x | "
            f"{plain_step / median['shipped']:.2f}x | {plain_step / median['floor']:.2f}x | "
            f"{median['fb_plain'] * 1e3:.2f} ms | {median['fb_plain'] / median['fb_fused']:.2f}x | "
            f"{median['fb_plain'] / median['fb_floor']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
