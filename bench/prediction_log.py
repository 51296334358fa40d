"""The prediction log as a monitoring store: reading the served window from a big log, and
pruning it while the service writes to it.

1. **Window.** A log of `--rows` answers (10M by default) spread over 100 days, in SQLite and
   in PostgreSQL: the last 10 days answered by the champion (v2), the rest by v1. Timed, each
   three times: `read_window` of the champion's last day (`--window` rows, 100k by
   default), then the measurement monitoring makes of it (the inputs typed, Evidently's drift
   against the champion's reference profile with the prediction drift from the logged
   predictions, importance-weighted; no model call). The goal: read + measure <= 3 s.
2. **Prune.** A real `loopline serve` of the registry champion (run `make run` first) writes
   to a SQLite log holding `--prune` expired rows; single-record /predict at c=32, once
   without a prune and once while `prune` removes those rows. The goal: p99 during the prune
   <= 1.5x without.

    python bench/prediction_log.py [--rows 10000000] [--window 100000] [--prune 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DAYS = 100
END = datetime(2026, 1, 1, tzinfo=UTC)
CHUNK = 500_000


def bikeshare(params):
    """The bundled rows typed as the model reads them."""
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import read_source

    return typed_rows(read_source(params.data.source, params.table_schema, params.data).rows, params)


def champion_reference(params, rows: pd.DataFrame):
    """A gradient-boosting model on the first 70% of the hours: its reference profile, its
    importance (equal: the bench times the measurement, not the weights) and predictions."""
    from pipelines.model.estimators import build_model, fit_model
    from pipelines.monitoring.drift import drift_reference

    train = rows.iloc[: int(len(rows) * 0.7)]
    model = fit_model(build_model(params, "hist_gradient_boosting"), train, params)
    reference = drift_reference(train, model, params)
    return model, reference


def fill(location, rows: int, inputs: pd.DataFrame, predictions: np.ndarray) -> None:
    """`rows` answers in the log at `location`, 100 days to END; the last 10 days by v2.
    Indexes are built after the rows, as a log that grew over months would have them."""
    from pipelines.monitoring.prediction_log import LOG_COLUMNS, _PostgreSQL, _SQLite, _store

    store = _store(location)
    store.create()
    records = inputs.to_json(orient="records", lines=True).splitlines()
    start = END - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / rows
    with store.connect() as db:
        for name in ("predictions_request_id", "predictions_ts", "predictions_version_ts"):
            db.execute(f"DROP INDEX IF EXISTS {name}")
        for first in range(0, rows, CHUNK):
            n = min(CHUNK, rows - first)
            index = np.arange(first, first + n)
            ts = np.datetime64(start.replace(tzinfo=None), "ms") + (index * (step / timedelta(milliseconds=1))).astype(
                "timedelta64[ms]"
            )
            stamps = np.char.add(np.datetime_as_string(ts, unit="ms"), "+00:00")
            version = np.where(index >= rows * 0.9, "2", "1")
            pick = index % len(records)
            batch = list(
                zip(
                    (f"r{i}" for i in index),
                    stamps.tolist(),
                    ["bench"] * n,
                    version.tolist(),
                    ["run"] * n,
                    (records[i] for i in pick),
                    predictions[pick].tolist(),
                    [None] * n,
                    ["champion"] * n,
                    strict=True,
                )
            )
            if isinstance(store, _SQLite):
                with db:
                    db.executemany(store.INSERT, batch)
            else:
                assert isinstance(store, _PostgreSQL)
                with (
                    db.transaction(),
                    db.cursor() as cur,
                    cur.copy(f"COPY predictions ({', '.join(LOG_COLUMNS)}) FROM STDIN") as copy,
                ):
                    for row in batch:
                        copy.write_row(row[:6] + (json.dumps(row[6]),) + row[7:])
    store.create()  # the indexes
    if isinstance(store, _PostgreSQL):
        with store.connect() as db:
            db.execute("ANALYZE predictions")


def time_window(location, params, reference, window_span: timedelta) -> dict[str, float]:
    from pipelines.monitoring.drift import PREDICTION, measure_drift
    from pipelines.monitoring.prediction_log import read_window
    from pipelines.monitoring.run import _served, _typed_inputs

    best: dict[str, float] = {}
    for _ in range(3):
        started = time.perf_counter()
        window = read_window(location, params.features.columns, "2", window_span, END)
        read = time.perf_counter() - started
        started = time.perf_counter()
        typed = _typed_inputs(window.rows, params)
        typed[PREDICTION] = _served(window.rows, typed, params).predictions
        drift = measure_drift(reference, typed, params, None)
        measure = time.perf_counter() - started
        if not best or read + measure < best["read"] + best["measure"]:
            best = {"read": read, "measure": measure, "rows": window.size, "others": sum(window.others.values())}
        assert drift.scores
    return best


async def _load(url: str, body: bytes, concurrency: int, total: int) -> list[float]:
    import aiohttp

    latencies: list[float] = []
    sent = 0

    async def worker(session) -> None:
        nonlocal sent
        while sent < total:
            sent += 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return latencies


def prune_under_load(params_path: str, rows: int, inputs: pd.DataFrame, predictions: np.ndarray, tmp: Path) -> dict:
    from pipelines.core.config import load_params
    from pipelines.monitoring.prediction_log import log_size, prune
    from serving.local import local_service
    from serving.schema import request_records

    log = tmp / "serving.db"
    fill(log, rows, inputs, predictions)  # every row older than END: all of them expire
    body = json.dumps(request_records(inputs.head(1), load_params(params_path))[0]).encode()
    env = {"LOOPLINE_PREDICTION_LOG": str(log)}
    with open(tmp / "serve.log", "w") as out, local_service(params_path, log=out, env=env) as url:
        asyncio.run(_load(f"{url}/predict", body, 32, 500))  # warm-up
        quiet = asyncio.run(_load(f"{url}/predict", body, 32, 4000))
        removed: list[int] = []
        pruning = threading.Thread(target=lambda: removed.append(prune(log, END)))
        started = time.perf_counter()
        pruning.start()
        busy = asyncio.run(_load(f"{url}/predict", body, 32, 4000))
        pruning.join()
        prune_s = time.perf_counter() - started
    p99 = lambda xs: float(np.percentile(np.asarray(xs) * 1000, 99))  # noqa: E731
    return {
        "quiet": p99(quiet),
        "busy": p99(busy),
        "removed": removed[0],
        "prune_s": prune_s,
        "left": log_size(log).rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--window", type=int, default=100_000)
    parser.add_argument("--prune", type=int, default=1_000_000)
    parser.add_argument(
        "--postgres", default=os.environ.get("LOOPLINE_TEST_POSTGRES", "postgresql://127.0.0.1:5432/postgres")
    )
    args = parser.parse_args()
    from pipelines.core.config import load_params

    params = load_params(args.params)
    rows = bikeshare(params)
    model, reference = champion_reference(params, rows)
    inputs = rows[[*params.features.columns, "day"]]
    predictions = np.asarray(model.predict(rows[params.features.columns]), dtype="float64")
    span = timedelta(days=DAYS) * args.window / args.rows  # the champion's last `window` answers
    results = {}
    with tempfile.TemporaryDirectory(prefix="loopline-bench-log-") as tmp:
        started = time.perf_counter()
        fill(Path(tmp) / "log.db", args.rows, inputs, predictions)
        print(f"SQLite log of {args.rows:,} rows filled in {time.perf_counter() - started:.0f}s", flush=True)
        results["SQLite"] = time_window(Path(tmp) / "log.db", params, reference, span)
        (Path(tmp) / "log.db").unlink()
    try:
        import psycopg

        from pipelines.core.postgres import is_postgres

        assert is_postgres(args.postgres)
        name = f"loopline_bench_{os.getpid()}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        dsn = args.postgres.rsplit("/", 1)[0] + f"/{name}"
        try:
            started = time.perf_counter()
            fill(dsn, args.rows, inputs, predictions)
            print(f"PostgreSQL log of {args.rows:,} rows filled in {time.perf_counter() - started:.0f}s", flush=True)
            results["PostgreSQL"] = time_window(dsn, params, reference, span)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    except psycopg.OperationalError as err:
        print(f"PostgreSQL skipped: {err}")
    print(f"\nserved window of the champion in a {args.rows:,}-row log (best of 3; seconds)")
    print(f"{'log':<11}{'window rows':>12}{'others':>9}{'read':>8}{'measure':>9}{'total':>8}  goal <= 3 s")
    for name, r in results.items():
        print(
            f"{name:<11}{r['rows']:>12,}{r['others']:>9,}{r['read']:>8.2f}{r['measure']:>9.2f}{r['read'] + r['measure']:>8.2f}"
        )
    with tempfile.TemporaryDirectory(prefix="loopline-bench-prune-") as tmp:
        r = prune_under_load(args.params, args.prune, inputs, predictions, Path(tmp))
    print(
        f"\nprune of {r['removed']:,} expired rows ({r['prune_s']:.1f}s) while /predict runs at c=32 on the same log: "
        f"p99 {r['busy']:.1f} ms vs {r['quiet']:.1f} ms without ({r['busy'] / r['quiet']:.2f}x; goal <= 1.5x); "
        f"{r['left']:,} rows left (the service's own)"
    )


if __name__ == "__main__":
    main()
