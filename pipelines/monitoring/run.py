"""One monitoring run's work, as the monitoring flow's tasks call it:

- `measure`: the latest window of accepted batches against the champion's reference rows
  (drift, prediction drift), the live metric of served predictions that have ground truth,
  and how many rows no training has seen;
- `record`: the run in the monitoring experiment (decision and reasons as tags, scores as
  metrics, the Evidently report as an artifact).

State between runs (last retrain, data the last training saw) is read from MLflow. Results
are dataclasses with one renderer (`render_monitoring`) for the CLI and the Prefect artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.data.arrivals import BatchOutcome
from pipelines.monitoring.drift import Drift
from pipelines.monitoring.estimate import Estimate
from pipelines.monitoring.labels import LiveMetric
from pipelines.monitoring.policy import Verdict

if TYPE_CHECKING:
    from pipelines.core.alerts import Alert


@dataclass(frozen=True)
class Measurement:
    status: Literal["measured", "no champion", "no data", "not enough rows"]
    detail: str = ""  # why nothing was measured
    champion: str | None = None  # the champion's version
    champion_run: str | None = None
    champion_metric: float | None = None  # its test metric, as registered
    metric: str = ""
    window: list[str] = field(default_factory=list)  # the accepted batches measured
    window_rows: int = 0
    reference_rows: int = 0
    drift: Drift | None = None  # without its HTML, which is in `report`
    live: LiveMetric | None = None  # served predictions on labelled rows
    offline: LiveMetric | None = None  # the champion on labelled rows nothing served answers
    labels: str = ""  # why a labelled measurement is missing ("no labels in window", too few rows)
    estimate: Estimate | None = None  # NannyML's label-free estimate (or why there is none)
    new_rows: int = 0  # rows no training has seen
    report: str = ""  # the Evidently report's path
    snapshot: str = ""  # the same report as an Evidently snapshot (JSON), for the dashboard
    seconds: float = 0.0


@dataclass(frozen=True)
class Retrain:
    """What the retrain a monitoring run started came to."""

    outcome: str
    version: str | None = None
    promoted: bool = False
    reason: str = ""
    data_version: str | None = None
    candidate: str | None = None
    flow_run_id: str | None = None  # a retrain started through the deployment


@dataclass(frozen=True)
class MonitoringResult:
    at: str
    batches: list[BatchOutcome]
    measured: Measurement
    verdict: Verdict
    mlflow_run_id: str | None = None
    training: Retrain | None = None


def _cached_path(run_id: str, artifact: str, params: Params) -> Path:
    return Layout.of(params).monitoring / "reference" / f"{run_id}-{Path(artifact).name}"


def _artifact(client, run_id: str, artifact: str, params: Params, required: bool = True) -> Path | None:
    """One of the files logged beside the champion's model, downloaded once per run id."""
    import tempfile

    from pipelines.core.storage import atomic_path

    cached = _cached_path(run_id, artifact, params)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                local = client.download_artifacts(run_id, artifact, tmp)
                with atomic_path(cached) as target:
                    Path(local).replace(target)
        except Exception as err:  # MLflow raises several types for a missing artifact
            if not required:
                return None
            raise LooplineError(
                "monitor",
                f"the champion's run {run_id} has no {artifact} (trained before loopline logged it?): {err}",
            ) from None
    return cached


def reference_rows(client, run_id: str, params: Params) -> pd.DataFrame:
    """The champion's training rows."""
    path = _artifact(client, run_id, names.REFERENCE_ARTIFACT, params)
    assert path is not None
    return pd.read_parquet(path)


def champion_drift_reference(client, run_id: str, model, params: Params) -> pd.DataFrame:
    """What drift compares the window with (monitor.drift_reference): the profile logged at
    training, or, for a champion trained with another monitor.reference_profile_rows (or
    before profiles), one made from its reference rows now and kept in the monitoring
    workspace under the same name, so the next run reads it."""
    from pipelines.core.storage import atomic_path
    from pipelines.monitoring.drift import drift_reference

    rows = params.monitor.reference_profile_rows
    if not rows:
        return drift_reference(reference_rows(client, run_id, params), model, params)
    artifact = names.profile_artifact(rows)
    path = _artifact(client, run_id, artifact, params, required=False)
    if path is None:
        profile = drift_reference(reference_rows(client, run_id, params), model, params)
        path = _cached_path(run_id, artifact, params)
        with atomic_path(path) as target:
            profile.to_parquet(target, index=False)
        return profile
    return pd.read_parquet(path)


def champion_importance(client, run_id: str, params: Params) -> dict[str, float] | None:
    """The champion's permutation importance per feature (None: logged before loopline kept it)."""
    import json

    path = _artifact(client, run_id, names.IMPORTANCE_ARTIFACT, params, required=False)
    return json.loads(path.read_text()) if path is not None else None


def champion_estimator(client, run_id: str, params: Params):
    """The champion's fitted NannyML estimator, or why there is none."""
    from pipelines.monitoring.estimate import loads_estimator

    path = _artifact(client, run_id, names.ESTIMATOR_ARTIFACT, params, required=False)
    if path is not None:
        return loads_estimator(path.read_bytes()), ""
    why = client.get_run(run_id).data.tags.get(names.ESTIMATE, "the champion was trained without one")
    return None, f"no performance estimator: {why}"


def last_training_arrival(client, experiment_id: str) -> str | None:
    """The last accepted batch the newest training run read (None: no training run says)."""
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=20):
        if names.LAST_ARRIVAL in run.data.tags:
            return run.data.tags[names.LAST_ARRIVAL]
    return None


def last_retrain(client, experiment_id: str) -> datetime | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{names.DECISION}` = 'retrain'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return datetime.fromisoformat(runs[0].data.tags[names.AT]) if runs else None


def measure(params: Params) -> Measurement:
    """Drift of the latest window against the champion's reference, the live metric of the
    served predictions that have ground truth, and how many rows no training has seen."""
    from pipelines.core.names import CHAMPION
    from pipelines.core.storage import write_text
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import arrival_files, read_arrivals
    from pipelines.monitoring.drift import PREDICTION, REFERENCE_ROWS, measure_drift
    from pipelines.monitoring.labels import labelled_metrics
    from pipelines.monitoring.prediction_log import log_location, prediction_log_exists, read_prediction_log
    from pipelines.registry.champion import alias_version
    from pipelines.registry.tracking import client_for, load_model_version

    layout = Layout.of(params)
    client, training_id = client_for(params)
    name = params.tracking.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return Measurement("no champion", f"{name} has no champion yet: run `loopline train`")
    files = arrival_files(layout.arrivals)
    if not files:
        return Measurement("no data", f"no accepted batch in {layout.arrivals} yet")
    started = time.perf_counter()
    window_files = files[-params.monitor.window_batches :]
    id_column = [params.monitor.id_column] if params.monitor.id_column else []
    window = typed_rows(read_arrivals(window_files, [*params.table_schema.columns, *id_column]), params)
    champion = client.get_model_version(name, version)
    if len(window) < params.monitor.min_window_rows:
        return Measurement(
            "not enough rows",
            f"the window ({', '.join(f.name for f in window_files)}) has {len(window)} rows, fewer than "
            f"monitor.min_window_rows {params.monitor.min_window_rows}: too few to measure drift or estimate",
            champion=version,
            window_rows=len(window),
        )
    model, meta = load_model_version(client, name, version)
    reference = champion_drift_reference(client, champion.run_id, model, params)
    window[PREDICTION] = model.predict(window[params.features.columns])
    drift = measure_drift(reference, window, params, champion_importance(client, champion.run_id, params))
    estimate = None
    if params.monitor.estimate_performance:
        estimate = _estimate(client, champion.run_id, model, window, params)
    report = layout.monitoring / "reports" / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-v{version}.html"
    write_text(drift.html, report)
    snapshot = report.with_suffix(".json")
    write_text(drift.snapshot, snapshot)

    served_log = log_location(params)
    log = (
        read_prediction_log(served_log, params.monitor.time_key)
        if prediction_log_exists(served_log)
        else pd.DataFrame(columns=["request_id", "model_version", PREDICTION])
    )
    labelled = labelled_metrics(window, log, params, meta["baseline"], champion=version)
    metric, _ = params.metric
    tested = champion.tags.get(names.version_metric_tag(metric))
    seen = last_training_arrival(client, training_id)
    since = [f for f in files if seen is None or seen == "none" or f.name > seen]
    return Measurement(
        "measured",
        champion=version,
        champion_run=champion.run_id,
        champion_metric=float(tested) if tested is not None else None,
        metric=metric,
        window=[f.name for f in window_files],
        window_rows=len(window),
        reference_rows=int(reference.attrs.get(REFERENCE_ROWS, len(reference))),
        drift=replace(drift, html="", snapshot=""),
        live=labelled.live,
        offline=labelled.offline,
        labels=labelled.note,
        estimate=estimate,
        new_rows=new_rows(since, params),
        report=str(report.resolve()),
        snapshot=str(snapshot.resolve()),
        seconds=round(time.perf_counter() - started, 3),
    )


def new_rows(files: list[Path], params: Params) -> int:
    """Rows of the batches accepted since the last training that no training has seen: not
    equal, on the features and the target, to a row of the latest splits (the test the
    promotion's recent-row evidence uses), each distinct row counted once. A batch of hours a
    model already trained on is not new data."""
    from pipelines.core.errors import LooplineError
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import read_arrivals
    from pipelines.data.split import SPLITS, read_split
    from pipelines.registry.evidence import unseen

    if not files:
        return 0
    columns = [*params.features.columns, params.data.target]
    rows = typed_rows(read_arrivals(files, list(params.table_schema.columns)), params).dropna(
        subset=[params.data.target]
    )
    try:
        seen = [read_split(params, split, "monitor") for split in SPLITS]
    except LooplineError:  # no splits here (another machine trained): what arrived since is new
        seen = []
    return len(unseen(rows, seen, columns).drop_duplicates(subset=columns))


def _estimate(client, run_id: str, model, window: pd.DataFrame, params: Params) -> Estimate:
    from pipelines.monitoring.estimate import estimate

    estimator, why = champion_estimator(client, run_id, params)
    if estimator is None:
        metric, _ = params.metric
        return Estimate(metric, "DLE" if params.data.task == "regression" else "CBPE", None, why, len(window))
    return estimate(estimator, model, window, params.monitor.min_window_rows)


def _metrics(measured: Measurement) -> dict[str, float]:
    if measured.drift is None:
        return {}
    drift, metric = measured.drift, measured.metric
    values = {
        "drift_share": drift.share,
        "weighted_drift_share": drift.weighted_share,
        "prediction_drift_score": drift.prediction_score,
        "window_rows": measured.window_rows,
        "new_rows": measured.new_rows,
        **{f"drift_score.{c}": v for c, v in drift.scores.items()},
        **{f"drift_weight.{c}": v for c, v in drift.weights.items()},
    }
    if measured.champion_metric is not None:
        values[f"champion_test_{metric}"] = measured.champion_metric
    if measured.live is not None:
        values |= {
            f"live_{metric}": measured.live.value,
            f"live_baseline_{metric}": measured.live.baseline,
            "live_rows": measured.live.rows,
            "live_rows_by_id": measured.live.by_id,
            "live_rows_by_time": measured.live.by_time,
        }
    if measured.offline is not None:
        values |= {
            f"offline_{metric}": measured.offline.value,
            f"offline_baseline_{metric}": measured.offline.baseline,
            "offline_rows": measured.offline.rows,
        }
    estimate = measured.estimate
    if estimate is not None and estimate.value is not None:
        values[f"estimated_{metric}"] = estimate.value
    if estimate is not None and estimate.reference is not None:
        values[f"estimator_reference_{metric}"] = estimate.reference
    return values


def record(params: Params, result: MonitoringResult) -> str:
    """One run in the monitoring experiment: drift scores, live metrics, decision and reasons
    as tags, the Evidently report as an artifact. Returns its run id."""
    from pipelines.registry.tracking import client_for, log_dict_batch, monitoring_experiment

    client, experiment_id = client_for(params, monitoring_experiment(params))
    measured, verdict = result.measured, result.verdict
    tags = {
        names.DECISION: verdict.outcome,
        names.REASON: verdict.reason()[:5000],
        names.AT: result.at,
        names.STATUS: measured.status,
        names.BATCHES: ", ".join(b.file for b in result.batches) or "none",
        names.REJECTED: ", ".join(b.file for b in result.batches if b.status == "rejected") or "none",
    }
    if measured.drift is not None:
        tags |= {
            names.CHAMPION_VERSION: measured.champion or "",
            names.WINDOW: ", ".join(measured.window),
            names.DRIFTED: ", ".join(measured.drift.drifted) or "none",
            names.ESTIMATE: _describe_estimate(measured.estimate, measured.champion_metric)[:5000],
            names.LABELS: _describe_labelled(measured)[:5000],
        }
    metrics = {
        "batches_accepted": sum(b.status == "accepted" for b in result.batches),
        "batches_rejected": sum(b.status == "rejected" for b in result.batches),
        **_metrics(measured),
    }
    run = client.create_run(experiment_id, run_name=f"monitoring-{result.at}", tags=tags)
    log_dict_batch(client, run.info.run_id, metrics=metrics)
    if measured.report:
        client.log_artifact(run.info.run_id, measured.report, "drift")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def record_retrain(params: Params, run_id: str, retrain: Retrain) -> None:
    """What the retrain came to, as tags on the monitoring run that started it."""
    from pipelines.registry.tracking import client_for, monitoring_experiment

    client, _ = client_for(params, monitoring_experiment(params))
    for key, value in vars(retrain).items():
        if value is not None:
            client.set_tag(run_id, names.training_tag(key), str(value)[:5000])


def _describe_labelled(measured: Measurement) -> str:
    """Which labelled rows were measured how, in one line."""
    metric = measured.metric
    tested = f"{measured.champion_metric:.4f}" if measured.champion_metric is not None else "unknown"
    parts = []
    if measured.live is not None:
        live = measured.live
        parts.append(
            f"live {metric} {live.value:.4f} on {live.rows} labelled served predictions ({live.by_id} joined by "
            f"request id, {live.by_time} by time key; naive baseline {live.baseline:.4f})"
        )
    if measured.offline is not None:
        off = measured.offline
        parts.append(
            f"offline {metric} {off.value:.4f} on {off.rows} labelled rows no served prediction answers, "
            f"scored by champion v{measured.champion} (naive baseline {off.baseline:.4f})"
        )
    if measured.labels:
        parts.append(measured.labels)
    if not parts:
        return "no labelled rows in the window"
    return "; ".join(parts) + f"; champion's test {metric} {tested}"


def _describe_estimate(estimate: Estimate | None, champion_metric: float | None) -> str:
    if estimate is None:
        return "not estimated (monitor.estimate_performance is false)"
    if estimate.value is None:
        return f"no {estimate.method} estimate of {estimate.metric}: {estimate.detail}; drift and labels only"
    tested = f"{champion_metric:.4f}" if champion_metric is not None else "unknown"
    return (
        f"{estimate.method} estimates {estimate.metric} {estimate.value:.4f} on {estimate.rows} rows without labels "
        f"(champion's test {estimate.metric} {tested}; {estimate.reference:.4f} on the rows it was fitted on)"
    )


def render_monitoring(result: MonitoringResult) -> str:
    """The monitoring flow's result as Markdown that also reads as plain text: the CLI prints
    it, the Prefect artifact shows it."""
    measured, verdict = result.measured, result.verdict
    blocks = ["  \n".join(f"batch {b.file}: {b.describe()}" for b in result.batches)]
    if measured.drift is None:
        blocks.append(measured.detail)
    else:
        drift = measured.drift
        blocks.append(
            f"champion v{measured.champion}; window {', '.join(measured.window)} "
            f"({measured.window_rows} rows) vs {measured.reference_rows} reference rows; "
            f"{measured.new_rows} rows no training has seen  \n"
            f"drift share {drift.share:.0%} ({', '.join(drift.drifted) or 'no feature'}); "
            f"importance-weighted {drift.weighted_share:.0%} ({drift.weighting}); "
            f"prediction drift score {drift.prediction_score:.3f}"
        )
        blocks.append(
            "\n".join(
                [
                    "| feature | test | score | drifted | weight |",
                    "|---|---|---:|---:|---:|",
                    *(
                        f"| {c} | {drift.methods.get(c, '')} | {s:.4f} | {'yes' if c in drift.drifted else ''} "
                        f"| {drift.weights.get(c, 0.0):.0%} |"
                        for c, s in drift.scores.items()
                    ),
                ]
            )
        )
        blocks.append(_describe_labelled(measured))
        blocks.append(_describe_estimate(measured.estimate, measured.champion_metric))
        blocks.append(f"Evidently report: {measured.report}; the history: `loopline dashboard`")
    blocks.append(f"decision: {verdict.outcome} — {verdict.reason()}")
    if result.training is not None:
        t = result.training
        version = f"v{t.version} " if t.version else ""
        blocks.append(f"training: {version}{t.outcome}" + (f" — {t.reason}" if t.reason else ""))
    return "\n\n".join(block for block in blocks if block)


def monitoring_alerts(params: Params, result: MonitoringResult) -> list[Alert]:
    """What a monitoring run tells the `alerts:` targets: rejected batches and a retrain."""
    from pipelines.core.alerts import Alert
    from pipelines.registry.tracking import monitoring_experiment

    where = f"MLflow run {result.mlflow_run_id} in experiment {monitoring_experiment(params)} ({params.tracking.uri})"
    rejected = Layout.of(params).rejected.resolve()
    alerts = [
        Alert(
            event="batch rejected",
            title=f"batch {b.file} rejected",
            what=f"landed batch {b.file} was rejected and moved to {rejected}",
            why=b.describe(),
            where=f"{rejected / b.file}; {where}",
            level="warning",
        )
        for b in result.batches
        if b.status == "rejected"
    ]
    if result.verdict.retrain:
        training = result.training
        outcome = "" if training is None else f"; the retrain: {_describe_retrain(training)}"
        alerts.append(
            Alert(
                event="retrain",
                title=f"{params.tracking.model_name}: monitoring started a retrain",
                what=f"monitoring at {result.at} decided to retrain champion v{result.measured.champion}{outcome}",
                why=result.verdict.reason(),
                where=f"{where}; Evidently report {result.measured.report}",
                level="warning",
            )
        )
    return alerts


def _describe_retrain(t: Retrain) -> str:
    if t.flow_run_id is not None and t.version is None:
        return f"started as Prefect flow run {t.flow_run_id}"
    return f"v{t.version} {t.outcome}" + (f" ({t.reason})" if t.reason else "")
