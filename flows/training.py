"""The training flow: the dvc.yaml data stages, a candidate search tracked in MLflow, and a
guarded registration. Wiring only: every task is one call of a `pipelines/` function, as the
matching dvc.yaml stage is.

The params file is read once, by the flow, and the validated params are passed down. Tasks
pass small summaries, never DataFrames. Each data stage is cached on the fingerprint of its
dvc.yaml inputs (file bytes, params, stage code), and the search on the fingerprint of the
splits, its code and its params, so a re-run on unchanged data and params skips them, and a
change re-runs exactly what depends on it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.hooks import alert_failed_run, quiet_cancellation
from pipelines.core.config import Params, load_params
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.stages import DATA_STAGES, run_stage
from pipelines.registry.promotion import Registration, registration_alert, skipped
from pipelines.training.run import Trained, TrainingResult, check_execution, render_training


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
        from pipelines.core.fingerprint import stage_fingerprint

        return stage_fingerprint(stage, parameters["params"])

    return key


def _stage_task(stage: str):
    @task(
        name=stage,
        cache_key_fn=_stage_key(stage),
        persist_result=True,
        retries=2 if stage == "ingest" else 0,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=_retry_unless_bad_input,
    )
    def stage_task(params: Params) -> dict[str, Any]:
        return run_stage(stage, params)

    return stage_task


STAGE_TASKS = {stage: _stage_task(stage) for stage in DATA_STAGES}


def _search_key(context, parameters: dict[str, Any]) -> str:
    """The training fingerprint and the tracking store its runs and model go to: a result
    logged to another store must not stand in for this one."""
    from pipelines.registry.tracking import store_identity
    from pipelines.training.run import training_fingerprint

    params = parameters["params"]
    return f"{training_fingerprint(params)}|{store_identity(params)}"


@task(name="search-candidates", cache_key_fn=_search_key, persist_result=True)
def search_task(params: Params, params_path: str, flow_run_id: str) -> Trained:
    """Train every candidate and log the best model (pipelines.training.search_and_log)."""
    from pipelines.training.run import search_and_log

    return search_and_log(params, params_path, flow_run_id, warn=get_run_logger().warning)


@task(name="register-and-promote", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_bad_input)
def register_task(params: Params, trained: Trained) -> Registration:
    """Register the best model; promote it only if better (pipelines.training.register_best)."""
    from pipelines.registry.promotion import register_best

    return register_best(params, trained)


@task(name="record-data-version")
def record_data_version_task(params: Params, params_path: str) -> str:
    from pipelines.registry.lineage import commit_data_version

    return commit_data_version(params_path, list(DATA_STAGES), Layout.of(params).ingested)


@flow(name="training", on_failure=[alert_failed_run])
def training_flow(
    params_path: str = "params.yaml", force: bool = False, record_data_version: bool | None = None
) -> TrainingResult:
    """Data stages → candidate search → register and promote only if better.
    `record_data_version`: pin the data stages' outputs in dvc.lock and the DVC cache (`dvc
    commit`, in the DVC workspace of the params file, with monitor.dvc_commit); by default
    whenever a data stage ran, so that every version's data can be checked out again
    (`loopline reproduce`)."""
    quiet_cancellation()
    logger = get_run_logger()
    params = load_params(params_path)  # once per run; a malformed file fails here, naming the key
    check_execution(params)
    storage = Layout.of(params).flow_cache.resolve()  # a Path: a local store needing no saved block
    outputs, cached, timings = _data_stages(params, force, storage)
    data_version = None
    if record_data_version is None:
        record_data_version = len(cached) < len(DATA_STAGES)
    if record_data_version and params.monitor.dvc_commit:
        data_version = record_data_version_task(params, params_path)
        logger.info("Data version %s", data_version)

    started = time.perf_counter()
    trained, search_cached, logged = _search(params, params_path, force, storage)
    if search_cached:
        timings["search (cached)"] = time.perf_counter() - started
    else:
        timings.update(trained.timings)
    if search_cached and logged == "registered":
        decision = skipped(trained, params.tracking.model_name)
        logger.info("Training skipped: %s", decision.reason)
    else:  # new, or searched before but never registered (killed before registration)
        started = time.perf_counter()
        decision = register_task(params, trained)
        timings["register and promote"] = time.perf_counter() - started
        logger.info("%s v%s: %s — %s", decision.model_name, decision.version, decision.outcome, decision.reason)
    result = TrainingResult(
        stages=outputs,
        cached=cached,
        trained=trained,
        training_cached=search_cached and logged == "registered",
        decision=decision,
        timings={k: round(v, 3) for k, v in timings.items()},
        data_version=data_version,
    )
    create_markdown_artifact(
        render_training(result), key="training-summary", description="Data hash, candidates and the promotion decision"
    )
    alert = registration_alert(params, trained, decision)
    if alert is not None:
        from pipelines.core.alerts import send

        send(params.alerts, alert, warn=logger.warning)
    return result


def _data_stages(params: Params, force: bool, storage) -> tuple[dict[str, Any], list[str], dict[str, float]]:
    """The dvc.yaml data stages in order; a stage whose outputs were deleted runs again."""
    from pipelines.core.fingerprint import stage_outputs_exist

    outputs: dict[str, Any] = {}
    cached: list[str] = []
    timings: dict[str, float] = {}
    for stage in DATA_STAGES:
        rerun = force or not stage_outputs_exist(stage, params)
        started = time.perf_counter()
        state = STAGE_TASKS[stage].with_options(refresh_cache=rerun, result_storage=storage)(params, return_state=True)
        timings[stage] = time.perf_counter() - started
        if stage == "validate" and state.is_failed():
            _link_validation_report(params, state)
        outputs[stage] = state.result()
        if state.name == "Cached":
            cached.append(stage)
    return outputs, cached, timings


def _search(params: Params, params_path: str, force: bool, storage) -> tuple[Trained, bool, str]:
    """The search's result, whether it came from the cache, and what this tracking store
    holds of it (a cached result is trusted only if its run is in this store)."""
    from pipelines.registry.tracking import client_for, logged_run_state

    state = search_task.with_options(refresh_cache=force, result_storage=storage)(
        params, params_path, str(flow_run.id), return_state=True
    )
    trained = state.result()
    if state.name != "Cached":
        return trained, False, "new"
    logged = logged_run_state(client_for(params)[0], trained.best_run_id)
    if logged != "missing":
        return trained, True, logged
    get_run_logger().warning(
        "Cached search result names MLflow run %s, which this store (%s) does not hold; training again",
        trained.best_run_id,
        params.tracking.uri,
    )
    state = search_task.with_options(refresh_cache=True, result_storage=storage)(
        params, params_path, str(flow_run.id), return_state=True
    )
    return state.result(), False, "new"


def _link_validation_report(params: Params, state) -> None:
    report = (Layout.of(params).validation / "report.html").resolve()
    try:
        state.result()
    except LooplineError as err:
        create_link_artifact(
            link=report.as_uri(),
            link_text="Great Expectations validation report",
            key="validation-report",
            description=str(err)[:5000],
        )
