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
from fusedae.torch import accelerate, cache

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


class DataSGD(torch.optim.Optimizer):
    """Plain SGD written as many optimizers outside torch are (LAMB's among them): through
    ``p.data``, which bumps no version counter."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["lr"])


def test_an_optimizer_that_writes_data_trains_as_in_pytorch(monkeypatch):
    """The packed chain kept the first weights for the whole run (a tester's loss stayed 1.0252
    for 30 steps, plain went to 0.34): a step of any optimizer now has the next call pack again
    from the parameters' memory."""
    for gate in cache.TRAINING_GATES:
        monkeypatch.setattr(cache, gate, 0)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    fused, _ = accelerate(copy.deepcopy(plain))
    x = torch.randn(64, 8)
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        optimizer = DataSGD(model.parameters(), lr=0.1)
        losses[name] = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), x)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["fused"], losses["plain"])
    assert losses["fused"][-1] < losses["fused"][0]
    # Another model's packing (a teacher's) is left alone by this optimizer's steps.
    teacher, _ = accelerate(copy.deepcopy(plain))
    with torch.no_grad():
        teacher(x)
    optimizer.step()
    assert fused._fused.stepped
    assert not teacher._fused.stepped
