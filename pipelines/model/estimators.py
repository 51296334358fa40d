"""train: a seeded scikit-learn estimator behind the fitted feature transform.

The model family is configuration (`train.model`); the same family name gives a regressor
or a classifier depending on the task. Hyperparameters are passed to the estimator as they
are, so an unknown one fails with the key named.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.model.features import build_preprocessor
from pipelines.model.torch_model import TorchMLPClassifier, TorchMLPRegressor

STAGE = "train"

ESTIMATORS: dict[str, dict[str, type[BaseEstimator]]] = {
    "linear": {"regression": Ridge, "classification": LogisticRegression},
    "random_forest": {"regression": RandomForestRegressor, "classification": RandomForestClassifier},
    "hist_gradient_boosting": {
        "regression": HistGradientBoostingRegressor,
        "classification": HistGradientBoostingClassifier,
    },
    "torch_mlp": {"regression": TorchMLPRegressor, "classification": TorchMLPClassifier},
}
LINEAR_CLASSIFIER_DEFAULTS = {"max_iter": 1000}
XGBOOST_DEFAULTS = {
    "tree_method": "hist"
}  # its threads: OpenMP's, held to the fit's budget as HistGradientBoosting's are


def estimator_class(family: str, task: str) -> type[BaseEstimator]:
    """The estimator of `family` for `task`; XGBoost's is imported only when asked for."""
    if family == "xgboost":
        from pipelines.model.boosting import XGBoostClassifier, XGBoostRegressor

        return XGBoostRegressor if task == "regression" else XGBoostClassifier
    return ESTIMATORS[family][task]


def build_estimator(family: str, task: str, hyperparams: dict[str, Any], seed: int) -> BaseEstimator:
    cls = estimator_class(family, task)
    defaults = (
        LINEAR_CLASSIFIER_DEFAULTS if cls is LogisticRegression else XGBOOST_DEFAULTS if family == "xgboost" else {}
    )
    estimator = cls(**defaults)
    valid = estimator.get_params()
    unknown = [k for k in hyperparams if k not in valid]
    if unknown:
        raise LooplineError(
            STAGE,
            f"train.hyperparams.{family}.{unknown[0]} is not a parameter of "
            f"{cls.__name__}; valid ones: {sorted(valid)}",
        )
    if "random_state" in valid:
        estimator.set_params(random_state=seed)
    if "seed" in valid:
        estimator.set_params(seed=seed)
    try:
        return estimator.set_params(**hyperparams)
    except (TypeError, ValueError) as err:
        raise LooplineError(STAGE, f"train.hyperparams.{family}: {err}") from None


def build_model(params: Params, family: str | None = None, hyperparams: dict[str, Any] | None = None) -> Pipeline:
    family = family or params.train.model
    if hyperparams is None:
        hyperparams = params.train.hyperparams.get(family, {})
    estimator = build_estimator(family, params.data.task, hyperparams, params.train.seed)
    if "checkpoint_dir" in estimator.get_params() and estimator.get_params()["checkpoint_dir"] is None:
        estimator.set_params(checkpoint_dir=str(params.paths.models / "checkpoints"))
    return Pipeline([("features", build_preprocessor(params.features, params.table_schema)), ("model", estimator)])


def fit_family(
    params: Params, family: str, hyperparams: dict[str, Any], rows: pd.DataFrame, threads: int | None = None
) -> Pipeline:
    """`family` with `hyperparams` fitted: on `rows`, or, for xgboost with the data in
    partitions (execution.data: dask), on every training partition across the Dask cluster's
    workers (`rows`, the sample, fit the feature transform)."""
    model = build_model(params, family, hyperparams)
    if family == "xgboost" and params.execution.data == "dask":
        from pipelines.model.boosting import fit_on_partitions

        return fit_on_partitions(params, model, rows)
    if threads is not None and "n_jobs" in model[-1].get_params():
        model[-1].set_params(n_jobs=threads)  # a worker's budget; seeded, the fit is the same
    return fit_model(model, rows, params, threads)


def fit_model(model: Pipeline, train: pd.DataFrame, params: Params, threads: int | None = None) -> Pipeline:
    """Fit on the training rows within `threads` native threads, by default this training's
    share of the cores (pipelines.core.threads)."""
    from pipelines.core.threads import fit_threads, thread_budget, training_slot

    torch_model = isinstance(model[-1], (TorchMLPClassifier, TorchMLPRegressor))
    with training_slot(), thread_budget(threads or fit_threads(params.train.threads), torch_model):
        return _fit(model, train, params)


def _fit(model: Pipeline, train: pd.DataFrame, params: Params) -> Pipeline:
    X = train[params.features.columns]
    y = train[params.data.target]
    if params.data.task == "classification":
        y = y.astype(str)
        if y.nunique() < 2:
            raise LooplineError(
                STAGE,
                f"the training rows hold a single class of {params.data.target!r} "
                f"({y.iloc[0]!r}); a classifier needs at least two",
            )
    try:
        return model.fit(X, y)
    except ValueError as err:
        raise LooplineError(STAGE, f"fitting {type(model[-1]).__name__} failed: {err}") from None
