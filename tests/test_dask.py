"""``fusedae.MLP`` on a Dask cluster (a ``LocalCluster`` of 2 worker processes): from
``dask.array.map_blocks`` and ``dask.dataframe.map_partitions``, row for row equal to a local
call, the model serialized once into the graph however many blocks, and one kernel thread per
worker (Dask's nanny sets ``OMP_NUM_THREADS=1``, which fusedae follows)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

import fusedae
import fusedae.mlp
from fusedae import MLP

dask = pytest.importorskip("dask", reason="the Dask tests need dask[distributed,dataframe]")
da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
pd = pytest.importorskip("pandas")
distributed = pytest.importorskip("distributed")

WIDTHS = (10, 42, 3)


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        yield client


def make_mlp(dtype: type) -> MLP:
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.standard_normal(n_out))
        for n_in, n_out in itertools.pairwise(WIDTHS)
    ]
    return MLP(layers, ["relu", "tanh"], dtype=dtype)


def encode_block(block: np.ndarray, model: MLP) -> np.ndarray:
    return model(block)


def encode_partition(part: pd.DataFrame, model: MLP, columns: list[str]) -> pd.DataFrame:
    codes = model(part[columns].to_numpy(model.dtype))
    return pd.DataFrame(
        codes, index=part.index, columns=[f"z{i}" for i in range(model.out_features)]
    ).assign(id=part["id"])


def encoded_array(x: np.ndarray, rows_per_block: int, model: MLP) -> da.Array:
    blocks = da.from_array(x, chunks=(rows_per_block, x.shape[1]))
    meta = np.empty((0, model.out_features), model.dtype)
    # dask.delayed puts the model into the graph once, as a key every block depends on; passed
    # as the function itself it would be pickled into every task.
    return blocks.map_blocks(
        encode_block,
        dask.delayed(model),
        chunks=(blocks.chunks[0], (model.out_features,)),
        meta=meta,
    )


def tolerance(dtype: type) -> float:
    return 16 * float(np.finfo(dtype).eps)


def test_workers_run_one_kernel_thread(client: distributed.Client) -> None:
    def threads() -> tuple[int, str]:
        return fusedae.get_num_threads(), fusedae.info()["threads_from"]

    assert set(client.run(threads).values()) == {(1, "OMP_NUM_THREADS=1")}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_map_blocks_row_for_row(client: distributed.Client, dtype: type) -> None:
    mlp = make_mlp(dtype)
    x = np.random.default_rng(1).standard_normal((1000, WIDTHS[0])).astype(dtype)
    got = encoded_array(x, 300, mlp).compute()  # the last block holds 100 rows
    assert got.dtype == dtype
    np.testing.assert_allclose(got, mlp(x), rtol=tolerance(dtype), atol=tolerance(dtype))


def test_the_model_is_serialized_once_however_many_blocks(
    client: distributed.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlp = make_mlp(np.float32)
    x = np.random.default_rng(2).standard_normal((1000, WIDTHS[0])).astype(np.float32)
    reduce = fusedae.mlp.MLP.__reduce__
    pickled = []

    def counting(self: MLP) -> tuple[object, ...]:
        pickled.append(self)
        return reduce(self)

    monkeypatch.setattr(fusedae.mlp.MLP, "__reduce__", counting)
    counts = []
    for rows_per_block in (250, 25):  # 4 blocks, then 40
        pickled.clear()
        encoded_array(x, rows_per_block, mlp).compute()
        counts.append(len(pickled))
    # A fixed number (the graph's serialization may try pickle, then cloudpickle), not one per
    # block: passed as the function, the model was pickled 5 and 41 times.
    assert counts[0] == counts[1] <= 3, counts


def test_map_partitions_row_for_row(client: distributed.Client) -> None:
    mlp = make_mlp(np.float32)
    rng = np.random.default_rng(3)
    columns = [f"x{i}" for i in range(WIDTHS[0])]
    frame = pd.DataFrame(rng.standard_normal((777, WIDTHS[0])), columns=columns)
    frame["id"] = np.arange(len(frame))
    partitions = dd.from_pandas(frame, npartitions=3)
    meta = pd.DataFrame(
        {**{f"z{i}": np.float32() for i in range(mlp.out_features)}, "id": np.int64()}, index=[]
    )
    got = (
        partitions.map_partitions(encode_partition, dask.delayed(mlp), columns, meta=meta)
        .compute()
        .sort_values("id")
    )
    np.testing.assert_array_equal(got["id"].to_numpy(), frame["id"].to_numpy())
    want = mlp(frame[columns].to_numpy(np.float32))
    np.testing.assert_allclose(
        got[[f"z{i}" for i in range(mlp.out_features)]].to_numpy(), want, rtol=1e-6, atol=1e-6
    )
