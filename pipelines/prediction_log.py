"""The prediction log: every served prediction, one SQLite table (WAL). The service writes
it through `PredictionLog` (a writer thread, so the request path only puts rows on a
queue); monitoring reads it through `read_prediction_log`."""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from pipelines.errors import LooplineError

log = logging.getLogger("loopline.serving")


class ModelIdentity(Protocol):
    """Which model answered: the registered name, version and MLflow run."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def run_id(self) -> str: ...


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


LOG_COLUMNS = ("request_id", "ts", "model_name", "model_version", "run_id", "inputs", "prediction", "probabilities")


class PredictionLog:
    """Every served prediction, appended to a SQLite table (WAL) by one writer thread.

    Columns: request_id, ts (UTC ISO), model_name, model_version, run_id, inputs (JSON
    object of the record), prediction (number or label), probabilities (JSON or NULL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (request_id TEXT NOT NULL, ts TEXT NOT NULL, "
                "model_name TEXT NOT NULL, model_version TEXT NOT NULL, run_id TEXT NOT NULL, "
                "inputs TEXT NOT NULL, prediction NOT NULL, probabilities TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
        self.dropped = 0  # rows lost to a failed write (logged)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def append(
        self,
        served: ModelIdentity,
        request_ids: Sequence[str],
        records: Sequence[dict[str, Any]],
        predictions: Sequence[Any],
        probabilities: Sequence[dict[str, float]] | None,
    ) -> None:
        ts = utc_now()
        probs = [json.dumps(p) for p in probabilities] if probabilities is not None else [None] * len(records)
        rows = [
            (rid, ts, served.name, served.version, served.run_id, json.dumps(rec), pred, prob)
            for rid, rec, pred, prob in zip(request_ids, records, predictions, probs, strict=True)
        ]
        self._queue.put(rows)

    def _write_loop(self) -> None:
        db = self._connect()
        db.execute("PRAGMA synchronous=NORMAL")
        while True:
            item = self._queue.get()
            rows, done = ([], item) if isinstance(item, threading.Event) else (item, None)
            while done is None and not self._queue.empty() and len(rows) < 50_000:  # one transaction per burst
                more = self._queue.get()
                if isinstance(more, threading.Event):
                    done = more
                else:
                    rows.extend(more)
            if rows:
                try:
                    with db:
                        db.executemany(f"INSERT INTO predictions VALUES ({', '.join('?' * len(LOG_COLUMNS))})", rows)
                except sqlite3.Error:
                    self.dropped += len(rows)
                    log.exception("could not write %d predictions to %s", len(rows), self.path)
            if done is not None:
                done.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything appended so far is on disk."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)


def read_prediction_log(path: str | Path, columns: Sequence[str], since: str | None = None) -> pd.DataFrame:
    """The prediction log as a frame with one column per input field in `columns` (SQLite
    extracts them from the JSON), for monitoring."""
    path = Path(path)
    if not path.is_file():
        raise LooplineError("monitor", f"prediction log {path} does not exist; nothing has been served yet")
    fields = "".join(f', json_extract(inputs, \'$."{c}"\') AS "{c}"' for c in columns)
    query = (
        f"SELECT request_id, ts, model_name, model_version, run_id, prediction, probabilities{fields} FROM predictions"
    )
    args: tuple = ()
    if since is not None:
        query, args = query + " WHERE ts >= ?", (since,)
    with sqlite3.connect(path, timeout=30) as db:
        return pd.read_sql_query(query + " ORDER BY rowid", db, params=args)
