"""Drift of a window against the champion's reference, weighed for the retrain trigger.

Drift is Evidently 0.7's: its DataDriftPreset picks a test per column (by type and size) and
its per-column tests say which features drifted; a ValueDrift on the model's predictions
measures prediction drift. What drift reads of the reference is a profile made once per
champion (`drift_reference`), so a run costs the same whatever the reference's size. Each
drifted feature weighs its share of the champion's permutation importance; features that
drift by construction (the calendar) weigh nothing unless `monitor.count_expected_drift`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

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
