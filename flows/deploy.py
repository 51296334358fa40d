"""Scheduled deployments served by one long-running process (`loopline deploy`).

`prefect.serve` registers each deployment with the Prefect API (a local temporary one, or
the server in PREFECT_API_URL) and runs their scheduled and triggered flow runs. Paths in
the params file are relative to the directory the process runs in: start it from the
repository root.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.schedules import Cron

from flows.monitoring import monitoring_flow
from flows.training import training_flow
from pipelines.config import load_params

TRAINING_DEPLOYMENT = "scheduled-training"
MONITORING_DEPLOYMENT = "scheduled-monitoring"


def build_deployments(params_path: str | Path = "params.yaml") -> list:
    params = load_params(params_path)
    path = str(Path(params_path).resolve())
    schedule = params.schedule
    training = training_flow.to_deployment(
        name=TRAINING_DEPLOYMENT, parameters={"params_path": path},
        schedule=Cron(schedule.training, timezone=schedule.timezone) if schedule.training else None,
        description="Data stages, candidate search and guarded promotion on the configured data.",
        tags=["loopline", "training"])
    monitoring = monitoring_flow.to_deployment(
        name=MONITORING_DEPLOYMENT, parameters={"params_path": path, "trigger": "deployment"},
        schedule=Cron(schedule.monitoring, timezone=schedule.timezone) if schedule.monitoring else None,
        description="Accept landed batches, measure drift and live metrics, retrain through the "
                    "training deployment when the monitor: policy says so.",
        tags=["loopline", "monitoring"])
    return [training, monitoring]


def serve_deployments(params_path: str | Path = "params.yaml") -> None:
    serve(*build_deployments(params_path))
