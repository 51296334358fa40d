"""The prediction log: every served prediction, in one table, and the store monitoring reads.

The service writes it through `PredictionLog`: the request path only puts the answered
records on a queue; a writer thread encodes them and writes each burst in one transaction.
Monitoring reads it through `read_window` (the rows the champion answered in the served
window), `read_answers` (the answers a label file's ids or time keys name) and prunes it
(`prune`, serve.log_retention).

Where it lives (`serve.prediction_log`): a SQLite file (WAL), the default, for one service
on one machine; or a PostgreSQL DSN (`postgresql://…`), so that several service replicas
write to one log and monitoring reads them all. Both have the same columns, and indexes on
what monitoring selects by: the request id, the time, and the model version with the time.
`role` says who answered: the `champion` (what the client got) or a `shadow`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson
import pandas as pd

from pipelines.core.errors import LooplineError
from pipelines.core.postgres import connect, describe, is_postgres

if TYPE_CHECKING:
    from pipelines.core.config import Params

log = logging.getLogger("loopline.serving")

CHAMPION_ROLE = "champion"
LOG_COLUMNS = (
    "request_id",
    "ts",
    "model_name",
    "model_version",
    "run_id",
    "inputs",
    "prediction",
    "probabilities",
    "role",
    "caller",
)
READ_COLUMNS = ("request_id", "ts", "model_version", "role", "caller", "prediction", "probabilities")
PRUNE_CHUNK = 20_000  # rows deleted per transaction: the service's writer never waits long
# The writer gathers what is appended for this long after a first burst and writes it in one
# transaction: under single-record traffic a transaction per micro-batch costs 2-3x per row
# (the same index pages written again each commit). A flush, or 50,000 rows, writes at once.
LINGER_S = 0.05
BURST_ROWS = 50_000


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


def log_location(params: Params) -> str | Path:
    """serve.prediction_log, else <paths.data>/serving/predictions.db."""
    from pipelines.core.layout import Layout

    configured = params.serve.prediction_log
    if configured is None:
        return Layout.of(params).prediction_log
    return configured if is_postgres(configured) else Path(configured)


class _SQLite:
    INSERT = f"INSERT INTO predictions ({', '.join(LOG_COLUMNS)}) VALUES ({', '.join('?' * len(LOG_COLUMNS))})"
    ORDER = "rowid"

    def __init__(self, path: Path):
        self.path = path

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (request_id TEXT NOT NULL, ts TEXT NOT NULL, "
                "model_name TEXT NOT NULL, model_version TEXT NOT NULL, run_id TEXT NOT NULL, "
                "inputs TEXT NOT NULL, prediction NOT NULL, probabilities TEXT, role TEXT NOT NULL DEFAULT 'champion', "
                "caller TEXT)"
            )
            known = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
            if "role" not in known:  # a log written before roles existed: every row was the champion's
                db.execute("ALTER TABLE predictions ADD COLUMN role TEXT NOT NULL DEFAULT 'champion'")
            if "caller" not in known:  # a log written before API keys: no caller is known
                db.execute("ALTER TABLE predictions ADD COLUMN caller TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_version_ts ON predictions (model_version, ts)")

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def insert(self, db: sqlite3.Connection, bursts: list[_Burst]) -> None:
        with db:
            db.executemany(self.INSERT, (row for burst in bursts for row in burst.rows(postgres=False)))

    @staticmethod
    def field(column: str) -> str:
        return f'json_extract(inputs, \'$."{column}"\') AS "{column}"'

    @staticmethod
    def param(n: int) -> str:
        return ", ".join("?" * n)


class _PostgreSQL:
    """One table for every replica. `id` keeps the order rows were written in (SQLite's rowid);
    inputs, prediction and probabilities are JSONB; rows go in with COPY, one per burst."""

    COPY = f"COPY predictions ({', '.join(LOG_COLUMNS)}) FROM STDIN"
    ORDER = "id"

    def __init__(self, dsn: str):
        self.dsn = dsn

    def create(self) -> None:
        with self.connect() as db:
            # Replicas starting together: one creates, the others wait and find it there.
            db.execute("SELECT pg_advisory_xact_lock(hashtext('loopline.predictions'))")
            db.execute(
                "CREATE TABLE IF NOT EXISTS predictions (id BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL, "
                "ts TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL, run_id TEXT NOT NULL, "
                "inputs JSONB NOT NULL, prediction JSONB NOT NULL, probabilities JSONB, "
                "role TEXT NOT NULL DEFAULT 'champion', caller TEXT)"
            )
            db.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS role TEXT NOT NULL DEFAULT 'champion'")
            db.execute("ALTER TABLE predictions ADD COLUMN IF NOT EXISTS caller TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_request_id ON predictions (request_id)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)")
            db.execute("CREATE INDEX IF NOT EXISTS predictions_version_ts ON predictions (model_version, ts)")

    def connect(self):
        return connect(self.dsn, "prediction log")

    def insert(self, db, bursts: list[_Burst]) -> None:
        with db.transaction(), db.cursor() as cur, cur.copy(self.COPY) as copy:
            for burst in bursts:
                for row in burst.rows(postgres=True):
                    copy.write_row(row)

    @staticmethod
    def field(column: str) -> str:
        quoted = column.replace('"', '""')
        return f"inputs -> '{column.replace(chr(39), chr(39) * 2)}' AS \"{quoted}\""

    @staticmethod
    def param(n: int) -> str:
        return ", ".join(["%s"] * n)


def _store(location: str | Path) -> _SQLite | _PostgreSQL:
    return _PostgreSQL(str(location)) if is_postgres(location) else _SQLite(Path(location))


@dataclass(frozen=True)
class _Burst:
    """What one call of `append` hands the writer: encoding happens off the request path."""

    ts: str
    served: tuple[str, str, str]
    role: str
    request_ids: Sequence[str]
    records: Sequence[dict[str, Any]] | Mapping[str, Any]  # records, or one array per field
    predictions: Sequence[Any]
    probabilities: Sequence[dict[str, float]] | None
    callers: Sequence[str | None] | str | None = None  # the API key's id of each row, or of them all

    @property
    def size(self) -> int:
        return len(self.request_ids)

    def rows(self, postgres: bool) -> list[tuple]:
        """The rows as LOG_COLUMNS: inputs and probabilities as JSON (orjson: a fifth of the
        json module's time), the prediction as is for SQLite, as JSON for PostgreSQL."""
        name, version, run_id = self.served
        probabilities = [_json(p) for p in self.probabilities] if self.probabilities is not None else [None] * self.size
        if isinstance(self.records, Mapping):
            fields = list(self.records)
            columns = (np.asarray(self.records[f]).tolist() for f in fields)
            inputs = [_json(dict(zip(fields, values, strict=True))) for values in zip(*columns, strict=True)]
        else:
            inputs = [_json(record) for record in self.records]
        predictions = [_json(p) for p in self.predictions] if postgres else self.predictions
        callers = [self.callers] * self.size if self.callers is None or isinstance(self.callers, str) else self.callers
        return [
            (rid, self.ts, name, version, run_id, row_inputs, prediction, probs, self.role, caller)
            for rid, row_inputs, prediction, probs, caller in zip(
                self.request_ids, inputs, predictions, probabilities, callers, strict=True
            )
        ]


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class PredictionLog:
    """Every served prediction, appended by one writer thread to the table at `location`
    (a SQLite path or a PostgreSQL DSN).

    Columns: request_id, ts (UTC ISO), model_name, model_version, run_id, inputs (JSON
    object of the record: features and context fields), prediction (number or label),
    probabilities (JSON or NULL), role (champion | shadow), caller (the id of the API key the
    request presented; NULL without keys). A failed write is logged and its
    rows counted in `dropped`; the next burst reconnects."""

    def __init__(self, location: str | Path):
        self.location = location
        self._store = _store(location)
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
        records: Sequence[dict[str, Any]] | Mapping[str, Any],
        predictions: Sequence[Any],
        probabilities: Sequence[dict[str, float]] | None,
        role: str = CHAMPION_ROLE,
        callers: Sequence[str | None] | str | None = None,
    ) -> None:
        """Queue the answers of one call (`callers`: the API key ids of its rows, or of them
        all); the writer thread encodes and writes them."""
        burst = _Burst(
            utc_now(),
            (served.name, served.version, served.run_id),
            role,
            request_ids,
            records,
            predictions,
            probabilities,
            callers,
        )
        self._queue.put(burst)

    def _write_loop(self) -> None:
        db = None
        while True:
            item = self._queue.get()
            bursts, done = ([], item) if isinstance(item, threading.Event) else ([item], None)
            deadline = time.monotonic() + LINGER_S
            while done is None and sum(b.size for b in bursts) < BURST_ROWS:  # one transaction for what comes meanwhile
                try:
                    more = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if isinstance(more, threading.Event):
                    done = more
                else:
                    bursts.append(more)
            if bursts:
                try:
                    db = db or self._store.connect()
                    self._store.insert(db, bursts)
                except Exception:  # the database went away or refused the rows: keep serving
                    rows = sum(b.size for b in bursts)
                    self.dropped += rows
                    log.exception("could not write %d predictions to %s", rows, describe(self.location))
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


def _require(location: str | Path) -> _SQLite | _PostgreSQL:
    """The log's store, or an error naming it: a log that is missing or unreadable is never
    read as "nothing served"."""
    try:
        exists = prediction_log_exists(location)
    except LooplineError:
        raise
    except Exception as err:
        raise LooplineError(
            "monitor", f"prediction log {describe(location)} cannot be read: {type(err).__name__}: {err}"
        ) from None
    if not exists:
        raise LooplineError(
            "monitor", f"prediction log {describe(location)} does not exist; nothing has been served yet"
        )
    return _store(location)


def _query(location: str | Path, sql: str, args: Sequence[Any] = ()) -> pd.DataFrame:
    store = _require(location)
    try:
        if isinstance(store, _SQLite):
            with sqlite3.connect(store.path, timeout=30) as db:
                return pd.read_sql_query(sql, db, params=tuple(args))
        with store.connect() as db, db.cursor() as cur:
            cur.execute(sql, tuple(args) or None)
            columns = [d.name for d in cur.description or []]
            return pd.DataFrame(cur.fetchall(), columns=columns)
    except LooplineError:
        raise
    except Exception as err:  # a damaged file, a lost connection: say which log
        raise LooplineError(
            "monitor", f"prediction log {describe(location)} cannot be read: {type(err).__name__}: {err}"
        ) from None


def _select(store: _SQLite | _PostgreSQL) -> str:
    """The fixed columns and the inputs as JSON text: `_fields` splits them into columns."""
    text = "" if isinstance(store, _SQLite) else "::text"
    fixed = ", ".join(f"{c}{text} AS {c}" if c == "probabilities" else c for c in READ_COLUMNS)
    return f"SELECT {fixed}, inputs{text} AS inputs FROM predictions"


def _fields(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`frame` with its JSON `inputs` replaced by one column per input field in `columns`
    (None where a record lacks it), all rows parsed at once by Arrow's JSON reader: a field
    extracted in SQL costs one JSON parse per row and field, this one per row."""
    import io

    import pyarrow.json as pj

    texts = frame.pop("inputs")
    if not columns:
        return frame
    if frame.empty:
        return frame.assign(**{c: pd.Series(dtype=object) for c in columns})
    try:
        parsed = pj.read_json(io.BytesIO("\n".join(texts.astype(str)).encode())).to_pandas()
    except Exception as err:  # a record Arrow cannot read: say so rather than guess
        raise LooplineError(
            "monitor", f"the prediction log's inputs cannot be parsed: {type(err).__name__}: {err}"
        ) from None
    return frame.assign(**{c: parsed[c].to_numpy() if c in parsed else None for c in columns})


def read_prediction_log(location: str | Path, columns: Sequence[str], since: str | None = None) -> pd.DataFrame:
    """The whole prediction log (or the rows since `since`) with one column per input field in
    `columns`, in the order rows were written."""
    store = _require(location)
    where, args = (f" WHERE ts >= {store.param(1)}", [since]) if since is not None else ("", [])
    return _fields(_query(location, _select(store) + where + f" ORDER BY {store.ORDER}", args), columns)


@dataclass(frozen=True)
class ServedWindow:
    """The rows the champion answered in the served window, and what else was served then."""

    rows: pd.DataFrame  # request_id, ts, model_version, role, prediction, probabilities, the fields asked for
    start: str | None  # the window's first timestamp (None: no rows)
    end: str | None
    others: dict[str, int]  # rows answered by other versions in the same span: reported apart

    @property
    def size(self) -> int:
        return len(self.rows)


def read_window(
    location: str | Path, columns: Sequence[str], version: str, span: timedelta | int, now: datetime
) -> ServedWindow:
    """What the champion `version` answered (role champion) in the `span` up to `now` (a
    duration: after now - span, up to and with now), or its latest `span` answers (a row
    count), with the input fields `columns`;
    rows other versions answered in that time are counted apart. Reads by the (model_version,
    ts) index: the cost follows the window, not the log."""
    store = _require(location)
    select = _select(store)
    role = f"role = '{CHAMPION_ROLE}'"
    p = store.param
    if isinstance(span, timedelta):  # (now - span, now]
        since, until, after = (
            (now - span).isoformat(timespec="milliseconds"),
            now.isoformat(timespec="milliseconds"),
            ">",
        )
        rows = _query(
            location,
            f"{select} WHERE model_version = {p(1)} AND {role} AND ts > {p(1)} AND ts <= {p(1)} ORDER BY {store.ORDER}",
            [version, since, until],
        )
    else:  # the latest `span` answers up to now
        newest_first = _query(
            location,
            f"{select} WHERE model_version = {p(1)} AND {role} AND ts <= {p(1)} ORDER BY {store.ORDER} DESC LIMIT {int(span)}",
            [version, now.isoformat(timespec="milliseconds")],
        )
        rows = newest_first.iloc[::-1].reset_index(drop=True)
        since, until, after = (str(rows["ts"].iloc[0]), str(rows["ts"].iloc[-1]), ">=") if len(rows) else ("", "", "")
    rows = _fields(rows, columns)
    if rows.empty:
        return ServedWindow(rows, None, None, {})
    counted = _query(
        location,
        f"SELECT model_version, count(*) AS n FROM predictions WHERE {role} AND model_version <> {p(1)} "
        f"AND ts {after} {p(1)} AND ts <= {p(1)} GROUP BY model_version",
        [version, since, until],
    )
    others = {str(v): int(n) for v, n in zip(counted["model_version"], counted["n"], strict=True)}
    return ServedWindow(rows, str(rows["ts"].min()), str(rows["ts"].max()), others)


def read_answers(
    location: str | Path,
    columns: Sequence[str],
    request_ids: Sequence[str] = (),
    key: str | None = None,
    key_values: Sequence[Any] = (),
    role: str = CHAMPION_ROLE,
) -> pd.DataFrame:
    """The answers of `role` (the champion's: what the client got; or the shadow's) to the
    given request ids, or to the requests whose input field `key` took one of `key_values`,
    with the input fields `columns`, in the order written: what a label file is joined to."""
    store = _require(location)
    select, p = _select(store), store.param
    frames = []
    if role not in (CHAMPION_ROLE, "shadow"):
        raise ValueError(f"no role {role!r} in the prediction log")
    role = f"role = '{role}'"
    ids = list(dict.fromkeys(str(i) for i in request_ids))
    for start in range(0, len(ids), 900):  # SQLite binds at most 999 values per statement
        chunk = ids[start : start + 900]
        frames.append(_query(location, f"{select} WHERE {role} AND request_id IN ({p(len(chunk))})", chunk))
    if key is not None and len(key_values):
        values = list(dict.fromkeys(v.item() if hasattr(v, "item") else v for v in key_values))
        extract = store.field(key).split(" AS ")[0]
        if isinstance(store, _PostgreSQL):  # JSONB as text: 45, or "label" with its quotes
            extract = f"({extract})::text"
            values = [json.dumps(v) for v in values]
        for start in range(0, len(values), 900):
            chunk = values[start : start + 900]
            frames.append(_query(location, f"{select} WHERE {role} AND {extract} IN ({p(len(chunk))})", chunk))
    if not frames:
        return _fields(_query(location, f"{select} WHERE 1 = 0"), columns)
    found = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["request_id", "ts", "model_version"])
    return _fields(found.reset_index(drop=True), columns)


def wait_for_answers(location: str | Path, request_ids: Sequence[str], timeout: float = 30.0) -> None:
    """Until the log holds an answer to every request id: a service writes its log from a
    background thread, after the response has gone out."""
    import time

    store, wanted = _require(location), list(dict.fromkeys(str(i) for i in request_ids))
    deadline = time.monotonic() + timeout
    while True:
        found = 0
        for start in range(0, len(wanted), 900):  # SQLite binds at most 999 values per statement
            chunk = wanted[start : start + 900]
            sql = f"SELECT count(DISTINCT request_id) AS n FROM predictions WHERE request_id IN ({store.param(len(chunk))})"
            found += int(_query(location, sql, chunk)["n"].iloc[0])
        if found == len(wanted):
            return
        if time.monotonic() > deadline:
            raise LooplineError(
                "monitor",
                f"prediction log {describe(location)} holds {found} of {len(wanted)} answers after {timeout:g} s",
            )
        time.sleep(0.1)


def retime(location: str | Path, request_ids: Sequence[str], times: Sequence[datetime]) -> int:
    """Set the logged time of each request id's rows (every role) to the time given for it:
    the replay serves 2011 now and files each answer under the hour it replays, so that
    monitoring's served window (a span before the decision time) finds it. Returns the rows
    changed."""
    store = _require(location)
    rows = [
        (t.astimezone(UTC).isoformat(timespec="milliseconds"), str(i)) for i, t in zip(request_ids, times, strict=True)
    ]
    db: Any = store.connect()
    try:
        if isinstance(store, _SQLite):
            with db:
                return db.executemany("UPDATE predictions SET ts = ? WHERE request_id = ?", rows).rowcount
        with db.transaction(), db.cursor() as cur:
            cur.executemany("UPDATE predictions SET ts = %s WHERE request_id = %s", rows)
            return cur.rowcount
    finally:
        _close(db)


@dataclass(frozen=True)
class LogSize:
    rows: int
    bytes: int | None  # the file (SQLite) or the table with its indexes (PostgreSQL)
    pruned: int = 0  # rows this monitoring run removed (serve.log_retention)

    def describe(self) -> str:
        size = f", {self.bytes / 1e6:.1f} MB" if self.bytes is not None else ""
        pruned = f"; {self.pruned} rows older than serve.log_retention pruned" if self.pruned else ""
        return f"{self.rows} rows{size}{pruned}"


def log_size(location: str | Path) -> LogSize:
    store = _require(location)
    rows = int(_query(location, "SELECT count(*) AS n FROM predictions")["n"].iloc[0])
    if isinstance(store, _SQLite):
        files = [store.path, store.path.with_name(store.path.name + "-wal")]
        return LogSize(rows, sum(f.stat().st_size for f in files if f.is_file()))
    size = _query(location, "SELECT pg_total_relation_size('predictions') AS b")["b"].iloc[0]
    return LogSize(rows, int(size))


def prune(location: str | Path, before: datetime, keep_since: datetime | None = None) -> int:
    """Delete the rows written before `before` (serve.log_retention), never those at or after
    `keep_since` (the current window, rows a pending retrain waits on labels for), in
    transactions of PRUNE_CHUNK rows so that the service's writer waits for none long.
    Returns how many rows went."""
    store = _require(location)
    limit = before if keep_since is None else min(before, keep_since)
    cutoff = limit.isoformat(timespec="milliseconds")
    removed = 0
    db: Any = store.connect()
    try:
        while True:
            if isinstance(store, _SQLite):
                with db:
                    cursor = db.execute(
                        "DELETE FROM predictions WHERE rowid IN "
                        f"(SELECT rowid FROM predictions WHERE ts < ? ORDER BY ts LIMIT {PRUNE_CHUNK})",
                        (cutoff,),
                    )
                gone = cursor.rowcount
            else:
                with db.transaction():
                    gone = db.execute(
                        "DELETE FROM predictions WHERE id IN "
                        f"(SELECT id FROM predictions WHERE ts < %s ORDER BY ts LIMIT {PRUNE_CHUNK})",
                        (cutoff,),
                    ).rowcount
            removed += max(gone, 0)
            if gone < PRUNE_CHUNK:
                return removed
    finally:
        _close(db)
