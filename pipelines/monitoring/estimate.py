"""Performance estimated without labels, with NannyML: direct loss estimation (DLE) for
regression, confidence-based performance estimation (CBPE) for classification.

The estimator is fitted when a model is trained, on rows the model did not train on (its
validation and test rows, with its predictions and the labels), and stored beside the model.
Monitoring then estimates the metric on every window from features and predictions alone.
A case NannyML cannot serve (a metric it has no estimator for, too few rows) is an
`Estimate` with a reason, never an exception: the loop falls back to drift and live labels.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.config import Params

# NannyML reports usage to a third-party service unless told not to; loopline never phones home.
os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")

PREDICTION = "y_pred"
TRUTH = "y_true"
ESTIMABLE = {"regression": ("rmse", "mae"), "classification": ("accuracy", "precision", "recall", "f1", "roc_auc")}
MIN_REFERENCE_ROWS = 100


@dataclass(frozen=True)
class Estimate:
    metric: str
    method: str  # DLE | CBPE
    value: float | None  # None: not estimated, `detail` says why
    detail: str = ""
    rows: int = 0
    reference: float | None = None  # the realised metric on the rows the estimator was fitted on


@dataclass
class PerformanceEstimator:
    """A fitted NannyML estimator and what it needs to build its input frame."""

    method: str
    metric: str
    features: list[str]
    categorical: list[str]
    classes: list[str]
    reference: float
    estimator: Any

    def dumps(self) -> bytes:
        return pickle.dumps(self)


def loads_estimator(data: bytes) -> PerformanceEstimator:
    """The estimator logged beside a model in this tracking store (pickle: read only what
    loopline itself logged to the store, like the model)."""
    return pickle.loads(data)  # noqa: S301


def _method(params: Params) -> str:
    return "DLE" if params.data.task == "regression" else "CBPE"


@dataclass(frozen=True)
class Served:
    """What the service answered for a window's rows, as the prediction log holds it: the
    estimate reads these instead of predicting again."""

    predictions: np.ndarray
    probabilities: np.ndarray | None = None  # one column per class, in the estimator's class order


def _frame(est: PerformanceEstimator, model, rows: pd.DataFrame, served: Served | None = None) -> pd.DataFrame:
    out = rows[est.features].copy()
    for column in est.categorical:  # NannyML encodes object columns as categories
        out[column] = out[column].astype("string").astype(object)
    if est.method == "DLE":
        predicted = served.predictions if served is not None else model.predict(rows[est.features])
        out[PREDICTION] = np.asarray(predicted, dtype="float64")
        return out
    if served is not None and served.probabilities is not None:
        proba, labels = served.probabilities, served.predictions
    else:
        proba, labels = model.predict_proba(rows[est.features]), model.predict(rows[est.features])
    out[PREDICTION] = _labels(est, labels)
    if len(est.classes) == 2:
        out["proba"] = proba[:, 1]
    else:
        for i in range(len(est.classes)):
            out[f"proba_{i}"] = proba[:, i]
    return out


def _labels(est: PerformanceEstimator, values) -> np.ndarray:
    """Class labels as CBPE reads them: 0/1 (the second class positive) for a binary task."""
    labels = np.asarray(values).astype(str)
    return (labels == est.classes[1]).astype(int) if len(est.classes) == 2 else labels


def _new_estimator(est: PerformanceEstimator, rows: int):
    import nannyml as nml

    if est.method == "DLE":
        return nml.DLE(
            feature_column_names=est.features,
            y_pred=PREDICTION,
            y_true=TRUTH,
            metrics=[est.metric],
            chunk_number=1,
            hyperparameters={"n_estimators": 100, "verbosity": -1, "n_jobs": 1},
        )
    binary = len(est.classes) == 2
    return nml.CBPE(
        metrics=[est.metric],
        y_pred_proba="proba" if binary else {label: f"proba_{i}" for i, label in enumerate(est.classes)},
        y_pred=PREDICTION,
        y_true=TRUTH,
        problem_type="classification_binary" if binary else "classification_multiclass",
        chunk_number=1,
    )


def fit_estimator(model, rows: pd.DataFrame, params: Params) -> tuple[PerformanceEstimator | None, str]:
    """NannyML's estimator of the promotion metric, fitted on `rows` (labelled rows the model
    did not train on). None, with the reason, when NannyML cannot serve this case."""
    from pipelines.model.evaluation import score

    metric, _ = params.metric
    method = _method(params)
    if metric not in ESTIMABLE[params.data.task]:
        return None, f"NannyML's {method} has no estimate of {metric}"
    if len(rows) < MIN_REFERENCE_ROWS:
        return None, f"only {len(rows)} held-out rows to fit {method} on (fewer than {MIN_REFERENCE_ROWS})"
    features = params.features.columns
    schema = params.table_schema.columns
    categorical = [c for c in features if c in params.features.categorical or schema[c].type == "category"]
    classes = [str(c) for c in getattr(model, "classes_", [])]
    if method == "CBPE" and not hasattr(model, "predict_proba"):
        return None, "CBPE needs predicted probabilities and the model has no predict_proba"
    if len(rows) > params.monitor.estimator_rows:
        rows = rows.sample(params.monitor.estimator_rows, random_state=params.train.seed)
    metrics, _ = score(model, rows, features, params.data.target, params.data.task, 0.0 if method == "DLE" else "")
    est = PerformanceEstimator(method, metric, features, categorical, classes, float(metrics[metric]), None)
    frame = _frame(est, model, rows)
    truth = rows[params.data.target]
    frame[TRUTH] = truth.to_numpy(dtype="float64") if method == "DLE" else _labels(est, truth)
    est.estimator = _new_estimator(est, len(frame)).fit(frame.reset_index(drop=True))
    return est, f"{method} fitted on {len(frame)} held-out rows ({metric} there {est.reference:.4g})"


def estimate(
    est: PerformanceEstimator, model, window: pd.DataFrame, min_rows: int, served: Served | None = None
) -> Estimate:
    """The metric NannyML estimates on `window` (features only; labels are not read), from
    the predictions the service logged (`served`) or, without them, the model's now."""
    base = Estimate(est.metric, est.method, None, rows=len(window), reference=est.reference)
    if len(window) < min_rows:
        return _with(base, f"only {len(window)} rows in the window (monitor.min_window_rows {min_rows})")
    try:
        result = est.estimator.estimate(_frame(est, model, window, served).reset_index(drop=True))
        frame = result.filter(period="analysis").to_df()
        value = float(frame[(est.metric, "value")].iloc[-1])
    except Exception as err:  # NannyML raises its own and pandas errors for data it cannot handle
        return _with(base, f"{est.method} could not estimate {est.metric}: {type(err).__name__}: {err}")
    if not np.isfinite(value):
        return _with(base, f"{est.method} returned no finite {est.metric} estimate")
    return Estimate(est.metric, est.method, value, f"{est.method} estimate", len(window), est.reference)


def _with(base: Estimate, detail: str) -> Estimate:
    return Estimate(base.metric, base.method, None, detail, base.rows, base.reference)
