"""The monitoring history in Evidently's own UI: every monitoring run adds its snapshots to a
local Evidently workspace (monitor.workspace), one project per model name, whose dashboard
`loopline dashboard` serves with `evidently ui`.

A run adds two snapshots at its decision time (a replay's simulated time, so a replay of
2011 shows 2011):
- the drift report it measured (Evidently's DataDriftPreset and the prediction ValueDrift);
- the loop's own figures (importance-weighted drift share, live and estimated metric, the
  champion's test metric, the decision) as Evidently MeanValue metrics of a one-row table.
  They are Evidently metrics, so the panels are plain Evidently panels over them, and the
  UI needs no loopline code to render them. A line joins points of one kind of snapshot
  only, so each line panel reads one kind.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.config import Params
from pipelines.core.layout import Layout

if TYPE_CHECKING:
    from pipelines.monitoring.run import MonitoringResult

DRIFT_TAG, LOOP_TAG = "drift", "loop"


def _panels(params: Params) -> list[Any]:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel, line_plot_panel, text_panel

    metric, higher = params.metric
    better = "higher" if higher else "lower"

    def loop(column: str, legend: str) -> PanelMetric:
        return PanelMetric(legend=legend, metric="MeanValue", metric_labels={"column": column}, tags=[LOOP_TAG])

    share = PanelMetric(
        legend="share of drifted features",
        metric="DriftedColumnsCount",
        metric_labels={"value_type": "share"},
        tags=[DRIFT_TAG],
    )
    return [
        text_panel(
            f"{params.tracking.model_name}: the monitoring loop",
            "One point per monitoring run, at its decision time. Reports: the Reports tab; runs: MLflow's "
            f"{params.tracking.experiment}-monitoring experiment.",
        ),
        counter_panel("Drifted features, last run", [share], size="half", aggregation="last"),
        counter_panel("Retrains started", [loop("retrain", "retrains")], size="half", aggregation="sum"),
        line_plot_panel(
            "Drift share",
            [
                loop("drift_share", "share of drifted features"),
                loop("weighted_drift_share", "importance-weighted (what the trigger reads)"),
                loop("drift_share_threshold", "monitor.drift_share"),
            ],
            description="Share of features Evidently finds drifted, and weighted by the champion's importance",
        ),
        line_plot_panel(
            "Prediction drift",
            [
                PanelMetric(
                    legend="prediction", metric="ValueDrift", metric_labels={"column": "prediction"}, tags=[DRIFT_TAG]
                )
            ],
            description="Drift score of the champion's predictions on the window against its reference",
            size="half",
        ),
        line_plot_panel(
            f"Live {metric} against the champion's test {metric}",
            [
                loop("live_metric", f"live {metric} (served, labelled)"),
                loop("offline_metric", f"offline {metric} (labelled, never served)"),
                loop("estimated_metric", f"estimated {metric} (no labels)"),
                loop("champion_test_metric", f"champion's test {metric}"),
                loop("live_baseline_metric", f"naive baseline {metric}"),
            ],
            description=f"{better} is better",
            size="half",
        ),
        line_plot_panel(
            f"Shadow against the champion: live {metric}",
            [
                loop("shadow_live_metric", f"shadow's live {metric}"),
                loop("shadow_champion_metric", f"champion's live {metric} on the same rows"),
            ],
            description=f"On every labelled request both answered since the shadow started; {better} is better",
            size="half",
        ),
        bar_plot_panel(
            "Labelled rows measured",
            [loop("live_rows", "live (a served prediction joined)"), loop("offline_rows", "offline (scored now)")],
            description="Each labelled row once: live when a served prediction answers it, else offline",
            stacked=True,
            size="half",
        ),
        bar_plot_panel(
            "Served rows",
            [
                loop("served_rows", "served by the champion in monitor.window"),
                loop("labels_joined", "labelled (label files joined to served answers)"),
                loop("labels_pending", "labels pending (served, not yet labelled)"),
            ],
            description="The served window: what the champion answered, and how much of it has its labels yet",
            size="half",
        ),
        bar_plot_panel(
            "Decisions",
            [
                loop("retrain", "retrain"),
                loop("retrain_pending", "retrain pending (waiting for labels)"),
                loop("held_back", "held back"),
                loop("no_action", "no action"),
            ],
            description="What each monitoring run decided",
            stacked=True,
            size="half",
        ),
    ]


def project_for(workspace, params: Params):
    """The model's project in the workspace, made with its dashboard on first use."""
    name = params.tracking.model_name
    found = workspace.search_project(name)
    if found:
        return found[0]
    project = workspace.create_project(name, description=f"loopline monitoring of {name}")
    for panel in _panels(params):
        project.dashboard.add_panel(panel, tab="Monitoring")
    return project


def loop_values(result: MonitoringResult, params: Params) -> dict[str, float]:
    """The figures of one monitoring run the dashboard plots beside Evidently's drift."""
    measured, verdict = result.measured, result.verdict
    served = measured.source("served")
    served_rows = served.rows if served is not None else 0
    labelled = measured.live.rows if measured.live is not None else 0
    values = {
        "retrain": float(verdict.outcome == "retrain"),
        "retrain_pending": float(verdict.outcome == "retrain pending"),
        "held_back": float(verdict.outcome == "held back"),
        "no_action": float(verdict.outcome == "no action"),
        "window_rows": float(measured.window_rows),
        "served_rows": float(served_rows),
        "labels_joined": float(sum(f.joined for f in measured.label_files)),
        "labels_pending": float(max(served_rows - labelled, 0)),
    }
    if measured.drift is not None:
        values["drift_share"] = measured.drift.share
        values["weighted_drift_share"] = measured.drift.weighted_share
        values["drift_share_threshold"] = params.monitor.drift_share
    if measured.champion_metric is not None:
        values["champion_test_metric"] = measured.champion_metric
    if measured.live is not None:
        values["live_metric"] = measured.live.value
        values["live_baseline_metric"] = measured.live.baseline
    if measured.offline is not None:
        values["offline_metric"] = measured.offline.value
    values["live_rows"] = float(measured.live.rows if measured.live else 0)
    values["offline_rows"] = float(measured.offline.rows if measured.offline else 0)
    if measured.estimate is not None and measured.estimate.value is not None:
        values["estimated_metric"] = measured.estimate.value
    shadow = result.shadow
    if shadow is not None:
        values["shadow_rows"] = float(shadow.pairs)
        if shadow.live is not None:
            values["shadow_live_metric"] = shadow.live.challenger
            values["shadow_champion_metric"] = shadow.live.champion
    return values


def add_monitoring_run(params: Params, result: MonitoringResult) -> str:
    """Add a monitoring run's drift snapshot and its loop figures to the workspace; returns
    the project's id."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.core.report import Snapshot
    from evidently.metrics import MeanValue
    from evidently.ui.workspace import Workspace

    path = Layout.of(params).workspace
    path.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(path))
    project = project_for(workspace, params)
    at = datetime.fromisoformat(result.at).astimezone(UTC).replace(tzinfo=None)
    measured, verdict = result.measured, result.verdict
    tags = [f"decision: {verdict.outcome}"] + ([f"champion: v{measured.champion}"] if measured.champion else [])
    metadata = {"mlflow_run": result.mlflow_run_id or "", "reason": verdict.reason()[:500]}
    if measured.snapshot:
        drift = Snapshot.loads(Path(measured.snapshot).read_text())
        drift._timestamp, drift._tags, drift._metadata = at, [DRIFT_TAG, *tags], metadata
        primary = measured.primary
        workspace.add_run(project.id, drift, name=f"drift {result.at}: {primary.source if primary else ''}")
    values = loop_values(result, params)
    table = pd.DataFrame({k: [v] for k, v in values.items()})
    report = Report([MeanValue(column=c) for c in values])
    snapshot = report.run(
        Dataset.from_pandas(table, data_definition=DataDefinition(numerical_columns=list(values))),
        None,
        timestamp=at,
        tags=[LOOP_TAG, *tags],
        metadata=metadata,
    )
    workspace.add_run(project.id, snapshot, name=f"decision {result.at}: {verdict.outcome}")
    return str(project.id)


def remove_project(workspace: Path, name: str) -> None:
    """Delete the named project's history from the workspace (a replay starting again)."""
    if not workspace.is_dir():
        return
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(workspace))
    for project in ws.search_project(name):
        ws.delete_project(project.id)
