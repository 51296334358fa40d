"""What a monitoring run leaves behind: its `record` in the MLflow monitoring experiment
(the decision and its reasons as tags, the measurements per source as metrics, the Evidently
reports as artifacts), its text (`render_monitoring`: the CLI prints it, the Prefect artifact
shows it: one line per source of rows, the labels, the decision) and what the `alerts:`
targets are told (`monitoring_alerts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.layout import Layout
from pipelines.monitoring.estimate import Estimate
from pipelines.monitoring.run import Measurement, MonitoringResult, Retrain, Window
from pipelines.monitoring.shadow import ShadowJudgement

if TYPE_CHECKING:
    from pipelines.core.alerts import Alert


def describe_labelled(measured: Measurement) -> str:
    """Which labelled rows were measured how, in one line."""
    metric = measured.metric
    tested = f"{measured.champion_metric:.4f}" if measured.champion_metric is not None else "unknown"
    parts = []
    if measured.live is not None:
        live = measured.live
        parts.append(
            f"live {metric} {live.value:.4f} on {live.rows} labelled predictions of champion v{measured.champion} "
            f"({live.by_id} joined by request id, {live.by_time} by time key; naive baseline {live.baseline:.4f})"
        )
    for version, earlier in sorted(measured.earlier.items()):
        parts.append(f"live {metric} {earlier.value:.4f} on {earlier.rows} labelled predictions of v{version}, apart")
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


def describe_estimate(estimate: Estimate | None, champion_metric: float | None) -> str:
    if estimate is None:
        return "not estimated (monitor.estimate_performance is false)"
    if estimate.value is None:
        return f"no {estimate.method} estimate of {estimate.metric}: {estimate.detail}; drift and labels only"
    tested = f"{champion_metric:.4f}" if champion_metric is not None else "unknown"
    return (
        f"{estimate.method} estimates {estimate.metric} {estimate.value:.4f} on {estimate.rows} rows without labels "
        f"(champion's test {estimate.metric} {tested}; {estimate.reference:.4f} on the rows it was fitted on)"
    )


def describe_shadow(shadow: ShadowJudgement) -> str:
    """The shadow's line: what became of it, on how many live rows, with both intervals."""
    test = f"; test rows: {shadow.test}" if shadow.test else ""
    return f"{shadow.describe()}; {shadow.new_pairs} of the pairs from this run{test}"


def describe_window(window: Window, measured: Measurement) -> str:
    """One line for a source: which rows, and what drift and the estimate found in them."""
    if not window.measured:
        return f"{window.source}: {window.what}" + (
            f" — {window.detail}" if window.detail and window.detail != window.what else ""
        )
    drift = window.drift
    assert drift is not None
    found = (
        f"drift share {drift.share:.0%} ({', '.join(drift.drifted) or 'no feature'}); importance-weighted "
        f"{drift.weighted_share:.0%}; prediction drift score {drift.prediction_score:.3f}"
    )
    estimate = window.estimate
    if estimate is not None and estimate.value is not None:
        found += f"; {estimate.method} estimates {estimate.metric} {estimate.value:.4g}"
    return f"{window.source}: {window.what} vs {measured.reference_rows} reference rows; {found}"


def _drift_table(window: Window) -> str:
    drift = window.drift
    assert drift is not None
    return "\n".join(
        [
            f"| {window.source}: feature | test | score | drifted | weight |",
            "|---|---|---:|---:|---:|",
            *(
                f"| {c} | {drift.methods.get(c, '')} | {s:.4f} | {'yes' if c in drift.drifted else ''} "
                f"| {drift.weights.get(c, 0.0):.0%} |"
                for c, s in drift.scores.items()
            ),
        ]
    )


def render_monitoring(result: MonitoringResult) -> str:
    """The monitoring flow's result as Markdown that also reads as plain text: the CLI prints
    it, the Prefect artifact shows it."""
    measured, verdict = result.measured, result.verdict
    blocks = ["  \n".join(f"batch {b.file}: {b.describe()}" for b in result.batches)]
    if measured.champion is None:
        blocks.append(measured.detail)
    else:
        lines = [describe_window(w, measured) for w in measured.windows]
        lines += [f.describe() for f in measured.label_files]
        lines.append(f"labels: {describe_labelled(measured)}; {measured.new_rows} labelled rows no training has seen")
        if measured.log is not None:
            lines.append(f"prediction log: {measured.log.describe()}")
        blocks.append(f"champion v{measured.champion}  \n" + "  \n".join(lines))
        for window in measured.windows:
            if window.measured:
                blocks.append(_drift_table(window))
        primary = measured.primary
        if primary is not None:
            blocks.append(describe_estimate(primary.estimate, measured.champion_metric))
            reports = "; ".join(f"{w.source} {w.report}" for w in measured.windows if w.report)
            blocks.append(f"Evidently reports: {reports}; the history: `loopline dashboard`")
    if result.shadow is not None:
        blocks.append(describe_shadow(result.shadow))
    blocks.append(f"decision: {verdict.outcome} — {verdict.reason()}")
    if result.training is not None:
        t = result.training
        version = f"v{t.version} " if t.version else ""
        blocks.append(f"training: {version}{t.outcome}" + (f" — {t.reason}" if t.reason else ""))
    if result.timings:
        blocks.append(f"seconds: {describe_steps(result)}")
    return "\n\n".join(block for block in blocks if block)


def describe_steps(result: MonitoringResult) -> str:
    """The run's seconds per step, a retrain's own steps in brackets (its sub-steps, such as
    "log: ONNX form", summed under their head): "accept 0.1, ..., retrain 24.3 (search 18.6, ...)"."""
    words = []
    for step, seconds in result.timings.items():
        words.append(f"{step} {seconds:.1f}")
        if step == "retrain" and result.training is not None and result.training.timings:
            heads: dict[str, float] = {}
            for inner, spent in result.training.timings.items():
                head = inner.split(":")[0].split(" (")[0]
                heads[head] = heads.get(head, 0.0) + spent
            words[-1] += " (" + ", ".join(f"{k} {v:.1f}" for k, v in heads.items() if v >= 0.05) + ")"
    return ", ".join(words)


def monitoring_alerts(params: Params, result: MonitoringResult) -> list[Alert]:
    """What a monitoring run tells the `alerts:` targets: rejected batches, a retrain, and a
    retrain decided but waiting for labels (once, when it becomes pending)."""
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
    verdict, name = result.verdict, params.tracking.model_name
    if verdict.retrain:
        training = result.training
        outcome = "" if training is None else f"; the retrain: {_describe_retrain(training)}"
        alerts.append(
            Alert(
                event="retrain",
                title=f"{name}: monitoring started a retrain",
                what=f"monitoring at {result.at} decided to retrain champion v{result.measured.champion}{outcome}",
                why=verdict.reason(),
                where=f"{where}; Evidently report {result.measured.report}",
                level="warning",
            )
        )
    elif verdict.outcome == "retrain pending" and not result.measured.pending:
        alerts.append(
            Alert(
                event="retrain pending",
                title=f"{name}: a retrain is waiting for labels",
                what=f"monitoring at {result.at} decided to retrain champion v{result.measured.champion}; "
                "the training starts on the first monitoring run that has the labels it needs",
                why=verdict.reason(),
                where=f"{where}; Evidently report {result.measured.report}",
                level="warning",
            )
        )
    shadow = result.shadow
    if shadow is not None and shadow.outcome != "kept":
        promoted = shadow.outcome == "promoted"
        alerts.append(
            Alert(
                event=f"shadow {shadow.outcome}",
                title=f"{name} v{shadow.shadow} "
                + ("is the new champion, on live shadow rows" if promoted else "retired from shadow"),
                what=f"monitoring at {result.at} "
                + (
                    f"promoted shadow v{shadow.shadow} to champion, replacing v{shadow.champion}"
                    if promoted
                    else f"retired shadow v{shadow.shadow}; champion v{shadow.champion} keeps serving"
                ),
                why=f"live rows: {shadow.reason}; test rows: {shadow.test or 'not recorded'}",
                where=f"{where}; `loopline card {shadow.shadow}`",
                level="success" if promoted else "info",
            )
        )
    return alerts


def _describe_retrain(t: Retrain) -> str:
    if t.flow_run_id is not None and t.version is None:
        return f"started as Prefect flow run {t.flow_run_id}"
    return f"v{t.version} {t.outcome}" + (f" ({t.reason})" if t.reason else "")


def _metrics(measured: Measurement) -> dict[str, float]:
    metric = measured.metric
    values: dict[str, float] = {"new_rows": measured.new_rows}
    for window in measured.windows:
        values[f"{window.source}_rows"] = window.rows
        if window.drift is not None:
            drift, prefix = window.drift, f"{window.source}_"
            values |= {
                f"{prefix}drift_share": drift.share,
                f"{prefix}weighted_drift_share": drift.weighted_share,
                f"{prefix}prediction_drift_score": drift.prediction_score,
                **{f"{prefix}drift_score.{c}": v for c, v in drift.scores.items()},
            }
        if window.estimate is not None and window.estimate.value is not None:
            values[f"{window.source}_estimated_{metric}"] = window.estimate.value
    primary = measured.primary
    if primary is not None and primary.drift is not None:  # the charted window, under the names it always had
        drift = primary.drift
        values |= {
            "drift_share": drift.share,
            "weighted_drift_share": drift.weighted_share,
            "prediction_drift_score": drift.prediction_score,
            "window_rows": primary.rows,
            **{f"drift_score.{c}": v for c, v in drift.scores.items()},
            **{f"drift_weight.{c}": v for c, v in drift.weights.items()},
        }
        if primary.estimate is not None and primary.estimate.value is not None:
            values[f"estimated_{metric}"] = primary.estimate.value
        if primary.estimate is not None and primary.estimate.reference is not None:
            values[f"estimator_reference_{metric}"] = primary.estimate.reference
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
    for version, earlier in measured.earlier.items():
        values |= {f"earlier_live_{metric}.v{version}": earlier.value, f"earlier_live_rows.v{version}": earlier.rows}
    if measured.offline is not None:
        values |= {
            f"offline_{metric}": measured.offline.value,
            f"offline_baseline_{metric}": measured.offline.baseline,
            "offline_rows": measured.offline.rows,
        }
    if measured.label_files:
        values |= {
            "labels_read": sum(f.labels for f in measured.label_files),
            "labels_joined": sum(f.joined for f in measured.label_files),
            "labels_unknown": sum(f.unknown for f in measured.label_files),
            "labels_conflicting": sum(f.conflicts for f in measured.label_files),
        }
    if measured.log is not None:
        values |= {"log_rows": measured.log.rows, "log_pruned": measured.log.pruned}
    return values


def _shadow_metrics(shadow: ShadowJudgement | None) -> dict[str, float]:
    if shadow is None:
        return {}
    values: dict[str, float] = {"shadow_rows": shadow.pairs, "shadow_new_rows": shadow.new_pairs}
    live = shadow.live
    if live is not None:
        values |= {
            f"shadow_live_{live.metric}": live.challenger,
            f"shadow_champion_live_{live.metric}": live.champion,
            "shadow_improvement": live.improvement,
            "shadow_improvement_low": live.low,
            "shadow_improvement_high": live.high,
        }
    return values


def record(params: Params, result: MonitoringResult) -> str:
    """One run in the monitoring experiment: drift scores per source, live metrics, decision
    and reasons as tags, the Evidently reports as artifacts. Returns its run id."""
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
    if verdict.outcome == "retrain pending":  # what the next runs read: open until a retrain
        tags[names.PENDING] = (measured.pending or f"{result.at}: {'; '.join(verdict.triggers)}")[:5000]
    if measured.champion is not None:
        tags |= {
            names.CHAMPION_VERSION: measured.champion or "",
            names.LABELS: describe_labelled(measured)[:5000],
            **{names.window_tag(w.source): w.what[:5000] for w in measured.windows},
        }
    primary = measured.primary
    if primary is not None and primary.drift is not None:
        tags |= {
            names.WINDOW: primary.what[:5000],
            names.DRIFTED: ", ".join(primary.drift.drifted) or "none",
            names.ESTIMATE: describe_estimate(primary.estimate, measured.champion_metric)[:5000],
        }
    if measured.log is not None:
        tags[names.LOG_SIZE] = measured.log.describe()
    metrics = {
        "batches_accepted": sum(b.status == "accepted" for b in result.batches),
        "batches_rejected": sum(b.status == "rejected" for b in result.batches),
        **_metrics(measured),
        **_shadow_metrics(result.shadow),
    }
    if result.shadow is not None:
        tags[names.SHADOW_JUDGEMENT] = describe_shadow(result.shadow)[:5000]
    run = client.create_run(experiment_id, run_name=f"monitoring-{result.at}", tags=tags)
    log_dict_batch(client, run.info.run_id, metrics=metrics)
    for window in measured.windows:
        if window.report:
            client.log_artifact(run.info.run_id, window.report, f"drift/{window.source}")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def record_retrain(params: Params, run_id: str, retrain: Retrain) -> None:
    """What the retrain came to, as tags on the monitoring run that started it."""
    from pipelines.registry.tracking import client_for, monitoring_experiment

    client, _ = client_for(params, monitoring_experiment(params))
    for key, value in vars(retrain).items():
        if value is not None:
            client.set_tag(run_id, names.training_tag(key), str(value)[:5000])
