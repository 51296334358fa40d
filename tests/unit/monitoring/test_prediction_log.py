"""The prediction log: written by a background thread, read back per input field."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from pipelines.core.errors import LooplineError
from pipelines.monitoring.prediction_log import PredictionLog, read_prediction_log


def served(version: str) -> SimpleNamespace:
    return SimpleNamespace(name="bikes", version=version, run_id=f"run{version}")


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "p.db"
    return request.getfixturevalue("postgres_db")


def test_prediction_log_appends_in_the_background_and_reads_back_per_field(location):
    log = PredictionLog(location)
    log.append(
        served("1"), ["a", "b"], [{"hr": 1, "weathersit": "clear"}, {"hr": 2, "weathersit": None}], [10.5, 20.5], None
    )
    time.sleep(0.01)  # timestamps have millisecond resolution
    log.append(served("2"), ["c"], [{"hr": 3, "weathersit": "cloudy/misty"}], [30.0], None)
    log.flush()
    rows = read_prediction_log(location, ["hr", "weathersit"])
    assert rows["request_id"].tolist() == ["a", "b", "c"]
    assert rows["hr"].tolist() == [1, 2, 3] and rows["prediction"].tolist() == [10.5, 20.5, 30.0]
    assert rows["weathersit"].tolist() == ["clear", None, "cloudy/misty"]
    assert rows["model_version"].tolist() == ["1", "1", "2"]
    later = read_prediction_log(location, ["hr"], since=rows["ts"].iloc[2])
    assert later["request_id"].tolist() == ["c"]
    assert log.dropped == 0


def test_a_log_nothing_was_written_to_is_an_error_naming_it(tmp_path, postgres_db):
    with pytest.raises(LooplineError, match="none.db does not exist"):
        read_prediction_log(tmp_path / "none.db", ["hr"])
    with pytest.raises(LooplineError, match=f"{postgres_db.rsplit('/', 1)[1]}.* does not exist"):
        read_prediction_log(postgres_db, ["hr"])


def test_replicas_share_one_postgresql_log_and_classifier_outputs_read_back(postgres_db):
    """Two writers (as two service replicas) on one table; labels and probabilities keep
    their types; the password never reaches a message."""
    from pipelines.monitoring.prediction_log import describe

    first, second = PredictionLog(postgres_db), PredictionLog(postgres_db)
    first.append(served("1"), [f"a-{i}" for i in range(500)], [{"hr": i} for i in range(500)], [7] * 500, None)
    second.append(served("1"), ["b-0"], [{"hr": 1}], ["red"], [{"red": 0.75, "white": 0.25}])
    first.flush(), second.flush()
    rows = read_prediction_log(postgres_db, ["hr"])
    assert len(rows) == 501 and rows["request_id"].str[0].value_counts().to_dict() == {"a": 500, "b": 1}
    assert rows.loc[rows["request_id"].str.startswith("a"), "hr"].tolist() == list(range(500))  # in write order
    last = rows.set_index("request_id").loc["b-0"]
    assert last["prediction"] == "red" and json.loads(last["probabilities"]) == {"red": 0.75, "white": 0.25}
    secret = postgres_db.replace("://", "://loopline:s3cret@")
    assert "s3cret" not in describe(secret) and "loopline" in describe(secret)


def test_an_unreachable_postgresql_log_is_refused_at_start_naming_it():
    from pipelines.core.processes import free_port

    dsn = f"postgresql://127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(LooplineError, match=f"cannot reach .*port={dsn.split(':')[2].split('/')[0]}"):
        PredictionLog(dsn)


def test_a_lost_postgresql_connection_drops_one_burst_and_the_next_reconnects(postgres_db):
    import psycopg

    log = PredictionLog(postgres_db)
    log.append(served("1"), ["a"], [{"hr": 1}], [1.0], None)
    log.flush()
    with psycopg.connect(postgres_db, autocommit=True) as admin:  # the server ends the writer's session
        ended = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    assert ended == [(True,)]
    log.append(served("1"), ["b"], [{"hr": 2}], [2.0], None)
    log.flush()
    log.append(served("1"), ["c"], [{"hr": 3}], [3.0], None)
    log.flush()
    assert log.dropped == 1
    assert read_prediction_log(postgres_db, [])["request_id"].tolist() == ["a", "c"]


def test_single_record_bursts_within_the_linger_go_in_one_transaction_and_a_flush_does_not_wait(location):
    """Micro-batches of single-record traffic, appended faster than LINGER_S, are written
    together (one transaction, not one each); a flush writes at once rather than lingering."""
    from pipelines.monitoring import prediction_log

    log = PredictionLog(location)
    writes: list[int] = []
    insert = log._store.insert
    log._store.insert = lambda db, bursts: (writes.append(sum(b.size for b in bursts)), insert(db, bursts))[1]
    started = time.monotonic()
    for i in range(20):
        log.append(served("1"), [f"r-{i}-{j}" for j in range(5)], [{"hr": j} for j in range(5)], [1.0] * 5, None)
    appended = time.monotonic() - started
    log.flush()
    flushed = time.monotonic() - started
    assert read_prediction_log(location, ["hr"])["request_id"].nunique() == 100
    assert sum(writes) == 100
    if appended < prediction_log.LINGER_S / 2:  # the appends came within the window: gathered
        assert len(writes) <= 2, writes
    assert flushed < appended + prediction_log.LINGER_S + 0.5  # the flush ended the window
    log.append(served("1"), ["late"], [{"hr": 1}], [1.0], None)
    time.sleep(prediction_log.LINGER_S + 0.5)  # no flush: written once the window closes
    assert "late" in read_prediction_log(location, ["hr"])["request_id"].tolist()
