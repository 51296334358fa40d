"""The metrics loopline judges models by, each task's primary one, and the naive baseline
every metric is reported beside. One list of metric names, read by the params checks, the
search, promotion, monitoring and the label-free estimate."""

from __future__ import annotations

import numpy as np
import pandas as pd

# scikit-learn's metrics are imported where computed: the names below are read by every
# params check (load_params), which should not pay for importing scikit-learn.

# Every metric loopline computes, by task (the functions below compute them in this order).
METRICS = {"regression": ("rmse", "mae", "r2"), "classification": ("accuracy", "precision", "recall", "f1", "roc_auc")}
# The metric each task is judged by, and whether larger is better.
PRIMARY_METRIC = {"regression": ("rmse", False), "classification": ("f1", True)}
LOWER_IS_BETTER = {"rmse", "mae"}
# What the paired bootstrap can compare row by row (promotion.metric): not roc_auc, a ranking.
COMPARABLE = {task: tuple(m for m in names if m != "roc_auc") for task, names in METRICS.items()}


def metric_direction(name: str) -> bool:
    """True when a larger value of the metric is better."""
    return name not in LOWER_IS_BETTER


def naive_baseline(y_train: pd.Series, task: str) -> float | str:
    """Training mean for regression, the most frequent class for classification."""
    if task == "regression":
        return float(y_train.mean())
    return str(y_train.astype(str).value_counts().idxmax())


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn import metrics as skm

    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(y, pred))),
        "mae": float(skm.mean_absolute_error(y, pred)),
        "r2": float(skm.r2_score(y, pred)),
    }


def classification_metrics(
    y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, classes: list[str]
) -> dict[str, float]:
    from sklearn import metrics as skm

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
