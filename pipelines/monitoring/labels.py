"""Labelled rows measured: the live metric of the predictions the service actually returned
(the prediction log) against ground truth that arrived later, joined by request id or by
time key; labelled rows no served prediction answers are scored by the champion now (the
offline metric), so labels without ids still count. Each row is measured once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.core.config import Params
from pipelines.monitoring.drift import PREDICTION


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
    from pipelines.core.metrics import classification_metrics, regression_metrics

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
