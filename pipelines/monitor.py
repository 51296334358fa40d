"""Monitoring measurements and the retraining decision, as plain functions.

Drift is Evidently 0.7's: its DataDriftPreset picks a test per column (by type and size) and
its per-column tests say which features drifted; a ValueDrift on the model's predictions
measures prediction drift. The live metric compares the predictions the service actually
returned (the prediction log) with ground truth that arrived later, joined by request id or
by time key; labelled rows no served prediction answers are scored by the champion now
(the offline metric), so labels without ids still count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import MonitorConfig, Params
from pipelines.errors import LooplineError
from pipelines.estimate import Estimate

STAGE = "monitor"
PREDICTION = "prediction"
REFERENCE_ROWS = "reference_rows"


@dataclass(frozen=True)
class Drift:
    share: float  # share of features Evidently finds drifted
    drifted: list[str]
    scores: dict[str, float]  # per feature: the score of the test Evidently chose
    methods: dict[str, str]
    prediction_score: float
    prediction_drifted: bool
    html: str = field(repr=False)
    snapshot: str = field(default="", repr=False)  # the Evidently snapshot, as JSON (the dashboard's)
    # What the trigger reads: each feature's weight (its share of the champion's importance
    # among the features that count; 0 for features expected to drift) and the weight of
    # the drifted ones.
    weights: dict[str, float] = field(default_factory=dict)
    weighted_share: float = 0.0
    weighting: str = ""  # how the weights were set, in words

    @property
    def counted_drifted(self) -> list[str]:
        return [c for c in self.drifted if self.weights.get(c, 0.0) > 0]

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("html", "snapshot")}


def expected_drift(params: Params) -> list[str]:
    """Features that drift by construction: the cyclical ones (hour, month, weekday) and
    the columns `schema:` marks `expected_drift: true`."""
    schema = params.table_schema.columns
    return [c for c in params.features.columns if c in params.features.cyclical or schema[c].expected_drift]


def drift_weights(params: Params, importance: dict[str, float] | None) -> tuple[dict[str, float], str]:
    """Each feature's weight in the drift trigger (summing to 1 over the counted features),
    and how they were set."""
    cfg, features = params.monitor, params.features.columns
    expected = [] if cfg.count_expected_drift else expected_drift(params)
    counted = [c for c in features if c not in expected]
    how = f"{', '.join(expected)} expected to drift, not counted; " if expected else ""
    raw = {c: 1.0 for c in counted}
    if cfg.weight_by_importance and importance:
        raw = {c: max(float(importance.get(c, 0.0)), 0.0) for c in counted}
        how += "weighted by the champion's permutation importance"
    else:
        how += "equal weights" + ("" if cfg.weight_by_importance is False else " (the champion logged no importance)")
    total = sum(raw.values())
    if total <= 0:  # nothing the model uses is counted: equal weights keep drift visible
        raw, how = {c: 1.0 for c in counted}, how + " (all zero: equal weights)"
        total = float(len(counted)) or 1.0
    return {c: raw.get(c, 0.0) / total for c in features}, how


def reference_sample(rows: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The rows a model keeps as its drift reference: a seeded sample above monitor.reference_rows."""
    if len(rows) > params.monitor.reference_rows:
        return rows.sample(params.monitor.reference_rows, random_state=params.train.seed).sort_index()
    return rows


def drift_reference(reference: pd.DataFrame, model, params: Params) -> pd.DataFrame:
    """What drift compares every window with, for one model: its reference rows' features
    and its predictions on them, as a profile of monitor.reference_profile_rows rows (0:
    every row). It depends on the model alone, so it is made once per model. Its
    attrs["reference_rows"] (kept in Parquet) says how many rows it stands for."""
    features = params.features.columns
    frame = reference[features].assign(**{PREDICTION: np.asarray(model.predict(reference[features]))})
    rows = params.monitor.reference_profile_rows
    profile = reference_profile(frame, rows) if rows else frame.reset_index(drop=True)
    profile.attrs[REFERENCE_ROWS] = len(frame)
    return profile


def reference_profile(reference: pd.DataFrame, rows: int) -> pd.DataFrame:
    """`rows` rows in which each column, on its own, has the distribution of that column of
    `reference` (the frame itself when it has no more rows). Drift is tested column by
    column, so this is all Evidently reads, at a cost that no longer grows with the reference:
    - a column with at most rows/10 distinct values keeps every value, repeated in proportion
      to its count (largest remainder, at least once): each value's share, and so every
      binned share Jensen-Shannon and chi-square read, moves by less than 1/rows;
    - a numeric column with more keeps `rows` evenly spaced quantiles, each a value of the
      reference (inverted CDF): the Wasserstein distance to any window moves by at most the
      reference's range over `rows`, its standard deviation (the norm) as little;
    - missing values keep their share.
    Columns are sorted independently, so a row means nothing as a whole: for drift only."""
    if len(reference) <= rows:
        return reference.reset_index(drop=True)
    return pd.DataFrame({name: _column_profile(column, rows) for name, column in reference.items()})


def _column_profile(column: pd.Series, rows: int) -> pd.Series:
    present = column.dropna()
    if present.empty:
        return column.iloc[:0].reset_index(drop=True).reindex(range(rows))
    n = rows - round(rows * (1 - len(present) / len(column)))  # the rest stay missing
    counts = present.value_counts(sort=False)
    counts = counts[counts > 0]  # a categorical's unused categories
    if len(counts) <= rows // 10:
        share = counts.to_numpy() * (n / len(present))
        repeats = np.maximum(np.floor(share).astype(np.int64), 1)
        gap = int(n - repeats.sum())  # > 0: give the largest remainders one more; < 0: take from the largest counts
        order = np.argsort(share - np.floor(share))[::-1] if gap > 0 else np.argsort(repeats)[::-1]
        repeats[order[: abs(gap)]] += 1 if gap > 0 else -1
        values = np.repeat(counts.index.to_numpy(), repeats)
    elif pd.api.types.is_numeric_dtype(present):
        values = np.quantile(present.to_numpy(dtype=float), (np.arange(n) + 0.5) / n, method="inverted_cdf")
    else:  # many distinct labels: a seeded sample is the closest a fixed size gets
        values = present.sample(n, random_state=0).sort_values().to_numpy()
    return pd.Series(values, dtype=column.dtype).reindex(range(rows))


def _evidently_frame(df: pd.DataFrame, columns: list[str], categorical: list[str]) -> pd.DataFrame:
    out = df[columns].copy()
    for col in categorical:  # labels as plain strings; codes such as season=1 are labels too
        out[col] = out[col].astype("string").astype(object)
    return out


def measure_drift(
    reference: pd.DataFrame, current: pd.DataFrame, params: Params, importance: dict[str, float] | None = None
) -> Drift:
    """Per-feature drift and prediction drift of `current` against `reference`; both frames
    hold the feature columns and a `prediction` column. `importance`: the champion's
    permutation importance per feature, which weighs each feature's drift."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    if current.empty or reference.empty:
        raise LooplineError(
            STAGE, f"cannot measure drift: {'current' if current.empty else 'reference'} window has no rows"
        )
    features = params.features.columns
    schema = params.table_schema.columns
    categorical = [c for c in features if c in params.features.categorical or schema[c].type == "category"]
    if params.data.task == "classification":
        categorical.append(PREDICTION)
    numerical = [c for c in [*features, PREDICTION] if c not in categorical]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    columns = [*features, PREDICTION]
    report = Report(
        [DataDriftPreset(columns=features, drift_share=params.monitor.drift_share), ValueDrift(column=PREDICTION)],
        include_tests=True,
    )
    snapshot = report.run(
        reference_data=Dataset.from_pandas(
            _evidently_frame(reference, columns, categorical), data_definition=definition
        ),
        current_data=Dataset.from_pandas(_evidently_frame(current, columns, categorical), data_definition=definition),
    )
    result = snapshot.dict()
    scores, methods, metric_column = {}, {}, {}
    share = None
    for metric in result["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            scores[config["column"]] = float(metric["value"])
            methods[config["column"]] = config["method"]
            metric_column[metric["id"]] = config["column"]
        elif config["type"].endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])
    drifted = {
        metric_column[t["metric_config"]["metric_id"]]
        for t in result["tests"]
        if t["metric_config"]["metric_id"] in metric_column and str(t["status"]).endswith("FAIL")
    }
    if share is None:
        raise LooplineError(STAGE, "Evidently returned no drifted-columns share")
    return reweigh(
        Drift(
            share=share,
            drifted=[c for c in features if c in drifted],
            scores={c: scores[c] for c in features},
            methods={c: methods[c] for c in features},
            prediction_score=scores[PREDICTION],
            prediction_drifted=PREDICTION in drifted,
            html=snapshot.get_html_str(as_iframe=False),
            snapshot=snapshot.dumps(),
        ),
        params,
        importance,
    )


def reweigh(drift: Drift, params: Params, importance: dict[str, float] | None) -> Drift:
    """The same measured drift, weighed for the trigger by `params.monitor` and `importance`."""
    weights, weighting = drift_weights(params, importance)
    return replace(
        drift,
        weights=weights,
        weighted_share=float(sum(weights.get(c, 0.0) for c in drift.drifted)),
        weighting=weighting,
    )


@dataclass(frozen=True)
class LiveMetric:
    """A metric measured on ground truth: of the predictions the service returned (live), or
    of the champion scoring labelled rows nobody was served (offline)."""

    metric: str
    value: float
    baseline: float  # the naive baseline's metric on the same rows
    rows: int
    served_versions: dict[str, int]  # model version -> rows it answered (offline: the champion scored them all)
    by_id: int = 0  # live rows joined by request id ...
    by_time: int = 0  # ... and by monitor.time_key


@dataclass(frozen=True)
class Labelled:
    """How a window's labelled rows were measured: each row once, live if a served prediction
    answers it (by request id, else by time key), offline otherwise."""

    live: LiveMetric | None = None
    offline: LiveMetric | None = None
    note: str = ""  # why a measurement is missing ("no labels in window", too few rows)


def _task_metrics(y: pd.Series, predicted: pd.Series, baseline: float | str, params: Params) -> tuple[float, float]:
    """The promotion metric of `predicted` and of the constant baseline against `y`."""
    from pipelines.evaluate import classification_metrics, regression_metrics

    metric, _ = params.metric
    if params.data.task == "regression":
        truth = y.to_numpy(dtype="float64")
        model = regression_metrics(truth, predicted.to_numpy(dtype="float64"))
        base = regression_metrics(truth, np.full_like(truth, float(baseline)))
    else:
        truth = y.astype(str).to_numpy()
        classes = sorted(set(truth) | set(predicted.astype(str)))
        model = classification_metrics(truth, predicted.astype(str).to_numpy(), None, classes)
        base = classification_metrics(truth, np.full(len(truth), str(baseline), dtype=object), None, classes)
    return model[metric], base[metric]


def _keys(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The key columns alike whether a value came typed or from the log's JSON: numbers as
    float64 (3, 3.0 and "3" are equal), anything else as text."""
    out = {}
    for c in columns:
        numeric = pd.to_numeric(frame[c], errors="coerce")
        out[c] = numeric.astype("float64") if numeric.notna().all() else frame[c].astype(str)
    return pd.DataFrame(out, index=frame.index)


def labelled_metrics(
    window: pd.DataFrame, log: pd.DataFrame, params: Params, baseline: float | str, champion: str = ""
) -> Labelled:
    """The window's labelled rows, each measured once: rows a served prediction answers (its
    request id in the log, else its monitor.time_key values, the last answer for them)
    against what was served (live); the rest against the champion's predictions on them, in
    `window[PREDICTION]` (offline). An offline metric on fewer than monitor.min_window_rows
    rows is left out, saying so."""
    cfg, target = params.monitor, params.data.target
    metric, _ = params.metric
    if target not in window or window[target].isna().all():
        return Labelled(note="no labels in window")
    rows = window[window[target].notna()]
    served = pd.Series(np.nan, index=rows.index, dtype=object)  # the served prediction per row
    version = pd.Series(None, index=rows.index, dtype=object)
    how = pd.Series("", index=rows.index, dtype=object)
    if not log.empty and cfg.id_column and cfg.id_column in rows:
        last = log.drop_duplicates("request_id", keep="last").set_index("request_id")
        ids = rows[cfg.id_column].astype(str)
        hit = ids.isin(last.index) & rows[cfg.id_column].notna()
        served[hit] = last[PREDICTION].reindex(ids[hit]).to_numpy()
        version[hit] = last["model_version"].reindex(ids[hit]).astype(str).to_numpy()
        how[hit] = "id"
    keys = cfg.time_key
    if not log.empty and keys and all(k in rows for k in keys) and all(k in log for k in keys):
        answered = log.dropna(subset=keys)
        last = _keys(answered, keys).assign(
            _prediction=answered[PREDICTION].to_numpy(), _version=answered["model_version"].astype(str).to_numpy()
        )
        last = last.drop_duplicates(keys, keep="last")  # the last answer for those values
        wanted = _keys(rows.loc[how == ""], keys)
        for c in keys:  # a number on one side, text on the other: compare as text
            if wanted[c].dtype != last[c].dtype:
                wanted[c], last[c] = wanted[c].astype(str), last[c].astype(str)
        found = wanted.rename_axis("_row").reset_index().merge(last, on=keys, how="inner").set_index("_row")
        served[found.index] = found["_prediction"].to_numpy()
        version[found.index] = found["_version"].to_numpy()
        how[found.index] = "time"
    notes: list[str] = []
    live = offline = None
    joined = how != ""
    if joined.any():
        value, base = _task_metrics(rows.loc[joined, target], served[joined], baseline, params)
        versions = version[joined].value_counts()
        live = LiveMetric(
            metric,
            value,
            base,
            int(joined.sum()),
            {str(v): int(n) for v, n in versions.items()},
            by_id=int((how == "id").sum()),
            by_time=int((how == "time").sum()),
        )
    rest = ~joined
    if rest.sum() >= cfg.min_window_rows and PREDICTION in rows:
        value, base = _task_metrics(rows.loc[rest, target], rows.loc[rest, PREDICTION], baseline, params)
        offline = LiveMetric(metric, value, base, int(rest.sum()), {champion: int(rest.sum())} if champion else {})
    elif rest.any() and PREDICTION in rows:
        notes.append(
            f"only {int(rest.sum())} labelled rows without a served prediction: no offline {metric} "
            f"(monitor.min_window_rows {cfg.min_window_rows})"
        )
    return Labelled(live, offline, "; ".join(notes))


def degradation(live: float, reference: float, higher_is_better: bool) -> float:
    """How much worse `live` is than `reference`, relative (0.2 = 20% worse; negative: better)."""
    if reference == 0:
        return 0.0 if live == reference else float("inf")
    change = (live - reference) / abs(reference)
    return -change if higher_is_better else change


@dataclass(frozen=True)
class Verdict:
    retrain: bool
    triggers: list[str]  # thresholds crossed
    held_back: list[str]  # why not now, although a threshold was crossed
    unmeasured: str = ""  # why nothing was measured (no champion, no data, not enough rows)

    @property
    def outcome(self) -> str:
        return "retrain" if self.retrain else ("held back" if self.triggers else "no action")

    def reason(self) -> str:
        if self.unmeasured:
            return f"nothing measured: {self.unmeasured}"
        if not self.triggers:
            return "no threshold crossed"
        return "; ".join(self.triggers) + ("" if self.retrain else " — but " + "; ".join(self.held_back))


def decide(
    cfg: MonitorConfig,
    *,
    now: datetime,
    drift: Drift | None = None,
    live: LiveMetric | None = None,
    offline: LiveMetric | None = None,
    estimate: Estimate | None = None,
    champion_metric: float | None = None,
    higher_is_better: bool = True,
    new_rows: int = 0,
    last_retrain: datetime | None = None,
) -> Verdict:
    """The retraining policy of `monitor:` applied to one monitoring run's measurements."""
    triggers: list[str] = []
    if drift is not None and drift.weighted_share >= cfg.drift_share:
        top = sorted(drift.counted_drifted, key=lambda c: -drift.weights[c])
        triggers.append(
            f"drifted features carry {drift.weighted_share:.0%} of the weight ≥ monitor.drift_share "
            f"{cfg.drift_share:.0%} ({', '.join(f'{c} {drift.weights[c]:.0%}' for c in top)}; "
            f"{len(drift.drifted)} of {len(drift.scores)} features drifted; {drift.weighting})"
        )
    if live is not None and champion_metric is not None:
        worse = degradation(live.value, champion_metric, higher_is_better)
        if worse >= cfg.max_degradation:
            triggers.append(
                f"live {live.metric} {live.value:.4g} on {live.rows} labelled predictions is "
                f"{worse:.0%} worse than the champion's test {live.metric} {champion_metric:.4g} "
                f"(monitor.max_degradation {cfg.max_degradation:.0%})"
            )
    if offline is not None and champion_metric is not None:
        worse = degradation(offline.value, champion_metric, higher_is_better)
        if worse >= cfg.max_degradation:
            scored = (
                f" (scored now by champion v{next(iter(offline.served_versions))})" if offline.served_versions else ""
            )
            triggers.append(
                f"offline {offline.metric} {offline.value:.4g} on {offline.rows} labelled rows no served prediction "
                f"answers{scored} is {worse:.0%} worse than the champion's test {offline.metric} "
                f"{champion_metric:.4g} (monitor.max_degradation {cfg.max_degradation:.0%})"
            )
    if estimate is not None and estimate.value is not None and champion_metric is not None:
        worse = degradation(estimate.value, champion_metric, higher_is_better)
        if worse >= cfg.max_estimated_degradation:
            triggers.append(
                f"{estimate.method} estimates {estimate.metric} {estimate.value:.4g} on {estimate.rows} unlabelled "
                f"rows, {worse:.0%} worse than the champion's test {estimate.metric} {champion_metric:.4g} "
                f"(monitor.max_estimated_degradation {cfg.max_estimated_degradation:.0%})"
            )
    held: list[str] = []
    if new_rows < cfg.min_new_rows:
        held.append(f"only {new_rows} rows arrived since the last training (monitor.min_new_rows {cfg.min_new_rows})")
    if last_retrain is not None and now - last_retrain < timedelta(hours=cfg.cooldown_hours):
        held.append(
            f"cooling down: last retrain at {last_retrain.isoformat()}, next allowed after "
            f"{(last_retrain + timedelta(hours=cfg.cooldown_hours)).isoformat()} "
            f"(monitor.cooldown_hours {cfg.cooldown_hours:g})"
        )
    return Verdict(retrain=bool(triggers) and not held, triggers=triggers, held_back=held if triggers else [])
