"""Registration and promotion of a search's best model: registered as `challenger`, then
promoted to `champion` only if the paired bootstrap finds it surely better than the champion
re-scored on the same test rows, and not refused by the recent labelled rows as
`promotion.recent_rule` says (pipelines/registry/evidence.py). A model identical to the
champion (the same training fingerprint) is not registered again.

Results are dataclasses; the training flow's renderer (pipelines/training/run.py) prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.layout import Layout
from pipelines.data.split import read_split
from pipelines.registry.evidence import Evidence

if TYPE_CHECKING:
    from pipelines.core.alerts import Alert


@dataclass(frozen=True)
class Challenger:
    """A search's best model as training logged it: what registration records and judges."""

    parent_run_id: str
    best_run_id: str
    best: str  # the candidate's name
    family: str
    fingerprint: str  # the training fingerprint: the same one is the same model
    model_uri: str
    metric: str
    test: dict[str, float]  # its test metrics, with the naive baseline's
    data_md5: str
    git_commit: str


@dataclass(frozen=True)
class Registration:
    """What became of a search's best model."""

    outcome: str  # promoted to champion | in shadow | kept the champion | nothing new | skipped
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


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def register_best(params: Params, challenger: Challenger) -> Registration:
    """Register the search's best model as `challenger`; promote it to `champion` only if it beats the
    champion re-scored on the same test rows. A model identical to the champion (same
    training fingerprint) is not registered again."""
    from pipelines.core.names import CHAMPION
    from pipelines.registry.card import log_card
    from pipelines.registry.champion import (
        alias_version,
        evidence_tags,
        feature_difference,
        promote_if_better,
        register,
    )
    from pipelines.registry.evidence import judge_on
    from pipelines.registry.lineage import libraries
    from pipelines.registry.tracking import client_for, load_model_version, registry_lock_target

    client, _ = client_for(params)
    name = params.tracking.model_name
    metric, higher = params.metric
    value = challenger.test[metric]
    champion = alias_version(client, name, CHAMPION)
    if (
        champion is not None
        and client.get_model_version(name, champion).tags.get(names.TRAINING_FINGERPRINT) == challenger.fingerprint
    ):
        reason = (
            f"identical to champion v{champion}: same data, params and code (training fingerprint "
            f"{challenger.fingerprint[:12]}); nothing new to register"
        )
        _set_tags(client, challenger.parent_run_id, {names.DECISION: "nothing new", names.DECISION_REASON: reason})
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
    if not challenger.model_uri:  # the search found the champion again, and the champion moved since
        reason = (
            f"the search made champion v{champion}'s model again, so it was not logged, but the champion "
            "changed before registration; run the training again"
        )
        _set_tags(client, challenger.parent_run_id, {names.DECISION: "nothing new", names.DECISION_REASON: reason})
        return Registration(
            outcome="nothing new", reason=reason, model_name=name, champion_before=champion, metric=metric
        )
    tags = {
        names.DATA_MD5: challenger.data_md5,
        names.VERSION_GIT_COMMIT: challenger.git_commit,
        names.version_metric_tag(metric): str(value),
        names.CANDIDATE: challenger.best,
        names.TRAINING_FINGERPRINT: challenger.fingerprint,
        names.LIBRARIES: libraries(),
    }
    version = register(client, name, challenger.model_uri, challenger.best_run_id, tags)
    test = read_split(params, "test", "register")
    challenger_model, challenger_meta = load_model_version(client, name, version)
    challenger_predictions = predictions_of(challenger_model, challenger_meta, test)
    target = params.data.target
    champion_features: dict[str, list[str]] = {}

    def judge(champion_version: str) -> Evidence:
        model, meta = load_model_version(client, name, champion_version)
        champion_features[champion_version] = list(meta["features"])
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

    def refuse_shadow(champion_version: str) -> str | None:
        return feature_difference(
            challenger_meta["features"], champion_features.get(champion_version, []), champion_version
        )

    decision = promote_if_better(
        client, name, version, judge, registry_lock_target(params), params.promotion.shadow, refuse_shadow
    )
    evidence = decision.evidence
    _set_tags(
        client,
        challenger.parent_run_id,
        {
            names.DECISION: "promoted" if decision.promoted else "rejected",
            names.DECISION_REASON: decision.reason[:5000],
            names.MODEL_VERSION: version,
            **(evidence_tags(evidence) if evidence else {}),
        },
    )
    card = log_card(client, params, name, version)  # after the decision, which the card reports
    return Registration(
        outcome="promoted to champion"
        if decision.promoted
        else "in shadow"
        if decision.shadow.startswith(f"v{version} serves in shadow")
        else "kept the champion",
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
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import arrival_files, read_arrivals
    from pipelines.registry.evidence import unseen

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


def skipped(challenger: Challenger, model_name: str) -> Registration:
    """The decision when the search was cached and its model is registered already."""
    return Registration(
        outcome="skipped",
        model_name=model_name,
        metric=challenger.metric,
        reason=f"data and params unchanged since MLflow run {challenger.parent_run_id}: nothing new to register",
    )


def registration_alert(params: Params, challenger: Challenger, decision: Registration) -> Alert | None:
    """What a training tells the `alerts:` targets: a new champion or a rejected challenger."""
    from pipelines.core.alerts import Alert

    if not decision.registered:
        return None
    name, version = decision.model_name, decision.version
    where = (
        f"model {name} v{version} and MLflow run {challenger.parent_run_id} in experiment "
        f"{params.tracking.experiment} ({params.tracking.uri}); `loopline card {version}`"
    )
    if decision.promoted:
        return Alert(
            event="promoted",
            title=f"{name} v{version} is the new champion",
            what=f"{challenger.best} ({challenger.family}) was promoted to champion, replacing "
            + (f"v{decision.champion_before}" if decision.champion_before else "no champion"),
            why=decision.reason,
            where=where,
            level="success",
        )
    if decision.outcome == "in shadow":
        return Alert(
            event="challenger in shadow",
            title=f"{name} v{version} serves in shadow beside champion v{decision.champion_before}",
            what=f"challenger v{version} ({challenger.best}) was not promoted on the test rows; the service "
            "scores every request with it too, and monitoring promotes or retires it on the labelled live rows",
            why=decision.reason,
            where=where,
            level="info",
        )
    return Alert(
        event="challenger rejected",
        title=f"{name} v{version} rejected; champion v{decision.champion_before} kept",
        what=f"challenger v{version} ({challenger.best}) was registered but not promoted",
        why=decision.reason,
        where=where,
        level="info",
    )
