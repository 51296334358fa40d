"""A monitoring workspace in a real git + DVC repo with a champion trained by the real
training flow, and the `Stream` that serves it through a real `loopline serve`, lands files
and runs the monitoring flow: shared by the served-stream and shadow tests."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import yaml

from conftest import BIKESHARE, REPO, AlertReceiver, client_of, raw_params, sh
from pipelines.monitoring.prediction_log import wait_for_answers

SOURCE_ROWS = 2000  # January to late March


class Stream:
    def __init__(self, root: Path, url: str, receiver: AlertReceiver):
        self.root, self.url, self.alerts = root, url, receiver
        self.full = pd.read_csv(BIKESHARE)
        self.http = httpx.Client(base_url=url, timeout=60)

    @property
    def params(self):
        from pipelines.core.config import load_params

        with contextlib.chdir(self.root):
            return load_params("params.yaml")

    def serve(self, rows: pd.DataFrame, request_id: str) -> list[str]:
        """Rows sent to /predict_batch with the features and the context field `day`."""
        from serving.schema import request_records

        records = request_records(rows, self.params)
        assert all("day" in r for r in records)
        answer = self.http.post("/predict_batch", json={"records": records}, headers={"X-Request-ID": request_id})
        assert answer.status_code == 200, answer.text
        ids = answer.json()["request_ids"]
        wait_for_answers(self.root / "data/serving/predictions.db", ids)  # logged after the answer
        return ids

    def land(self, frame: pd.DataFrame, name: str) -> None:
        landing = self.root / "data" / "landing"
        landing.mkdir(parents=True, exist_ok=True)
        frame.to_csv(landing / f"{name}.csv", index=False)

    def monitor(self, trigger: str = "subflow"):
        from flows.monitoring import monitoring_flow

        with contextlib.chdir(self.root):
            return monitoring_flow(params_path="params.yaml", trigger=trigger, now=datetime.now(UTC).isoformat())  # type: ignore[arg-type]

    def versions(self) -> list[str]:
        return sorted((str(v.version) for v in client_of(self.root).search_model_versions("name='bikes'")), key=int)

    def calm(self, n: int, seed: int) -> pd.DataFrame:
        """Hours the champion was trained on, as they were."""
        return self.full.iloc[: int(SOURCE_ROWS * 0.7)].sample(n, random_state=seed)

    def hot(self, n: int, seed: int) -> pd.DataFrame:
        """The same kind of winter hours, but warmer, drier and windier than anything in training."""
        rows = self.calm(n, seed).copy()
        rows["temp"] = (rows["temp"] + 0.45).clip(upper=1.0).round(2)
        rows["atemp"] = (rows["atemp"] + 0.4).clip(upper=1.0).round(4)
        rows["hum"] = (rows["hum"] - 0.35).clip(lower=0.0).round(2)
        rows["windspeed"] = (rows["windspeed"] + 0.3).clip(upper=1.0).round(4)
        return rows


def build_workspace(root: Path, alerts_url: str, edit: Callable[[dict], None] = lambda raw: None) -> Path:
    """A workspace at `root` with a 2,000-hour source and a champion (linear and gradient
    boosting searched; `edit` changes the params first)."""
    from flows.training import training_flow

    root.mkdir(parents=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__", "datasets"))
    (root / "data" / "arrivals").mkdir(parents=True)
    shutil.copy2(REPO / "data" / "arrivals" / "README.md", root / "data" / "arrivals" / "README.md")
    (root / "source.csv").write_text("".join(BIKESHARE.read_text().splitlines(keepends=True)[: SOURCE_ROWS + 1]))
    raw = raw_params()
    raw["data"]["source"] = "source.csv"
    raw["paths"] = {"data": "data", "models": "models"}
    raw["tracking"] = {
        "uri": "sqlite:///mlflow.db",
        "artifact_root": "mlruns",
        "experiment": "ws",
        "model_name": "bikes",
    }
    raw["search"] = {"families": ["linear", "hist_gradient_boosting"], "n_trials": 0}
    raw["train"]["hyperparams"]["hist_gradient_boosting"]["max_iter"] = 100
    raw["serve"] = {"context_columns": ["day"], "reload_interval_s": 1.0}
    raw["monitor"] = {"settle_seconds": 0, "window": "400", "time_key": ["day", "hr"]}  # the last 400 answers
    raw["alerts"] = [alerts_url]
    edit(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / ".gitignore").write_text("/mlflow.db*\n/mlruns/\n/data/landing/\n/data/monitoring/\n/data/serving/\n")
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    with contextlib.chdir(root):
        assert training_flow(params_path="params.yaml", record_data_version=True).decision.promoted
    return root
