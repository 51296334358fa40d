"""The monitoring flow: accept landed batches, compare the latest window with the data the
champion was trained on, decide by the `monitor:` policy, record the decision, and start the
training flow when the policy says so. Training promotes a new champion only if it is
better; a running service picks a new champion up by itself (serve.reload_interval_s).

Wiring only: the checks live in pipelines/arrivals.py, the measurements and the policy in
pipelines/monitor.py. State between runs (last retrain, data the last training saw) is read
from MLflow, so a run needs nothing but the params file.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipelines import stages
from pipelines.arrivals import describe_batch
from pipelines.config import Params, load_params

Trigger = Literal["subflow", "deployment", "none"]


@task(name="accept-batches")
def accept_task(params_path: str) -> list[dict[str, Any]]:
    from pipelines.arrivals import accept_landed

    return accept_landed(load_params(params_path))


def _reference(client, run_id: str, params: Params):
    """The champion's training rows, downloaded once per run id."""
    import pandas as pd

    from flows.training import REFERENCE_ARTIFACT
    from pipelines.errors import LooplineError
    from pipelines.storage import atomic_path

    cached = stages.Layout.of(params).monitoring / "reference" / f"{run_id}.parquet"
    if not cached.is_file():
        try:
            local = client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(cached.parent))
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise LooplineError("monitor", f"the champion's run {run_id} has no {REFERENCE_ARTIFACT} "
                                           f"(trained before loopline logged references?): {err}") from None
        with atomic_path(cached) as tmp:
            Path(local).replace(tmp)
    return pd.read_parquet(cached)


def _last_training_arrival(client, experiment_id: str) -> str | None:
    """The last accepted batch the newest training run read (None: no training run says)."""
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=20):
        if "data.last_arrival" in run.data.tags:
            return run.data.tags["data.last_arrival"]
    return None


@task(name="measure")
def measure_task(params_path: str) -> dict[str, Any]:
    """Drift of the latest window against the champion's reference, the live metric of the
    served predictions that have ground truth, and how many rows no training has seen."""
    from pipelines.arrivals import arrival_files, arrival_rows, read_arrivals, typed_rows
    from pipelines.monitor import PREDICTION, live_metrics, measure_drift
    from pipelines.registry import CHAMPION, alias_version
    from pipelines.storage import write_text
    from pipelines.tracking import client_for, load_model_version
    from serving.runtime import read_prediction_log

    params = load_params(params_path)
    layout = stages.Layout.of(params)
    client, training_id = client_for(params)
    name = params.tracking.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return {"status": "no champion", "detail": f"{name} has no champion yet: run `loopline train`"}
    files = arrival_files(layout.arrivals)
    if not files:
        return {"status": "no data", "detail": f"no accepted batch in {layout.arrivals} yet"}
    started = time.perf_counter()
    window_files = files[-params.monitor.window_batches:]
    id_column = [params.monitor.id_column] if params.monitor.id_column else []
    window = typed_rows(read_arrivals(window_files, [*params.table_schema.columns, *id_column]), params)
    model, meta = load_model_version(client, name, version)
    champion = client.get_model_version(name, version)
    champion_run = champion.run_id
    reference = _reference(client, champion_run, params)
    features = params.features.columns
    reference[PREDICTION] = model.predict(reference[features])
    window[PREDICTION] = model.predict(window[features])
    drift = measure_drift(reference, window, params)
    report = layout.monitoring / "reports" / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-v{version}.html"
    write_text(drift.html, report)

    live = None
    if layout.prediction_log.is_file() and id_column:
        live = live_metrics(window, read_prediction_log(layout.prediction_log, []), params, meta["baseline"])
    metric, _ = params.metric
    tags = champion.tags
    champion_metric = float(tags[f"loopline.test_{metric}"]) if f"loopline.test_{metric}" in tags else None
    seen = _last_training_arrival(client, training_id)
    unseen = [f for f in files if seen is None or seen == "none" or f.name > seen]
    return {"status": "measured", "champion": version, "champion_run": champion_run,
            "champion_metric": champion_metric, "metric": metric,
            "window": [f.name for f in window_files], "window_rows": len(window),
            "reference_rows": len(reference), "drift": drift.summary(), "live": live,
            "new_rows": arrival_rows(unseen), "report": str(report.resolve()),
            "seconds": round(time.perf_counter() - started, 3)}


def _last_retrain(client, experiment_id: str) -> datetime | None:
    runs = client.search_runs([experiment_id], filter_string="tags.`loopline.decision` = 'retrain'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return datetime.fromisoformat(runs[0].data.tags["loopline.at"]) if runs else None


@task(name="record-decision")
def record_task(params_path: str, result: dict[str, Any]) -> str:
    """One run in the monitoring experiment: drift scores, live metrics, decision and reasons
    as tags, the Evidently report as an artifact."""
    from pipelines.tracking import client_for, log_dict_batch, monitoring_experiment

    params = load_params(params_path)
    client, experiment_id = client_for(params, monitoring_experiment(params))
    measured, verdict = result["measured"], result["verdict"]
    tags = {"loopline.decision": verdict["outcome"], "loopline.reason": verdict["reason"][:5000],
            "loopline.at": result["at"], "loopline.status": measured["status"],
            "loopline.batches": ", ".join(b["file"] for b in result["batches"]) or "none",
            "loopline.rejected": ", ".join(b["file"] for b in result["batches"] if b["status"] == "rejected") or "none"}
    metrics: dict[str, float] = {"batches_accepted": sum(b["status"] == "accepted" for b in result["batches"]),
                                 "batches_rejected": sum(b["status"] == "rejected" for b in result["batches"])}
    if measured["status"] == "measured":
        drift, live = measured["drift"], measured["live"]
        metric = measured["metric"]
        tags |= {"loopline.champion_version": measured["champion"], "loopline.window": ", ".join(measured["window"]),
                 "loopline.drifted": ", ".join(drift["drifted"]) or "none"}
        metrics |= {"drift_share": drift["share"], "prediction_drift_score": drift["prediction_score"],
                    "window_rows": measured["window_rows"], "new_rows": measured["new_rows"],
                    **{f"drift_score.{c}": v for c, v in drift["scores"].items()}}
        if measured["champion_metric"] is not None:
            metrics[f"champion_test_{metric}"] = measured["champion_metric"]
        if live is not None:
            metrics |= {f"live_{metric}": live["value"], f"live_baseline_{metric}": live["baseline"],
                        "live_rows": live["rows"]}
    run = client.create_run(experiment_id, run_name=f"monitoring-{result['at']}", tags=tags)
    log_dict_batch(client, run.info.run_id, metrics=metrics)
    if measured["status"] == "measured":
        client.log_artifact(run.info.run_id, measured["report"], "drift")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _start_training(params_path: str, trigger: Trigger) -> dict[str, Any]:
    if trigger == "deployment":
        from prefect.deployments import run_deployment

        from flows.deploy import TRAINING_DEPLOYMENT

        run = run_deployment(f"training/{TRAINING_DEPLOYMENT}", timeout=0,
                             parameters={"params_path": params_path, "record_data_version": True})
        return {"outcome": "started", "flow_run_id": str(run.id)}
    from flows.training import training_flow

    trained = training_flow(params_path=params_path, record_data_version=True)
    decision = trained["decision"]
    return {"outcome": decision["outcome"], "version": decision.get("version"),
            "promoted": bool(decision.get("promoted")), "reason": decision["reason"],
            "data_version": trained.get("data_version"), "candidate": trained["trained"]["best"]}


def decision_markdown(result: dict[str, Any]) -> str:
    measured, verdict = result["measured"], result["verdict"]
    lines = [f"# Monitoring at {result['at']}: **{verdict['outcome']}**", "", verdict["reason"], ""]
    for b in result["batches"]:
        lines.append(f"- batch `{b['file']}`: {describe_batch(b)}")
    if measured["status"] != "measured":
        return "\n".join([*lines, "", measured["detail"]])
    drift, live, metric = measured["drift"], measured["live"], measured["metric"]
    lines += ["", f"Champion v{measured['champion']}; window {', '.join(measured['window'])} "
                  f"({measured['window_rows']} rows) vs {measured['reference_rows']} reference rows; "
                  f"{measured['new_rows']} rows no training has seen.", "",
              f"Drift share {drift['share']:.0%}; prediction drift score {drift['prediction_score']:.3f}", "",
              "| feature | test | score | drifted |", "|---|---|---:|---|"]
    lines += [f"| {c} | {drift['methods'][c]} | {s:.4f} | {'yes' if c in drift['drifted'] else ''} |"
              for c, s in drift["scores"].items()]
    if live is not None:
        lines += ["", f"Live {metric} {live['value']:.4f} on {live['rows']} labelled predictions "
                      f"(naive baseline {live['baseline']:.4f}; champion's test {metric} {measured['champion_metric']})"]
    if result.get("training"):
        lines += ["", f"Training: {result['training']}"]
    lines += ["", f"Evidently report: {measured['report']}"]
    return "\n".join(lines)


@flow(name="monitoring")
def monitoring_flow(params_path: str = "params.yaml", trigger: Trigger = "subflow",
                    now: str | None = None) -> dict[str, Any]:
    """Accept landed batches → measure drift and live metrics → decide → record → retrain.

    trigger: how a retrain starts — `subflow` (in this process), `deployment` (the served
    training deployment, as `loopline deploy` runs it), or `none` (decide and record only).
    now: the time the decision is taken at (ISO 8601; default: the clock), for replays."""
    from pipelines.monitor import Drift, Verdict, decide
    from pipelines.tracking import client_for, monitoring_experiment

    logger = get_run_logger()
    params = load_params(params_path)
    at = datetime.fromisoformat(now) if now else datetime.now(timezone.utc)
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    batches = accept_task(params_path)
    for b in batches:
        (logger.warning if b["status"] == "rejected" else logger.info)("batch %s: %s", b["file"], describe_batch(b))
    measured = measure_task(params_path)
    client, monitoring_id = client_for(params, monitoring_experiment(params))
    if measured["status"] == "measured":
        drift = measured["drift"]
        verdict = decide(params.monitor, Drift(**drift, html=""), measured["live"], measured["champion_metric"],
                         params.metric[1], measured["new_rows"], _last_retrain(client, monitoring_id), at)
        if trigger == "none" and verdict.retrain:
            verdict = Verdict(False, verdict.triggers, ["trigger=none: decide and record only"])
    else:
        verdict = decide(params.monitor, None, None, None, True, 0, None, at)
    result = {"at": at.isoformat(timespec="seconds"), "batches": batches, "measured": measured,
              "verdict": {"outcome": verdict.outcome, "retrain": verdict.retrain, "reason": verdict.reason(),
                          "triggers": verdict.triggers, "held_back": verdict.held_back}}
    logger.info("Decision: %s — %s", verdict.outcome, verdict.reason())
    run_id = record_task(params_path, result)
    result["mlflow_run_id"] = run_id
    if verdict.retrain:
        result["training"] = _start_training(params_path, trigger)
        for key, value in result["training"].items():
            client.set_tag(run_id, f"loopline.training_{key}", str(value)[:5000])
        logger.info("Training: %s", result["training"])
    create_markdown_artifact(decision_markdown(result), key="monitoring-decision",
                             description="Batches, drift, live metric, the decision and its reasons")
    return result
