"""The prediction log: every served prediction, in one table. The service writes it through
`PredictionLog` (a writer thread, so the request path only puts rows on a queue);
monitoring reads it through `read_prediction_log`.

Where it lives (`serve.prediction_log`): a SQLite file (WAL), the default, for one service
on one machine; or a PostgreSQL DSN (`postgresql://…`), so that several service replicas
write to one log and monitoring reads them all."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from pipelines.core.errors import LooplineError
from pipelines.core.postgres import connect, describe, is_postgres

if TYPE_CHECKING:
    from pipelines.core.config import Params

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


def log_location(params: Params) -> str | Path:
    """serve.prediction_log, else <paths.data>/serving/predictions.db."""
    from pipelines.core.layout import Layout

    configured = params.serve.prediction_log
    if configured is None:
        return Layout.of(params).prediction_log
    return configured if is_postgres(configured) else Path(configured)


class _SQLite:
    INSERT = f"INSERT INTO predictions VALUES ({', '.join('?' * len(LOG_COLUMNS))})"

    def __init__(self, path: Path):
        self.path = path

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (request_id TEXT NOT NULL, ts TEXT NOT NULL, "
                "model_name TEXT NOT NULL, model_version TEXT NOT NULL, run_id TEXT NOT NULL, "
                "inputs TEXT NOT NULL, prediction NOT NULL, probabilities TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def insert(self, db: sqlite3.Connection, rows: list[tuple]) -> None:
        with db:
            db.executemany(self.INSERT, rows)


class _PostgreSQL:
    """One table for every replica. `id` keeps the order rows were written in (SQLite's rowid);
    inputs, prediction and probabilities are JSONB; rows go in with COPY, one per burst."""

    COPY = f"COPY predictions ({', '.join(LOG_COLUMNS)}) FROM STDIN"

    def __init__(self, dsn: str):
        self.dsn = dsn

    def create(self) -> None:
        with self.connect() as db:
            # Replicas starting together: one creates, the others wait and find it there.
            db.execute("SELECT pg_advisory_xact_lock(hashtext('loopline.predictions'))")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (id BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL, "
                "ts TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL, run_id TEXT NOT NULL, "
                "inputs JSONB NOT NULL, prediction JSONB NOT NULL, probabilities JSONB)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")

    def connect(self):
        return connect(self.dsn, "prediction log")

    def insert(self, db, rows: list[tuple]) -> None:
        with db.transaction(), db.cursor() as cur, cur.copy(self.COPY) as copy:
            for rid, ts, name, version, run_id, inputs, prediction, probabilities in rows:
                copy.write_row((rid, ts, name, version, run_id, inputs, json.dumps(prediction), probabilities))


class PredictionLog:
    """Every served prediction, appended by one writer thread to the table at `location`
    (a SQLite path or a PostgreSQL DSN).

    Columns: request_id, ts (UTC ISO), model_name, model_version, run_id, inputs (JSON
    object of the record), prediction (number or label), probabilities (JSON or NULL). A
    failed write is logged and its rows counted in `dropped`; the next burst reconnects."""

    def __init__(self, location: str | Path):
        self.location = location
        self._store = _PostgreSQL(str(location)) if is_postgres(location) else _SQLite(Path(location))
        try:
            self._store.create()
        except LooplineError:
            raise
        except Exception as err:  # sqlite3 and psycopg errors alike: say where
            raise LooplineError(
                "serve", f"cannot open the prediction log {describe(location)}: {type(err).__name__}: {err}"
            ) from None
        self.dropped = 0  # rows lost to a failed write (logged)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._writer.start()

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
        db = None
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
                    db = db or self._store.connect()
                    self._store.insert(db, rows)
                except Exception:  # the database went away or refused the rows: keep serving
                    self.dropped += len(rows)
                    log.exception("could not write %d predictions to %s", len(rows), describe(self.location))
                    _close(db)
                    db = None
            if done is not None:
                done.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything appended so far is written."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)


def _close(db) -> None:
    if db is not None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail too
            db.close()


def prediction_log_exists(location: str | Path) -> bool:
    if not is_postgres(location):
        return Path(location).is_file()
    with _PostgreSQL(str(location)).connect() as db:
        row = db.execute("SELECT to_regclass('predictions') IS NOT NULL").fetchone()
    return bool(row and row[0])


def read_prediction_log(location: str | Path, columns: Sequence[str], since: str | None = None) -> pd.DataFrame:
    """The prediction log as a frame with one column per input field in `columns` (extracted
    from the JSON by the database), in the order rows were written, for monitoring."""
    if not prediction_log_exists(location):
        raise LooplineError(
            "monitor", f"prediction log {describe(location)} does not exist; nothing has been served yet"
        )
    if is_postgres(location):
        return _read_postgresql(str(location), columns, since)
    fields = "".join(f', json_extract(inputs, \'$."{c}"\') AS "{c}"' for c in columns)
    query = (
        f"SELECT request_id, ts, model_name, model_version, run_id, prediction, probabilities{fields} FROM predictions"
    )
    args: tuple = ()
    if since is not None:
        query, args = query + " WHERE ts >= ?", (since,)
    with sqlite3.connect(location, timeout=30) as db:
        return pd.read_sql_query(query + " ORDER BY rowid", db, params=args)


def _read_postgresql(dsn: str, columns: Sequence[str], since: str | None) -> pd.DataFrame:
    from psycopg import sql

    query = sql.SQL(
        "SELECT request_id, ts, model_name, model_version, run_id, prediction, probabilities::text AS probabilities"
        "{fields} FROM predictions {where} ORDER BY id"
    ).format(
        fields=sql.SQL("").join(
            sql.SQL(", inputs -> {} AS {}").format(sql.Literal(c), sql.Identifier(c)) for c in columns
        ),
        where=sql.SQL("WHERE ts >= %s" if since is not None else ""),
    )
    with _PostgreSQL(dsn).connect() as db, db.cursor() as cur:
        cur.execute(query, (since,) if since is not None else None)
        names = [d.name for d in cur.description or []]
        return pd.DataFrame(cur.fetchall(), columns=names)
