"""The shadow judged on live traffic: the labelled requests that both the champion and the
shadow answered, compared with the same paired block bootstrap as the test rows.

Each monitoring run pairs the labels it joined (label files, landed batches) with the
shadow's answers to the same request ids in the prediction log and adds them to the
shadow's pairs file (`<paths.data>/monitoring/shadow/<model>-v<N>.parquet`: one row per
request id, kept across runs and log pruning). Once there are `promotion.shadow_min_rows`
pairs, a shadow surely better than the champion on them is promoted, one surely worse is
retired; a shadow still undecided after `promotion.shadow_max_days` is retired too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.layout import Layout
from pipelines.monitoring.drift import PREDICTION
from pipelines.registry.evidence import Comparison, compare

PAIR_COLUMNS = ["request_id", "ts", "truth", "champion", "shadow", "champion_version"]


@dataclass(frozen=True)
class ShadowJudgement:
    """What a monitoring run made of the shadow."""

    shadow: str  # its version
    champion: str
    outcome: str  # promoted | retired | kept
    reason: str
    pairs: int  # labelled live rows both answered, so far
    new_pairs: int  # ... of them from this run
    live: Comparison | None  # None: fewer than two pairs
    test: str = ""  # the shadow's test-row interval, as its registration recorded it

    def describe(self) -> str:
        return f"shadow v{self.shadow}: {self.outcome} — {self.reason}"


def pairs_file(params: Params, version: str) -> Path:
    return Layout.of(params).monitoring / "shadow" / f"{params.tracking.model_name}-v{version}.parquet"


def live_pairs(params: Params, location, answered: pd.DataFrame, champion: str, shadow: str) -> pd.DataFrame:
    """The shadow's pairs file with this run's labelled answers added: each labelled request the
    champion `champion` answered (`answered`: request_id, ts, model_version, prediction, the
    target) paired with the shadow `shadow`'s answer to the same request id. Written back
    atomically; in time order."""
    from pipelines.core.storage import write_parquet
    from pipelines.monitoring.prediction_log import read_answers

    path = pairs_file(params, shadow)
    known = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=PAIR_COLUMNS)
    target = params.data.target
    mine = answered[answered["model_version"].astype(str) == str(champion)] if len(answered) else answered
    if len(mine):
        mine = mine.drop_duplicates("request_id", keep="last")
        theirs = read_answers(location, [], request_ids=mine["request_id"].astype(str).tolist(), role="shadow")
        theirs = theirs[theirs["model_version"].astype(str) == str(shadow)].drop_duplicates("request_id", keep="last")
        both = mine.merge(theirs[["request_id", PREDICTION]], on="request_id", suffixes=("", "_shadow"))
        fresh = pd.DataFrame(
            {
                "request_id": both["request_id"].astype(str),
                "ts": both["ts"].astype(str),
                "truth": both[target].to_numpy(),
                "champion": both[PREDICTION].to_numpy(),
                "shadow": both[f"{PREDICTION}_shadow"].to_numpy(),
                "champion_version": str(champion),
            }
        )
        fresh = fresh[~fresh["request_id"].isin(known["request_id"])]
        if len(fresh):
            merged = (
                pd.concat([known.astype(fresh.dtypes.to_dict()), fresh], ignore_index=True) if len(known) else fresh
            )
            known = merged.sort_values("ts", kind="stable").reset_index(drop=True)
            write_parquet(known, path)
    return known


def judge_shadow(
    params: Params, pairs: pd.DataFrame, new_pairs: int, shadow: str, champion: str, since: datetime, at: datetime
) -> ShadowJudgement:
    """The rule: promoted when surely better on at least promotion.shadow_min_rows pairs,
    retired when surely worse on them or when promotion.shadow_max_days have passed, else kept."""
    cfg = params.promotion
    metric, higher = params.metric
    mine = pairs[pairs["champion_version"].astype(str) == str(champion)] if len(pairs) else pairs
    live = None
    if len(mine) >= 2:
        truth, ours, theirs = (mine[c].to_numpy() for c in ("truth", "champion", "shadow"))
        if params.data.task == "regression":
            truth, ours, theirs = (np.asarray(a, dtype="float64") for a in (truth, ours, theirs))
        cfg_live = cfg.model_copy(update={"block_length": min(cfg.block_length, len(mine))})
        live = compare(truth, ours, theirs, metric=metric, higher_is_better=higher, cfg=cfg_live, ordered=True)
    rows = len(mine)
    enough = rows >= cfg.shadow_min_rows
    age = at - since
    evidence = f"{live.describe()} ({rows} live shadow rows)" if live is not None else f"{rows} live shadow rows"
    if enough and live is not None and live.better:
        outcome, reason = "promoted", f"surely better than champion v{champion} on live shadow rows: {evidence}"
    elif enough and live is not None and live.worse:
        outcome, reason = "retired", f"surely worse than champion v{champion} on live shadow rows: {evidence}"
    elif age > timedelta(days=cfg.shadow_max_days):
        outcome = "retired"
        reason = (
            f"not shown better within promotion.shadow_max_days {cfg.shadow_max_days:g} "
            f"(in shadow since {since.isoformat(timespec='seconds')}): {evidence}"
        )
    else:
        wait = "" if enough else f"; waiting for promotion.shadow_min_rows {cfg.shadow_min_rows}"
        outcome, reason = "kept", f"{evidence}{wait}"
    return ShadowJudgement(shadow, champion, outcome, reason, rows, new_pairs, live)


def shadow_since(tag: str | None, fallback: datetime) -> datetime:
    """When a version became the shadow, from its SHADOW_SINCE tag ("<at>: <why>")."""
    if not tag:
        return fallback
    try:
        when = datetime.fromisoformat(tag.split(": ", 1)[0])
    except ValueError:
        return fallback
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def settle_shadow(params: Params, location, answered: pd.DataFrame, at: datetime) -> ShadowJudgement | None:
    """Pair this run's labelled answers with the shadow's, judge, and act on the registry:
    promote (with the live evidence in the tags) or retire, under the registry lock and only
    if neither alias moved meanwhile. None when there is no shadow."""
    from pipelines.registry.champion import alias_version, end_shadow, live_evidence_tags, promote_shadow
    from pipelines.registry.tracking import client_for, registry_lock_target

    client, _ = client_for(params)
    name = params.tracking.model_name
    shadow = alias_version(client, name, names.SHADOW)
    champion = alias_version(client, name, names.CHAMPION)
    if shadow is None or champion is None:
        return None
    before = pairs_file(params, shadow)
    known = len(pd.read_parquet(before, columns=["request_id"])) if before.is_file() else 0
    pairs = live_pairs(params, location, answered, champion, shadow)
    version = client.get_model_version(name, shadow)
    since = shadow_since(version.tags.get(names.SHADOW_SINCE), at)
    judged = judge_shadow(params, pairs, len(pairs) - known, shadow, champion, since, at)
    test = version.tags.get(names.EVIDENCE_INTERVAL, "")
    judged = ShadowJudgement(**{**vars(judged), "test": test})
    if judged.outcome == "promoted":
        assert judged.live is not None
        promote_shadow(
            client,
            name,
            shadow,
            champion,
            judged.describe(),
            live_evidence_tags(judged.live),
            registry_lock_target(params),
        )
    elif judged.outcome == "retired":
        from pipelines.registry.champion import registry_lock

        with registry_lock(registry_lock_target(params)):
            if alias_version(client, name, names.SHADOW) == shadow:
                end_shadow(client, name, shadow, f"retired: {judged.reason}")
    return judged
