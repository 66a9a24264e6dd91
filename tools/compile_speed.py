"""Speed of the fused custom op under ``torch.compile`` against ``torch.compile`` of the plain
model, and of batch-1 eager inference (issue 14, point 3). One thread (torch's and fusedae's).

    python tools/compile_speed.py compiled [--rows 4096 ...] [--reps 40] [--burst N] [--gates-off]
        [--digits]
    python tools/compile_speed.py eager    # batch-1 eager inference, median ns per call

``compiled``: the seed AE 784-42-16-42-784 (with ``--digits``, the digits AE 64-42-2-42-64) as
``fusedae.torch.AE`` against the seed's class, and
as ``accelerate()`` of nested ``nn.Sequential`` against the same Sequential unaccelerated; each
compiled with the default (inductor) backend; inference under ``no_grad``, and the training
step (forward, MSE, backward, Adam), the MSE loss run eagerly after the compiled model or
compiled with it. Plain and fused calls are interleaved, medians reported; with ``--burst``, each
peer makes that many calls in a row per repetition, the first not timed, so each call finds the
caches and the allocator as its own last call left them, as in a loop over batches, instead of
as the other peer's did (the seed AE's compiled inference at 4096 rows, Intel Xeon: plain 6.6 ms
interleaved, 5.0-5.5 ms in bursts of 6; fused 4.1-4.4 ms in both). The gates of
``fusedae.torch.cache`` apply as shipped (below them the accelerated model traces plain
PyTorch), or with ``--gates-off`` not at all: the op at every size, as the gates were chosen.
Before/after comparisons of ``eager``: run it with each tree first on ``PYTHONPATH``, alternating.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from training_table import MODELS  # (this script's folder is on sys.path)

import fusedae
from fusedae.torch import AE, accelerate, cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _seed import AE as SeedAE


def nested(width: int, code: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Linear(width, 42), nn.ReLU(), nn.Linear(42, code)),
        nn.Sequential(nn.Linear(code, 42), nn.ReLU(), nn.Linear(42, width)),
    )


def pairs(width: int = 784, code: int = 16) -> dict[str, tuple[nn.Module, nn.Module]]:
    """name -> (plain, fused) with the same weights, for inputs of ``width`` values."""
    seed = SeedAE(width, code, 42)
    ae = AE(width, code, 42)
    ae.load_state_dict(seed.state_dict())
    plain = nested(width, code)
    fused, _ = accelerate(copy.deepcopy(plain))
    return {"AE": (seed, ae), "accelerate(Sequential)": (plain, fused)}


def interleaved(
    calls: dict[str, Callable[[], object]], reps: int, burst: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call, ``reps`` times, the calls interleaved; with ``burst`` > 1 each
    time is the mean of ``burst - 1`` calls in a row after one untimed."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm
    timed = max(burst - 1, 1)
    for _ in range(reps):
        for name, call in calls.items():
            if burst > 1:
                call()
            start = time.perf_counter()
            for _ in range(timed):
                call()
            times[name].append((time.perf_counter() - start) / timed)
    return times


def summary(times: dict[str, list[float]]) -> str:
    plain, fused = times["plain"], times["fused"]
    median = statistics.median
    return (
        f"median plain {median(plain) * 1e3:6.2f} ms, fused {median(fused) * 1e3:6.2f} ms, "
        f"{median(plain) / median(fused):.2f}x; min {min(plain) * 1e3:6.2f}, "
        f"{min(fused) * 1e3:6.2f} ms, {min(plain) / min(fused):.2f}x"
    )


def step_function(model: nn.Module, x: torch.Tensor, compiled_loss: bool) -> Callable[[], object]:
    """A training step: forward, MSE against the input, backward, Adam."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    compiled = torch.compile(model)
    loss_of = torch.compile(lambda x: nn.functional.mse_loss(model(x), x))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x) if compiled_loss else nn.functional.mse_loss(compiled(x), x)
        loss.backward()
        optimizer.step()

    step()  # compiles the backward
    return step


def compiled(rows: int, reps: int, rounds: int, width: int, code: int, burst: int) -> None:
    x = torch.randn(rows, width)
    for name, (plain, fused) in pairs(width, code).items():
        models = {"plain": copy.deepcopy(plain), "fused": copy.deepcopy(fused)}
        forwards = {key: torch.compile(model) for key, model in models.items()}
        with torch.no_grad():
            assert (forwards["plain"](x) - forwards["fused"](x)).abs().max() < 1e-4
        steps = {
            compiled_loss: {
                key: step_function(model, x, compiled_loss) for key, model in models.items()
            }
            for compiled_loss in (False, True)
        }
        for round_ in range(rounds):
            with torch.no_grad():
                calls: dict[str, Callable[[], object]] = {
                    key: functools.partial(f, x) for key, f in forwards.items()
                }
                print(
                    f"{name} {rows} rows round {round_} inference:          "
                    f"{summary(interleaved(calls, reps, burst))}"
                )
            for compiled_loss, functions in steps.items():
                kind = "train, loss compiled" if compiled_loss else "train, loss eager:  "
                print(
                    f"{name} {rows} rows round {round_} {kind}: "
                    f"{summary(interleaved(functions, reps, burst))}"
                )
        torch._dynamo.reset()


def eager(reps: int) -> None:
    x = torch.randn(1, 784)
    for name, (_, fused) in pairs().items():
        with torch.no_grad():
            for _ in range(1000):
                fused(x)
            medians = []
            for _ in range(reps):
                start = time.perf_counter_ns()
                for _ in range(1000):
                    fused(x)
                medians.append((time.perf_counter_ns() - start) / 1000)
        print(f"{name:24} batch-1 eager no_grad: {statistics.median(medians):.0f} ns per call")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("compiled", "eager"))
    parser.add_argument("--rows", type=int, nargs="+", default=[4096])
    parser.add_argument(
        "--gates-off", action="store_true", help="the op at every size (the gates set to 0)"
    )
    parser.add_argument("--digits", action="store_true", help="the digits AE 64-42-2-42-64")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--burst", type=int, default=1, help="calls in a row a peer (the first not timed)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    fusedae.set_num_threads(1)
    torch.manual_seed(0)
    print(f"fusedae from {fusedae.__file__}, torch {torch.__version__}")
    if args.gates_off:
        for gate in (*cache.TRAINING_GATES, *cache.COMPILED_GATES):
            setattr(cache, gate, 0)
    if args.what == "compiled":
        for rows in args.rows:
            width, code, _ = MODELS["digits" if args.digits else "seed"]
            compiled(rows, args.reps, args.rounds, width, code, args.burst)
    else:
        eager(args.reps)


if __name__ == "__main__":
    main()
