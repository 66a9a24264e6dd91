"""Shared fixtures: fresh random generators and the ISAs this CPU can run."""

from __future__ import annotations

import os
import sys

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


def pytest_report_header(config: pytest.Config) -> str:
    return f"fusedae: ISA {_native.selected_isa()}, testing {', '.join(selected_isas())}"


@pytest.fixture(params=selected_isas())
def isa(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _restore_threads():
    threads, runtime = fusedae.get_num_threads(), _native.threads_runtime()
    yield
    fusedae.set_num_threads(threads)
    if runtime == "fusedae":
        _native.use_own_threads()
    else:
        _native.share_openmp_threads(runtime.removeprefix("openmp:"))


@pytest.fixture(autouse=True)
def _fused_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests of the fused training path use small batches: every call that needs gradients
    takes it, and every call traced by torch.compile takes the custom op (where torch is in
    use; the size thresholds have tests of their own)."""
    cache = sys.modules.get("fusedae.torch.cache")
    if cache is not None:
        for gate in (*cache.TRAINING_GATES, *cache.COMPILED_GATES):
            monkeypatch.setattr(cache, gate, 0)
