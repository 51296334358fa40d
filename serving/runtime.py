"""What the service does, without BentoML: hold the champion, predict, batch, log.

- `ChampionHolder` keeps the model currently served. `refresh()` asks the registry which
  version `champion` points at and, when it moved, loads the new version and swaps it in
  one assignment: a batch that already took the old model finishes with it, the next batch
  gets the new one, no request is dropped.
- `MicroBatcher` predicts concurrent single-record requests together: while the model is
  busy with one batch, the requests that arrive queue up and form the next one.
- Every prediction goes to `pipelines.monitoring.prediction_log.PredictionLog`, which monitoring reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.monitoring.prediction_log import utc_now

log = logging.getLogger("loopline.serving")


class Unavailable(LooplineError):
    """Why the service has no model to serve: the body of its 503 answers."""

    def __init__(self, message: str):
        super().__init__("serve", message)


class NoChampion(Unavailable):
    def __init__(self, model_name: str):
        super().__init__(
            f"model {model_name!r} has no version aliased 'champion' yet; "
            "train one (`loopline train`) or promote one (`loopline promote V`)"
        )


class RegistryUnreachable(Unavailable):
    pass


class ChampionLoadFailed(Unavailable):
    pass


@dataclass(frozen=True)
class ServedModel:
    model: Any
    name: str
    version: str
    run_id: str
    task: str
    features: list[str]
    classes: list[str]
    loaded_at: str
    engine: Any = None  # the OnnxEngine that predicts; None: the Python model does
    engine_reason: str = ""  # why this engine serves

    @property
    def engine_name(self) -> str:
        return "python" if self.engine is None else "onnx"

    @classmethod
    def of(
        cls,
        model: Any,
        meta: dict[str, Any],
        name: str,
        version: str,
        run_id: str,
        params: Params,
        files: dict[str, bytes],
    ) -> ServedModel:
        engine, reason = choose_engine(params, model, meta, files)
        return cls(
            model=model,
            name=name,
            version=str(version),
            run_id=run_id,
            task=meta["task"],
            features=list(meta["features"]),
            classes=[str(c) for c in meta.get("classes", [])],
            loaded_at=utc_now(),
            engine=engine,
            engine_reason=reason,
        )


def choose_engine(params: Params, model: Any, meta: dict[str, Any], files: dict[str, bytes]) -> tuple[Any, str]:
    """(the OnnxEngine, why) or (None, why the Python model serves), by `serve.engine`. The
    ONNX form must agree with the Python model on the reference rows logged with it; with
    serve.engine onnx a model that has no such form is refused (ChampionLoadFailed)."""
    import io

    from pipelines.model.onnx_engine import ONNX_FILE, PARITY_FILE, OnnxEngine, parity, string_columns

    wanted = params.serve.engine
    if wanted == "python":
        return None, "serve.engine is python"
    problem = None
    if ONNX_FILE not in files or PARITY_FILE not in files:
        problem = f"the model has no ONNX form ({meta.get('onnx', 'logged before loopline compiled models')})"
    else:
        try:
            engine = OnnxEngine(
                files[ONNX_FILE], list(meta["features"]), string_columns(params), params.serve.model_threads
            )
            checked = parity(
                engine, model, pd.read_parquet(io.BytesIO(files[PARITY_FILE])), meta["task"], meta.get("classes", [])
            )
        except Exception as err:  # ONNX Runtime raises its own types for a graph it cannot load
            problem = f"ONNX Runtime cannot run the model's ONNX form: {type(err).__name__}: {str(err).splitlines()[0]}"
        else:
            if checked.ok:
                return engine, f"ONNX Runtime ({params.serve.model_threads} thread(s)); parity: {checked.detail}"
            problem = f"the ONNX form disagrees with the Python model: {checked.detail}"
    if wanted == "onnx":
        raise ChampionLoadFailed(f"serve.engine is onnx, but {problem}")
    return None, f"python: {problem}"


def records_frame(records: Sequence[dict[str, Any]], params: Params) -> pd.DataFrame:
    """Request records as the frame the model pipeline was fitted on: numeric columns as
    float64 (as clean types them), category columns as strings."""
    columns = params.features.columns
    frame = pd.DataFrame.from_records(records, columns=columns)
    specs = params.table_schema.columns
    numeric = [c for c in columns if specs[c].type != "category"]
    frame[numeric] = frame[numeric].astype("float64")
    return frame


Predicted = tuple[list[Any], list[dict[str, float]] | None]
# A request's rows: records (/predict, /predict_batch), or one array per field, checked and
# typed (/predict_columns: numbers as float64, labels in the schema's spelling).
Rows = Sequence[dict[str, Any]] | Mapping[str, Any]


def predict_records(served: ServedModel, records: Rows, params: Params) -> Predicted:
    """`predict_frame` for a request's rows; the ONNX engine takes them as columns, no frame."""
    if isinstance(records, Mapping):
        if served.engine is None:
            return predict_frame(served, pd.DataFrame({c: records[c] for c in params.features.columns}))
        return _engine_output(served, served.engine.feeds(records))
    if served.engine is None:
        return predict_frame(served, records_frame(records, params))
    return _engine_output(served, served.engine.feeds({c: [r.get(c) for r in records] for c in served.features}))


def _engine_output(served: ServedModel, feeds: dict[str, np.ndarray]) -> Predicted:
    out = served.engine.run(feeds)
    if served.task == "regression":
        return np.asarray(out, dtype="float64").tolist(), None
    proba = np.asarray(out, dtype="float64")
    labels = np.asarray(served.classes)[proba.argmax(axis=1)].tolist()
    return labels, [dict(zip(served.classes, row, strict=True)) for row in proba.tolist()]


def predict_frame(served: ServedModel, frame: pd.DataFrame) -> Predicted:
    """Predictions (floats or class labels) and, for classifiers, class probabilities, by
    the served engine."""
    if served.engine is not None:
        return _engine_output(served, served.engine.feeds({c: frame[c].to_numpy() for c in served.features}))
    model = served.model
    if served.task == "regression":
        return np.asarray(model.predict(frame), dtype="float64").tolist(), None
    labels = [str(v) for v in model.predict(frame)]
    if not hasattr(model, "predict_proba"):
        return labels, None
    proba = np.asarray(model.predict_proba(frame), dtype="float64")
    classes = [str(c) for c in model.classes_]
    return labels, [dict(zip(classes, row, strict=True)) for row in proba.tolist()]


class RegistrySource:
    """Loads the registry's champion. One MLflow client for the life of the service (a new
    client re-opens the store, too slow for every poll), reopened when the SQLite file is
    replaced: a store restored from a backup or renamed over the old one is seen, not the
    deleted file the pooled connections still hold. A store that is not there is an error:
    serving never creates one."""

    def __init__(self, params: Params):
        self.params = params
        self._client = None
        self._inode: tuple[int, int] | None = None

    def _registry(self):
        from pipelines.registry.tracking import StoreMissing, registry_client, sqlite_store, tracking_uri

        store = sqlite_store(tracking_uri(self.params))
        if store is not None:
            try:
                stat = store.stat()
            except FileNotFoundError:
                self.close()
                raise RegistryUnreachable(StoreMissing(store).message) from None
            if (stat.st_dev, stat.st_ino) != self._inode:
                self.close()
                self._inode = (stat.st_dev, stat.st_ino)
        if self._client is None:
            from pipelines.registry.champion import registry_lock

            # Under the lock a training holds while it creates the store: a store found half
            # made is opened once it is whole, never migrated from two processes at once.
            with registry_lock(tracking_uri(self.params)):
                client = registry_client(self.params)
                _ = client._tracking_client.store, client._get_registry_client().store  # open both now
            self._client = client
        return self._client

    def close(self) -> None:
        """Forget the client and close its pooled connections (MLflow keeps one store object
        per URI in the process, so its engines are disposed, not just dropped)."""
        if self._client is None:
            return
        for store in (self._client._tracking_client.store, self._client._get_registry_client().store):
            engine = getattr(store, "engine", None)
            if engine is not None:
                engine.dispose()
        self._client = None

    def aliased(self, alias: str) -> tuple[str | None, str | None]:
        """(version, run id) the registry's `alias` points at; (None, None) when none."""
        from pipelines.registry.champion import alias_version
        from pipelines.registry.tracking import tracking_uri

        name = self.params.tracking.model_name
        try:
            client = self._registry()
            version = alias_version(client, name, alias)
            run_id = client.get_model_version(name, version).run_id if version is not None else None
        except RegistryUnreachable:
            raise
        except Exception as err:  # a damaged or unreachable store: MLflow and SQLAlchemy raise many types
            self.close()
            raise RegistryUnreachable(
                f"tracking store {tracking_uri(self.params)} cannot be read: "
                f"{type(err).__name__}: {str(err).splitlines()[0]}"
            ) from None
        return version, (str(run_id) if run_id is not None else None)

    def load(self, alias: str, version: str, run_id: str) -> ServedModel:
        """Version `version` ready to predict; ChampionLoadFailed names what failed."""
        from pipelines.model.onnx_engine import ONNX_FILE, PARITY_FILE
        from pipelines.registry.tracking import load_model_files

        name = self.params.tracking.model_name
        try:
            model, meta, files = load_model_files(self._registry(), name, version, (ONNX_FILE, PARITY_FILE))
            return ServedModel.of(model, meta, name, version, run_id, self.params, files)
        except Exception as err:  # a missing or damaged artifact
            raise ChampionLoadFailed(
                f"{alias} v{version} of {name!r} (run {run_id}) failed to load: "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from None

    def __call__(self, current: ServedModel | None) -> ServedModel | None:
        """The champion if it is not the model in service (None: unchanged)."""
        from pipelines.core.names import CHAMPION

        version, run_id = self.aliased(CHAMPION)
        if version is None or run_id is None:
            raise NoChampion(self.params.tracking.model_name)
        if current is not None and (current.version, current.run_id) == (version, run_id):
            return None
        return self.load(CHAMPION, version, run_id)


def load_registry_champion(params: Params) -> ServedModel:
    """The champion now, for one-off users (batch scoring, benches); raises Unavailable."""
    served = RegistrySource(params)(current=None)
    assert served is not None
    return served


def limit_threads(threads: int) -> None:
    """The process's native thread pools (OpenMP, BLAS, torch) held to `threads`, through
    threadpoolctl (which sets them in the loaded libraries, not only for later ones) and
    torch's own setting. ONNX Runtime sessions get theirs in their session options."""
    import sys

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


_BUDGET = threading.local()
MODEL_THREADS: dict[str, int] = {}  # the pools as read in the threads that called the model


def hold_thread_budget(threads: int) -> None:
    """`limit_threads` in the calling thread, once per thread: OpenMP's limit belongs to the
    thread that sets it, and model calls run in worker threads. What the pools hold there is
    kept for /model."""
    if getattr(_BUDGET, "threads", None) == threads:
        return
    limit_threads(threads)
    _BUDGET.threads = threads
    for pool, n in native_threads().items():
        MODEL_THREADS[pool] = max(MODEL_THREADS.get(pool, 0), n)


def native_threads() -> dict[str, int]:
    """The thread count of each native pool loaded in this process, as threadpoolctl reads it."""
    import sys

    from threadpoolctl import threadpool_info

    pools: dict[str, int] = {}
    for pool in threadpool_info():
        key = f"{pool['user_api']}:{pool['internal_api']}"
        pools[key] = max(pools.get(key, 0), int(pool["num_threads"]))
    if "torch" in sys.modules:
        pools["torch"] = int(sys.modules["torch"].get_num_threads())
    return pools


class ChampionHolder:
    """The model in service, swapped atomically when the registry's champion moves."""

    def __init__(self, params: Params, load: Callable[[ServedModel | None], ServedModel | None], source: str):
        self.params = params
        self._load = load
        self.source = source
        self.current: ServedModel | None = None
        self.last_check: str | None = None
        self.problem: Unavailable | None = None  # what the last check found wrong, if anything
        self._refresh_lock = threading.RLock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.shadow: Any = None  # the ShadowScorer (serving/shadow.py) that follows the registry with the champion

    def refresh(self) -> bool:
        """Load the champion (and the shadow) if it changed; True when the served version
        changed. A failure to reach the registry or load a model keeps the current model in
        service."""
        with self._refresh_lock:  # one check at a time: the poller's and /admin/reload's share the registry client
            try:
                return self._refresh_champion()
            finally:
                if self.shadow is not None:
                    self.shadow.refresh()

    def _refresh_champion(self) -> bool:
        with self._refresh_lock:
            known = self.current.version if self.current else None
            try:
                loaded = self._load(self.current)
                if self.problem is not None:
                    log.info("champion check works again: %s", self.problem.message)
                self.problem = None
            except Exception as err:
                before = self.problem.message if self.problem else None
                self.problem = (
                    err
                    if isinstance(err, Unavailable)
                    else Unavailable(f"checking for a champion failed: {type(err).__name__}: {err}")
                )
                if self.problem.message != before:  # once per change, not once per poll
                    serving = f"v{known}" if known else "nothing"
                    log.warning("champion check failed (serving %s): %s", serving, self.problem.message)
                    self._alert(serving, self.problem.message)
                return False
            finally:
                self.last_check = utc_now()
            if loaded is None:
                return False
            limit_threads(self.params.serve.model_threads)  # again: loading may have brought a new pool (torch)
            self.current = loaded
            log.info(
                "now serving %s v%s (run %s), %s; engine %s: %s",
                loaded.name,
                loaded.version,
                loaded.run_id,
                f"was v{known}" if known else "the first model since start-up",
                loaded.engine_name,
                loaded.engine_reason,
            )
            return True

    def _alert(self, serving: str, problem: str) -> None:
        """Tell the `alerts:` targets, off the request and polling path (delivery can be slow)."""
        from pipelines.core.alerts import Alert, send_in_background

        alert = Alert(
            event="champion not loaded",
            title=f"the {self.params.tracking.model_name} service could not load the champion",
            what=f"the service ({self.source}, pid {os.getpid()}) is serving {serving}",
            why=problem,
            where=f"the service's log and its /model; tracking store {self.params.tracking.uri}",
            level="failure",
        )
        send_in_background(self.params.alerts, alert)

    def start_polling(self, interval_s: float) -> None:
        if interval_s <= 0 or self._poller is not None:
            return

        def poll() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._poller = threading.Thread(target=poll, name="champion-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()

    def require(self) -> ServedModel:
        served = self.current
        if served is None:
            raise self.problem or NoChampion(self.params.tracking.model_name)
        return served

    def status(self) -> dict[str, Any]:
        served = self.current
        return {
            "model_name": self.params.tracking.model_name,
            "source": self.source,
            "model_version": served.version if served else None,
            "run_id": served.run_id if served else None,
            "loaded_at": served.loaded_at if served else None,
            "last_check": self.last_check,
            "last_error": self.problem.message if self.problem else None,
            "engine": served.engine_name if served else None,
            "engine_reason": served.engine_reason if served else None,
            "threads": dict(MODEL_THREADS),
            "shadow": self.shadow.status() if self.shadow is not None else None,
        }


class MicroBatcher:
    """Collects concurrent `submit` calls into lists for `handle`, run in a worker thread.

    With `wait_s` = 0 a batch is whatever queued while the previous one was predicted, so a
    lone request is never delayed and a burst is predicted in a few large calls."""

    def __init__(self, handle: Callable[[list[Any]], list[Any]], max_batch_size: int, wait_s: float = 0.0):
        self._handle = handle
        self._max = max_batch_size
        self._wait_s = wait_s
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))  # type: ignore[union-attr]
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        q = self._queue
        assert q is not None
        batch = [await q.get()]
        deadline = time.monotonic() + self._wait_s
        while len(batch) < self._max:
            if not q.empty():
                batch.append(q.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), left))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled requests

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self._handle, [item for item, _ in batch])
            except Exception as err:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
