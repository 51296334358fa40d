"""The training flow: the dvc.yaml data stages, a candidate search tracked in MLflow, and a
guarded registration. Wiring only: every step calls a `pipelines/` function.

Tasks pass the params file path and small summaries, never DataFrames. Each data stage is
cached on the fingerprint of its dvc.yaml inputs (file bytes, params, stage code), and the
search on the fingerprint of the splits and its params, so a re-run on unchanged data and
params skips them, and a change re-runs exactly what depends on it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from pipelines import stages
from pipelines.config import load_params
from pipelines.errors import LooplineError

DATA_STAGES = ("params", "ingest", "clean", "validate", "split")
SEARCH_CODE = [Path("pipelines") / f for f in ("search.py", "train.py", "threads.py", "features.py", "torch_model.py",
                                               "evaluate.py", "model_io.py", "tracking.py")]
REFERENCE_ARTIFACT = "reference/reference.parquet"  # the champion's training rows, for drift
SEARCH_PARAMS = ["data", "features", "train", "search", "promotion", "tracking"]


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry I/O hiccups, not bad data or config: those fail the same way every time."""
    try:
        state.result()
    except LooplineError:
        return False
    except Exception:
        return True
    return False


def _stage_key(stage: str):
    def key(context, parameters: dict[str, Any]) -> str:
        from pipelines.lineage import stage_fingerprint

        return stage_fingerprint(stage, load_params(parameters["params_path"]))
    return key


def _stage_task(stage: str):
    @task(name=stage, cache_key_fn=_stage_key(stage), persist_result=True,
          retries=2 if stage == "ingest" else 0, retry_delay_seconds=[2, 10],
          retry_condition_fn=_retry_unless_bad_input)
    def run_stage(params_path: str) -> dict[str, Any]:
        return stages.STAGES[stage](load_params(params_path))
    return run_stage


STAGE_TASKS = {stage: _stage_task(stage) for stage in DATA_STAGES}


def training_fingerprint(params) -> str:
    """What a search's result depends on: the splits' bytes, its code and the params it reads.
    Tagged on every registered version: the same fingerprint is the same model."""
    from pipelines.lineage import fingerprint

    layout = stages.Layout.of(params)
    splits = [layout.split_file(name) for name in ("train", "val", "test")]
    return fingerprint([*splits, *SEARCH_CODE], SEARCH_PARAMS, params, salt="search")


def _search_key(context, parameters: dict[str, Any]) -> str:
    """The training fingerprint and the tracking store its runs and model go to: a result
    logged to another store must not stand in for this one."""
    from pipelines.tracking import store_identity

    params = load_params(parameters["params_path"])
    return f"{training_fingerprint(params)}|{store_identity(params)}"


@task(name="search-candidates", cache_key_fn=_search_key, persist_result=True)
def search_task(params_path: str, flow_run_id: str) -> dict[str, Any]:
    """Train every candidate (a nested MLflow run each), log the best model with its test
    metrics and plots into the parent run. Registration is a separate step."""
    from pipelines.evaluate import score
    from pipelines.arrivals import arrival_files
    from pipelines.lineage import dvc_lock_md5, git_commit
    from pipelines.search import search_candidates
    from pipelines.storage import file_md5
    from pipelines.tracking import (OWNER_TAG, client_for, close_orphaned_runs, diagnostic_figures, flatten,
                                    log_dict_batch, log_figures, log_history, log_model, log_torch_weights,
                                    run_owner)

    params = load_params(params_path)
    layout = stages.Layout.of(params)
    train, val, test = (stages.read_split(params, n, "search") for n in ("train", "val", "test"))
    client, experiment_id = client_for(params)
    for run_id in close_orphaned_runs(client, experiment_id):
        get_run_logger().warning("MLflow run %s was left running by a training that was killed; marked KILLED", run_id)
    metric, _ = params.metric
    clean_md5 = file_md5(layout.clean)
    arrivals = arrival_files(layout.arrivals)
    lineage = {
        "git_commit": git_commit(), "data.clean_md5": clean_md5,
        "data.source": str(params.data.source), "data.source_md5": file_md5(params.data.source),
        "data.ingested_md5": file_md5(layout.ingested),
        "data.arrival_batches": len(arrivals), "data.last_arrival": arrivals[-1].name if arrivals else "none",
        "data.dvc_lock_md5": dvc_lock_md5(layout.clean) or "none",
        "data.rows_train": len(train), "data.rows_val": len(val), "data.rows_test": len(test),
        "prefect.flow_run_id": flow_run_id, "loopline.params_file": params_path, OWNER_TAG: run_owner(),
    }
    parent = client.create_run(experiment_id, run_name=f"training-{flow_run_id[:8]}", tags=lineage)
    parent_id = parent.info.run_id
    log_dict_batch(client, parent_id, params=flatten("", params.model_dump(mode="json", by_alias=True,
                                                                        exclude={"table_schema"})))
    candidates: list[dict[str, Any]] = []

    def log_candidate(c) -> None:
        child = client.create_run(experiment_id, run_name=c.name,
                                  tags={"mlflow.parentRunId": parent_id, **lineage, "loopline.family": c.family})
        estimator = c.model[-1]
        device = {"device": estimator.device_, "gpu_name": estimator.gpu_name_} if hasattr(estimator, "device_") else {}
        log_dict_batch(client, child.info.run_id, params=flatten("", {"family": c.family, **c.hyperparams}),
                       metrics={f"val_{k}": v for k, v in c.val.items()} | {"fit_seconds": c.fit_seconds},
                       tags=device)
        if hasattr(estimator, "history_"):
            log_history(client, child.info.run_id, estimator.history_)
        client.set_terminated(child.info.run_id)
        candidates.append({"name": c.name, "family": c.family, "run_id": child.info.run_id,
                           "val": c.val[metric], "fit_seconds": round(c.fit_seconds, 2)})

    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        best, _ = search_candidates(params, train, val, on_candidate=log_candidate)
        timings["search: fit and score candidates"] = time.perf_counter() - started
        started = time.perf_counter()
        best_run = next(c["run_id"] for c in candidates if c["name"] == best.name)
        metadata = stages.model_metadata(params, best.family, best.model, train, best.hyperparams)
        test_metrics, predictions = score(best.model, test, params.features.columns, params.data.target,
                                          params.data.task, metadata["baseline"])
        model_uri = log_model(client, best_run, best.model, train[params.features.columns].head(5), metadata)
        if hasattr(best.model[-1], "state_dict"):
            log_torch_weights(client, best_run, best.model)
        log_reference(client, best_run, train, params)
        log_dict_batch(client, best_run, metrics={f"test_{k}": v for k, v in test_metrics.items()})
        log_dict_batch(client, parent_id,
                       metrics={f"val_{k}": v for k, v in best.val.items()}
                       | {f"test_{k}": v for k, v in test_metrics.items()},
                       tags={"loopline.best_candidate": best.name, "loopline.best_run_id": best_run})
        log_figures(client, best_run, diagnostic_figures(best.model, test, predictions, params.features.columns,
                                                         params.data.target, params.data.task, params.train.seed))
        client.set_terminated(parent_id)
        timings["search: test scoring, MLflow model, plots"] = time.perf_counter() - started
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    return {"parent_run_id": parent_id, "best_run_id": best_run, "best": best.name, "family": best.family,
            "fingerprint": training_fingerprint(params),
            "model_uri": model_uri, "metric": metric, "val": best.val, "test": test_metrics,
            "candidates": candidates, "data_md5": clean_md5, "git_commit": lineage["git_commit"],
            "timings": timings}


def log_reference(client, run_id: str, train, params) -> None:
    """The rows the model was trained on (feature columns and target; a seeded sample above
    monitor.reference_rows), beside the model: monitoring compares new data with them."""
    import tempfile

    columns = [*params.features.columns, params.data.target]
    rows = train[columns]
    if len(rows) > params.monitor.reference_rows:
        rows = rows.sample(params.monitor.reference_rows, random_state=params.train.seed).sort_index()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(REFERENCE_ARTIFACT).name
        rows.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(REFERENCE_ARTIFACT).parent))


@task(name="register-and-promote", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_retry_unless_bad_input)
def register_task(params_path: str, trained: dict[str, Any]) -> dict[str, Any]:
    """Register the best model as `challenger`; promote it to `champion` only if it beats the
    champion re-scored on the same test rows."""
    from pipelines.evaluate import score
    from pipelines.registry import CHAMPION, alias_version, promote_if_better, register
    from pipelines.tracking import client_for, load_model_version, tracking_uri

    params = load_params(params_path)
    client, _ = client_for(params)
    name = params.tracking.model_name
    metric, higher = params.metric
    champion = alias_version(client, name, CHAMPION)
    if champion is not None:
        champion_tags = client.get_model_version(name, champion).tags
        if champion_tags.get("loopline.training_fingerprint") == trained["fingerprint"]:
            reason = (f"identical to champion v{champion}: same data, params and code (training fingerprint "
                      f"{trained['fingerprint'][:12]}); nothing new to register")
            client.set_tag(trained["parent_run_id"], "loopline.decision", "nothing new")
            client.set_tag(trained["parent_run_id"], "loopline.decision_reason", reason)
            return {"promoted": False, "version": champion, "champion_before": champion, "metric": metric,
                    "challenger_value": trained["test"][metric], "champion_value": trained["test"][metric],
                    "reason": reason, "model_name": name, "registered": False}
    tags = {"loopline.data_md5": trained["data_md5"], "loopline.git_commit": trained["git_commit"],
            f"loopline.test_{metric}": str(trained["test"][metric]), "loopline.candidate": trained["best"],
            "loopline.training_fingerprint": trained["fingerprint"]}
    version = register(client, name, trained["model_uri"], trained["best_run_id"], tags)
    test = stages.read_split(params, "test", "register")

    def score_version(v: str) -> float:
        model, meta = load_model_version(client, name, v)
        metrics, _ = score(model, test, meta["features"], params.data.target, params.data.task, meta["baseline"])
        return metrics[metric]

    decision = promote_if_better(client, name, version, metric, higher, params.promotion.min_improvement,
                                 trained["test"][metric], score_version, tracking_uri(params))
    client.set_tag(trained["parent_run_id"], "loopline.decision", "promoted" if decision.promoted else "rejected")
    client.set_tag(trained["parent_run_id"], "loopline.decision_reason", decision.reason)
    client.set_tag(trained["parent_run_id"], "loopline.model_version", version)
    return decision.as_dict() | {"model_name": name, "registered": True}


def summary_markdown(result: dict[str, Any]) -> str:
    trained, decision = result["trained"], result["decision"]
    metric = trained["metric"]
    lines = [f"# Training {'(cached)' if result['training_cached'] else ''}",
             f"- data (clean.parquet md5): `{trained['data_md5']}`",
             f"- git commit: `{trained['git_commit']}`",
             f"- MLflow parent run: `{trained['parent_run_id']}`", "",
             f"| candidate | family | val {metric} | fit s |", "|---|---|---:|---:|"]
    lines += [f"| {c['name']} | {c['family']} | {c['val']:.4f} | {c['fit_seconds']} |" for c in trained["candidates"]]
    lines += ["", f"Best: **{trained['best']}**, test {metric} = {trained['test'][metric]:.4f} "
                  f"(naive baseline {trained['test'][f'baseline_{metric}']:.4f})", "",
              f"Decision: **{decision['outcome']}** — {decision['reason']}"]
    return "\n".join(lines)


@task(name="record-data-version")
def record_data_version_task(params_path: str) -> str:
    from pipelines.lineage import commit_data_version

    layout = stages.Layout.of(load_params(params_path))
    return commit_data_version(params_path, list(DATA_STAGES), layout.ingested)


@flow(name="training")
def training_flow(params_path: str = "params.yaml", force: bool = False,
                  record_data_version: bool = False) -> dict[str, Any]:
    """Data stages → candidate search → register and promote only if better.
    `record_data_version`: pin the data stages' outputs in dvc.lock (`dvc commit`), as a
    retrain started by monitoring does."""
    from pipelines.lineage import stage_outputs_exist
    from pipelines.tracking import client_for, logged_run_state

    logger = get_run_logger()
    params = load_params(params_path)  # a malformed params file fails here, naming the key
    storage = stages.Layout.of(params).flow_cache.resolve()  # a Path: a local store needing no saved block
    summary: dict[str, Any] = {"stages": {}, "cached": []}
    timings: dict[str, float] = {}
    for stage in DATA_STAGES:
        rerun = force or not stage_outputs_exist(stage, params)
        started = time.perf_counter()
        state = STAGE_TASKS[stage].with_options(refresh_cache=rerun, result_storage=storage)(
            params_path, return_state=True)
        timings[stage] = time.perf_counter() - started
        if stage == "validate" and state.is_failed():
            _link_validation_report(params_path, state)
        summary["stages"][stage] = state.result()
        if state.name == "Cached":
            summary["cached"].append(stage)
    if record_data_version and params.monitor.dvc_commit:
        summary["data_version"] = record_data_version_task(params_path)
        logger.info("Data version %s", summary["data_version"])

    started = time.perf_counter()
    state = search_task.with_options(refresh_cache=force, result_storage=storage)(
        params_path, str(flow_run.id), return_state=True)
    trained = state.result()
    cached = state.name == "Cached"
    logged = logged_run_state(client_for(params)[0], trained["best_run_id"]) if cached else "registered"
    if logged == "missing":  # the cache outlived the store it was logged to
        logger.warning("Cached search result names MLflow run %s, which this store (%s) does not hold; "
                       "training again", trained["best_run_id"], params.tracking.uri)
        state = search_task.with_options(refresh_cache=True, result_storage=storage)(
            params_path, str(flow_run.id), return_state=True)
        trained, cached = state.result(), False
    if cached:
        timings["search (cached)"] = time.perf_counter() - started
    else:
        timings.update(trained["timings"])
    skipped = cached and logged == "registered"
    if skipped:
        decision = {"outcome": "skipped", "reason": "data and params unchanged since MLflow run "
                                                    f"{trained['parent_run_id']}: nothing new to register"}
        logger.info("Training skipped: %s", decision["reason"])
    else:  # new, or searched before but never registered (killed before registration)
        started = time.perf_counter()
        decision = register_task(params_path, trained)
        timings["register and promote"] = time.perf_counter() - started
        decision["outcome"] = ("promoted to champion" if decision["promoted"] else
                               "kept the champion" if decision["registered"] else "nothing new")
        logger.info("%s v%s: %s — %s", decision["model_name"], decision["version"], decision["outcome"],
                    decision["reason"])
    result = {**summary, "trained": trained, "training_cached": skipped, "decision": decision,
              "timings": {k: round(v, 3) for k, v in timings.items()}}
    create_markdown_artifact(summary_markdown(result), key="training-summary",
                             description="Data hash, candidates and the promotion decision")
    return result


def _link_validation_report(params_path: str, state) -> None:
    report = (stages.Layout.of(load_params(params_path)).validation / "report.html").resolve()
    try:
        state.result()
    except LooplineError as err:
        create_link_artifact(link=report.as_uri(), link_text="Great Expectations validation report",
                             key="validation-report", description=str(err)[:5000])
