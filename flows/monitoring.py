"""The monitoring flow: accept landed files, join label files to the prediction log, measure
what the champion served (and what landed) against the data it was trained on, decide by the
`monitor:` policy, record the decision, start the training flow when the policy says so and
the labels it needs are there, and prune the prediction log. Training promotes a new
champion only if it is better; a running service picks a new champion up by itself
(serve.reload_interval_s).

Wiring only: the checks live in pipelines/data/arrivals.py, the label join in
pipelines/monitoring/labels.py, the measurements and the record in pipelines/monitoring/run.py,
the policy in pipelines/monitoring/policy.py. The params file is read once per run; state
between runs is read from MLflow, so a run needs nothing but the params file.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.hooks import alert_failed_run, quiet_cancellation
from pipelines.core.config import Params, load_params
from pipelines.core.names import TRAINING_DEPLOYMENT
from pipelines.data.arrivals import BatchOutcome
from pipelines.monitoring.labels import LabelFeed
from pipelines.monitoring.policy import Verdict
from pipelines.monitoring.prediction_log import LogSize
from pipelines.monitoring.report import render_monitoring
from pipelines.monitoring.run import Measurement, MonitoringResult, Retrain
from pipelines.monitoring.shadow import ShadowJudgement

Trigger = Literal["subflow", "deployment", "none"]


@task(name="accept-batches")
def accept_task(params: Params) -> list[BatchOutcome]:
    from pipelines.data.arrivals import accept_landed

    return accept_landed(params)


@task(name="join-labels")
def join_labels_task(params: Params) -> LabelFeed:
    """Label files joined to the answers they label; the joined rows become training rows."""
    from pipelines.monitoring.labels import join_label_files
    from pipelines.monitoring.prediction_log import log_location

    return join_label_files(params, log_location(params))


@task(name="measure")
def measure_task(params: Params, at: datetime, feed: LabelFeed) -> Measurement:
    from pipelines.monitoring.run import measure

    return measure(params, at, feed)


@task(name="decide")
def decide_task(params: Params, measured: Measurement, at: datetime) -> Verdict:
    from pipelines.monitoring.policy import decide
    from pipelines.monitoring.run import last_retrain
    from pipelines.registry.tracking import client_for, monitoring_experiment

    if measured.status != "measured" and not measured.pending:  # nothing measured: nothing to decide on
        return Verdict(False, [], [], unmeasured=f"{measured.status}: {measured.detail}")
    client, monitoring_id = client_for(params, monitoring_experiment(params))
    return decide(
        params.monitor,
        now=at,
        windows=[(w.source, w.drift, w.estimate) for w in measured.windows if w.measured],
        live=measured.live,
        offline=measured.offline,
        champion_metric=measured.champion_metric,
        higher_is_better=params.metric[1],
        new_rows=measured.new_rows,
        last_retrain=last_retrain(client, monitoring_id),
        pending=measured.pending,
    )


@task(name="judge-shadow")
def shadow_task(params: Params, measured: Measurement, at: datetime) -> ShadowJudgement | None:
    """The shadow against the champion on this run's labelled answers and those before:
    promoted, retired or kept (pipelines/monitoring/shadow.py)."""
    from pipelines.monitoring.prediction_log import log_location
    from pipelines.monitoring.shadow import settle_shadow

    if measured.status == "no champion":
        return None
    return settle_shadow(params, log_location(params), measured.answered, at)


@task(name="record-decision")
def record_task(params: Params, result: MonitoringResult) -> str:
    from pipelines.monitoring.report import record

    return record(params, result)


@task(name="prune-prediction-log")
def prune_task(params: Params, measured: Measurement, at: datetime) -> LogSize | None:
    from pipelines.monitoring.run import prune_log

    return prune_log(params, measured, at)


@task(name="add-to-dashboard")
def dashboard_task(params: Params, result: MonitoringResult) -> str | None:
    """The run's snapshots in the Evidently workspace; a failure there is a warning, never a
    lost decision."""
    from pipelines.monitoring.dashboard import add_monitoring_run

    try:
        return add_monitoring_run(params, result)
    except Exception as err:
        get_run_logger().warning("the Evidently workspace did not take this run: %s: %s", type(err).__name__, err)
        return None


def _start_training(params_path: str, trigger: Trigger) -> Retrain:
    if trigger == "deployment":
        from prefect.deployments import run_deployment

        run = run_deployment(
            f"training/{TRAINING_DEPLOYMENT}",
            timeout=0,
            parameters={"params_path": params_path, "record_data_version": True},
        )
        return Retrain(outcome="started", flow_run_id=str(run.id))  # type: ignore[union-attr]  # sync: this flow is sync
    from flows.training import training_flow

    trained = training_flow(params_path=params_path, record_data_version=True)
    decision = trained.decision
    return Retrain(
        outcome=decision.outcome,
        version=decision.version,
        promoted=decision.promoted,
        reason=decision.reason,
        data_version=trained.data_version,
        candidate=trained.trained.best,
        timings=trained.timings,
    )


@contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    """Seconds spent in the block, into timings[name]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 3)


@flow(name="monitoring", on_failure=[alert_failed_run])
def monitoring_flow(
    params_path: str = "params.yaml", trigger: Trigger = "subflow", now: str | None = None
) -> MonitoringResult:
    """Accept landed files → join labels → measure the served and landed windows → decide →
    record → retrain → prune the log.

    trigger: how a retrain starts — `subflow` (in this process), `deployment` (the served
    training deployment, as `loopline deploy` runs it), or `none` (decide and record only).
    now: the time the decision is taken at (ISO 8601; default: the clock), for replays."""
    from dataclasses import replace

    from pipelines.core.alerts import send
    from pipelines.monitoring.report import monitoring_alerts, record_retrain

    quiet_cancellation()
    logger = get_run_logger()
    params = load_params(params_path)  # once per run; tasks get the validated params
    at = datetime.fromisoformat(now) if now else datetime.now(UTC)
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    steps: dict[str, float] = {}
    with _step(steps, "accept"):
        batches = accept_task(params)
    for b in batches:
        (logger.warning if b.status == "rejected" else logger.info)("batch %s: %s", b.file, b.describe())
    with _step(steps, "labels"):
        feed = join_labels_task(params)
    for joined in feed.files:
        logger.info("%s", joined.describe())
    with _step(steps, "measure"):
        measured = measure_task(params, at, feed)
    with _step(steps, "decide"):
        verdict = decide_task(params, measured, at)
    with _step(steps, "shadow"):
        shadow = shadow_task(params, measured, at)
    if shadow is not None:
        logger.info("%s", shadow.describe())
    if trigger == "none" and verdict.retrain:
        verdict = Verdict(False, verdict.triggers, ["trigger=none: decide and record only"])
    if shadow is not None and shadow.outcome == "promoted" and verdict.retrain:
        why = f"shadow v{shadow.shadow} was promoted on live rows: the next run measures the new champion"
        verdict = Verdict(False, verdict.triggers, [why])
    logger.info("Decision: %s — %s", verdict.outcome, verdict.reason())
    with _step(steps, "prune"):
        measured = replace(measured, log=prune_task(params, measured, at))
    result = MonitoringResult(
        at=at.isoformat(timespec="seconds"), batches=batches, measured=measured, verdict=verdict, shadow=shadow
    )
    with _step(steps, "record"):
        run_id = record_task(params, result)
    training = None
    if verdict.retrain:
        with _step(steps, "retrain"):
            training = _start_training(params_path, trigger)
        record_retrain(params, run_id, training)
        logger.info("Training: %s", training)
    result = replace(result, mlflow_run_id=run_id, training=training, timings=steps)
    dashboard_task(params, result)
    create_markdown_artifact(
        render_monitoring(result),
        key="monitoring-decision",
        description="Batches, labels, the served and landed windows, the decision and its reasons",
    )
    for alert in monitoring_alerts(params, result):
        send(params.alerts, alert, warn=logger.warning)
    return result
