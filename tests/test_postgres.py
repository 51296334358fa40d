"""loopline beyond one machine, on a real PostgreSQL server (skipped where none answers):
service replicas sharing one prediction log that monitoring joins."""

from __future__ import annotations

import httpx
import pytest

from conftest import (
    bikeshare_sample,
    free_port,
    register_family,
    start_service,
    stop,
    tracking_section,
    wait_for_http,
    write_params,
)

pytestmark = pytest.mark.slow


def test_two_service_replicas_log_to_one_postgresql_table_and_monitoring_joins_every_id(postgres_db, tmp_path):
    """Two real `loopline serve` processes, one /predict_batch call to the first and single
    /predict calls to the second, both stopped (a clean shutdown writes what is queued);
    a labelled batch with those request ids then gets a live metric on every row."""
    from pipelines.arrivals import accept_landed
    from pipelines.config import load_params
    from pipelines.layout import Layout
    from pipelines.measure import measure
    from pipelines.prediction_log import read_prediction_log
    from pipelines.registry import promote
    from pipelines.stages import read_split, run_all
    from pipelines.tracking import client_for, load_model_version, plain_frame
    from pipelines.training import log_reference

    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path),
        tracking=tracking_section(tmp_path),
        serve={"prediction_log": postgres_db},
        monitor={"settle_seconds": 0, "estimate_performance": False},
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    version = register_family(params, "linear")
    client, _ = client_for(params)
    model, _ = load_model_version(client, "bikes", version)
    log_reference(client, client.get_model_version("bikes", version).run_id, model, read_split(params, "train"), params)
    promote(client, "bikes", version, params.tracking.uri, reason="test")

    labelled = read_split(params, "test").head(60)
    records = plain_frame(labelled[params.features.columns]).to_dict(orient="records")
    ports = [free_port(), free_port()]
    replicas = [start_service(["--params", str(path)], tmp_path, port) for port in ports]
    try:
        for proc, port in zip(replicas, ports, strict=True):
            wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=30) as first,
            httpx.Client(base_url=f"http://127.0.0.1:{ports[1]}", timeout=30) as second,
        ):
            answer = first.post("/predict_batch", json={"records": records[:30]}, headers={"X-Request-ID": "batch"})
            assert answer.status_code == 200, answer.text
            for i, record in enumerate(records[30:]):
                assert second.post("/predict", json=record, headers={"X-Request-ID": f"one-{i}"}).status_code == 200
    finally:
        for proc in replicas:
            stop(proc)
    ids = [f"batch-{i}" for i in range(30)] + [f"one-{i}" for i in range(30)]
    served = read_prediction_log(postgres_db, ["hr"])
    assert sorted(served["request_id"]) == sorted(ids)
    assert served["hr"].tolist() == [int(r["hr"]) for r in records]  # written in the order served
    assert set(served["model_version"]) == {version}

    landing = Layout.of(params).landing
    landing.mkdir(parents=True, exist_ok=True)
    labelled.assign(request_id=ids).to_csv(landing / "labels.csv", index=False)
    assert [b.accepted for b in accept_landed(params)] == [True]
    measured = measure(params)
    assert measured.status == "measured", measured.detail
    assert measured.live is not None and measured.live.rows == 60 and measured.live.served_versions == {version: 60}
