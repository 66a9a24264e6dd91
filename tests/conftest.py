"""Shared fixtures: fresh random generators and the ISAs this CPU can run."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest

import fusedae
from fusedae import _native


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator seeded from the OS: every run draws fresh inputs (the seed is printed on
    failure through pytest's -ra summary of the test id and this repr)."""
    return np.random.default_rng()


def selected_isas() -> list[str]:
    """Every ISA to test in this process: all the CPU supports, or only the forced one."""
    forced = os.environ.get("FUSEDAE_ISA")
    return [forced] if forced else _native.available_isas()


@pytest.fixture(params=selected_isas())
def isa(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = fusedae.get_num_threads()
    yield
    fusedae.set_num_threads(threads)


def run_at_once(check: Callable[[int], bool], count: int) -> list[int]:
    """Starts ``count`` threads together, thread ``i`` calling ``check(i)``; returns the indices
    whose check failed."""
    failed: list[int] = []
    barrier = threading.Barrier(count)

    def work(index: int) -> None:
        barrier.wait()
        if not check(index):
            failed.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed
