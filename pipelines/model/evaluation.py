"""A fitted model scored against rows with labels: its metrics beside the naive baseline's,
per-row predictions, and permutation importance."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Importance:
    """Permutation importance: per feature, the drop in score (R², or accuracy) when that
    column alone is shuffled, once per repeat (`importances`: features × repeats)."""

    importances: np.ndarray

    @property
    def importances_mean(self) -> np.ndarray:
        return self.importances.mean(axis=1)

    @property
    def importances_std(self) -> np.ndarray:
        return self.importances.std(axis=1)


def feature_importance(
    model: Any, rows: pd.DataFrame, features: list[str], target: str, task: str, seed: int, max_rows: int
) -> Importance:
    """Permutation importance of each input column on a seeded sample of at most `max_rows`
    of `rows` (train.importance_rows), with 3 repeats: what the drift trigger weighs
    features by and what the importance plot shows. Every shuffled copy of the sample is
    predicted in one call, so a forest pays its per-call cost once, not once per column
    and repeat."""
    repeats = 3
    sample = rows.sample(n=min(len(rows), max_rows), random_state=seed)[[*features, target]]
    n, blocks = len(sample), 1 + len(features) * repeats  # block 0: the sample as it is
    rng = np.random.default_rng(seed)
    columns = {c: np.tile(sample[c].to_numpy(), blocks) for c in features}
    for j, column in enumerate(features):
        values = sample[column].to_numpy()
        for r in range(repeats):
            block = 1 + j * repeats + r
            columns[column][block * n : (block + 1) * n] = values[rng.permutation(n)]
    shuffled = pd.DataFrame(columns).astype(sample[features].dtypes.to_dict())
    predicted = np.asarray(model.predict(shuffled)).reshape(blocks, n)
    if task == "regression":
        y = sample[target].to_numpy(dtype="float64")
        total = ((y - y.mean()) ** 2).sum()
        scores = 1.0 - ((predicted.astype("float64") - y) ** 2).sum(axis=1) / (total if total > 0 else 1.0)
    else:
        scores = (predicted.astype(str) == sample[target].astype(str).to_numpy()).mean(axis=1)
    return Importance((scores[0] - scores[1:]).reshape(len(features), repeats))
