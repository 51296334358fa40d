"""The served stream end to end, in a real git + DVC workspace with a real `loopline serve`,
its SQLite prediction log, a real Prefect API and a SQLite-backed MLflow: monitoring reads
what the service answered (drift before any label, a pending retrain), label files land
later and are joined to the log (the live metric, training rows from the logged inputs), a
batch of features without its target is measured and never trained on, and labels that
name the hour find their answers through the context field `day`.

The tests run in file order: each works on what the previous left.
"""

from __future__ import annotations

import contextlib

import pandas as pd
import pytest
from streams import SOURCE_ROWS, Stream, build_workspace

from conftest import AlertReceiver, client_of, free_port, start_service, stop, wait_for_http, wait_for_version

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stream(prefect_api, tmp_path_factory):
    """A workspace with a 2,000-hour source, a champion, and its service on a free port."""
    receiver = AlertReceiver()
    root = build_workspace(tmp_path_factory.mktemp("stream") / "ws", receiver.url)
    port = free_port()
    proc = start_service(["--params", "params.yaml"], root, port)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
        yield Stream(root, f"http://127.0.0.1:{port}", receiver)
    finally:
        stop(proc)
        receiver.server.shutdown()


def test_benign_served_traffic_is_measured_from_the_log_and_changes_nothing(stream):
    ids = stream.serve(stream.calm(400, seed=1), "calm")
    result = stream.monitor()
    served, landed = result.measured.source("served"), result.measured.source("landed")
    assert result.batches == [] and landed.status == "no rows"  # nothing landed: the log is the source
    assert served.status == "measured" and served.rows == 400, served
    assert "400 rows served by v1" in served.what
    assert served.drift.weighted_share < 0.5 and result.verdict.outcome == "no action", result.verdict.reason()
    from pipelines.monitoring.prediction_log import read_prediction_log

    with contextlib.chdir(stream.root):
        logged = read_prediction_log("data/serving/predictions.db", ["day", "temp"])
    assert logged["request_id"].tolist() == ids and logged["day"].notna().all()  # the context field, logged
    tags = client_of(stream.root).get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.window.served"].startswith("400 rows served by v1")


def test_shifted_served_traffic_decides_to_retrain_and_waits_for_labels(stream):
    stream.hot_ids = stream.serve(stream.hot(400, seed=2), "hot")
    result = stream.monitor()
    served = result.measured.source("served")
    assert served.rows == 400 and {"temp", "hum"} <= set(served.drift.drifted), served.drift
    verdict = result.verdict
    assert verdict.outcome == "retrain pending" and not verdict.retrain and result.training is None
    line = f"decision: {verdict.outcome} — {verdict.reason()}"
    print(line)
    assert line.startswith("decision: retrain pending — served: ")  # from served traffic alone: drift or the estimate
    assert "drifted features carry" in line or "DLE estimates rmse" in line
    assert "waiting for labels: 0 of monitor.min_new_rows 100 labelled rows no training has seen" in line
    assert stream.versions() == ["1"]
    tags = client_of(stream.root).get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.decision"] == "retrain pending" and tags["loopline.pending"].startswith(result.at)
    [alert] = [a for a in stream.alerts.wait_for(2) if "waiting for labels" in a["title"]]
    assert "served: " in alert["message"] and "waiting for labels" in alert["message"]
    stream.decision_lines = [line]


def test_labels_landing_later_are_joined_and_the_pending_retrain_trains_on_the_logged_inputs(stream):
    from pipelines.data.arrivals import SOURCE_KEY, stored_files
    from pipelines.data.ingest import read_arrivals

    hot = stream.hot(400, seed=2)
    stream.land(pd.DataFrame({"request_id": stream.hot_ids, "bikers": hot["bikers"].to_numpy()}), "labels-hot")
    result = stream.monitor()
    [batch] = result.batches
    assert batch.kind == "labels" and batch.rows == 400
    [joined] = result.measured.label_files
    assert (joined.joined, joined.unknown, joined.conflicts) == (400, 0, 0) and joined.stored
    live = result.measured.live
    assert live.rows == 400 and live.by_id == 400 and live.served_versions == {"1": 400}
    verdict = result.verdict
    line = f"decision: {verdict.outcome} — {verdict.reason()}"
    print(line)
    assert verdict.outcome == "retrain" and line.startswith("decision: retrain — pending since")
    assert result.training is not None and result.training.version == "2" and stream.versions() == ["1", "2"]
    # the training rows are the logged inputs with their labels, with the label file as lineage
    arrivals = stream.root / "data" / "arrivals"
    [stored] = stored_files(arrivals)
    assert stored.name == joined.stored
    import pyarrow.parquet as pq

    assert pq.ParquetFile(stored).schema_arrow.metadata[SOURCE_KEY].decode().endswith("labels-hot.parquet")
    rows = read_arrivals([stored], ["temp", "hum", "bikers", "request_id"]).to_pandas()
    assert rows["request_id"].tolist() == stream.hot_ids
    assert (
        rows["temp"].astype(float).tolist() == hot["temp"].tolist()
        and rows["bikers"].astype(int).tolist() == hot["bikers"].tolist()
    )
    run = client_of(stream.root).get_run(client_of(stream.root).get_model_version("bikes", "2").run_id)
    assert run.data.tags["data.last_arrival"] == stored.name and run.data.tags["data.arrival_batches"] == "1"
    ingested = pd.read_parquet(stream.root / "data" / "interim" / "ingested.parquet")
    assert len(ingested) == SOURCE_ROWS + 400
    tags = client_of(stream.root).get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.decision"] == "retrain" and "loopline.pending" not in tags
    stream.decision_lines.append(line)


def test_a_batch_of_features_without_the_target_is_measured_and_never_trained_on(stream):
    from pipelines.data.arrivals import stored_files
    from pipelines.data.stages import ingest

    before = [f.name for f in stored_files(stream.root / "data" / "arrivals")]
    features = stream.calm(300, seed=3).drop(columns=["bikers", "casual", "registered"])
    stream.land(features, "features-only")
    result = stream.monitor()
    [batch] = result.batches
    assert batch.kind == "features" and "never trained on" in batch.describe()
    landed = result.measured.source("landed")
    assert landed.status == "measured" and landed.rows == 300 and "features-only" in landed.what
    assert [f.name for f in stored_files(stream.root / "data" / "arrivals")] == before
    assert len(stored_files(stream.root / "data" / "observed")) == 1
    with contextlib.chdir(stream.root):
        summary = ingest(stream.params)  # what the next training reads
    assert summary["rows"] == SOURCE_ROWS + 400 and summary["arrival_batches"] == 1


def test_labels_that_name_the_hour_join_through_the_context_field(stream):
    champion = str(client_of(stream.root).get_model_version_by_alias("bikes", "champion").version)
    wait_for_version(stream.http, champion)
    april = stream.full.iloc[2200:2400]  # hours neither model trained on
    stream.serve(april, "april")
    stream.land(april[["day", "hr", "bikers"]], "labels-by-hour")
    result = stream.monitor()
    [joined] = result.measured.label_files
    assert joined.joined == 200 and joined.unknown == 0
    live = result.measured.live
    assert live.by_time == 200 and live.by_id == 0 and live.served_versions == {champion: 200}
    print(f"decision: {result.verdict.outcome} — {result.verdict.reason()}")
