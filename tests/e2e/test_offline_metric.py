"""Labelled batches without request ids, through the real monitoring flow (SQLite MLflow, a
real Prefect API): the champion scores the rows nobody was served, and that offline metric
takes part in the trigger. The ×1.8 case is the one a new user met: features as in
training, demand 1.8 times higher, no ids, where drift alone saw nothing."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIKESHARE, REPO, client_of, raw_params

pytestmark = pytest.mark.slow

SOURCE_ROWS = 2000


@pytest.fixture(scope="module")
def root(prefect_api, tmp_path_factory) -> Path:
    from flows.training import training_flow

    root = tmp_path_factory.mktemp("offline")
    (root / "source.csv").write_text("".join(BIKESHARE.read_text().splitlines(keepends=True)[: SOURCE_ROWS + 1]))
    raw = raw_params()
    raw["data"]["source"] = str(root / "source.csv")
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models")}
    raw["tracking"] = {
        "uri": f"sqlite:///{root}/mlflow.db",
        "artifact_root": str(root / "mlruns"),
        "experiment": "offline",
        "model_name": "bikes",
    }
    raw["search"] = {"families": ["linear", "hist_gradient_boosting"], "n_trials": 0}
    raw["monitor"] = {"settle_seconds": 0, "time_key": ["day", "hr"], "dvc_commit": False}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with contextlib.chdir(REPO):  # the flow reads dvc.yaml and stage code from the repository root
        assert training_flow(params_path=str(root / "params.yaml")).decision.promoted
    return root


def land_and_monitor(root: Path, frame: pd.DataFrame, name: str):
    from flows.monitoring import monitoring_flow

    landing = root / "data" / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    frame.to_csv(landing / f"{name}.csv", index=False)  # labels, no request_id column
    with contextlib.chdir(REPO):  # a retrain runs the training flow in this process
        return monitoring_flow(params_path=str(root / "params.yaml"), now=datetime.now(UTC).isoformat())


def training_hours(n: int) -> pd.DataFrame:
    """Hours from inside the training period (the first 70% of the source)."""
    return pd.read_csv(BIKESHARE).iloc[: int(SOURCE_ROWS * 0.7)].sample(n, random_state=7)


def test_a_labelled_batch_without_ids_and_the_same_relation_is_measured_offline_and_kept(root):
    result = land_and_monitor(root, training_hours(500), "same")
    measured = result.measured
    assert measured.live is None and measured.offline.rows == 500
    assert measured.offline.value < measured.champion_metric  # rows the champion trained on
    assert result.verdict.outcome == "no action", result.verdict.reason()
    tags = client_of(root).get_run(result.mlflow_run_id).data
    assert tags.metrics["offline_rows"] == 500 and "offline_rmse" in tags.metrics
    assert "offline rmse" in tags.tags["loopline.labels"] and "on 500 labelled rows" in tags.tags["loopline.labels"]


def test_the_same_batch_with_demand_times_1_8_retrains_naming_the_offline_metric(root):
    scaled = training_hours(500)
    scaled["bikers"] = (scaled["bikers"] * 1.8).round().astype(int)
    result = land_and_monitor(root, scaled, "scaled")
    verdict = result.verdict
    print(f"decision: {verdict.outcome} — {verdict.reason()}")  # the closing note quotes it
    assert verdict.outcome == "retrain"
    assert (
        verdict.reason().startswith("offline rmse ") and "on 500 labelled rows no served prediction" in verdict.reason()
    )
    assert result.measured.drift.weighted_share < 0.5  # the features did not move: drift alone saw nothing
    assert result.training is not None and result.training.version == "2"
    assert client_of(root).get_run(result.mlflow_run_id).data.tags["loopline.decision"] == "retrain"


def test_a_batch_whose_labels_are_all_missing_is_measured_and_kept_from_training(root):
    """A batch whose target column is there but empty is features without labels: accepted
    for monitoring (stored in observed/, the landed window), never a training row; nothing
    labelled in it, so no live or offline metric."""
    arrivals = sorted((root / "data" / "arrivals").glob("*.parquet"))
    rows = training_hours(200)
    rows["bikers"] = None
    result = land_and_monitor(root, rows, "unlabelled")
    [batch] = result.batches
    assert batch.status == "accepted" and batch.kind == "features", batch.describe()
    assert sorted((root / "data" / "arrivals").glob("*.parquet")) == arrivals
    assert [f.name for f in (root / "data" / "observed").glob("*.parquet")] == [batch.stored]
    landed = result.measured.source("landed")
    assert landed.status == "measured" and landed.rows == 200 and landed.files == [batch.stored]
    assert result.measured.offline is None and result.measured.live is None
    assert result.verdict.outcome != "retrain"
