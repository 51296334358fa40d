"""evaluate: metrics of the model and of a naive baseline on the validation and test rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipelines.errors import LooplineError

STAGE = "evaluate"

# The metric each task is judged by, and whether larger is better.
PRIMARY_METRIC = {"regression": ("rmse", False), "classification": ("f1", True)}
LOWER_IS_BETTER = {"rmse", "mae"}


def metric_direction(name: str) -> bool:
    """True when a larger value of the metric is better."""
    return name not in LOWER_IS_BETTER


def naive_baseline(y_train: pd.Series, task: str) -> float | str:
    """Training mean for regression, the most frequent class for classification."""
    if task == "regression":
        return float(y_train.mean())
    return str(y_train.astype(str).value_counts().idxmax())


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(y, pred))),
        "mae": float(skm.mean_absolute_error(y, pred)),
        "r2": float(skm.r2_score(y, pred)),
    }


def classification_metrics(
    y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, classes: list[str]
) -> dict[str, float]:
    out = {"accuracy": float(skm.accuracy_score(y, pred))}
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    out.update(precision=float(p), recall=float(r), f1=float(f))
    present = np.unique(y)
    if proba is not None and len(present) > 1:
        if len(classes) == 2:
            out["roc_auc"] = float(skm.roc_auc_score(y == classes[1], proba[:, 1]))
        elif len(present) == len(classes):
            out["roc_auc"] = float(skm.roc_auc_score(y, proba, multi_class="ovr", labels=classes))
    return out


def score(
    model: Any, df: pd.DataFrame, features: list[str], target: str, task: str, baseline: float | str
) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics of `model` and of the constant `baseline` on `df`, and the per-row predictions."""
    if df.empty:
        raise LooplineError(STAGE, "no rows to evaluate on")
    X = df[features]
    if task == "regression":
        y = df[target].to_numpy(dtype="float64")
        pred = np.asarray(model.predict(X), dtype="float64")
        result = regression_metrics(y, pred)
        base = regression_metrics(y, np.full_like(y, float(baseline)))
        rows = pd.DataFrame({"actual": y, "predicted": pred, "residual": y - pred})
    else:
        y = df[target].astype(str).to_numpy()
        classes = [str(c) for c in model.classes_]
        pred = np.asarray(model.predict(X)).astype(str)
        proba = model.predict_proba(X) if hasattr(model, "predict_proba") else None
        result = classification_metrics(y, pred, proba, classes)
        base = classification_metrics(y, np.full(len(y), str(baseline), dtype=object), None, classes)
        rows = pd.DataFrame({"actual": y, "predicted": pred})
    result.update({f"baseline_{k}": v for k, v in base.items()})
    result["rows"] = len(df)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}, rows


def feature_importance(model: Any, rows: pd.DataFrame, features: list[str], target: str, task: str, seed: int):
    """Permutation importance of each input column on `rows` (a seeded sample of at most
    2,000): sklearn's result object, whose mean drop in score per feature is what the drift
    trigger weighs features by and what the importance plot shows."""
    from sklearn.inspection import permutation_importance

    sample = rows.sample(n=min(len(rows), 2000), random_state=seed)
    y = sample[target] if task == "regression" else sample[target].astype(str)
    return permutation_importance(model, sample[features], y, n_repeats=3, random_state=seed, n_jobs=1)
