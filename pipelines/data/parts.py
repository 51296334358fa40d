"""A table in partitions, for the data stages on a Dask cluster (`execution.data: dask`).

The table never has to fit in one process. Ingest cuts the source into pieces of about
`execution.partition_mb` at line ends (each CSV file of a source folder, and each accepted
batch, is a piece or more of its own); every later stage reads and writes folders of Parquet
parts, `part-00000.parquet` on, one per partition. Each step on a partition is the pandas
engine's own function (pipelines/data/ingest.py, clean.py, validate.py, split.py) run as a
task, and what needs the whole table is decided in this process from what the tasks return:

- clean: the quarantine share over every row, duplicates across partitions (a 64-bit hash per
  row comes back; only rows whose hash repeats are compared exactly), one list of categories;
- validate: GX's result on each partition, combined into the table's (`combine_partitions`);
- split: the split.order_by keys (or the target, to stratify) come back, `split_plan` decides
  every row's split and place, and the rows move to their split's parts through files.

A stage's output takes the old one's place only once every part is written (`atomic_folder`),
so a failed stage leaves the previous output whole. A worker lost mid-stage: Dask runs its
tasks again on another worker, and each task writes its own part, so the output is the same.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

PART = "part-{:05d}.parquet"
PLACE = "__loopline_place"  # a row's place in its split, while rows move to their split's parts


def parts_of(path: Path) -> list[Path]:
    """A stage output's partitions: the parts of a folder in order, or the one file the pandas
    engine wrote."""
    return sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]


def for_workers(value: Any) -> Any:
    """`value` with every relative path in it (in tuples and lists too) made absolute from
    this process's directory. A worker runs in a directory of its own: a relative path sent
    to it (params.yaml's `data/...`) would be read and written there instead."""
    if isinstance(value, Path):
        return value.absolute()
    if isinstance(value, tuple):
        items = [for_workers(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [for_workers(v) for v in value]
    return value


def run_tasks(client, fn: Callable[..., Any], calls: Sequence[tuple], stage: str, params: Params) -> list[Any]:
    """`fn(*call)` for every call as tasks on the cluster (its paths absolute: for_workers);
    their results in order. The first failure is raised as it was raised in the task; a task
    lost with every worker that ran it (a worker that died, typically for memory) is a
    LooplineError saying what to change."""
    from distributed import KilledWorker

    token = uuid.uuid4().hex[:12]
    futures = [
        client.submit(fn, *for_workers(call), key=f"{stage}-{i}-{token}", pure=False) for i, call in enumerate(calls)
    ]
    try:
        return client.gather(futures)
    except KilledWorker as err:
        raise LooplineError(
            stage,
            f"a partition's task was lost with every Dask worker that ran it ({err}); a worker that runs out of "
            f"memory dies this way: make partitions smaller (execution.partition_mb, now {params.execution.partition_mb}) "
            f"or give workers more memory (execution.dask.memory_limit, now {params.execution.dask.memory_limit}), "
            "or run the stage in one process (execution.data: pandas)",
        ) from None
    finally:
        client.cancel([f for f in futures if not f.done()])


@contextlib.contextmanager
def cluster(params: Params):
    from pipelines.core.cluster import kept_client

    with kept_client(params) as client:
        yield client
