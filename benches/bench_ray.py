"""Encoding a Parquet file on Ray Data: rows per second of the same pipeline (``read_parquet``
-> ``map_batches`` -> batches consumed by the driver) with an identity callable (the ceiling),
with ``fusedae.ray.Encoder`` at 1 actor x 2 CPUs and 2 actors x 1 CPU, with the plain PyTorch
model in the same callable (what users write today), and with fusedae's threads left at the
machine's count inside 2 actors (the cost of oversubscription); beside them, pyarrow reading the
file alone and ``fusedae encode`` on 1 and 2 threads in this process. ``report.py`` renders a
section of its own.

The input is ``bench_parquet.py``'s (rows of 784 float32 values, the seed's encoder to 16), 2M
rows (6.3 GB) by default: FUSEDAE_BENCH_RAY_ROWS changes it. Each Ray run includes starting its
actors (loading the model; importing torch for the PyTorch peer), as every real job does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fusedae
from bench_parquet import encode, read_only, torch_encoder, write_lake

ray = pytest.importorskip("ray", reason="Ray needs the extra: pip install 'fusedae[ray]'")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

from fusedae.ray import Encoder  # noqa: E402 (needs ray)

RAY = "ray"
ROWS = int(os.environ.get("FUSEDAE_BENCH_RAY_ROWS", "2000000"))
SMOKE_ROWS = 2_500
BATCH = 8192  # rows per map_batches call
# The actors' CPUs plus one for Ray Data's read tasks, without which the actor pool waits
# forever for its input: logical CPUs, the machine's cores shared by all.
CLUSTER_CPUS = 3
# peer: (actors, CPUs per actor, batch format); None for the runs outside Ray.
PEERS: dict[str, tuple[int, int, str] | None] = {
    "pyarrow-read": None,
    "fusedae-encode-t1": None,
    "fusedae-encode-t2": None,
    "ray-identity": (2, 1, "numpy"),
    "ray-fusedae-1x2": (1, 2, "numpy"),
    "ray-fusedae-2x1": (2, 1, "numpy"),
    "ray-torch-2x1": (2, 1, "numpy"),
    "ray-fusedae-2x1-oversubscribed": (2, 1, "numpy"),
    "ray-identity-arrow": (2, 1, "pyarrow"),
    "ray-fusedae-2x1-arrow": (2, 1, "pyarrow"),
}


class Identity:
    def __call__(self, batch: Any) -> Any:
        return batch


class TorchEncoder:
    """The plain PyTorch model in a ``map_batches`` callable, as users write it."""

    def __init__(self, model: str, input_column: str) -> None:
        self.model = torch_encoder(Path(model))
        self.input_column = input_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            rows = np.stack(batch.pop(self.input_column))  # a list column arrives as objects
            codes = self.model(torch.from_numpy(rows)).numpy()
        return {**batch, "codes": codes}


class OversubscribedEncoder(Encoder):
    """``Encoder`` with its thread count left at the machine's (what fusedae did before it read
    the actor's CPUs): each actor runs that many threads, whatever Ray gave it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        fusedae.set_num_threads(os.cpu_count() or 1)


CALLABLES: dict[str, type] = {
    "ray-identity": Identity,
    "ray-fusedae-1x2": Encoder,
    "ray-fusedae-2x1": Encoder,
    "ray-torch-2x1": TorchEncoder,
    "ray-fusedae-2x1-oversubscribed": OversubscribedEncoder,
    "ray-identity-arrow": Identity,
    "ray-fusedae-2x1-arrow": Encoder,
}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    options = request.config.getoption
    disabled = options("benchmark_disable") and not options("benchmark_enable")
    return write_lake(tmp_path_factory.mktemp("ray-bench"), SMOKE_ROWS if disabled else ROWS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    import ray.cloudpickle

    # The callables defined here travel by value: the workers cannot import this module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["bench_parquet"])
    fusedae.ray.init(num_cpus=CLUSTER_CPUS)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def ray_pipeline(peer: str, model: Path, source: Path) -> int:
    """Runs ``peer``'s pipeline over ``source``; the rows the driver received."""
    actors, cpus, batch_format = PEERS[peer] or (0, 0, "")
    identity = CALLABLES[peer] is Identity
    kwargs = {} if identity else {"model": str(model), "input_column": "x"}
    encoded = ray.data.read_parquet(str(source)).map_batches(
        CALLABLES[peer],
        fn_constructor_kwargs=kwargs,
        batch_format=batch_format,
        batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
    )
    return sum(batch.num_rows for batch in encoded.iter_batches(batch_format="pyarrow"))


@pytest.mark.parametrize("peer", PEERS)
def test_encode_parquet_on_ray(
    benchmark: Any, lake: Path, cluster: None, tmp_path: Path, peer: str
) -> None:
    source = lake / "rows.parquet"
    model = lake / "ae.safetensors"
    rows = pq.read_metadata(source).num_rows
    targets: dict[str, Callable[[], object]] = {
        "pyarrow-read": lambda: read_only(source),
        "fusedae-encode-t1": lambda: encode(lake, 1, tmp_path / "codes.parquet"),
        "fusedae-encode-t2": lambda: encode(lake, 2, tmp_path / "codes.parquet"),
    }
    target = targets.get(peer, lambda: ray_pipeline(peer, model, source))
    actors, cpus, batch_format = PEERS[peer] or (None, None, None)
    benchmark.group = f"ray-{rows}"
    benchmark.extra_info.update(
        {
            "kind": RAY,
            "peer": peer,
            "rows": rows,
            "actors": actors,
            "cpus_per_actor": cpus,
            "batch_format": batch_format,
        }
    )
    threads = fusedae.get_num_threads()
    try:
        if benchmark.disabled:
            received = benchmark(target)
        else:
            received = benchmark.pedantic(target, rounds=3, warmup_rounds=0)
    finally:
        fusedae.set_num_threads(threads)
    assert received in (None, rows)  # every row read (encode checks its own)
