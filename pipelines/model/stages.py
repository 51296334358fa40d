"""The model stages of dvc.yaml: `train` fits the `train.model` family on the training rows
and saves it; `evaluate` scores the saved model on the validation and test rows. As in
pipelines/data/stages.py, each function imports what it runs, so each stage's code is its own."""

from __future__ import annotations

from typing import Any

from pipelines.core.config import Params
from pipelines.core.layout import Layout


def fit_configured_model(params: Params) -> tuple[Any, dict[str, Any]]:
    """The `train.model` family fitted on the training split, and its metadata."""
    from pipelines.data.split import training_rows
    from pipelines.model.estimators import fit_family
    from pipelines.model.io import model_metadata

    rows, _ = training_rows(params)
    family = params.train.model
    model = fit_family(params, family, params.train.hyperparams.get(family, {}), rows)
    return model, model_metadata(params, family, model, rows, params.train.hyperparams.get(family, {}))


def train(params: Params) -> dict[str, Any]:
    from pipelines.model.io import save_model

    model, meta = fit_configured_model(params)
    save_model(model, meta, Layout.of(params).models)
    return {"model": params.train.model, "train_rows": meta["train_rows"]}


def evaluate(params: Params) -> dict[str, Any]:
    from pipelines.core.storage import write_csv, write_json
    from pipelines.data.split import read_split
    from pipelines.model.evaluation import score
    from pipelines.model.io import load_model

    layout = Layout.of(params)
    model, meta = load_model(layout.models)
    metrics: dict[str, Any] = {}
    for name in ("val", "test"):
        metrics[name], rows = score(
            model,
            read_split(params, name, "evaluate"),
            meta["features"],
            params.data.target,
            params.data.task,
            meta["baseline"],
        )
        if name == "test":
            write_csv(rows, layout.predictions)
    write_json(metrics, layout.metrics)
    return metrics
