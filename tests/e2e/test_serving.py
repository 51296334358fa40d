"""The BentoML service as users run it: a real `loopline serve` (bentoml serve) subprocess on a
loopback port, a real SQLite MLflow registry, HTTP calls. Also the packaged Bento and the
batch-scoring flow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from conftest import (
    bikeshare_sample,
    free_port,
    register_family,
    run_cli,
    start_service,
    stop,
    tracking_section,
    venv_bin,
    wait_for_http,
    wait_for_version,
    wait_until,
    write_params,
)
from serving.schema import request_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared splits and an empty registry; models are registered by the tests."""
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all

    tmp = tmp_path_factory.mktemp("serving")
    path = write_params(
        tmp,
        bikeshare_sample(tmp),
        tracking=tracking_section(tmp),
        serve={"reload_interval_s": 1, "max_batch_records": 50, "max_body_bytes": 100_000},
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    return tmp, path, params


@pytest.fixture(scope="module")
def service(setup):
    tmp, path, _ = setup
    port = free_port()
    proc = start_service(["--params", str(path)], tmp, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/livez", timeout=120, proc=proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def test_rows(setup) -> pd.DataFrame:
    from pipelines.data.split import read_split
    from pipelines.registry.tracking import plain_frame

    _, _, params = setup
    return plain_frame(read_split(params, "test")[params.features.columns].head(40))


def pyfunc_predictions(params, version: str, frame: pd.DataFrame) -> np.ndarray:
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    uri = params.tracking.uri
    run_id = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("bikes", version).run_id
    local = MlflowClient(tracking_uri=uri).download_artifacts(
        run_id, "model", str(params.paths.data / f"pyfunc-{version}")
    )
    return np.asarray(mlflow.pyfunc.load_model(local).predict(frame), dtype="float64")


def test_without_a_store_or_champion_the_service_runs_and_says_why(service, test_rows, setup):
    from pipelines.registry.tracking import client_for

    tmp, _, params = setup
    body = request_records(test_rows.head(1), params)[0]
    missing = f"tracking store {tmp / 'mlflow.db'} does not exist"
    for response in (
        service.post("/predict", json=body),
        service.get("/readyz"),
        service.post("/predict_batch", json={"records": [body]}),
    ):
        assert response.status_code == 503 and missing in response.json()["error"], response.text
    assert missing in service.post("/model").json()["last_error"]
    assert service.get("/livez").status_code == 200
    assert not (tmp / "mlflow.db").exists(), "the service created a tracking store"

    client_for(params)  # the store appears (as a first training makes it), still without a champion
    deadline = time.monotonic() + 30
    while "no version aliased 'champion'" not in (answer := service.post("/predict", json=body)).text:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.3)
    assert answer.status_code == 503 and "loopline train" in answer.json()["error"]
    assert "no version aliased" in service.get("/readyz").json()["error"]


@pytest.fixture(scope="module")
def champion_v1(service, setup):
    """v1 (hist gradient boosting) becomes champion; the running service picks it up by polling."""
    from pipelines.registry.champion import promote
    from pipelines.registry.tracking import client_for

    _, _, params = setup
    v1 = register_family(params, "hist_gradient_boosting")
    v2 = register_family(params, "linear")
    client, _ = client_for(params)
    promote(client, "bikes", v1, params.tracking.uri, reason="test")
    wait_for_version(service, v1)
    return v1, v2


def test_predictions_equal_mlflow_pyfunc_single_and_batch(service, champion_v1, test_rows, setup):
    _, _, params = setup
    v1, _ = champion_v1
    expected = pyfunc_predictions(params, v1, test_rows)
    bodies = request_records(test_rows, params)
    single = [service.post("/predict", json=b).json() for b in bodies]
    assert {r["model_version"] for r in single} == {v1} and all(r["run_id"] for r in single)
    # served by ONNX Runtime: equal to the Python model within the parity tolerance
    assert service.post("/model").json()["engine"] == "onnx"
    status = service.get("/model")  # a read is a GET too; POST stays for older clients
    assert status.status_code == 200 and status.json()["model_version"] == v1 and status.json()["engine"] == "onnx"
    np.testing.assert_allclose([r["prediction"] for r in single], expected, rtol=1e-4, atol=1e-4)
    batch = service.post("/predict_batch", json={"records": bodies}, headers={"X-Request-ID": "batch-7"}).json()
    np.testing.assert_allclose(batch["predictions"], expected, rtol=1e-4, atol=1e-4)
    assert batch["request_ids"][:2] == ["batch-7-0", "batch-7-1"] and batch["model_version"] == v1
    assert service.get("/readyz").status_code == 200


def test_every_prediction_is_logged_with_inputs_version_and_request_id(service, champion_v1, test_rows, setup):
    from pipelines.monitoring.prediction_log import read_prediction_log

    tmp, _, params = setup
    body = request_records(test_rows.head(1), params)[0]
    answer = service.post("/predict", json=body, headers={"X-Request-ID": "req-42"}).json()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = read_prediction_log(tmp / "data" / "serving" / "predictions.db", params.features.columns)
        row = log[log["request_id"] == "req-42"]
        if len(row):
            break
        time.sleep(0.2)
    assert len(row) == 1
    row = row.iloc[0]
    assert row["prediction"] == pytest.approx(answer["prediction"]) and row["model_version"] == champion_v1[0]
    assert {c: row[c] for c in body} == body
    assert (log["request_id"].str.startswith("batch-7-")).sum() == len(test_rows)


def test_columns_are_answered_as_the_same_records_are_and_logged_alike(service, champion_v1, test_rows, setup):
    """/predict_columns: one array per field, the same answers as /predict_batch for the
    same rows, logged with their inputs; a broken rule is a 400 naming column, row and value."""
    from pipelines.monitoring.prediction_log import read_prediction_log

    tmp, _, params = setup
    bodies = request_records(test_rows, params)
    columns = {c: [b[c] for b in bodies] for c in bodies[0]}
    columns["weathersit"] = [f" {v.upper()} " for v in columns["weathersit"]]  # the label rule, as for records
    batch = service.post("/predict_batch", json={"records": bodies}).json()
    answer = service.post("/predict_columns", json=columns, headers={"X-Request-ID": "cols-1"})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["predictions"], batch["predictions"], rtol=1e-12)
    assert answer.json()["request_ids"][-1] == f"cols-1-{len(bodies) - 1}"
    assert answer.json()["model_version"] == champion_v1[0]

    def logged():
        log = read_prediction_log(tmp / "data" / "serving" / "predictions.db", params.features.columns)
        return log[log["request_id"].str.startswith("cols-1-")]

    wait_until(lambda: len(logged()) == len(bodies), timeout=10)
    rows = logged().sort_values("request_id", key=lambda ids: ids.str.rsplit("-", n=1).str[1].astype(int))
    np.testing.assert_allclose(rows["prediction"], batch["predictions"], rtol=1e-12)
    for column in params.features.columns:  # the inputs as the records form logs them (labels in the schema's spelling)
        assert list(rows[column]) == [b[column] for b in bodies], column

    broken = {**columns, "hr": [*columns["hr"][:-1], 31]}
    refused = service.post("/predict_columns", json=broken)
    assert refused.status_code == 400
    assert refused.json()["error"] == f"column 'hr': 1 row(s) above the maximum 23.0, e.g. row {len(bodies)}: 31"
    short = {**columns, "temp": columns["temp"][:3]}
    assert "one value per row" in service.post("/predict_columns", json=short).json()["error"]
    assert service.post("/predict_columns", json={**columns, "color": ["red"] * len(bodies)}).status_code == 400
    assert service.get("/readyz").status_code == 200


BAD_BODIES = [
    ("wrong type", {"hr": "eight"}, 400, "hr"),
    ("fraction for int", {"hr": 8.5}, 400, "hr"),
    ("boolean for int", {"holiday": False}, 400, "holiday"),
    ("out of range", {"hum": 1.5}, 400, "hum"),
    ("unknown category", {"weathersit": "sunny"}, 400, "weathersit"),
    ("null where not allowed", {"season": None}, 400, "season"),
    ("extra field", {"station": "A"}, 400, "station"),
]


@pytest.mark.parametrize("name, change, status, field", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_fields_get_a_4xx_naming_the_field(service, champion_v1, test_rows, setup, name, change, status, field):
    _, _, params = setup
    body = {**request_records(test_rows.head(1), params)[0], **change}
    response = service.post("/predict", json=body)
    assert response.status_code == status
    assert [d["loc"] for d in response.json()["detail"]] == [[field]]


def test_malformed_requests_get_a_4xx_and_the_server_keeps_serving(service, champion_v1, test_rows, setup):
    _, _, params = setup
    good = request_records(test_rows.head(1), params)[0]
    missing = {k: v for k, v in good.items() if k != "temp"}
    raw_bodies = {
        "missing field": (json.dumps(missing), 400, "temp"),
        "NaN": (json.dumps({**good, "temp": float("nan")}), 400, "temp"),
        "Infinity": (json.dumps({**good, "temp": float("inf")}), 400, "temp"),
        "empty body": ("", 400, "Field required"),
        "invalid JSON": ('{"hr": ', 400, "Invalid JSON"),
        "a list": ("[1, 2]", 400, "object"),
    }
    for name, (raw, status, mention) in raw_bodies.items():
        response = service.post("/predict", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == status, name
        assert mention in response.text, name
    oversized = service.post("/predict_batch", json={"records": [good] * 51})
    assert oversized.status_code == 400 and oversized.json()["detail"][0]["loc"] == ["records"]
    huge = service.post("/predict", content=b"{" + b" " * 200_000 + b"}", headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["error"]
    chunked = service.post(
        "/predict", content=iter([b"{", b" " * 150_000, b"}"]), headers={"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413
    form = service.post("/predict", content=b"a=1", headers={"Content-Type": "multipart/form-data"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    bad_id = service.post("/predict", json=good, headers={"X-Request-ID": "x" * 65})
    assert bad_id.status_code == 400 and "X-Request-ID" in bad_id.json()["error"]
    assert service.post("/predict", json=good).status_code == 200


def test_a_refused_request_is_one_warning_line_in_the_service_log(service, champion_v1, test_rows, setup):
    tmp, _, params = setup
    good = request_records(test_rows.head(1), params)[0]
    assert service.post("/predict", json={**good, "hum": 1.5}, headers={"X-Request-ID": "refused-1"}).status_code == 400
    assert (
        service.post(
            "/predict", content=b"a=1", headers={"Content-Type": "text/plain", "X-Request-ID": "refused-2"}
        ).status_code
        == 415
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = "".join(p.read_text() for p in tmp.glob("serve-*.log"))
        if "refused-2" in log:
            break
        time.sleep(0.3)
    lines = [line for line in log.splitlines() if "refused-" in line]
    assert len(lines) == 2 and all("[WARNING]" in line for line in lines), lines
    assert "/predict (400, request id refused-1): hum: less_than_equal" in lines[0]
    assert "(415, request id refused-2)" in lines[1]
    assert "Exception on /predict" not in log and "ValidationError" not in log
    assert "the first model since start-up" in log and "was vNone" not in log


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_concurrent_single_requests_are_predicted_in_batches(service, champion_v1, test_rows, setup):
    import asyncio

    _, _, params = setup
    bodies = request_records(test_rows, params)
    before = service.get("/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=str(service.base_url), timeout=30) as client:
            return await asyncio.gather(*(client.post("/predict", json=bodies[i % len(bodies)]) for i in range(64)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 64
    after = service.get("/metrics").text
    rows = metric(after, "loopline_batch_rows_sum") - metric(before, "loopline_batch_rows_sum")
    calls = metric(after, "loopline_batch_rows_count") - metric(before, "loopline_batch_rows_count")
    assert rows == 64 and calls < 64, f"{calls} model calls for 64 concurrent requests"


def test_hot_reload_switches_version_without_dropping_requests(service, champion_v1, test_rows, setup):
    from pipelines.registry.champion import promote
    from pipelines.registry.tracking import client_for

    _, _, params = setup
    v1, v2 = champion_v1
    body = request_records(test_rows.head(1), params)[0]
    seen: list[tuple[int, str | None]] = []
    done = threading.Event()

    def traffic():
        with httpx.Client(base_url=str(service.base_url), timeout=30) as client:
            while not done.is_set():
                r = client.post("/predict", json=body)
                seen.append((r.status_code, r.json().get("model_version")))

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while sum(v == v1 for _, v in seen) < 5:  # traffic is flowing, answered by v1
            assert time.monotonic() < deadline and worker.is_alive(), f"no traffic answered by v{v1}: {seen[-5:]}"
            time.sleep(0.05)
        client, _ = client_for(params)
        promote(client, "bikes", v2, params.tracking.uri, reason="test")
        wait_for_version(service, v2)
        # A request whose batch took the model just before the switch may still answer v1;
        # stop once v2 has answered (on a loaded machine one request can take a while).
        deadline = time.monotonic() + 30
        while not any(v == v2 for _, v in seen[-5:]):
            assert time.monotonic() < deadline, f"no answer from v{v2}: {seen[-5:]}"
            time.sleep(0.1)
    finally:
        done.set()
        worker.join()
    versions = [v for _, v in seen]
    assert {s for s, _ in seen} == {200}
    assert versions[0] == v1 and versions[-1] == v2
    switch = versions.index(v2)
    assert set(versions[switch:]) == {v2}, "served version went back after the switch"
    promote(client, "bikes", v1, params.tracking.uri, reason="test")
    assert service.post("/admin/reload").json()["model_version"] == v1  # the admin endpoint checks now


def test_api_keys_guard_the_prediction_routes_and_the_log_names_each_caller(champion_v1, test_rows, setup, tmp_path):
    """With keys ($LOOPLINE_API_KEYS), every prediction route answers 401 without a known key
    (none, or a wrong one) and 200 with one, by Bearer or X-API-Key; the health routes and
    /model stay open; the log holds each answer's key id, and no key is written anywhere."""
    import yaml

    from pipelines.monitoring.prediction_log import read_prediction_log

    _, path, params = setup
    keys = {"alice": "k-alice-3f9c0b6e1d2a4478", "batch-job": "k-batch-9e8d7c6b5a493827"}
    raw = yaml.safe_load(path.read_text())
    raw["serve"]["prediction_log"] = str(tmp_path / "keyed.db")
    keyed = tmp_path / "params.yaml"
    keyed.write_text(yaml.safe_dump(raw))
    port = free_port()
    env = {"LOOPLINE_API_KEYS": ",".join(f"{k}:{v}" for k, v in keys.items())}
    proc = start_service(["--params", str(keyed)], tmp_path, port, env)
    body = request_records(test_rows.head(2), params)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            columns = {c: [r[c] for r in body] for c in body[0]}
            for route, payload in (
                ("/predict", body[0]),
                ("/predict_batch", {"records": body}),
                ("/predict_columns", columns),
            ):
                anonymous = client.post(route, json=payload)
                assert anonymous.status_code == 401 and "needs an API key" in anonymous.json()["error"], route
                assert anonymous.headers["www-authenticate"].startswith("Bearer")
                wrong = client.post(route, json=payload, headers={"Authorization": "Bearer k-not-a-key-000000000"})
                assert wrong.status_code == 401 and "not one of the service's" in wrong.json()["error"]
            right = client.post(
                "/predict", json=body[0], headers={"Authorization": f"Bearer {keys['alice']}", "X-Request-ID": "a-1"}
            )
            assert right.status_code == 200, right.text
            batch = client.post(
                "/predict_batch", json={"records": body}, headers={"X-API-Key": keys["batch-job"], "X-Request-ID": "b"}
            )
            assert batch.status_code == 200, batch.text
            assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
            status = client.get("/model").json()
            assert (
                status["authentication"] == "API keys: alice, batch-job" and status["model_version"] == champion_v1[0]
            )
    finally:
        stop(proc)
    log = read_prediction_log(tmp_path / "keyed.db", [])
    assert dict(zip(log["request_id"], log["caller"], strict=True)) == {
        "a-1": "alice",
        "b-0": "batch-job",
        "b-1": "batch-job",
    }
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert not any(key.encode() in written for key in keys.values())


def test_sigkill_of_the_server_group_leaves_no_worker_holding_the_port(setup, tmp_path):
    """`setsid loopline serve & kill -9 -- -$PID`: BentoML's workers run in their own session,
    so they must die with their parent, not keep the port."""
    import socket

    import psutil

    _, path, _ = setup
    port = free_port()
    proc = start_service(["--params", str(path)], tmp_path, port)
    wait_for_http(f"http://127.0.0.1:{port}/livez", timeout=120, proc=proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "no worker process to check"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived the killed server: {[(p.pid, p.cmdline()[-6:]) for p in alive]}"
    with socket.socket() as s:  # bound as a server binds, so connections in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()  # nothing else is listening: the next `loopline serve` gets the port


def test_the_openapi_document_has_no_duplicate_keys(service):
    """Swagger UI (/docs) refuses a document with a key twice ("duplicated mapping key"), as
    BentoML's integer status codes beside loopline's string ones gave: found by the browser test."""

    def unique(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"keys given twice: {sorted(k for k in keys if keys.count(k) > 1)}"
        return dict(pairs)

    spec = json.loads(service.get("/docs.json").content, object_pairs_hook=unique)
    assert set(spec["paths"]["/predict"]["post"]["responses"]) >= {"200", "400", "413", "415", "503"}


# Examples per operation and phase: `make test` runs 100 (a few hundred requests, every check);
# `make fuzz` runs 500 (more than 1,000 requests).
FUZZ_EXAMPLES = int(os.environ.get("LOOPLINE_FUZZ_EXAMPLES", "100"))


def test_fuzzing_the_openapi_spec_finds_no_failure_of_any_check(service, champion_v1, tmp_path):
    """Every schemathesis check: no 5xx, responses that match the published spec, schema-valid
    requests accepted and schema-violating ones refused."""
    report = tmp_path / "fuzz.json"
    # /predict_columns needs every array of one length, which JSON Schema cannot say: columns
    # of two lengths fit the schema and are refused (400), as they must be. Every other check
    # runs there, and every check on the other routes.
    (tmp_path / "schemathesis.toml").write_text(
        '[[operations]]\ninclude-path = "/predict_columns"\nchecks.positive_data_acceptance.enabled = false\n'
    )
    result = subprocess.run(
        [
            venv_bin("st"),
            "run",
            f"{service.base_url}/docs.json",  # every check is on by default (--checks all would override the file)
            "--max-examples",
            str(FUZZ_EXAMPLES),
            "--seed",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--report",
            "ndjson",
            "--report-ndjson-path",
            str(report),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )  # its cache goes to tmp_path
    assert result.returncode == 0, result.stdout[-4000:]
    cases = int(re.search(r"(\d+) generated", result.stdout).group(1))
    print(f"schemathesis: {cases} generated requests, every check passed")
    assert cases >= 2 * FUZZ_EXAMPLES, result.stdout[-2000:]
    assert service.get("/readyz").status_code == 200


def test_packaged_bento_serves_the_champion_without_the_registry(champion_v1, test_rows, setup):
    tmp, path, params = setup
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}

    def package() -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv_bin("loopline"), "package", "--params", str(path)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    built = package()
    assert built.returncode == 0, built.stderr[-3000:]
    tag = re.search(r"^bento (\S+) \(", built.stdout, re.M).group(1)
    assert built.stdout.count(tag) == 3, built.stdout  # named once, then in the two commands that use it
    assert f"registry version {champion_v1[0]}; built" in built.stdout
    assert tag.startswith(f"bikes:v{champion_v1[0]}-")  # the tag names the model and its version
    again = package()
    assert again.returncode == 0 and f"bento {tag} (" in again.stdout and "unchanged, reused" in again.stdout
    port = free_port()
    proc = start_service(["--params", str(path), "--bento", tag], tmp, port)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            info = client.post("/model").json()
            answer = client.post("/predict_batch", json={"records": request_records(test_rows, params)}).json()
    finally:
        stop(proc)
    assert info["source"].startswith("bento bikes:") and info["model_version"] == champion_v1[0]
    # the Bento carries the ONNX form: served by ONNX Runtime without converting, within the parity tolerance
    assert info["engine"] == "onnx", info
    expected = pyfunc_predictions(params, champion_v1[0], test_rows)
    np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-4, atol=1e-4)


def test_batch_scoring_flow_matches_the_service_and_refuses_bad_files(
    prefect_api, champion_v1, test_rows, setup, tmp_path, capsys
):
    _, path, params = setup
    source = tmp_path / "to_score.csv"
    pd.DataFrame(request_records(test_rows, params)).to_csv(source, index=False)
    out = tmp_path / "scored.parquet"
    code, stdout, stderr = run_cli("score", str(source), str(out), "--params", str(path), capsys=capsys)
    assert code == 0, stderr
    assert f"scored {len(test_rows)} rows with bikes v{champion_v1[0]}" in stdout
    assert f"score: {len(test_rows)}/{len(test_rows)} rows (" in stderr  # progress, as plain lines off a terminal
    scored = pd.read_parquet(out)
    # batch scoring uses the service's engine (ONNX), within the parity tolerance
    expected = pyfunc_predictions(params, champion_v1[0], test_rows)
    np.testing.assert_allclose(scored["prediction"], expected, rtol=1e-4, atol=1e-4)
    assert set(scored["model_version"]) == {champion_v1[0]} and list(scored.columns[:2]) == list(test_rows.columns[:2])

    broken = pd.read_csv(source)
    broken.loc[5, "hum"] = 1.5
    broken.to_csv(source, index=False)
    out.unlink()
    code, _, stderr = run_cli("score", str(source), str(out), "--params", str(path), capsys=capsys)
    assert code == 2 and "column 'hum': 1 row(s) above the maximum 1.0, e.g. row 6: 1.5" in stderr
    assert not out.exists()
