"""The training run, as the training flow's search task calls it: every candidate trained
and scored (a nested MLflow run each), then the best model logged into the parent run with
its test metrics, plots, model card facts and what monitoring reads beside it (reference
profile, importance, the performance estimator). Registration and promotion are the next
task's (pipelines/registry/promotion.py).

Results are dataclasses with one renderer (`render_training`), which the CLI and the Prefect
artifact both print.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params, shown
from pipelines.core.fingerprint import PARAMS_MODULE, code_files, fingerprint
from pipelines.core.layout import Layout
from pipelines.data.split import SPLITS, read_split, training_rows
from pipelines.model.io import model_metadata
from pipelines.registry.promotion import Challenger, Registration

# What a fitted model depends on: the params the search reads (the promotion metric ranks
# the candidates) and the code that fits and scores them, found from the search's imports.
SEARCH_PARAMS = ["data", "features", "train", "search", "promotion.metric"]
SEARCH_CODE = "pipelines.training.search"


@dataclass(frozen=True)
class CandidateRun:
    name: str
    family: str
    run_id: str
    val: float  # the promotion metric on the validation rows
    fit_seconds: float
    worker: str = ""  # where it was fitted (execution:)
    restored: bool = False  # finished by an earlier, interrupted search of the stored study


@dataclass(frozen=True)
class Trained(Challenger):
    """A finished search: the parent MLflow run, the best candidate and its logged model,
    every candidate, and where the time went."""

    val: dict[str, float] = field(default_factory=dict)
    candidates: list[CandidateRun] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingResult:
    """What the training flow returns."""

    stages: dict[str, dict[str, Any]]
    cached: list[str]  # data stages answered from Prefect's cache
    trained: Trained
    training_cached: bool  # the search was cached and its model already registered
    decision: Registration
    timings: dict[str, float]
    data_version: str | None = None


def check_execution(params: Params) -> None:
    """Refuse what a cluster cannot do, before anything starts: workers on other machines
    cannot reach a tracking store that is a SQLite file on this one."""
    from pipelines.core.errors import LooplineError
    from pipelines.registry.tracking import tracking_uri

    address = params.execution.dask.address
    uri = tracking_uri(params)
    if params.execution.runner == "dask" and address and uri.startswith("sqlite:"):
        raise LooplineError(
            "execution",
            f"execution.dask.address is a cluster ({address}) but tracking.uri is a SQLite file on this machine "
            f"({uri}): a cluster's work must be tracked where the whole team can reach it. Point tracking.uri "
            "(or MLFLOW_TRACKING_URI) at an MLflow server (`loopline tracking-server`, http://…), or leave "
            "execution.dask.address empty to run a LocalCluster on this machine",
        )


def training_fingerprint(params: Params) -> str:
    """What a fitted model depends on: the splits' bytes, the code the search runs to fit and
    score candidates (pipelines.training.search and every module it imports; not what logs,
    renders or alerts) and the params it reads. Tagged on every registered version: the same
    fingerprint is the same model. It keys the search's cache too."""
    layout = Layout.of(params)
    splits = [layout.split_file(name) for name in SPLITS]
    return fingerprint([*splits, *code_files(SEARCH_CODE, skip=(PARAMS_MODULE,))], SEARCH_PARAMS, params, salt="search")


def study_name(params: Params) -> str:
    """The Optuna study of a search: one per training fingerprint, so a search started again
    on the same splits, code and params resumes it (search.storage)."""
    return f"{params.tracking.model_name}-{training_fingerprint(params)[:16]}"


def lineage_tags(params: Params, params_path: str, flow_run_id: str, rows: dict[str, int]) -> dict[str, str]:
    """Where a training's data and code came from, tagged on its parent and candidate runs."""
    from pipelines.core.storage import path_md5
    from pipelines.data.ingest import arrival_files
    from pipelines.registry.lineage import dvc_lock_md5, git_commit
    from pipelines.registry.tracking import run_owner

    layout = Layout.of(params)
    arrivals = arrival_files(layout.arrivals)
    tags = {
        names.GIT_COMMIT: git_commit(),
        names.CLEAN_MD5: path_md5(layout.clean),
        names.SOURCE: str(params.data.source),
        names.SOURCE_MD5: path_md5(params.data.source),
        names.INGESTED_MD5: path_md5(layout.ingested),
        names.ARRIVAL_BATCHES: len(arrivals),
        names.LAST_ARRIVAL: arrivals[-1].name if arrivals else "none",
        names.DVC_LOCK_MD5: dvc_lock_md5(layout.clean) or "none",
        **{names.rows_tag(split): n for split, n in rows.items()},
        names.FLOW_RUN_ID: flow_run_id,
        names.PARAMS_FILE: params_path,
        names.OWNER: run_owner(),
    }
    return {key: str(value) for key, value in tags.items()}  # a tracking server takes strings only


class _CandidateLogger:
    """Logs each candidate as a nested run of the parent as the search reports it."""

    def __init__(
        self,
        client,
        experiment_id: str,
        parent_id: str,
        lineage: dict[str, Any],
        metric: str,
        advance: Callable[..., None] = lambda **_: None,
    ):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.lineage, self.metric, self.advance = lineage, metric, advance
        self.runs: list[CandidateRun] = []

    def __call__(self, c) -> None:
        from pipelines.registry.tracking import flatten, log_dict_batch, log_history

        tags = {names.PARENT_RUN: self.parent_id, **self.lineage, names.FAMILY: c.family, names.WORKER: c.worker}
        if c.restored:
            tags[names.RESTORED] = "true"
        run_id = self.client.create_run(self.experiment_id, run_name=c.name, tags=tags).info.run_id
        estimator: Any = c.model[-1] if c.model is not None else None
        device = (
            {names.DEVICE: estimator.device_, names.GPU_NAME: estimator.gpu_name_}
            if hasattr(estimator, "device_")
            else {}
        )
        log_dict_batch(
            self.client,
            run_id,
            params=flatten("", {"family": c.family, **c.hyperparams}),
            metrics={f"val_{k}": v for k, v in c.val.items()} | {"fit_seconds": c.fit_seconds},
            tags=device,
        )
        if hasattr(estimator, "history_"):
            log_history(self.client, run_id, estimator.history_)
        self.client.set_terminated(run_id)
        self.runs.append(
            CandidateRun(c.name, c.family, run_id, c.val[self.metric], round(c.fit_seconds, 2), c.worker, c.restored)
        )
        self.advance(note=f"{c.name} val {self.metric} {c.val[self.metric]:.4g}")


def search_and_log(params: Params, params_path: str, flow_run_id: str, warn=print) -> Trained:
    """Train every candidate (a nested MLflow run each); log the best model with its test
    metrics and plots into the parent run. Registration is a separate step."""
    from pipelines.core.progress import progress
    from pipelines.registry.evidence import block_length
    from pipelines.registry.tracking import client_for, close_orphaned_runs, flatten, log_dict_batch
    from pipelines.training.search import search_candidates

    train, sampled = training_rows(params, "search")
    val, test = (read_split(params, name, "search") for name in SPLITS[1:])
    if params.split.order_by:  # the promotion's block length must fit the test rows: say so before training
        block_length(params.promotion, len(test))
    client, experiment_id = client_for(params)
    for run_id in close_orphaned_runs(client, experiment_id):
        warn(f"MLflow run {run_id} was left running by a training that was killed; marked KILLED")
    metric, _ = params.metric
    lineage = lineage_tags(params, params_path, flow_run_id, {"train": len(train), "val": len(val), "test": len(test)})
    if sampled is not None:
        lineage[names.TRAIN_SAMPLE] = sampled
        warn(f"the search fits on {sampled}")
    parent_id = client.create_run(experiment_id, run_name=f"training-{flow_run_id[:8]}", tags=lineage).info.run_id
    log_dict_batch(client, parent_id, params=flatten("", shown(params, exclude={"table_schema"})))
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        total = len(params.search.families) + params.search.n_trials
        with progress("search", total, "candidates") as advance:
            log_candidate = _CandidateLogger(client, experiment_id, parent_id, lineage, metric, advance)
            best, _ = search_candidates(
                params, train, val, on_candidate=log_candidate, study_name=study_name(params), warn=warn
            )
        timings["search: fit and score candidates"] = time.perf_counter() - started
        best_run = next(c.run_id for c in log_candidate.runs if c.name == best.name)
        same = identical_champion(client, params, best.name)
        if same is not None:  # registration will say "nothing new": log nothing it would throw away
            model_uri, test_metrics = "", _score_only(best, params, train, test)
            warn(f"{best.name} is champion v{same} again (same training fingerprint): not logged a second time")
            timings["log: skipped, identical to the champion"] = 0.0
        else:
            with progress(f"log {best.name}", LOG_STEPS, "steps") as advance:
                model_uri, test_metrics = _log_best(
                    client, parent_id, best_run, best, params, (train, val, test), _Clock(timings, "log: ", advance)
                )
        log_dict_batch(
            client,
            parent_id,
            metrics={f"val_{k}": v for k, v in best.val.items()} | {f"test_{k}": v for k, v in test_metrics.items()},
            tags={names.BEST_CANDIDATE: best.name, names.BEST_RUN_ID: best_run},
        )
        client.set_terminated(parent_id)
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    return Trained(
        parent_run_id=parent_id,
        best_run_id=best_run,
        best=best.name,
        family=best.family,
        fingerprint=training_fingerprint(params),
        model_uri=model_uri,
        metric=metric,
        val=best.val,
        test=test_metrics,
        candidates=log_candidate.runs,
        data_md5=lineage[names.CLEAN_MD5],
        git_commit=lineage[names.GIT_COMMIT],
        timings=timings,
    )


def identical_champion(client, params: Params, best: str) -> str | None:
    """The champion's version when it was trained from the same fingerprint (data, params and
    search code) and is the same candidate: the search made it again."""
    from pipelines.registry.champion import alias_version

    name = params.tracking.model_name
    version = alias_version(client, name, names.CHAMPION)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    same = tags.get(names.TRAINING_FINGERPRINT) == training_fingerprint(params) and tags.get(names.CANDIDATE) == best
    return version if same else None


def _score_only(best, params: Params, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    from pipelines.core.metrics import naive_baseline
    from pipelines.model.evaluation import score

    features, target, task = params.features.columns, params.data.target, params.data.task
    metrics, _ = score(best.model, test, features, target, task, naive_baseline(train[target], task))
    return metrics


def _log_best(
    client,
    parent_id: str,
    best_run: str,
    best,
    params: Params,
    splits: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    clock: _Clock,
) -> tuple[str, dict[str, float]]:
    """The best candidate's model, weights, test metrics and plots, and what monitoring
    reads beside it: reference rows, feature importance, the performance estimator. The
    fitted pipeline is the search's; the test rows are predicted once, here. Each step's
    seconds go to `clock`, which shows it done."""
    from pipelines.model.evaluation import feature_importance, score
    from pipelines.model.onnx_engine import compile_model
    from pipelines.registry.card import log_slices, slice_metrics, training_facts
    from pipelines.registry.tracking import (
        diagnostic_figures,
        log_dict_batch,
        log_figures,
        log_model,
        log_torch_weights,
    )

    train, val, test = splits
    features, target, task = params.features.columns, params.data.target, params.data.task
    metadata = model_metadata(params, best.family, best.model, train, best.hyperparams)
    test_metrics, predictions = score(best.model, test, features, target, task, metadata["baseline"])
    clock("test scoring")
    files, compiled = compile_model(best.model, params, train)
    metadata["onnx"] = compiled
    clock("ONNX form and parity")
    model_uri = log_model(client, best_run, best.model, train[features].head(5), metadata, files)
    if hasattr(best.model[-1], "state_dict"):
        log_torch_weights(client, best_run, best.model)
    clock("MLflow model")
    log_reference(client, best_run, best.model, train, params)
    clock("drift reference and profile")
    importance = feature_importance(
        best.model, test, features, target, task, params.train.seed, params.train.importance_rows
    )
    log_monitoring_aids(
        client, best_run, best.model, dict(zip(features, importance.importances_mean, strict=True)), val, test, params
    )
    clock("importance and estimator")
    log_dict_batch(client, best_run, metrics={f"test_{k}": v for k, v in test_metrics.items()})
    figures = diagnostic_figures(predictions, features, target, task, importance)
    log_figures(client, best_run, figures)
    clock("metrics and plots")
    slices = slice_metrics(test, predictions["predicted"].to_numpy(), params, metadata["baseline"], metadata["classes"])
    log_slices(client, best_run, slices, training_facts(train, params), params.metric[0])
    clock("slice metrics")
    return model_uri, test_metrics


LOG_STEPS = 7  # the steps of _log_best, each a line of the progress display


class _Clock:
    """Seconds since the last call, recorded under a name, and the step shown as done."""

    def __init__(self, timings: dict[str, float], prefix: str, advance: Callable[..., None] = lambda **_: None):
        self.timings, self.prefix, self.advance, self.last = timings, prefix, advance, time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[self.prefix + step] = now - self.last
        self.advance(note=f"{step} ({now - self.last:.1f} s)")
        self.last = now


def log_reference(client, run_id: str, model, train: pd.DataFrame, params: Params) -> None:
    """The rows the model was trained on (feature columns and target; a seeded sample above
    monitor.reference_rows), beside the model, and the profile of them with the model's
    predictions that monitoring's drift reads (monitor.drift_reference): made here once."""
    from pipelines.monitoring.drift import drift_reference, reference_sample

    rows = reference_sample(train[[*params.features.columns, params.data.target]], params)
    artifacts = {names.REFERENCE_ARTIFACT: rows}
    if params.monitor.reference_profile_rows:
        artifacts[names.profile_artifact(params.monitor.reference_profile_rows)] = drift_reference(rows, model, params)
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, frame in artifacts.items():
            path = Path(tmp) / Path(artifact).name
            frame.to_parquet(path, index=False)
            client.log_artifact(run_id, str(path), str(Path(artifact).parent))


def log_monitoring_aids(
    client, run_id: str, model, importance: dict[str, float], val: pd.DataFrame, test: pd.DataFrame, params: Params
) -> None:
    """Beside the reference rows: the permutation importance per feature (the drift
    trigger's weights) and NannyML's performance estimator fitted on the held-out rows (or,
    as a tag, why there is none)."""
    from pipelines.monitoring.estimate import fit_estimator

    estimator, detail = fit_estimator(model, pd.concat([val, test], ignore_index=True), params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(names.IMPORTANCE_ARTIFACT).name
        path.write_text(json.dumps({k: float(v) for k, v in importance.items()}, indent=1))
        client.log_artifact(run_id, str(path), str(Path(names.IMPORTANCE_ARTIFACT).parent))
        if estimator is not None:
            path = Path(tmp) / Path(names.ESTIMATOR_ARTIFACT).name
            path.write_bytes(estimator.dumps())
            client.log_artifact(run_id, str(path), str(Path(names.ESTIMATOR_ARTIFACT).parent))
    client.set_tag(run_id, names.ESTIMATE, detail)


def render_training(result: TrainingResult) -> str:
    """The training flow's result as Markdown that also reads as plain text: the CLI prints
    it, the Prefect artifact shows it."""
    trained, decision, metric = result.trained, result.decision, result.trained.metric
    rows = [
        f"| {c.name} | {c.family} | {c.val:.4f} | {c.fit_seconds} | {c.worker}{' (restored)' if c.restored else ''} |"
        for c in trained.candidates
    ]
    outcome = (
        f"training skipped: {decision.reason}"
        if decision.outcome == "skipped"
        else f"{decision.model_name} v{decision.version}: {decision.outcome} — {decision.reason}"
    )
    if decision.card:
        outcome += f"\n\nmodel card: [{decision.card}]({decision.card}) (`loopline card {decision.version}`)"
    return "\n\n".join(
        [
            f"cached stages: {', '.join(result.cached) or 'none'}"
            + (" (and the search)" if result.training_cached else ""),
            f"data: clean.parquet md5 `{trained.data_md5}`; git commit `{trained.git_commit}`; "
            f"MLflow parent run `{trained.parent_run_id}`",
            "\n".join([f"| candidate | family | val {metric} | fit s | fitted on |", "|---|---|---:|---:|---|", *rows]),
            f"best: {trained.best}  test {metric}={trained.test[metric]:.4f} "
            f"(naive baseline {trained.test[f'baseline_{metric}']:.4f})",
            outcome,
        ]
    )
