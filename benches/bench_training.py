"""Training-step speed: one step of forward, MSE loss, backward and Adam, plain PyTorch against
the same model through ``fusedae.torch.accelerate``, eager and under ``torch.compile``; one
pytest-benchmark group per (model, batch, threads).

Each peer trains its own copy of the same weights on the same batch (the loss is the seed's
reconstruction error). Before timing, one step of every peer is checked against plain PyTorch's
step: the same loss and the same gradients, so the smoke run (benchmarks disabled) is a test of
the training path. ``report.py`` renders these groups in a section of their own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from fusedae.torch import accelerate

# Rows per step when benchmarks are disabled (the smoke run).
SMOKE_MAX_ROWS = 64


@dataclass(frozen=True)
class TrainedModel:
    """The seed's autoencoder ``AE(x_dim, z_dim, h_dim)`` and its widths."""

    key: str
    label: str
    x_dim: int
    z_dim: int
    h_dim: int = 42

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds of the forward (2 per) times 3: the backward computes twice as many
        (the gradients of the inputs and of the weights)."""
        x, h, z = self.x_dim, self.h_dim, self.z_dim
        return 3 * 2 * 2 * (x * h + h * z)


MODELS = (
    TrainedModel("ae784", "AE 784-42-16-42-784", 784, 16),
    TrainedModel("digits", "AE 64-42-2-42-64", 64, 2),
)
BATCHES = (1, 64, 256, 4096)
THREADS = (1, 2)
PEERS = ("fusedae-eager", "fusedae-compile", "torch-eager", "torch-compile")
MODEL_BY_KEY = {model.key: model for model in MODELS}
# Passes over every group, one after another, as in bench_models.py (`make bench` asks for 4):
# the peers of a group run one after another, so a neighbour on the host that slows one of them
# for a while would tilt a single pass; the report keeps each peer's fastest pass.
PASSES = int(os.environ.get("FUSEDAE_BENCH_PASSES", "1"))

CASES = [
    pytest.param(
        pass_index,
        model.key,
        batch,
        threads,
        peer,
        id=f"train-{model.key}-b{batch}-t{threads}-{peer}"
        + (f"-pass{pass_index}" if PASSES > 1 else ""),
    )
    for pass_index in range(PASSES)
    for model in MODELS
    for batch in BATCHES
    for threads in THREADS
    for peer in PEERS
]


def group_name(model: TrainedModel, batch: int, threads: int) -> str:
    plural = "s" if threads > 1 else ""
    return f"training step {model.label} | batch {batch} | {threads} thread{plural}"


def _plain(seed_ae: type[nn.Module], model: TrainedModel) -> nn.Module:
    torch.manual_seed(model.x_dim + model.z_dim)
    return seed_ae(model.x_dim, model.z_dim, model.h_dim)


def _peer_module(plain: nn.Module, peer: str) -> nn.Module:
    module = copy.deepcopy(plain)
    if peer.startswith("fusedae"):
        module, _ = accelerate(module)
    if peer.endswith("compile"):
        torch._dynamo.reset()  # compile afresh for this batch size and thread count
        module = torch.compile(module)
    return module


def _step(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step of ``module`` on ``x`` (Adam, the MSE reconstruction loss)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(module(x), x)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _loss_and_gradients(module: nn.Module, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(module(x), x)
    loss.backward()
    return float(loss), [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize(("pass_index", "model_key", "batch", "threads", "peer"), CASES)
def test_training_step(
    benchmark: Any,
    measure: Callable[[Callable[[], Any]], None],
    pin_threads: Any,
    seed_ae: type[nn.Module],
    pass_index: int,
    model_key: str,
    batch: int,
    threads: int,
    peer: str,
) -> None:
    model = MODEL_BY_KEY[model_key]
    rows = batch if benchmark.enabled else min(batch, SMOKE_MAX_ROWS)
    benchmark.group = group_name(model, batch, threads)
    benchmark.extra_info.update(
        kind="training",
        pass_index=pass_index,
        model=model.label,
        model_key=model.key,
        batch=batch,
        rows=rows,
        threads=threads,
        peer=peer,
        flops=model.flops_per_row * rows,
    )
    if peer.endswith("compile") and benchmark.disabled:
        pytest.skip("torch.compile is only run when benchmarking (it takes seconds)")
    with pin_threads(threads):
        x = torch.rand(rows, model.x_dim, generator=torch.Generator().manual_seed(rows))
        plain = _plain(seed_ae, model)
        module = _peer_module(plain, peer)
        want_loss, want_grads = _loss_and_gradients(plain, x)
        loss, grads = _loss_and_gradients(module, x)
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for got, want in zip(grads, want_grads, strict=True):
            # In norm, not per element: where a ReLU's input is within rounding of 0 the fused
            # forward may take the other side than PyTorch's, and that row's contribution to
            # the gradient differs (a few tenths of a percent of the norm at 4096 rows).
            assert float((got - want).norm()) <= 1e-2 * float(want.norm()) + 1e-12
        measure(_step(module, x))
