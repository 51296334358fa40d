"""Training as the training flow runs it, in two steps, each one call from a flow task:

- `search_and_log`: every candidate trained and scored (a nested MLflow run each), the best
  model logged with its test metrics, plots and reference rows into the parent run;
- `register_best`: the best model registered as `challenger` and promoted to `champion` only
  if it beats the champion re-scored on the same test rows, and on the recent labelled rows
  as `promotion.recent_rule` says.

Results are dataclasses with one renderer (`render_training`), which the CLI and the Prefect
artifact both print.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines import names
from pipelines.config import Params
from pipelines.evidence import Evidence
from pipelines.layout import Layout
from pipelines.lineage import code_files, fingerprint
from pipelines.stages import model_metadata, read_split

if TYPE_CHECKING:
    from pipelines.alerts import Alert

SEARCH_PARAMS = ["data", "features", "train", "search", "promotion", "tracking"]
SPLITS = ("train", "val", "test")


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
class Trained:
    """A finished search: the parent MLflow run, the best candidate and its logged model."""

    parent_run_id: str
    best_run_id: str
    best: str
    family: str
    fingerprint: str
    model_uri: str
    metric: str
    val: dict[str, float]
    test: dict[str, float]
    candidates: list[CandidateRun]
    data_md5: str
    git_commit: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Registration:
    """What became of a search's best model."""

    outcome: str  # promoted to champion | kept the champion | nothing new | skipped
    reason: str
    model_name: str
    version: str | None = None
    promoted: bool = False
    registered: bool = False
    champion_before: str | None = None
    metric: str = ""
    challenger_value: float | None = None
    champion_value: float | None = None
    evidence: Evidence | None = None  # the bootstrap comparisons with the champion
    card: str | None = None  # the model card's artifact URI


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


def training_fingerprint(params: Params) -> str:
    """What a search's result depends on: the splits' bytes, the code it runs (this module
    and every loopline module it imports) and the params it reads. Tagged on every
    registered version: the same fingerprint is the same model."""
    layout = Layout.of(params)
    splits = [layout.split_file(name) for name in SPLITS]
    return fingerprint([*splits, *code_files(__name__)], SEARCH_PARAMS, params, salt="search")


def study_name(params: Params) -> str:
    """The Optuna study of a search: one per training fingerprint, so a search started again
    on the same splits, code and params resumes it (search.storage)."""
    return f"{params.tracking.model_name}-{training_fingerprint(params)[:16]}"


def lineage_tags(params: Params, params_path: str, flow_run_id: str, rows: dict[str, int]) -> dict[str, str]:
    """Where a training's data and code came from, tagged on its parent and candidate runs."""
    from pipelines.arrivals import arrival_files
    from pipelines.lineage import dvc_lock_md5, git_commit
    from pipelines.storage import file_md5
    from pipelines.tracking import run_owner

    layout = Layout.of(params)
    arrivals = arrival_files(layout.arrivals)
    tags = {
        names.GIT_COMMIT: git_commit(),
        names.CLEAN_MD5: file_md5(layout.clean),
        names.SOURCE: str(params.data.source),
        names.SOURCE_MD5: file_md5(params.data.source),
        names.INGESTED_MD5: file_md5(layout.ingested),
        names.ARRIVAL_BATCHES: len(arrivals),
        names.LAST_ARRIVAL: arrivals[-1].name if arrivals else "none",
        names.DVC_LOCK_MD5: dvc_lock_md5(layout.clean) or "none",
        **{f"data.rows_{split}": n for split, n in rows.items()},
        names.FLOW_RUN_ID: flow_run_id,
        names.PARAMS_FILE: params_path,
        names.OWNER: run_owner(),
    }
    return {key: str(value) for key, value in tags.items()}  # a tracking server takes strings only


class _CandidateLogger:
    """Logs each candidate as a nested run of the parent as the search reports it."""

    def __init__(self, client, experiment_id: str, parent_id: str, lineage: dict[str, Any], metric: str):
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.lineage, self.metric = lineage, metric
        self.runs: list[CandidateRun] = []

    def __call__(self, c) -> None:
        from pipelines.tracking import flatten, log_dict_batch, log_history

        tags = {"mlflow.parentRunId": self.parent_id, **self.lineage, names.FAMILY: c.family, names.WORKER: c.worker}
        if c.restored:
            tags[names.RESTORED] = "true"
        run_id = self.client.create_run(self.experiment_id, run_name=c.name, tags=tags).info.run_id
        estimator: Any = c.model[-1] if c.model is not None else None
        device = {"device": estimator.device_, "gpu_name": estimator.gpu_name_} if hasattr(estimator, "device_") else {}
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


def search_and_log(params: Params, params_path: str, flow_run_id: str, warn=print) -> Trained:
    """Train every candidate (a nested MLflow run each); log the best model with its test
    metrics and plots into the parent run. Registration is a separate step."""
    from pipelines.evidence import block_length
    from pipelines.search import search_candidates
    from pipelines.tracking import client_for, close_orphaned_runs, flatten, log_dict_batch

    train, val, test = (read_split(params, name, "search") for name in SPLITS)
    if params.split.order_by:  # the promotion's block length must fit the test rows: say so before training
        block_length(params.promotion, len(test))
    client, experiment_id = client_for(params)
    for run_id in close_orphaned_runs(client, experiment_id):
        warn(f"MLflow run {run_id} was left running by a training that was killed; marked KILLED")
    metric, _ = params.metric
    lineage = lineage_tags(params, params_path, flow_run_id, {"train": len(train), "val": len(val), "test": len(test)})
    parent_id = client.create_run(experiment_id, run_name=f"training-{flow_run_id[:8]}", tags=lineage).info.run_id
    log_dict_batch(
        client, parent_id, params=flatten("", params.model_dump(mode="json", by_alias=True, exclude={"table_schema"}))
    )
    log_candidate = _CandidateLogger(client, experiment_id, parent_id, lineage, metric)
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        best, _ = search_candidates(
            params, train, val, on_candidate=log_candidate, study_name=study_name(params), warn=warn
        )
        timings["search: fit and score candidates"] = time.perf_counter() - started
        best_run = next(c.run_id for c in log_candidate.runs if c.name == best.name)
        model_uri, test_metrics = _log_best(client, parent_id, best_run, best, params, (train, val, test), timings)
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


def _log_best(
    client,
    parent_id: str,
    best_run: str,
    best,
    params: Params,
    splits: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    timings: dict[str, float],
) -> tuple[str, dict[str, float]]:
    """The best candidate's model, weights, test metrics and plots, and what monitoring
    reads beside it: reference rows, feature importance, the performance estimator. The
    fitted pipeline is the search's; the test rows are predicted once, here. Each step's
    seconds go into `timings`."""
    from pipelines.card import log_slices, slice_metrics, training_facts
    from pipelines.evaluate import feature_importance, score
    from pipelines.onnx_engine import compile_model
    from pipelines.tracking import diagnostic_figures, log_dict_batch, log_figures, log_model, log_torch_weights

    train, val, test = splits
    features, target, task = params.features.columns, params.data.target, params.data.task
    clock = _Clock(timings, "log: ")
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
    importance = feature_importance(best.model, test, features, target, task, params.train.seed)
    log_monitoring_aids(
        client, best_run, best.model, dict(zip(features, importance.importances_mean, strict=True)), val, test, params
    )
    clock("importance and estimator")
    log_dict_batch(client, best_run, metrics={f"test_{k}": v for k, v in test_metrics.items()})
    log_dict_batch(
        client,
        parent_id,
        metrics={f"val_{k}": v for k, v in best.val.items()} | {f"test_{k}": v for k, v in test_metrics.items()},
        tags={names.BEST_CANDIDATE: best.name, names.BEST_RUN_ID: best_run},
    )
    figures = diagnostic_figures(best.model, test, predictions, features, target, task, params.train.seed, importance)
    log_figures(client, best_run, figures)
    clock("metrics and plots")
    slices = slice_metrics(test, predictions["predicted"].to_numpy(), params, metadata["baseline"], metadata["classes"])
    log_slices(client, best_run, slices, training_facts(train, params), params.metric[0])
    clock("slice metrics")
    return model_uri, test_metrics


class _Clock:
    """Seconds since the last call, recorded under a name."""

    def __init__(self, timings: dict[str, float], prefix: str):
        self.timings, self.prefix, self.last = timings, prefix, time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[self.prefix + step] = now - self.last
        self.last = now


def log_reference(client, run_id: str, model, train: pd.DataFrame, params: Params) -> None:
    """The rows the model was trained on (feature columns and target; a seeded sample above
    monitor.reference_rows), beside the model, and the profile of them with the model's
    predictions that monitoring's drift reads (monitor.drift_reference): made here once."""
    from pipelines.monitor import drift_reference, reference_sample

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
    from pipelines.estimate import fit_estimator

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


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def register_best(params: Params, trained: Trained) -> Registration:
    """Register the best model as `challenger`; promote it to `champion` only if it beats the
    champion re-scored on the same test rows. A model identical to the champion (same
    training fingerprint) is not registered again."""
    from pipelines.card import log_card
    from pipelines.evidence import judge_on
    from pipelines.lineage import libraries
    from pipelines.registry import CHAMPION, alias_version, evidence_tags, promote_if_better, register
    from pipelines.tracking import client_for, load_model_version, registry_lock_target

    client, _ = client_for(params)
    name = params.tracking.model_name
    metric, higher = params.metric
    value = trained.test[metric]
    champion = alias_version(client, name, CHAMPION)
    if (
        champion is not None
        and client.get_model_version(name, champion).tags.get(names.TRAINING_FINGERPRINT) == trained.fingerprint
    ):
        reason = (
            f"identical to champion v{champion}: same data, params and code (training fingerprint "
            f"{trained.fingerprint[:12]}); nothing new to register"
        )
        _set_tags(client, trained.parent_run_id, {names.DECISION: "nothing new", names.DECISION_REASON: reason})
        return Registration(
            outcome="nothing new",
            reason=reason,
            model_name=name,
            version=champion,
            champion_before=champion,
            metric=metric,
            challenger_value=value,
            champion_value=value,
        )
    tags = {
        names.DATA_MD5: trained.data_md5,
        names.VERSION_GIT_COMMIT: trained.git_commit,
        names.version_metric_tag(metric): str(value),
        names.CANDIDATE: trained.best,
        names.TRAINING_FINGERPRINT: trained.fingerprint,
        names.LIBRARIES: libraries(),
    }
    version = register(client, name, trained.model_uri, trained.best_run_id, tags)
    test = read_split(params, "test", "register")
    challenger_model, challenger_meta = load_model_version(client, name, version)
    challenger_predictions = predictions_of(challenger_model, challenger_meta, test)
    target = params.data.target

    def judge(champion_version: str) -> Evidence:
        model, meta = load_model_version(client, name, champion_version)
        champion_run = client.get_run(client.get_model_version(name, champion_version).run_id)
        recent, note = recent_rows(params, champion_run.data.tags.get(names.LAST_ARRIVAL))
        enough = len(recent) >= params.promotion.recent_min_rows
        return judge_on(
            (test[target].to_numpy(), predictions_of(model, meta, test), challenger_predictions),
            (
                recent[target].to_numpy(),
                predictions_of(model, meta, recent),
                predictions_of(challenger_model, challenger_meta, recent),
            )
            if enough
            else None,
            note,
            metric=metric,
            higher_is_better=higher,
            cfg=params.promotion,
            ordered=bool(params.split.order_by),
        )

    decision = promote_if_better(client, name, version, judge, registry_lock_target(params))
    evidence = decision.evidence
    _set_tags(
        client,
        trained.parent_run_id,
        {
            names.DECISION: "promoted" if decision.promoted else "rejected",
            names.DECISION_REASON: decision.reason[:5000],
            names.MODEL_VERSION: version,
            **(evidence_tags(evidence) if evidence else {}),
        },
    )
    card = log_card(client, params, name, version)  # after the decision, which the card reports
    return Registration(
        outcome="promoted to champion" if decision.promoted else "kept the champion",
        reason=decision.reason,
        model_name=name,
        version=version,
        promoted=decision.promoted,
        registered=True,
        champion_before=decision.champion_before,
        metric=metric,
        challenger_value=evidence.test.challenger if evidence else value,
        champion_value=evidence.test.champion if evidence else None,
        evidence=evidence,
        card=card,
    )


def recent_rows(params: Params, champion_read: str | None) -> tuple[pd.DataFrame, str]:
    """The latest monitoring window's labelled rows that neither model was fit on: from the
    last monitor.window_batches accepted batches, those the champion's training never read
    (`champion_read`: the last batch it read), less rows equal to one the challenger trained
    or validated on. With a note that says where they came from, for the evidence."""
    from pipelines.arrivals import arrival_files, read_arrivals, typed_rows
    from pipelines.evidence import unseen

    columns = list(params.table_schema.columns)
    files = arrival_files(Layout.of(params).arrivals)[-params.monitor.window_batches :]
    if champion_read is None:
        return pd.DataFrame(columns=columns), "the champion's run does not say which batches it read"
    files = [f for f in files if champion_read == "none" or f.name > champion_read]
    if not files:
        return pd.DataFrame(columns=columns), "no accepted batch since the champion's training"
    target = params.data.target
    rows = typed_rows(read_arrivals(files, columns), params).dropna(subset=[target])
    fresh = unseen(
        rows, [read_split(params, s, "register") for s in ("train", "val")], [*params.features.columns, target]
    ).reset_index(drop=True)
    left = f", less {len(rows) - len(fresh)} the challenger trained or validated on" if len(fresh) < len(rows) else ""
    return fresh, f"{len(fresh)} labelled rows of {', '.join(f.name for f in files)}{left}"


def predictions_of(model, meta: dict[str, Any], rows: pd.DataFrame):
    """A registered model's predictions on `rows` (its own input columns)."""
    return model.predict(rows[meta["features"]])


def skipped(trained: Trained, model_name: str) -> Registration:
    """The decision when the search was cached and its model is registered already."""
    return Registration(
        outcome="skipped",
        model_name=model_name,
        metric=trained.metric,
        reason=f"data and params unchanged since MLflow run {trained.parent_run_id}: nothing new to register",
    )


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


def registration_alert(params: Params, trained: Trained, decision: Registration) -> Alert | None:
    """What a training tells the `alerts:` targets: a new champion or a rejected challenger."""
    from pipelines.alerts import Alert

    if not decision.registered:
        return None
    name, version = decision.model_name, decision.version
    where = (
        f"model {name} v{version} and MLflow run {trained.parent_run_id} in experiment "
        f"{params.tracking.experiment} ({params.tracking.uri}); `loopline card {version}`"
    )
    if decision.promoted:
        return Alert(
            event="promoted",
            title=f"{name} v{version} is the new champion",
            what=f"{trained.best} ({trained.family}) was promoted to champion, replacing "
            + (f"v{decision.champion_before}" if decision.champion_before else "no champion"),
            why=decision.reason,
            where=where,
            level="success",
        )
    return Alert(
        event="challenger rejected",
        title=f"{name} v{version} rejected; champion v{decision.champion_before} kept",
        what=f"challenger v{version} ({trained.best}) was registered but not promoted",
        why=decision.reason,
        where=where,
        level="info",
    )
