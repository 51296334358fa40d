"""A fitted model scored against rows with labels: its metrics beside the naive baseline's,
per-row predictions, and permutation importance."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.errors import LooplineError
from pipelines.core.metrics import classification_metrics, regression_metrics

STAGE = "evaluate"


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
