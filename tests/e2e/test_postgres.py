"""loopline beyond one machine, on a real PostgreSQL server (skipped where none answers):
service replicas sharing one prediction log that monitoring joins."""

from __future__ import annotations

import functools
import os
from datetime import UTC, datetime

import httpx
import psutil
import pytest

from conftest import (
    bikeshare_sample,
    free_port,
    loopline_process,
    register_family,
    start_service,
    stop,
    tracking_section,
    wait_for_http,
    wait_until,
    write_params,
)

pytestmark = pytest.mark.slow


def _group_of(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:  # gone meanwhile
        return None


def test_two_service_replicas_log_to_one_postgresql_table_and_monitoring_joins_every_id(postgres_db, tmp_path):
    """Two real `loopline serve` processes, one /predict_batch call to the first and single
    /predict calls to the second (each with the context field `day`), both stopped (a clean
    shutdown writes what is queued); monitoring's served window holds both replicas' answers,
    and a label file of only the request ids and the target then joins every one of them. A
    shadow is scored by both replicas into the same table, and its pairs hold every id."""
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.core.stages import run_all
    from pipelines.data.arrivals import accept_landed
    from pipelines.data.split import read_split
    from pipelines.monitoring.labels import join_label_files
    from pipelines.monitoring.prediction_log import read_answers, read_prediction_log
    from pipelines.monitoring.run import measure
    from pipelines.monitoring.shadow import settle_shadow
    from pipelines.registry.champion import make_shadow, promote
    from pipelines.registry.tracking import client_for, load_model_version, model_features, plain_frame
    from pipelines.training.run import log_reference

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
    shadow = register_family(params, "hist_gradient_boosting")  # the same features: it may shadow the champion
    features = functools.partial(model_features, client, "bikes")
    assert make_shadow(client, "bikes", shadow, params.tracking.uri, "test", features) == f"v{shadow} serves in shadow"

    labelled = read_split(params, "test").head(60)
    records = plain_frame(labelled[[*params.features.columns, "day"]]).to_dict(orient="records")
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
            ids = [f"batch-{i}" for i in range(30)] + [f"one-{i}" for i in range(30)]
            wait_until(lambda: len(read_answers(postgres_db, [], request_ids=ids, role="shadow")) == 60)
            scored = [c.get("/model").json()["shadow"] for c in (first, second)]
            assert [s["version"] for s in scored] == [shadow, shadow]
            assert [s["rows_scored"] for s in scored] == [30, 30]  # each replica scores what it answered
    finally:
        for proc in replicas:
            stop(proc)
    logged = read_prediction_log(postgres_db, ["hr", "day"])
    assert set(logged.loc[logged["role"] == "shadow", "model_version"]) == {shadow}
    served = logged[logged["role"] == "champion"]
    assert sorted(served["request_id"]) == sorted(ids)
    assert set(served["model_version"]) == {version}
    # each replica writes in the order it served; the two replicas' writers are independent,
    # so the table interleaves them in whatever order their transactions committed
    for prefix, part in (("batch-", records[:30]), ("one-", records[30:])):
        mine = served[served["request_id"].str.startswith(prefix)]
        assert mine["request_id"].tolist() == [f"{prefix}{i}" for i in range(30)]
        assert mine["hr"].tolist() == [int(r["hr"]) for r in part]
        assert mine["day"].tolist() == [int(r["day"]) for r in part]  # the context field, logged

    landing = Layout.of(params).landing
    landing.mkdir(parents=True, exist_ok=True)
    labelled[["bikers"]].assign(request_id=ids).to_csv(landing / "labels.csv", index=False)
    [batch] = accept_landed(params)
    assert batch.accepted and batch.kind == "labels"
    feed = join_label_files(params, postgres_db)
    assert [f.joined for f in feed.files] == [60] and feed.files[0].stored is not None
    measured = measure(params, feed=feed)
    assert measured.status == "measured", measured.detail
    window = measured.source("served")
    assert window.status == "measured" and window.rows == 60 and "60 rows served by v" in window.what
    assert measured.live is not None and measured.live.rows == 60 and measured.live.served_versions == {version: 60}
    judged = settle_shadow(params, postgres_db, measured.answered, datetime.now(UTC))
    assert judged is not None and judged.pairs == 60 and judged.new_pairs == 60  # both replicas' rows, paired
    assert judged.outcome == "kept" and "waiting for promotion.shadow_min_rows 200" in judged.reason


def test_advisory_lock_makes_a_second_process_wait(postgres_db):
    """The registry lock on PostgreSQL: a process holding it keeps another out until it ends."""
    import subprocess
    import sys
    import time

    from conftest import REPO
    from pipelines.registry.champion import registry_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pipelines.registry.champion import registry_lock\n"
            "with registry_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(3)\n",
            postgres_db,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with registry_lock(postgres_db):
            waited = time.monotonic() - started
            assert holder.poll() is not None or waited >= 2.0
        assert waited >= 1.5, f"took the lock after {waited:.2f} s while another process held it"
    finally:
        holder.wait(timeout=30)


def test_the_loop_through_an_mlflow_server_on_postgresql(postgres_db, prefect_api, tmp_path, capsys):
    """`loopline tracking-server` on a fresh PostgreSQL database, and everything through it
    over http://: two trainings started together from separate processes (separate data
    folders, different seeds) give exactly one champion, the later decision made against the
    earlier one under the advisory lock (locks.dsn); `loopline serve` follows a promotion
    (hot reload); `loopline monitor` measures a landed batch; `loopline package` builds the
    champion's Bento."""
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    from conftest import REPO, run_cli, start_tracking_server, venv_bin, wait_for_version
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.core.names import CHAMPION
    from pipelines.data.split import read_split
    from pipelines.registry.champion import alias_version

    server, url = start_tracking_server(tmp_path, postgres_db)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "BENTOML_HOME": str(tmp_path / "bentoml")}
    try:
        # the server and its web workers only: no MLflow job runner or Huey consumers (jobs
        # loopline never submits, eight processes more)
        group = [" ".join(p.cmdline()) for p in psutil.process_iter() if _group_of(p) == server.pid]
        assert group and not [c for c in group if "mlflow.server.jobs" in c or "huey" in c], group
        sample = bikeshare_sample(tmp_path)
        paths = []
        for i in range(2):
            folder = tmp_path / f"team-{i}"
            folder.mkdir()
            paths.append(
                write_params(
                    folder,
                    sample,
                    tracking={"uri": url, "experiment": "bikes", "model_name": "bikes"},
                    locks={"dsn": postgres_db},
                    train={"seed": i},
                    search={"families": ["linear", "hist_gradient_boosting"], "n_trials": 0},
                    serve={"reload_interval_s": 1},
                    monitor={"settle_seconds": 0, "estimate_performance": False, "min_new_rows": 0},
                )
            )
        trainings = [
            subprocess.Popen(
                [venv_bin("loopline"), "train", "--params", str(p)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for p in paths
        ]
        for proc in trainings:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]

        client = MlflowClient(tracking_uri=url, registry_uri=url)
        versions = {v.version: v.tags for v in client.search_model_versions("name='bikes'")}
        assert sorted(versions) == ["1", "2"]
        reasons = [tags["loopline.decision_reason"] for tags in versions.values()]
        firsts = [v for v, tags in versions.items() if tags["loopline.decision_reason"].startswith("first model")]
        assert len(firsts) == 1, reasons  # decided one after the other, not both against "no champion"
        later = next(v for v in versions if v != firsts[0])
        assert f"v{later} against champion v{firsts[0]}" in versions[later]["loopline.decision_reason"]
        champion_version = alias_version(client, "bikes", CHAMPION)
        other = next(v for v in versions if v != champion_version)

        params = load_params(paths[0])
        port = free_port()
        service = start_service(["--params", str(paths[0])], tmp_path, port)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=service)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                wait_for_version(http, champion_version)
                code, _, err = run_cli("promote", other, "--params", str(paths[0]), capsys=capsys)
                assert code == 0, err
                wait_for_version(http, other)  # the service follows the registry over http
        finally:
            stop(service)

        landing = Layout.of(params).landing
        landing.mkdir(parents=True, exist_ok=True)
        read_split(params, "test").head(120).to_csv(landing / "batch-1.csv", index=False)
        monitored = loopline_process("monitor", "--params", str(paths[0]), "--no-retrain", "--json", env=env)
        assert monitored.returncode == 0, monitored.stderr[-3000:]
        assert '"status": "measured"' in monitored.stdout
        experiments = {e.name for e in client.search_experiments()}
        assert any(name.startswith("bikes") and name != "bikes" for name in experiments)  # the monitoring runs

        packaged = loopline_process("package", "--params", str(paths[0]), env=env, cwd=tmp_path)
        assert packaged.returncode == 0, packaged.stderr[-3000:]
        assert f"registry version {other}" in packaged.stdout
    finally:
        stop(server)


def test_prefect_server_on_postgresql_runs_the_deployments_on_a_work_pool_worker(postgres_db, tmp_path):
    """`loopline prefect-server --database` keeps its state in PostgreSQL; `loopline deploy
    --work-pool` registers the deployments on a process pool and exits; a real `prefect
    worker` runs a triggered training. (The retrain a monitoring run starts through
    run_deployment is test_schedules', on `loopline deploy`'s runner: the same deployment
    call, whatever runs it.)"""
    import os

    import psycopg
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conftest import client_of, venv_bin
    from pipelines.core.processes import start_server

    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path, 1000),
        search={"families": ["linear"], "n_trials": 0},
        tracking=tracking_section(tmp_path),
        schedule={"training": None, "monitoring": None},
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    log = open(tmp_path / "prefect.log", "w")  # noqa: SIM115  (written until the processes stop)
    server = start_server(  # --no-warm: no loopline command here would use a warm process
        [venv_bin("loopline"), "prefect-server", "--port", str(port), "--database", postgres_db, "--no-warm"],
        log=log,
        env=home,
    )
    worker = None
    try:
        wait_for_http(f"{url}/health", timeout=180, proc=server)
        with psycopg.connect(postgres_db) as db:  # the server's state is in PostgreSQL
            assert db.execute("SELECT to_regclass('public.flow_run') IS NOT NULL").fetchone() == (True,)
        env = {**os.environ, **home, "PREFECT_API_URL": url}
        deployed = loopline_process("deploy", "--params", str(path), "--work-pool", "loopline-pool", env=env)
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        assert "prefect worker start --pool loopline-pool" in deployed.stdout
        worker = start_server(
            [venv_bin("prefect"), "worker", "start", "--pool", "loopline-pool"],
            log=log,
            env={**home, "PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        )
        with temporary_settings(updates={PREFECT_API_URL: url}):
            run = run_deployment("training/scheduled-training", timeout=300)
            assert run.state.is_completed(), run.state
            assert len(client_of(tmp_path).search_model_versions("name='bikes'")) == 1
    finally:
        for proc in (worker, server):
            if proc is not None:
                stop(proc)
        log.close()
