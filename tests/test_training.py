"""Training through the fused kernels end to end: many steps on real data reach plain PyTorch's
loss, and `DistributedDataParallel` over two CPU processes (gloo) gives both ranks, and one
process on the whole batch, the same parameters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedae
from _seed import AE
from _tensors import relative_error
from fusedae.torch import accelerate

STEPS = 200
DDP_STEPS = 4
DDP_ROWS = 48


def _train(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """The seed's reconstruction loss under Adam, one full batch per step; the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), x)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_200_steps_on_the_digits_reach_plain_pytorchs_loss():
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.tensor(datasets.load_digits().data / 16.0, dtype=torch.float32)
    torch.manual_seed(0)
    plain = AE(64, 2)
    fused, report = accelerate(copy.deepcopy(plain))
    assert "FusedMLPFunction" in type(fused(x).grad_fn).__name__, report
    want = _train(plain, x, STEPS)
    got = _train(fused, x, STEPS)
    assert got[-1] < 0.5 * got[0]  # it learned
    assert abs(got[-1] - want[-1]) <= 0.01 * want[-1], (got[-1], want[-1])


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: the accelerated seed AE under DDP, trained on its share of the batch; its
    parameters saved for the test to compare."""
    from fusedae.torch import cache

    # Every call trains fused, whatever its size (as the tests' conftest sets it).
    for gate in cache.TRAINING_GATES:
        setattr(cache, gate, 0)
    torch.set_num_threads(1)
    fusedae.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, _ = accelerate(AE(20, 3, 7))
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(DDP_ROWS, 20, generator=torch.Generator().manual_seed(1))
        share = x.chunk(world)[rank]
        fused = "FusedMLPFunction" in type(ddp(share).grad_fn).__name__
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(DDP_STEPS):
            optimizer.zero_grad()
            nn.functional.mse_loss(ddp(share), share).backward()
            optimizer.step()
        torch.save({"fused": fused, "state": model.state_dict()}, Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_on_two_processes(tmp_path):
    """Gradients averaged over two ranks of half the batch each are the gradients of the mean
    loss over the whole batch: both ranks end with the same parameters as one process trained
    on all of it (plain PyTorch), within float rounding."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert all(rank["fused"] for rank in ranks)
    torch.manual_seed(0)
    alone = AE(20, 3, 7)
    x = torch.randn(DDP_ROWS, 20, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(alone.parameters(), lr=0.1)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(alone(x), x).backward()
        optimizer.step()
    for key, want in alone.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        assert relative_error(ranks[0]["state"][key], want) <= 1e-5, key
