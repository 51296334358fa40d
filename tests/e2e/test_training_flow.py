"""The Prefect training flow against a real Prefect server and a real SQLite-backed MLflow:
tracking, caching, the guarded registry, failures, kills, concurrency and deployments."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    REPO,
    bikeshare_sample,
    champion,
    client_of,
    free_port,
    own_prefect_home,
    stop,
    tracking_section,
    venv_bin,
    wait_for_http,
    write_params,
)

pytestmark = pytest.mark.slow

SMALL_SEARCH = {
    "families": ["linear", "hist_gradient_boosting"],
    "n_trials": 2,
    "space": {
        "hist_gradient_boosting": {"max_iter": {"choices": [30, 60]}, "learning_rate": {"low": 0.05, "high": 0.2}}
    },
}


def flow_params(tmp: Path, source: Path, store: Path | None = None, **sections) -> Path:
    sections.setdefault("search", SMALL_SEARCH)
    sections.setdefault("tracking", tracking_section(store or tmp))
    return write_params(tmp, source, **sections)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the flow reads dvc.yaml and stage code from the repository root


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    from flows.training import training_flow

    tmp = tmp_path_factory.mktemp("flow")
    params = flow_params(tmp, bikeshare_sample(tmp))
    return tmp, params, training_flow(params_path=str(params))


def test_first_run_tracks_everything_and_becomes_champion(first_run):
    tmp, _, result = first_run
    trained, decision = result.trained, result.decision
    assert result.cached == [] and not result.training_cached
    assert decision.promoted and decision.version == "1" and "first model" in decision.reason
    assert [c.name for c in trained.candidates] == ["linear", "hist_gradient_boosting", "trial-0", "trial-1"]
    assert trained.test["rmse"] < trained.test["baseline_rmse"]

    client = client_of(tmp)
    parent = client.get_run(trained.parent_run_id)
    tags = parent.data.tags
    assert tags["git_commit"] != "unknown" and len(tags["data.clean_md5"]) == 32
    assert tags["data.rows_train"] == "1400" and tags["prefect.flow_run_id"]
    assert tags["loopline.decision"] == "promoted"
    assert parent.data.params["search.n_trials"] == "2"
    assert parent.data.metrics["test_rmse"] == pytest.approx(trained.test["rmse"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{trained.parent_run_id}'")
    assert len(children) == 4 and all("val_rmse" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(trained.best_run_id, "plots")}
    assert {"plots/predicted_vs_actual.png", "plots/feature_importance.png"} <= artifacts
    assert champion(client) == "1"
    assert str(client.get_model_version_by_alias("bikes", "challenger").version) == "1"


def test_registered_model_loads_through_allowlist_and_matches(first_run, monkeypatch):
    import mlflow
    import pandas as pd

    from pipelines.registry.tracking import load_model_version

    tmp, _, result = first_run
    client = client_of(tmp)
    model, meta = load_model_version(client, "bikes", "1")
    test = pd.read_parquet(tmp / "data" / "processed" / "test.parquet")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")  # for the fluent API only
    pyfunc = mlflow.pyfunc.load_model("models:/bikes@champion")
    from pipelines.registry.tracking import plain_frame

    X = plain_frame(test[meta["features"]])
    assert pyfunc.predict(X) == pytest.approx(model.predict(X))


def test_every_registered_version_has_a_model_card_with_slices(first_run, capsys, tmp_path):
    import pandas as pd

    from conftest import run_cli
    from pipelines.core.config import load_params
    from pipelines.registry.card import slice_metrics
    from pipelines.registry.tracking import load_model_version

    tmp, params_path, result = first_run
    client = client_of(tmp)
    run_id = client.get_model_version("bikes", "1").run_id
    assert {"card/model_card.md", "card/slices.png", "card/slices.json"} <= {
        a.path for a in client.list_artifacts(run_id, "card")
    }
    assert result.decision.card.endswith("/card/model_card.md")
    # the slices are the champion's metric on the test rows of each value, recomputed here
    params = load_params(params_path)
    model, meta = load_model_version(client, "bikes", "1")
    test = pd.read_parquet(tmp / "data" / "processed" / "test.parquet")
    slices = slice_metrics(test, model.predict(test[meta["features"]]), params, meta["baseline"], [])
    weather = slices[slices["feature"] == "weathersit"].set_index("value")
    assert set(weather.index) == set(test["weathersit"].astype(str)) and weather["rows"].sum() == len(test)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["slice.weathersit.clear.rmse"] == pytest.approx(weather.loc["clear", "model"])
    assert metrics["slice.weathersit.clear.rows"] == weather.loc["clear", "rows"]

    code, out, err = run_cli("card", "1", "--params", str(params_path), "--save", str(tmp_path), capsys=capsys)
    assert code == 0, err
    assert out.startswith("# Model card: bikes v1\n") and "the champion when this card was written (" in out
    for section in ("## Lineage", "## Test metrics", "## Metrics by slice", "## Feature importance", "## Known limits"):
        assert section in out
    assert f"| weathersit | clear | {weather.loc['clear', 'rows']} | {weather.loc['clear', 'model']:.4f} |" in out
    assert "promoted: first model" in out and "training window | day " in out
    assert result.trained.git_commit in out and "scikit-learn" in out
    assert (tmp_path / "model_card.md").read_text() == out and (tmp_path / "slices.png").stat().st_size > 1000
    code, _, err = run_cli("card", "9", "--params", str(params_path), capsys=capsys)
    assert code == 2 and "bikes has no version '9'" in err


def test_second_run_on_unchanged_inputs_skips_training(first_run):
    from flows.training import training_flow

    tmp, params, result = first_run
    again = training_flow(params_path=str(params))
    assert again.cached == ["params", "ingest", "clean", "validate", "split"]
    assert again.training_cached and again.decision.outcome == "skipped"
    assert again.trained.parent_run_id == result.trained.parent_run_id
    assert len(client_of(tmp).search_model_versions("name='bikes'")) == 1


def test_an_identical_model_is_nothing_new_even_without_the_cache(first_run):
    """The cache gone (another machine, `rm -rf data/cache`), the same data, params and code
    train the same model again: it is not registered as a new version."""
    import shutil

    from flows.training import training_flow

    tmp, params, result = first_run
    shutil.rmtree(tmp / "data" / "cache")
    again = training_flow(params_path=str(params))
    assert not again.training_cached and again.decision.outcome == "nothing new"
    assert "identical to champion v1" in again.decision.reason
    assert len(client_of(tmp).search_model_versions("name='bikes'")) == 1
    parent = client_of(tmp).get_run(again.trained.parent_run_id)
    assert parent.data.tags["loopline.decision"] == "nothing new"
    # decided before logging: no model, ONNX form, reference or plots for a model thrown away
    assert again.trained.model_uri == "" and "log: skipped, identical to the champion" in again.trained.timings
    assert not [t for t in again.trained.timings if t.startswith("log: ") and "skipped" not in t]
    best = client_of(tmp).list_artifacts(again.trained.best_run_id)
    assert not best, [a.path for a in best]
    assert parent.data.metrics[f"test_{again.trained.metric}"] == pytest.approx(
        result.trained.test[again.trained.metric]
    )


def test_param_change_retrains_only_what_depends_on_it(first_run):
    from flows.training import training_flow

    tmp, params, result = first_run
    changed = flow_params(tmp, tmp / "bikeshare_sample.csv", search={**SMALL_SEARCH, "n_trials": 3})
    assert changed == params
    again = training_flow(params_path=str(changed))
    assert again.cached == ["params", "ingest", "clean", "validate", "split"]
    assert not again.training_cached
    assert again.decision.version == "2"
    assert len(again.trained.candidates) == 5


def test_worse_model_leaves_champion_and_records_decision(first_run):
    from flows.training import training_flow

    tmp, _, _ = first_run
    client = client_of(tmp)
    before = champion(client)
    worse = flow_params(
        tmp,
        tmp / "bikeshare_sample.csv",
        search={"families": ["linear"], "n_trials": 0},
        train={"hyperparams": {"linear": {"alpha": 1e5}}, "sample_rows": 300},  # and on a sample of the rows
    )
    result = training_flow(params_path=str(worse))
    decision = result.decision
    assert not decision.promoted and decision.champion_before == before
    assert champion(client) == before
    new = client.get_model_version("bikes", decision.version)
    assert new.tags["loopline.decision"] == "rejected" and "not surely better" in new.tags["loopline.decision_reason"]
    assert new.tags["loopline.evidence.verdict"] == "not surely better"
    assert "interval" in new.tags["loopline.evidence.interval"] and int(new.tags["loopline.evidence.rows"]) > 0
    assert "moving-block bootstrap" in new.tags["loopline.evidence.method"]  # the split is ordered by day and hour
    defended = client.get_model_version("bikes", before).tags
    assert "defended" in defended["loopline.last_challenge"] and "loopline.last_challenge.interval" in defended
    run_tags = client.get_run(result.trained.parent_run_id).data.tags
    assert run_tags["loopline.evidence.interval"] == new.tags["loopline.evidence.interval"]
    # train.sample_rows: the search fitted on 300 of the training rows, and the run says so
    assert run_tags["data.rows_train"] == "300"
    assert run_tags["data.train_sample"].startswith("300 of ") and "seed 42" in run_tags["data.train_sample"]
    champion_run = client.get_run(client.get_model_version("bikes", before).run_id)
    artifacts = {a.path for a in client.list_artifacts(champion_run.info.run_id, "reference")}
    assert {"reference/importance.json", "reference/estimator.pkl"} <= artifacts, artifacts
    assert str(client.get_model_version_by_alias("bikes", "challenger").version) == decision.version


def test_cli_promote_and_rollback_are_audited(first_run, capsys):
    from conftest import run_cli

    tmp, params, _ = first_run
    client = client_of(tmp)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='bikes'"))
    before = champion(client)
    target = str(max(v for v in versions if str(v) != before))
    code, out, err = run_cli("promote", target, "--params", str(params), capsys=capsys)
    assert code == 0, err
    assert champion(client) == target
    assert f"replacing v{before}" in client.get_model_version("bikes", target).tags["loopline.promoted"]
    code, out, err = run_cli("promote", target, "--params", str(params), capsys=capsys)
    assert code == 0 and f"v{target} is already the champion; nothing changed" in out
    assert f"replacing v{target}" not in client.get_model_version("bikes", target).tags["loopline.promoted"]
    code, out, err = run_cli("rollback", "--params", str(params), capsys=capsys)
    assert code == 0, err
    assert champion(client) == before and f"from v{target} to v{before}" in out
    assert "rollback from" in client.get_model_version("bikes", before).tags["loopline.restored"]
    code, _, err = run_cli("promote", "99", "--params", str(params), capsys=capsys)
    assert code == 2 and "bikes has no version '99'" in err and "Traceback" not in err


def test_loopline_mlflow_ui_serves_runs_over_the_mlflow_rest_api(first_run):
    """`loopline mlflow-ui` listens where `servers.mlflow` says when given no --port."""
    import yaml

    tmp, params, result = first_run
    port = free_port()
    raw = yaml.safe_load(Path(params).read_text())
    raw["servers"] = {"mlflow": {"host": "127.0.0.1", "port": port}}
    with_port = tmp / "ui-params.yaml"
    with_port.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.Popen(
        [venv_bin("loopline"), "mlflow-ui", "--params", str(with_port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", proc=proc)
        run_id = result.trained.parent_run_id
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as resp:
            run = json.load(resp)["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert tags["data.clean_md5"] == result.trained.data_md5
        assert metrics["test_rmse"] == pytest.approx(result.trained.test["rmse"])
        body = json.dumps(
            {"experiment_ids": [run["info"]["experiment_id"]], "filter": f"tags.mlflow.parentRunId = '{run_id}'"}
        ).encode()
        req = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req) as resp:
            assert len(json.load(resp)["runs"]) == 4
    finally:
        stop(proc)


def test_torch_candidate_logs_epoch_curves_and_registers_a_servable_model(prefect_api, tmp_path):
    import pandas as pd

    from flows.training import training_flow
    from pipelines.registry.tracking import load_model_version, plain_frame

    hp = {"torch_mlp": {"epochs": 12, "hidden_sizes": [32], "device": "cpu", "patience": 20}}
    params = flow_params(
        tmp_path,
        bikeshare_sample(tmp_path),
        search={"families": ["torch_mlp"], "n_trials": 0},
        train={"hyperparams": hp},
    )
    result = training_flow(params_path=str(params))
    client = client_of(tmp_path)
    run_id = result.trained.best_run_id
    curve = client.get_metric_history(run_id, "early_stopping_rmse")
    assert [m.step for m in curve] == list(range(12))
    assert len(client.get_metric_history(run_id, "train_loss")) == 12
    assert client.get_run(run_id).data.tags["device"] == "cpu"
    assert {"torch/state_dict.pt", "torch/preprocess.skops"} <= {a.path for a in client.list_artifacts(run_id, "torch")}
    model, meta = load_model_version(client, "bikes", result.decision.version)
    test = pd.read_parquet(tmp_path / "data" / "processed" / "test.parquet")
    assert model.predict(plain_frame(test[meta["features"]])).shape == (len(test),)


def test_validation_failure_fails_flow_links_report_registers_nothing(prefect_api, tmp_path, alert_receiver):
    import asyncio

    import pandas as pd
    from prefect.client.orchestration import get_client

    from flows.training import training_flow
    from pipelines.core.errors import LooplineError

    source = bikeshare_sample(tmp_path)
    df = pd.read_csv(source)
    df.loc[5, "hum"] = 9.0
    df.to_csv(source, index=False)
    params = flow_params(tmp_path, source, alerts=[alert_receiver.url])
    state = training_flow(params_path=str(params), return_state=True)
    assert state.is_failed()
    with pytest.raises(LooplineError, match="column 'hum'"):
        state.result()
    [alert] = alert_receiver.wait_for(1)  # the on_failure hook: what failed, why, where to look
    assert alert["title"].startswith("[loopline] training flow run ") and alert["title"].endswith(" failed")
    assert "column 'hum'" in alert["message"] and "prefect flow-run inspect" in alert["message"]
    assert alert["type"] == "failure"

    async def artifact():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    links = [a for a in asyncio.run(artifact()) if a.key == "validation-report"]
    assert links and "data/validation/report.html" in links[0].data
    assert not (tmp_path / "mlflow.db").exists() or not client_of(tmp_path).search_registered_models()


def _env(prefect_api: str) -> dict:
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_sigkill_during_training_leaves_registry_and_next_run_completes(prefect_api, tmp_path):
    store = tmp_path
    slow = {"families": ["linear"], "n_trials": 40, "space": {"random_forest": {"n_estimators": {"choices": [60, 80]}}}}
    params = flow_params(tmp_path, bikeshare_sample(tmp_path), search=slow)
    client = client_of(store)
    proc = subprocess.Popen(  # the training's own process (not a warm one's child), killed as a crash kills it
        [venv_bin("loopline"), "train", "--params", str(params)],
        cwd=REPO,
        env={**_env(prefect_api), "LOOPLINE_WARM": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180

    def logged_runs() -> int:
        if not (store / "mlflow.db").exists():
            return 0
        experiment = client.get_experiment_by_name("test-bikes")
        return len(client.search_runs([experiment.experiment_id])) if experiment else 0

    while logged_runs() < 4 and time.monotonic() < deadline:  # kill once a few trials are logged
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not client.search_model_versions("name='bikes'")
    experiment = client.get_experiment_by_name("test-bikes").experiment_id
    killed = [r.info.run_id for r in client.search_runs([experiment]) if r.info.status == "RUNNING"]
    assert killed, "the killed training left no open run to clean up"

    fast = flow_params(tmp_path, tmp_path / "bikeshare_sample.csv", search={**slow, "n_trials": 2})
    done = subprocess.run(
        [venv_bin("loopline"), "train", "--params", str(fast)],
        cwd=REPO,
        env=_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "v1: promoted to champion" in done.stdout
    assert champion(client) == "1"
    for run_id in killed:  # the next training closed what the killed one left open, saying why
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run.info
        assert "ended without closing the run" in run.data.tags["loopline.end_reason"]
    assert not [r for r in client.search_runs([experiment]) if r.info.status == "RUNNING"]


def test_two_concurrent_trainings_cannot_both_become_champion(prefect_api, tmp_path):
    store = tmp_path / "shared"
    store.mkdir()
    procs = []
    for i, rows in enumerate((1500, 2000)):
        work = tmp_path / f"w{i}"
        work.mkdir()
        params = flow_params(
            work,
            bikeshare_sample(work, rows=rows),
            store=store,
            search={"families": ["hist_gradient_boosting"], "n_trials": 0},
        )
        procs.append(
            subprocess.Popen(
                [venv_bin("loopline"), "train", "--params", str(params)],
                cwd=REPO,
                env=_env(prefect_api),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    client = client_of(store)
    versions = client.search_model_versions("name='bikes'")
    assert len(versions) == 2
    reasons = [client.get_model_version("bikes", v.version).tags["loopline.decision_reason"] for v in versions]
    assert sum("first model" in r for r in reasons) == 1, reasons
    later = next(r for r in reasons if "first model" not in r)
    assert "champion v" in later  # the second decision compared against the first champion
    assert champion(client) in {"1", "2"}


def test_a_command_killed_on_the_temporary_api_takes_that_api_with_it(tmp_path):
    """A `loopline train` with no Prefect API runs Prefect's temporary API as a child process.
    Killed outright (SIGKILL to the command alone, as the OOM killer does: no atexit, no
    signal handler), it must not leave that API running."""
    import psutil

    params = flow_params(tmp_path, bikeshare_sample(tmp_path, 600), search={"families": ["linear"], "n_trials": 0})
    env = own_prefect_home({**os.environ, "LOOPLINE_WARM": "0"}, tmp_path / "prefect-home")
    proc = subprocess.Popen(
        [venv_bin("loopline"), "train", "--params", str(params)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = None
    try:
        deadline = time.monotonic() + 120
        while api is None:
            assert proc.poll() is None, "the training ended before its temporary API was seen"
            assert time.monotonic() < deadline, "no temporary API started within 120 s"
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(psutil.Error):
                    if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                        api = child
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            api.wait(timeout=20)
        except psutil.TimeoutExpired:
            pytest.fail(f"the temporary API (pid {api.pid}) outlived the command killed with SIGKILL")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the API shares the command's group


# What a command and then its first flow do: loopline's early start, then Prefect's own
# (a no-op once the first has started it); then the API's processes and the flow's answer.
EARLY_THEN_FLOW_START = """
import json, psutil
from flows.api import start_temporary_api_while
from prefect.server.api.server import SubprocessASGIServer
start_temporary_api_while(lambda: None)
server = SubprocessASGIServer()
server.start()
import httpx
health = httpx.get(server.api_url + "/health", timeout=10).status_code
apis = [p for p in psutil.Process().children(recursive=True) if "create_app" in " ".join(p.cmdline())]
print(json.dumps({"health": health, "apis": len(apis)}))
server.stop()
"""


def test_a_temporary_api_slower_than_prefects_timeout_is_waited_for_not_started_twice(tmp_path):
    """With Prefect's start-up timeout at 1 s (a loaded machine takes longer than its 20 s
    default), the early start used to give up while its server process went on starting;
    the flow's own start then ran a second one on the same port ("address already in use",
    a traceback in the command's output) and gave up too. The early start waits as long as a
    `loopline prefect-server` start may take, and its one API serves the flow."""
    env = own_prefect_home({**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}, tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-c", EARLY_THEN_FLOW_START], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"health": 200, "apis": 1}
    assert "address already in use" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
