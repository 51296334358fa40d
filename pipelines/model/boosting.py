"""The xgboost family: XGBoost's gradient-boosted trees behind loopline's feature transform.

It trains like any family on rows in memory, and, with `execution.data: dask`, across the
workers of the Dask cluster on the partitioned training rows (`fit_on_partitions`, through
`xgboost.dask`): the feature transform is fitted on a seeded sample of the training rows
(`train.sample_rows`, default SAMPLE_ROWS), each partition is transformed on its worker, and
XGBoost's workers build every tree together. The result is the same kind of pipeline either
way, saved, converted to ONNX and served like the others.

XGBoost compares float32 features with float32 thresholds; the ONNX form
(pipelines/model/onnx_engine.py) casts the transformed features to float32 before the trees
for the same reason, so a value sitting on a threshold goes the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from xgboost import XGBClassifier, XGBRegressor

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

    from pipelines.core.config import Params

SAMPLE_ROWS = 100_000  # rows the feature transform is fitted on, when train.sample_rows is unset


class XGBoostRegressor(XGBRegressor):
    """XGBoost's regressor, under loopline's name (its model files name this class)."""


class XGBoostClassifier(XGBClassifier):
    """XGBoost's classifier on labels of any kind: XGBoost is given them as 0..k-1 and the
    predictions are turned back; `classes_` holds the labels in sorted order, as
    scikit-learn's classifiers do."""

    @property
    def classes_(self) -> np.ndarray:
        labels = getattr(self, "labels_", None)
        return np.arange(self.n_classes_) if labels is None else labels  # XGBoost's own while it fits

    def fit(self, X: Any, y: Any, **kwargs: Any) -> XGBoostClassifier:
        labels, codes = np.unique(np.asarray(y), return_inverse=True)
        self.labels_ = None
        super().fit(X, codes, **kwargs)
        self.labels_ = labels
        return self

    def predict(self, X: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[override]
        return self.classes_[np.asarray(super().predict(X, **kwargs), dtype=np.int64)]


def fit_on_partitions(params: Params, model: Pipeline, sample: pd.DataFrame) -> Pipeline:
    """`model` (the feature transform, then an XGBoost estimator) fitted on every training
    partition (execution.data: dask): the feature transform on `sample` (the training rows the
    search holds: train.sample_rows of them, else SAMPLE_ROWS drawn here), then XGBoost across
    the cluster's workers, each partition transformed where it is read."""
    import dask.array as da
    import pyarrow.parquet as pq
    import xgboost as xgb
    from dask import delayed

    from pipelines.core.layout import Layout
    from pipelines.data.parts import cluster, for_workers, parts_of

    columns, target, task = params.features.columns, params.data.target, params.data.task
    features, estimator = model.steps[0][1], model.steps[-1][1]
    if not params.train.sample_rows and len(sample) > SAMPLE_ROWS:
        sample = sample.sample(SAMPLE_ROWS, random_state=params.train.seed).sort_index()
    features.fit(sample[columns], sample[target])
    width = features.transform(sample[columns].head(1)).shape[1]
    parts = [
        p for p in for_workers(parts_of(Layout.of(params).split_file("train"))) if pq.ParquetFile(p).metadata.num_rows
    ]
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    labels = None
    if task == "classification":
        labels = np.unique(np.concatenate([_labels_of(p, target) for p in parts]))
    X = da.concatenate(
        [
            da.from_delayed(delayed(_features_of)(features, p, columns), shape=(n, width), dtype="float32")
            for p, n in zip(parts, sizes, strict=True)
        ]
    )
    y = da.concatenate(
        [
            da.from_delayed(delayed(_target_of)(p, target, labels), shape=(n,), dtype="float32")
            for p, n in zip(parts, sizes, strict=True)
        ]
    )
    settings = {k: v for k, v in estimator.get_xgb_params().items() if v is not None}
    if labels is not None:
        settings |= {"objective": "multi:softprob", "num_class": len(labels)} if len(labels) > 2 else {}
    with cluster(params) as client:
        matrix = xgb.dask.DaskQuantileDMatrix(client, X, y)
        booster = xgb.dask.train(client, settings, matrix, num_boost_round=estimator.n_estimators or 100)["booster"]
    estimator.load_model(bytearray(booster.save_raw("json")))
    if labels is not None:
        estimator.labels_ = labels
    return model


def _features_of(features: Any, part: Path, columns: list[str]) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.asarray(features.transform(pq.read_table(part, columns=columns).to_pandas()), dtype="float32")


def _target_of(part: Path, target: str, labels: np.ndarray | None) -> np.ndarray:
    import pyarrow.parquet as pq

    values = pq.read_table(part, columns=[target]).to_pandas()[target]
    if labels is None:
        return values.to_numpy(dtype="float32")
    return np.searchsorted(labels, values.astype(str).to_numpy()).astype("float32")


def _labels_of(part: Path, target: str) -> np.ndarray:
    import pyarrow.parquet as pq

    return np.unique(pq.read_table(part, columns=[target]).to_pandas()[target].astype(str).to_numpy())
