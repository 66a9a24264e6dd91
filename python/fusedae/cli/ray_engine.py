"""``fusedae encode --engine ray``: the Parquet job of ``cli.parquet`` on Ray Data.

The unit of work is a shard, as in this process: an actor encodes a whole input shard into its
output shard through ``staged_output``, so the job keeps what the local engine promises (one
output shard per input shard, never a partial one under its name, ``--resume`` after any
interruption); Ray Data's ``write_parquet`` names its files by write task, not by input shard,
so neither would hold through it. The shards are the items of a Ray dataset mapped by a pool of
actors; each actor reads its shard itself (the path must be readable on every node: a shared
file system), loads the model once, and runs a reader thread beside as many kernel threads as
its CPUs, as ``encode`` does here.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from typing import Any

import numpy as np

from fusedae.cli.common import TERMINATION_SIGNALS, CommandError, progress_bar, say
from fusedae.cli.parquet import Job, plan
from fusedae.mlp import MLP

ACTOR_RETRIES = 2


def import_ray() -> Any:
    try:
        import ray
        import ray.data
        import ray.exceptions
    except ImportError:
        raise CommandError("--engine ray needs Ray: pip install 'fusedae[ray]'") from None
    return ray


class ShardEncoder:
    """The actor: encodes each shard index of a batch, returning the rows each one held, or the
    ``CommandError`` that stopped it as a message (Ray Data hands the driver its own
    ``UserCodeException`` for an exception a task raises, with the original only as text)."""

    def __init__(self, job: Job) -> None:
        from fusedae.ray import threads_from_actor_cpus

        threads_from_actor_cpus()
        self.job = job

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, errors = [], []
        for index in batch["shard"]:
            shard = self.job.todo[index]
            try:
                self.job.encode(shard, NoProgress())
            except CommandError as error:
                rows.append(0)
                errors.append(str(error))
            else:
                rows.append(shard.rows)
                errors.append("")
        return {"shard": batch["shard"], "rows": np.array(rows), "error": np.array(errors)}


class NoProgress:
    """The progress bar of an actor's shard: the driver counts finished shards instead."""

    def update(self, rows: int) -> None:
        pass


def pool_size(ray: Any, requested: int | None, cpus_per_actor: int, shards: int) -> int:
    """Actors for the pool: ``requested``, else as many as the cluster's CPUs hold, at most one a
    shard. A pool the cluster cannot place would wait forever, so it is an error instead."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest = max((node["Resources"].get("CPU", 0) for node in nodes), default=0)
    if cpus_per_actor > largest:
        raise CommandError(
            f"--cpus-per-actor {cpus_per_actor}: the largest node of the cluster has "
            f"{largest:g} CPUs"
        )
    placeable = sum(int(node["Resources"].get("CPU", 0) // cpus_per_actor) for node in nodes)
    if requested is not None and requested > placeable:
        raise CommandError(
            f"--actors {requested} x {cpus_per_actor} CPU(s): the cluster has room for {placeable}"
        )
    return min(requested or placeable, shards)


def encode(args: argparse.Namespace, model_for: Callable[[np.dtype], MLP]) -> None:
    """Plans and checks the job here, then maps the shards not done yet over a pool of actors on
    the cluster at ``RAY_ADDRESS`` (else a local one), with a progress bar over finished rows."""
    import fusedae.ray

    ray = import_ray()
    # The actors open the paths from their own working directories, on other hosts too.
    args.input, args.output = args.input.absolute(), args.output.absolute()
    job = plan(args, model_for)
    cpus_per_actor = args.cpus_per_actor or 1
    if not job.todo:
        say(job.summary(args.output, "nothing to do on Ray"))
        return
    handlers = {signum: signal.getsignal(signum) for signum in TERMINATION_SIGNALS}
    fusedae.ray.init()
    for signum, handler in handlers.items():  # ray.init installs its own
        signal.signal(signum, handler)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows; Ray's would count shards
    actors = pool_size(ray, args.actors, cpus_per_actor, len(job.todo))
    shards = ray.data.from_items(
        [{"shard": index} for index in range(len(job.todo))],
        override_num_blocks=len(job.todo),
    )
    results = shards.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"job": job},
        batch_format="numpy",
        batch_size=1,
        # One shard at a time per actor: queued behind a long shard, others would wait while
        # another actor is idle.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_actor,
        # An actor that dies on a shard (the OOM killer, a crash) is restarted and the shard
        # retried this many times, then the job fails; Ray Data's default retries forever.
        max_restarts=ACTOR_RETRIES,
        max_task_retries=ACTOR_RETRIES,
    )
    with progress_bar(total=job.rows, unit="row", unit_scale=True) as bar:
        try:
            for done, row in enumerate(results.iter_rows(), 1):
                if row["error"]:
                    raise CommandError(row["error"])
                bar.set_postfix_str(f"shards {done}/{len(job.todo)}", refresh=False)
                bar.update(int(row["rows"]))
        except ray.exceptions.ActorDiedError:
            raise CommandError(
                f"an actor died encoding a shard, {ACTOR_RETRIES + 1} times (out of memory? "
                "fewer --actors or a smaller --batch-size need less); the shards finished "
                "before are kept: --resume does the rest"
            ) from None
    say(
        job.summary(
            args.output,
            f"Ray: {actors} actor(s) x {cpus_per_actor} CPU(s), each running a reader thread "
            "and as many kernel threads as its CPUs",
        )
    )
