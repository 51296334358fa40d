"""The Dask cluster loopline's work runs on (`execution.dask`): the candidate search's fits
(execution.runner: dask) and the data stages' partitions (execution.data: dask).

An address names a running cluster (`dask scheduler` and `dask worker`s); without one, a
LocalCluster of `execution.dask.n_workers` processes is started for the work and stopped
after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

STAGE = "execution"
CONNECT_TIMEOUT_S = 20


@contextmanager
def dask_client(params: Params) -> Iterator[Any]:
    """A client of the configured cluster, or of a LocalCluster started here for the block."""
    import logging

    from distributed import Client, LocalCluster

    config = params.execution.dask
    if not config.address:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        with (
            LocalCluster(
                n_workers=config.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=config.memory_limit,
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = Client(config.address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as err:
        raise LooplineError(
            STAGE, f"execution.dask.address {config.address}: no Dask scheduler answered ({err})"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise LooplineError(
                STAGE, f"execution.dask.address {config.address}: the scheduler has no workers (`dask worker` …)"
            ) from None
        yield client
    finally:
        client.close()


_KEPT: dict[str, Any] = {}  # LocalClusters kept for the life of the process, by configuration


@contextmanager
def kept_client(params: Params) -> Iterator[Any]:
    """`dask_client`, but a LocalCluster is started once per process and kept until it exits:
    the data stages of one `loopline run` or training share it instead of paying its start-up
    (seconds) each."""
    import atexit

    if params.execution.dask.address:
        with dask_client(params) as client:
            yield client
        return
    key = params.execution.dask.model_dump_json()
    if key not in _KEPT:
        context = dask_client(params)
        _KEPT[key] = (context, context.__enter__())
        atexit.register(_close_kept, key)
    yield _KEPT[key][1]


def _close_kept(key: str) -> None:
    context, _ = _KEPT.pop(key, (None, None))
    if context is not None:
        context.__exit__(None, None, None)
