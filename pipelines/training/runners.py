"""Where the candidate search's fits run (`execution:`): one after another in the training
process, or as tasks on a Dask cluster.

The search itself (which candidates, Optuna's study, MLflow's runs) stays in the training
process; a runner only fits and scores. So a worker needs loopline's code and nothing else:
no tracking store, no Optuna storage, no data files. The training and validation rows go
to every worker once (`scatter(broadcast=True)`); each task then carries a family and its
hyperparameters, and brings back the fitted model, its validation metrics and the worker's
address.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError


@dataclass(frozen=True)
class Fit:
    """One unit of work: a candidate's name, family and hyperparameters."""

    name: str
    family: str
    hyperparams: dict[str, Any]


@dataclass
class Fitted:
    model: Any = field(repr=False)
    val: dict[str, float]
    seconds: float
    worker: str


def worker_name() -> str:
    """The Dask worker running this call (its address), or local:host:pid outside one."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            return str(get_worker().address)
        except ValueError:  # not inside a worker task
            pass
    return f"local:{socket.gethostname()}:{os.getpid()}"


def fit_and_score(
    params: Params, fit: Fit, train: pd.DataFrame, val: pd.DataFrame, baseline: Any, threads: int | None = None
) -> Fitted:
    """Fit one candidate on the training rows and score it on the validation rows."""
    from pipelines.model.estimators import fit_family
    from pipelines.model.evaluation import score

    started = time.perf_counter()
    with warnings.catch_warnings():  # joblib in a (daemonic) Dask worker: n_jobs is the budget already
        warnings.filterwarnings("ignore", message="Inside a Dask worker", category=UserWarning)
        model = fit_family(params, fit.family, fit.hyperparams, train, threads)
    seconds = time.perf_counter() - started
    metrics, _ = score(model, val, params.features.columns, params.data.target, params.data.task, baseline)
    return Fitted(model, metrics, seconds, worker_name())


class SequentialRunner:
    """Fits in this process, one after another, within this training's share of the cores."""

    def __init__(self, params: Params, train: pd.DataFrame, val: pd.DataFrame, baseline: Any):
        self.params, self.train, self.val, self.baseline = params, train, val, baseline

    def map(self, fits: list[Fit]) -> Iterator[Fitted]:
        for fit in fits:
            yield fit_and_score(self.params, fit, self.train, self.val, self.baseline)


class DaskRunner:
    """Fits as tasks on a Dask cluster, all of a round at once; results in submission order."""

    def __init__(self, client, params: Params, train: pd.DataFrame, val: pd.DataFrame, baseline: Any):
        self.client, self.params, self.baseline = client, params, baseline
        self.threads = params.execution.dask.threads_per_worker
        self.data = [self._rows(frame, name) for frame, name in ((train, "train"), (val, "val"))]

    def _rows(self, frame: pd.DataFrame, name: str) -> Any:
        """The rows as a task of their own, which Dask can compute again from its recipe (the
        rows themselves) on any worker: scattered data has no recipe, so when every worker
        holding it died (Dask's memory manager keeps one replica of what was broadcast), the
        fits that needed it were forgotten ("already forgotten") and the search failed. The
        workers fetch the rows from each other, once per worker, not per task."""
        with warnings.catch_warnings():  # the rows are meant to travel in the graph, once
            warnings.filterwarnings("ignore", message="Large object", category=UserWarning)
            return self.client.submit(_rows, frame, key=f"rows-{name}-{uuid.uuid4().hex[:12]}", pure=False)

    def map(self, fits: list[Fit]) -> Iterator[Fitted]:
        """Every fit submitted at once; results in submission order. Every future is kept
        until its result is read (a released future lets the scheduler forget its task)."""
        from distributed import KilledWorker

        train, val = self.data
        token = uuid.uuid4().hex[:12]  # a shared scheduler treats equal keys as one task, whoever submits them
        futures = [
            self.client.submit(
                fit_and_score, self.params, fit, train, val, self.baseline, self.threads, key=f"fit-{fit.name}-{token}"
            )
            for fit in fits
        ]
        try:
            for fit, future in zip(fits, futures, strict=True):
                try:
                    yield future.result()
                except KilledWorker as err:
                    raise LooplineError(
                        "search",
                        f"candidate {fit.name} ({fit.family}) was lost with every Dask worker that ran it: {err}",
                    ) from None
        finally:
            self.client.cancel([f for f in futures if not f.done()])


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


@contextmanager
def runner_for(params: Params, train: pd.DataFrame, val: pd.DataFrame, baseline: Any) -> Iterator[Any]:
    """The configured runner for one search; a LocalCluster it starts stops with it."""
    if params.execution.runner == "sequential":
        from pipelines.core.threads import training_slot

        with training_slot():  # counted as one training for the whole search, not per fit
            yield SequentialRunner(params, train, val, baseline)
        return
    from pipelines.core.cluster import dask_client

    with dask_client(params) as client:
        yield DaskRunner(client, params, train, val, baseline)
