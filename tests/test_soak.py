"""Concurrency soak: eight Python threads call mixed models, shapes and dtypes while another
thread changes the thread count and swaps the models' weights, for a bounded time. Every result
is checked, bit for bit where the answer cannot depend on the thread count (a forward pass splits
rows, never a row's sum); no deadlock (a join with a deadline), no crash."""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import fusedae
from fusedae.torch import FusedMLP

SOAK_SECONDS = float(os.environ.get("FUSEDAE_SOAK_SECONDS", "8"))
READERS = 8
ROWS = (0, 1, 7, 300, 2049)  # 2049: split across threads, with a ragged last share

# (widths, activations, dtype): the seed's encoder and decoder, a width-1 chain, a deeper one.
MODELS = [
    ([784, 42, 16], ["relu", "identity"], np.float32),
    ([16, 42, 784], ["relu", "sigmoid"], np.float64),
    ([1, 5, 1], ["tanh", "identity"], np.float32),
    ([33, 42, 42, 7], ["relu", "tanh", "identity"], np.float64),
]


def random_mlp(rng: np.random.Generator, widths, activations, dtype) -> fusedae.MLP:
    layers = [
        (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.standard_normal(n_out))
        for n_in, n_out in itertools.pairwise(widths)
    ]
    return fusedae.MLP(layers, activations, dtype=dtype)


def torch_model(seed: int) -> FusedMLP:
    torch.manual_seed(seed)
    return FusedMLP(nn.Linear(64, 42), nn.ReLU(), nn.Linear(42, 8), nn.Tanh())


class Soak:
    """The shared state: model slots the swapper replaces, expected answers, what went wrong."""

    def __init__(self, rng: np.random.Generator) -> None:
        fusedae.set_num_threads(1)
        # Two weight sets per model; a slot holds one of them at a time.
        self.versions = [[random_mlp(rng, *model) for _ in range(2)] for model in MODELS]
        self.slots = [versions[0] for versions in self.versions]
        self.inputs = {
            (index, rows): rng.standard_normal((rows, MODELS[index][0][0])).astype(MODELS[index][2])
            for index in range(len(MODELS))
            for rows in ROWS
        }
        self.expected = {
            (id(mlp), rows): mlp(self.inputs[index, rows])
            for index, versions in enumerate(self.versions)
            for mlp in versions
            for rows in ROWS
        }
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.calls: list[int] = []  # per worker, once it stopped
        self.lock = threading.Lock()

    def record(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)
        self.stop.set()

    def count(self, calls: int) -> None:
        with self.lock:
            self.calls.append(calls)

    def run(self, work: Callable[[np.random.Generator], None], seed: int) -> None:
        rng = np.random.default_rng(seed)
        calls = 0
        try:
            while not self.stop.is_set():
                work(rng)
                calls += 1
        except BaseException:
            self.record(traceback.format_exc())
        self.count(calls)

    def numpy_call(self, rng: np.random.Generator) -> None:
        index = int(rng.integers(len(MODELS)))
        rows = ROWS[int(rng.integers(len(ROWS)))]
        mlp = self.slots[index]  # whichever weights the swapper left there
        x = self.inputs[index, rows]
        if rng.random() < 0.3:  # a strided view of the same rows: the general path copies it
            wide = np.repeat(x, 2, axis=1)
            x = wide[:, ::2]
        got = mlp(x)
        if not np.array_equal(got, self.expected[id(mlp), rows], equal_nan=True):
            self.record(f"model {index}, {rows} rows: wrong result")

    def swap(self, rng: np.random.Generator) -> None:
        fusedae.set_num_threads(int(rng.integers(1, 4)))
        index = int(rng.integers(len(MODELS)))
        self.slots[index] = self.versions[index][int(rng.integers(2))]
        time.sleep(0.001)


class TorchReader:
    """One thread's own module, whose weights it replaces with load_state_dict between calls,
    and a module shared by all readers; forward under no_grad is checked bit for bit, forward
    and backward within float32 rounding (gradient sums depend on the thread count)."""

    shared = torch_model(0)

    def __init__(self, seed: int) -> None:
        self.module = torch_model(seed)
        self.states = [torch_model(seed + 100 + k).state_dict() for k in range(2)]
        self.x = torch.randn(max(ROWS), 64, generator=torch.Generator().manual_seed(seed))
        fusedae.set_num_threads(1)
        self.expected = []  # per version: {rows: output}, and the input's gradient
        for state in self.states:
            self.module.load_state_dict(state)
            with torch.no_grad():
                outputs = {rows: self.module(self.x[:rows]) for rows in ROWS}
            x = self.x.clone().requires_grad_()
            self.module(x).square().sum().backward()
            self.expected.append((outputs, x.grad))
        with torch.no_grad():
            self.shared_expected = {rows: self.shared(self.x[:rows]) for rows in ROWS}

    def __call__(self, rng: np.random.Generator) -> None:
        version = int(rng.integers(2))
        self.module.load_state_dict(self.states[version])
        outputs, want_grad = self.expected[version]
        rows = ROWS[int(rng.integers(len(ROWS)))]
        with torch.no_grad():
            if not torch.equal(self.module(self.x[:rows]), outputs[rows]):
                raise AssertionError(f"own module, {rows} rows: wrong forward")
            if not torch.equal(self.shared(self.x[:rows]), self.shared_expected[rows]):
                raise AssertionError(f"shared module, {rows} rows: wrong forward")
        x = self.x.clone().requires_grad_()
        self.module(x).square().sum().backward()
        torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-5)


def test_threads_calling_while_weights_and_thread_counts_change(rng):
    soak = Soak(rng)
    torch_readers = [TorchReader(seed) for seed in range(2)]
    workers: list[Callable[[np.random.Generator], None]] = [
        *torch_readers,
        *[soak.numpy_call] * (READERS - len(torch_readers)),
        soak.swap,
    ]
    seeds = rng.integers(2**32, size=len(workers))
    threads = [
        threading.Thread(target=soak.run, args=(work, int(seed)), daemon=True)
        for work, seed in zip(workers, seeds, strict=True)
    ]
    for thread in threads:
        thread.start()
    soak.stop.wait(SOAK_SECONDS)
    soak.stop.set()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [thread.name for thread in threads if thread.is_alive()]
    assert not hung, f"threads still running 120 s after the soak ended (deadlock?): {hung}"
    assert not soak.failures, soak.failures[0]
    assert min(soak.calls) >= 5, f"calls per worker in {SOAK_SECONDS} s: {soak.calls}"
