"""The served stream without a service: spans, the prediction log as a monitoring store
(the served window, the answers a label names, retention), landed files by kind, and label
files joined to the log."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import BIKESHARE, bikeshare_sample, write_params
from pipelines.core.errors import LooplineError
from pipelines.monitoring.prediction_log import PredictionLog, read_window, retime

T0 = datetime(2011, 6, 1, tzinfo=UTC)


def served(version: str) -> SimpleNamespace:
    return SimpleNamespace(name="bikes", version=version, run_id=f"run{version}")


def test_spans_read_durations_and_row_counts_and_name_what_is_wrong():
    from pipelines.core.spans import describe_span, parse_duration, parse_span

    assert parse_span("7d") == timedelta(days=7) and parse_span("36h") == timedelta(hours=36)
    assert parse_span("5000") == 5000 and parse_span(250) == 250
    assert parse_duration("0") == timedelta(0)  # no delay, although "5000" is a row count
    assert parse_duration("0d") == timedelta(0) and parse_duration("30d") == timedelta(days=30)
    assert describe_span(timedelta(days=7)) == "1 week" and describe_span(timedelta(hours=36)) == "36 hours"
    assert describe_span(5000) == "5000 rows"
    for bad in ("seven days", "7y", "-3d", "2.5"):
        with pytest.raises(ValueError, match="duration|row count"):
            parse_span(bad)
    with pytest.raises(ValueError, match="is a row count; give a duration"):
        parse_duration("5000")


def test_a_bad_window_or_retention_or_context_column_names_the_key(tmp_path):
    from pipelines.core.config import load_params

    cases = [
        ({"monitor": {"window": "a week"}}, "monitor.window"),
        ({"serve": {"log_retention": "1000"}}, "serve.log_retention"),
        ({"serve": {"context_columns": ["station"]}}, "serve.context_columns names 'station'"),
        ({"serve": {"context_columns": ["temp"]}}, "'temp', which is a feature"),
    ]
    for sections, named in cases:
        with pytest.raises(LooplineError, match=named):
            load_params(write_params(tmp_path, "x.csv", **sections))


@pytest.fixture(params=["sqlite", "postgresql"])
def log_at(request, tmp_path):
    """A prediction log (SQLite or PostgreSQL) with answers filed at chosen times: v1 served
    hours 0-9 of June 1, v2 hours 10-19, each once (request id h<hour>), with a context field."""
    location = tmp_path / "p.db" if request.param == "sqlite" else request.getfixturevalue("postgres_db")
    log = PredictionLog(location)
    for version, hours in (("1", range(10)), ("2", range(10, 20))):
        ids = [f"h{h}" for h in hours]
        log.append(served(version), ids, [{"hr": h, "day": 152} for h in hours], [float(h) for h in hours], None)
    log.append(served("2"), ["h15"], [{"hr": 15, "day": 152}], [99.0], None, role="shadow")
    log.flush()
    retime(location, [f"h{h}" for h in range(20)], [T0 + timedelta(hours=h) for h in range(20)])
    return location


def test_the_served_window_is_the_champions_answers_in_the_span_and_others_are_apart(log_at):
    window = read_window(log_at, ["hr"], "2", timedelta(hours=6), T0 + timedelta(hours=19))
    assert window.rows["request_id"].tolist() == ["h14", "h15", "h16", "h17", "h18", "h19"]
    assert set(window.rows["role"]) == {"champion"}  # the shadow's answer to h15 is not the champion's
    assert window.others == {} and window.start.startswith("2011-06-01T14:00")
    wide = read_window(log_at, ["hr", "day"], "2", timedelta(hours=15), T0 + timedelta(hours=19))
    assert wide.size == 10 and wide.others == {"1": 5}  # v1's hours 5-9 in the same span, counted apart
    assert wide.rows["hr"].tolist() == list(range(10, 20)) and set(wide.rows["day"]) == {152}
    last = read_window(log_at, ["hr"], "1", 3, T0 + timedelta(hours=19))
    assert last.rows["request_id"].tolist() == ["h7", "h8", "h9"] and last.size == 3
    before = read_window(log_at, ["hr"], "2", timedelta(hours=2), T0)  # nothing v2 answered by then
    assert before.size == 0 and before.start is None


def test_retention_prunes_old_rows_but_never_the_window_or_a_pending_wait(log_at):
    from pipelines.monitoring.prediction_log import log_size, prune, read_prediction_log

    assert log_size(log_at).rows == 21
    assert prune(log_at, before=T0 + timedelta(hours=5), keep_since=T0 + timedelta(hours=3)) == 3
    assert read_prediction_log(log_at, [])["request_id"].tolist()[:2] == ["h3", "h4"]
    assert prune(log_at, before=T0 + timedelta(hours=8)) == 5
    assert log_size(log_at).rows == 13


def test_answers_are_found_by_request_id_and_by_a_context_key(log_at):
    from pipelines.monitoring.prediction_log import read_answers

    by_id = read_answers(log_at, ["hr"], request_ids=["h3", "h15", "nope"])
    assert sorted(by_id["request_id"]) == ["h15", "h3"] and set(by_id["role"]) == {"champion"}
    by_key = read_answers(log_at, ["hr", "day"], key="day", key_values=[152])
    assert len(by_key) == 20


def test_a_missing_or_unreadable_log_is_an_error_naming_it_never_nothing_served(tmp_path):
    from pipelines.monitoring.prediction_log import read_window

    with pytest.raises(LooplineError, match="gone.db does not exist"):
        read_window(tmp_path / "gone.db", ["hr"], "1", timedelta(days=1), T0)
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LooplineError, match="damaged.db cannot be read"):
        read_window(damaged, ["hr"], "1", timedelta(days=1), T0)


@pytest.fixture
def landing(tmp_path):
    """Params of a 300-hour source (a request may carry `day`), the landing folder, the rest of
    2011 as a frame."""
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout

    params = load_params(
        write_params(
            tmp_path, bikeshare_sample(tmp_path, 300), monitor={"settle_seconds": 0}, serve={"context_columns": ["day"]}
        )
    )
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    return params, layout, pd.read_csv(BIKESHARE).iloc[300:]


def test_landed_files_are_stored_by_what_they_hold(landing):
    from pipelines.data.arrivals import accept_landed, stored_files, stored_kind

    params, layout, rest = landing
    features = [*params.features.columns, "day"]
    rest.iloc[:100].to_csv(layout.landing / "a-full.csv", index=False)
    rest.iloc[100:200][features].to_csv(layout.landing / "b-features.csv", index=False)
    rest.iloc[200:300].assign(bikers=None).to_parquet(layout.landing / "c-empty-target.parquet", index=False)
    labels = rest.iloc[:100][["bikers"]].assign(request_id=[f"r{i}" for i in range(100)])
    labels.to_csv(layout.landing / "d-labels.csv", index=False)
    rest.iloc[:50][["day", "hr", "bikers"]].to_csv(layout.landing / "e-keyed-labels.csv", index=False)
    outcomes = {o.file: o for o in accept_landed(params)}
    assert {f: o.kind for f, o in outcomes.items()} == {
        "a-full.csv": "full",
        "b-features.csv": "features",
        "c-empty-target.parquet": "features",
        "d-labels.csv": "labels",
        "e-keyed-labels.csv": "labels",
    }
    assert "never trained on" in outcomes["b-features.csv"].describe()
    assert [f.name for f in stored_files(layout.arrivals)] == ["000001-a-full.parquet"]
    assert [f.name for f in stored_files(layout.observed)] == [
        "000002-b-features.parquet",
        "000003-c-empty-target.parquet",
    ]
    assert [stored_kind(f) for f in stored_files(layout.labels)] == ["labels", "labels"]
    assert pq.read_table(stored_files(layout.labels)[0]).column_names == ["bikers", "request_id"]


def test_bad_label_files_are_rejected_whole_naming_rule_columns_and_values(landing):
    from pipelines.data.arrivals import accept_landed, stored_files

    params, layout, rest = landing
    ids = [f"r{i}" for i in range(40)]
    negative = rest.iloc[:40][["bikers"]].assign(request_id=ids)
    negative.loc[negative.index[3], "bikers"] = -5
    negative.to_csv(layout.landing / "negative.csv", index=False)
    text = rest.iloc[:40][["bikers"]].astype(object).assign(request_id=ids)
    text.loc[text.index[0], "bikers"] = "lots"
    text.to_csv(layout.landing / "text.csv", index=False)
    rest.iloc[:40][["bikers"]].to_csv(layout.landing / "no-key.csv", index=False)
    outcomes = {o.file: o for o in accept_landed(params)}
    assert all(o.status == "rejected" for o in outcomes.values())
    assert "bikers" in outcomes["negative.csv"].reason and "-5" in outcomes["negative.csv"].reason
    assert "bikers" in outcomes["text.csv"].reason and "lots" in outcomes["text.csv"].reason
    reason = outcomes["no-key.csv"].reason
    assert "'request_id'" in reason and "['day', 'hr']" in reason and "missing" in reason, reason
    assert stored_files(layout.labels) == [] and stored_files(layout.arrivals) == []


def _serve(location, frame: pd.DataFrame, ids: list[str], version: str = "1", context: bool = True) -> None:
    from pipelines.core.config import Params  # noqa: F401  (the columns below are Bikeshare's)

    columns = [c for c in frame.columns if c not in ("bikers", "casual", "registered") and (context or c != "day")]
    log = PredictionLog(location)
    records = json.loads(frame[columns].to_json(orient="records"))
    log.append(served(version), ids, records, frame["bikers"].astype(float).tolist(), None)
    log.flush()


def test_label_files_join_the_log_count_what_does_not_and_become_training_rows(landing):
    from pipelines.data.arrivals import SOURCE_KEY, accept_landed, stored_files, typed_rows
    from pipelines.data.ingest import read_arrivals
    from pipelines.monitoring.labels import join_label_files
    from pipelines.monitoring.prediction_log import log_location

    params, layout, rest = landing
    location = log_location(params)
    served_rows = rest.iloc[:200]
    _serve(location, served_rows, [f"r{i}" for i in range(200)])
    labels = served_rows[["bikers"]].assign(request_id=[f"r{i}" for i in range(200)]).iloc[:150]
    extra = pd.DataFrame({"bikers": [1, 2, 3], "request_id": ["ghost-1", "ghost-2", "ghost-3"]})
    repeat = labels.iloc[:5]  # the same labels again: kept once
    clash = labels.iloc[5:7].assign(bikers=lambda f: f["bikers"] + 1)  # r5, r6 labelled twice differently
    pd.concat([labels, extra, repeat, clash]).to_csv(layout.landing / "labels-june.csv", index=False)
    [accepted] = accept_landed(params)
    assert accepted.kind == "labels" and accepted.rows == 160

    feed = join_label_files(params, location)
    [outcome] = feed.files
    assert (outcome.labels, outcome.joined, outcome.unknown, outcome.duplicates, outcome.conflicts) == (
        160,
        148,
        3,
        5,
        2,
    )
    assert outcome.unknown_examples == ["ghost-1", "ghost-2", "ghost-3"] and sorted(outcome.conflict_examples) == [
        "r5",
        "r6",
    ]
    assert "148 of 160 labels joined" in outcome.describe() and "ghost-1" in outcome.describe()
    assert len(feed.answered) == 148 and set(feed.answered["how"]) == {"id"}
    [stored] = stored_files(layout.arrivals)
    assert pq.ParquetFile(stored).schema_arrow.metadata[SOURCE_KEY] == b"000001-labels-june.parquet"
    training = typed_rows(read_arrivals([stored], [*params.table_schema.columns, "request_id"]), params)
    assert len(training) == 148 and list(training.columns)[: len(params.table_schema.columns)] == list(
        params.table_schema.columns
    )
    expected = served_rows.set_index(pd.Index([f"r{i}" for i in range(200)]))
    joined = training.set_index("request_id")
    assert (joined["temp"] == expected.loc[joined.index, "temp"]).all()  # the logged inputs ...
    assert (joined["bikers"] == expected.loc[joined.index, "bikers"]).all()  # ... with their labels
    assert (layout.joined_labels / "000001-labels-june.report.json").is_file()
    assert stored_files(layout.labels) == [] and join_label_files(params, location).files == []  # joined once


def test_labels_by_time_key_join_through_the_logged_context_field(landing):
    from pipelines.data.arrivals import accept_landed, stored_files
    from pipelines.monitoring.labels import join_label_files
    from pipelines.monitoring.prediction_log import log_location

    params, layout, rest = landing
    location = log_location(params)
    _serve(location, rest.iloc[:100], [f"r{i}" for i in range(100)])
    rest.iloc[:100][["day", "hr", "bikers"]].to_csv(layout.landing / "by-hour.csv", index=False)
    accept_landed(params)
    [outcome] = join_label_files(params, location).files
    assert outcome.joined == 100 and outcome.unknown == 0 and outcome.stored is not None
    assert len(stored_files(layout.arrivals)) == 1


def test_joined_labels_without_every_schema_column_in_the_log_are_measured_not_trained_on(landing):
    from pipelines.data.arrivals import accept_landed, stored_files
    from pipelines.monitoring.labels import join_label_files
    from pipelines.monitoring.prediction_log import log_location

    params, layout, rest = landing
    location = log_location(params)
    _serve(location, rest.iloc[:80], [f"r{i}" for i in range(80)], context=False)  # requests sent no `day`
    rest.iloc[:80][["bikers"]].assign(request_id=[f"r{i}" for i in range(80)]).to_csv(
        layout.landing / "labels.csv", index=False
    )
    accept_landed(params)
    feed = join_label_files(params, location)
    [outcome] = feed.files
    assert outcome.joined == 80 and outcome.stored is None and len(feed.answered) == 80
    assert "['day']" in outcome.not_stored and "serve.context_columns" in outcome.not_stored
    assert stored_files(layout.arrivals) == []
