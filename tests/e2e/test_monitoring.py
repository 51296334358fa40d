"""The monitoring flow in a real DVC + git workspace, against a real Prefect server and a
SQLite-backed MLflow: no drift, injected drift, an invalid batch, cooldown, a worse retrain,
and a reduced replay through a real `loopline serve` process.

The tests of the workspace run in file order: each lands a batch on what the previous left.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIKESHARE, REPO, AlertReceiver, champion, client_of, raw_params, sh

pytestmark = pytest.mark.slow

SOURCE_ROWS = 2000  # January to late March
SEARCH = {"families": ["linear", "hist_gradient_boosting"], "n_trials": 0}


def write_workspace_params(root: Path, **sections) -> None:
    raw = raw_params()
    raw["data"]["source"] = "source.csv"
    raw["paths"] = {"data": "data", "models": "models"}
    raw["tracking"] = {
        "uri": "sqlite:///mlflow.db",
        "artifact_root": "mlruns",
        "experiment": "ws",
        "model_name": "bikes",
    }
    raw["search"] = SEARCH
    raw["monitor"] = {"settle_seconds": 0}  # each batch is written whole before monitoring runs
    raw["train"]["hyperparams"]["hist_gradient_boosting"]["max_iter"] = 100
    for section, values in sections.items():
        raw[section] = values
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


class Workspace:
    def __init__(self, root: Path, receiver: AlertReceiver):
        self.root = root
        self.full = pd.read_csv(BIKESHARE)
        self.alerts = receiver  # every alert the workspace's flows sent

    def alert(self, event_title: str) -> dict:
        """The one alert received whose title holds `event_title`."""
        [alert] = [a for a in self.alerts.wait_for(1) if event_title in a["title"]]
        return alert

    def client(self):
        return client_of(self.root)

    def versions(self) -> list[str]:
        return sorted((str(v.version) for v in self.client().search_model_versions("name='bikes'")), key=int)

    def champion(self) -> str | None:
        return champion(self.client())

    def land(self, frame: pd.DataFrame, name: str) -> Path:
        landing = self.root / "data" / "landing"
        landing.mkdir(parents=True, exist_ok=True)
        frame = frame.assign(request_id=[f"{name}-{i}" for i in range(len(frame))])
        path = landing / f"{name}.csv"
        frame.to_csv(path, index=False)
        return path

    def monitor(self, now: datetime | None = None) -> dict:
        from flows.monitoring import monitoring_flow

        with contextlib.chdir(self.root):
            return monitoring_flow(params_path="params.yaml", now=(now or datetime.now(UTC)).isoformat())

    def reference_like(self, n: int, seed: int) -> pd.DataFrame:
        """Rows from the hours the champion was trained on (the first 70% of the source)."""
        return self.full.iloc[: int(SOURCE_ROWS * 0.7)].sample(n, random_state=seed)

    def drifted(self, n: int, seed: int) -> pd.DataFrame:
        """Winter hours made to look like July: warmer, drier, windier, summer season and month."""
        rows = self.reference_like(n, seed).copy()
        rows["temp"] = (rows["temp"] + 0.45).clip(upper=1.0).round(2)
        rows["atemp"] = (rows["atemp"] + 0.4).clip(upper=1.0).round(4)
        rows["hum"] = (rows["hum"] - 0.3).clip(lower=0.0).round(2)
        rows["windspeed"] = (rows["windspeed"] + 0.3).clip(upper=1.0).round(4)
        rows["season"], rows["mnth"] = 3, "July"
        rows["bikers"] = rows["bikers"] * 3
        return rows


@pytest.fixture(scope="module")
def ws(prefect_api, tmp_path_factory) -> Workspace:
    """A git + DVC workspace with the project's dvc.yaml, a 2,000-hour source and a champion."""
    from flows.training import training_flow

    root = tmp_path_factory.mktemp("monitoring") / "ws"
    root.mkdir()
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__", "datasets"))
    (root / "data" / "arrivals").mkdir(parents=True)
    shutil.copy2(REPO / "data" / "arrivals" / "README.md", root / "data" / "arrivals" / "README.md")
    (root / "source.csv").write_text("".join(BIKESHARE.read_text().splitlines(keepends=True)[: SOURCE_ROWS + 1]))
    receiver = AlertReceiver()
    write_workspace_params(root, alerts=[receiver.url])
    (root / ".gitignore").write_text("/mlflow.db*\n/mlruns/\n/data/landing/\n/data/monitoring/\n")
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    with contextlib.chdir(root):
        first = training_flow(params_path="params.yaml", record_data_version=True)
    assert first.decision.promoted
    assert first.data_version.startswith("recorded in dvc.lock")
    ws = Workspace(root, receiver)
    promoted = ws.alert("bikes v1 is the new champion")
    assert promoted["type"] == "success" and "replacing no champion" in promoted["message"]
    assert first.trained.parent_run_id in promoted["message"] and "loopline card 1" in promoted["message"]
    return ws


def _lock_md5(root: Path, stage: str, out: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def test_batch_like_the_reference_does_not_retrain(ws):
    ws.land(ws.reference_like(400, seed=1), "calm")
    result = ws.monitor()
    assert [b.accepted for b in result.batches] == [True]
    measured = result.measured
    assert measured.status == "measured" and measured.window_rows == 400
    assert measured.drift.share < 0.5, measured.drift
    assert result.verdict.outcome == "no action" and result.training is None
    assert ws.versions() == ["1"]
    run = ws.client().get_run(result.mlflow_run_id)
    assert run.data.tags["loopline.decision"] == "no action"
    assert run.data.metrics["drift_share"] == pytest.approx(measured.drift.share)
    assert {a.path for a in ws.client().list_artifacts(run.info.run_id, "drift/landed")} == {
        f"drift/landed/{Path(measured.report).name}"
    }
    html = Path(measured.report).read_text()
    assert "Drifted" in html and all(f in html for f in ("temp", "weathersit", "mnth"))
    # drift read the profile logged at training (here the whole reference: it has fewer rows)
    rows = int(ws.client().get_run(measured.champion_run).data.tags["data.rows_train"])
    assert measured.reference_rows == rows
    assert (ws.root / "data/monitoring/reference" / f"{measured.champion_run}-profile-10000.parquet").is_file()


def test_a_champion_without_a_profile_of_this_size_gets_one_made_once(ws):
    """After monitor.reference_profile_rows changes, the champion's logged profile no longer
    fits: one is made from its reference rows on the first run and read from the workspace after."""
    from pipelines.core.config import load_params
    from pipelines.monitoring.drift import REFERENCE_ROWS, measure_drift
    from pipelines.monitoring.reference import champion_drift_reference
    from pipelines.registry.tracking import client_for, load_model_version

    with contextlib.chdir(ws.root):
        base = load_params("params.yaml")
        params = base.model_copy(update={"monitor": base.monitor.model_copy(update={"reference_profile_rows": 1100})})
        client, _ = client_for(params)
        version = client.get_model_version("bikes", ws.champion())
        model, _ = load_model_version(client, "bikes", version.version)
        kept = Path("data/monitoring/reference") / f"{version.run_id}-profile-1100.parquet"
        assert not kept.exists()
        profile = champion_drift_reference(client, version.run_id, model, params)
        full = champion_drift_reference(client, version.run_id, model, base)
        assert kept.is_file() and len(profile) == 1100 and len(full) == profile.attrs[REFERENCE_ROWS] > 1100
        assert champion_drift_reference(client, version.run_id, model, params).equals(profile)
        window = ws.drifted(300, seed=5)[params.features.columns]
        window["prediction"] = model.predict(window)
        assert measure_drift(profile, window, params).drifted == measure_drift(full, window, params).drifted


def test_invalid_batch_is_rejected_and_reaches_nothing(ws):
    arrivals = sorted((ws.root / "data" / "arrivals").glob("*.parquet"))
    bad = ws.drifted(300, seed=2)
    bad["temp"] = 7.5  # outside the schema's 0..1: the expectation on temp fails
    ws.land(bad, "broken")
    result = ws.monitor()
    [batch] = result.batches
    assert batch.status == "rejected" and "temp" in batch.reason and "7.5" in batch.reason
    rejected = ws.root / "data" / "landing" / "rejected"
    assert (rejected / "broken.csv").is_file() and "temp" in (rejected / "broken.csv.reason.txt").read_text()
    assert not (ws.root / "data" / "landing" / "broken.csv").exists()
    assert sorted((ws.root / "data" / "arrivals").glob("*.parquet")) == arrivals
    assert result.measured.window == [arrivals[-1].name]  # still the calm batch
    assert result.verdict.outcome == "no action" and ws.versions() == ["1"]
    alert = ws.alert("batch broken.csv rejected")
    assert alert["type"] == "warning" and "7.5" in alert["message"] and "broken.csv.reason.txt" not in alert["title"]
    assert str(rejected / "broken.csv") in alert["message"] and result.mlflow_run_id in alert["message"]


def test_injected_drift_retrains_on_a_new_data_version(ws):
    before_lock = _lock_md5(ws.root, "ingest", "data/interim/ingested.parquet")
    champion_run = ws.client().get_run(ws.client().get_model_version("bikes", "1").run_id)
    ws.land(ws.drifted(400, seed=3), "hot")
    result = ws.monitor()
    verdict = result.verdict
    assert verdict.outcome == "retrain", str(result.measured)
    # the evidence is named: the importance-weighted drift, or NannyML's estimate without labels
    assert "of the weight" in verdict.reason() or "DLE estimates rmse" in verdict.reason(), verdict.reason()
    assert result.measured.estimate.value is not None and result.measured.drift.weighted_share > 0.3
    training = result.training
    assert {"temp", "atemp", "windspeed", "season", "mnth"} <= set(result.measured.drift.drifted)
    assert training.version == "2" and ws.versions() == ["1", "2"]
    assert list(result.timings)[-1] == "retrain" and result.timings["retrain"] > sum(training.timings.values()) > 0
    assert "search: fit and score candidates" in training.timings
    assert training.data_version.startswith("recorded in dvc.lock")
    assert _lock_md5(ws.root, "ingest", "data/interim/ingested.parquet") != before_lock
    new_run = ws.client().get_run(ws.client().get_model_version("bikes", "2").run_id)
    assert new_run.data.tags["data.ingested_md5"] != champion_run.data.tags["data.ingested_md5"]
    assert new_run.data.tags["data.last_arrival"] == result.measured.window[0]
    assert new_run.data.tags["data.arrival_batches"] == "2"
    tags = ws.client().get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.decision"] == "retrain" and tags["loopline.training_version"] == "2"
    # the window's rows carry labels, but the challenger trained on them (they are winter
    # hours, early in the ordered split): no recent-row evidence, and the tags say why
    version = ws.client().get_model_version("bikes", "2").tags
    assert version["loopline.evidence.recent_rows"] == "0" and version["loopline.evidence.rule"] == "veto"
    assert "less 400 the challenger trained or validated on" in version["loopline.evidence.recent"], version
    retrain = ws.alert("monitoring started a retrain")
    assert verdict.reason()[:80] in retrain["message"] and result.mlflow_run_id in retrain["message"]
    assert f"the retrain: v2 {training.outcome}" in retrain["message"] and result.measured.report in retrain["message"]
    titles = {
        "promoted to champion": "bikes v2 is the new champion",
        "in shadow": "bikes v2 serves in shadow beside champion v1",  # promotion.shadow: uncertain
    }
    decided = ws.alert(titles.get(training.outcome, "bikes v2 rejected; champion v1 kept"))
    assert training.reason[:60] in decided["message"]


def test_cooldown_holds_back_the_next_retrain(ws):
    versions = ws.versions()
    ws.land(ws.drifted(400, seed=4), "hot-again")
    result = ws.monitor(now=datetime.now(UTC) + timedelta(hours=1))
    verdict = result.verdict
    assert verdict.outcome == "held back" and verdict.triggers
    assert any("cooling down" in h for h in verdict.held_back)
    assert result.training is None and ws.versions() == versions


def test_worse_retrain_leaves_the_champion(ws):
    champion = ws.champion()
    write_workspace_params(ws.root, search={"families": ["linear"], "n_trials": 0}, alerts=[ws.alerts.url])
    ws.land(ws.drifted(400, seed=5), "hot-third")
    result = ws.monitor(now=datetime.now(UTC) + timedelta(days=2))  # past the cooldown
    training = result.training
    assert result.verdict.outcome == "retrain"
    assert training.outcome == "kept the champion" and not training.promoted
    assert "not surely better" in training.reason and "interval" in training.reason, training.reason
    assert ws.champion() == champion and training.version not in (champion, None)
    tags = ws.client().get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.training_outcome"] == "kept the champion"
    rejected = ws.alert(f"v{training.version} rejected; champion v{champion} kept")
    assert "not surely better" in rejected["message"]


def test_window_too_small_is_recorded_not_measured(ws):
    versions = ws.versions()
    ws.land(ws.drifted(20, seed=7), "tiny")  # accepted, but below monitor.min_window_rows
    result = ws.monitor(now=datetime.now(UTC) + timedelta(days=4))
    assert result.batches[0].accepted and result.measured.status == "not enough rows"
    assert result.verdict.outcome == "no action" and "20 rows" in result.verdict.reason()
    assert result.training is None and ws.versions() == versions
    tags = ws.client().get_run(result.mlflow_run_id).data.tags
    assert tags["loopline.status"] == "not enough rows" and "min_window_rows" in tags["loopline.reason"]


def test_monitor_command_reports_batches_drift_and_decision(ws, capsys):
    from conftest import run_cli

    ws.land(ws.reference_like(300, seed=6), "calm-again")
    with contextlib.chdir(ws.root):
        code, out, err = run_cli("monitor", "--params", "params.yaml", "--no-retrain", capsys=capsys)
    assert code == 0, err
    assert "batch calm-again.csv: accepted (300 rows; features and target" in out
    assert "drift share" in out and "Evidently reports: landed " in out and "decision: " in out
    assert "training:" not in out
    # where the run's time went, step by step
    seconds = re.search(
        r"^seconds: accept [0-9.]+, labels [0-9.]+, measure ([0-9.]+), decide .*, record [0-9.]+$", out, re.M
    )
    assert seconds is not None and float(seconds.group(1)) > 0, out[-800:]


def test_reduced_replay_with_late_labels_alarms_first_and_retrains_when_they_land(prefect_api, tmp_path, monkeypatch):
    """Jan-Feb champion, then March to May through a real service, each label landing 30 days
    after its hour: March's served traffic raises the alarm before its labels exist (pending),
    April's run has them and retrains, and May is served by the new champion."""
    from flows.replay import run_replay
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.monitoring.prediction_log import read_prediction_log

    monkeypatch.chdir(REPO)  # `loopline serve` imports serving.service from here
    workdir = tmp_path / "replay"
    chart = tmp_path / "chart.png"
    raw = raw_params()
    raw["monitor"] = {"workspace": str(tmp_path / "workspace")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    printed: list[str] = []
    timeline = run_replay(
        workdir,
        tmp_path / "params.yaml",
        "month",
        train_months=2,
        periods=3,
        chart=chart,
        echo=printed.append,
        label_delay="30d",
    )
    assert list(timeline["period"]) == ["2011-03", "2011-04", "2011-05"]
    march, april, may = (timeline.iloc[i] for i in range(3))
    assert march["served_version"] == "1" and march["labels_landed"] < 100  # only March 1 is 30 days old
    assert march["decision"] == "retrain pending" and march["alarm"] and "served: " in march["reason"]
    assert april["decision"] == "retrain" and april["promoted"]  # March's labels landed
    assert april["reason"].startswith("pending since 2011-03-31T23:59")
    assert may["served_version"] == april["retrained_version"]  # the service switched without a restart
    # April's retrain, from its labels landing to the service answering with it, step by step
    [line] = [p for p in printed if "land to serve" in p]
    total = float(re.search(r"land to serve v\d+: ([0-9.]+) s = ", line).group(1))
    steps = dict((k, float(v)) for k, v in re.findall(r"(?:= |, |\()([a-z ]+?) ([0-9.]+)", line))
    assert line.startswith(f"    land to serve v{april['retrained_version']}: ")
    assert {"accept", "labels", "measure", "decide", "record", "retrain", "search", "reload"} <= set(steps), line
    assert abs(april["land_to_serve_s"] - total) < 0.06 and 0 < steps["search"] < steps["retrain"] < total, line
    assert timeline["land_to_serve_s"].isna().tolist() == [True, False, True]
    print(line)
    assert march["baseline"] > march["live"] > 0  # in hindsight, every label known
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (workdir / "timeline.csv").is_file()
    params = load_params(workdir / "params.yaml")
    log = read_prediction_log(Layout.of(params).prediction_log, ["day"])
    assert set(log["model_version"].astype(str)) == {"1", april["retrained_version"]}
    assert len(log) == int(timeline["rows"].sum()) and log["day"].notna().all()
    assert log["ts"].str.startswith("2011-").all()  # each answer filed under the hour it replays

    # the monitoring history, in Evidently's workspace at each decision's (2011) time
    from evidently.ui.workspace import Workspace

    workspace = Workspace(str(tmp_path / "workspace"))
    [project] = workspace.search_project("replay-bikeshare")
    snapshots = [workspace.get_run(project.id, s) for s in workspace.list_runs(project.id)]
    by_kind = {
        kind: sorted((s for s in snapshots if kind in s.tags), key=lambda s: s.timestamp) for kind in ("drift", "loop")
    }
    assert [f"{s.timestamp:%Y-%m}" for s in by_kind["drift"]] == ["2011-03", "2011-04", "2011-05"]
    assert [f"{s.timestamp:%Y-%m}" for s in by_kind["loop"]] == ["2011-03", "2011-04", "2011-05"]
    assert "decision: retrain pending" in by_kind["loop"][0].tags and "decision: retrain" in by_kind["loop"][1].tags
    panels = {p.title for p in workspace.get_dashboard(project.id).panels}
    assert {"Drift share", "Prediction drift", "Live rmse against the champion's test rmse", "Decisions"} <= panels
    assert "Served rows" in panels
