"""The pipeline stages as file-to-file steps: one function per `dvc.yaml` stage.

Each reads its inputs from the paths in `Layout`, calls the pure functions of its module
and writes its outputs atomically. `dvc repro`, the Prefect flows and the tests all run
these same functions. Each returns a small JSON-able summary.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import Params
from pipelines.errors import LooplineError
from pipelines.layout import Layout
from pipelines.storage import write_csv, write_json, write_parquet, write_text


def _require(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise LooplineError(stage, f"input {path} does not exist; run the earlier stages first (dvc repro)")
    return path


def _read(path: Path, stage: str) -> pd.DataFrame:
    return pq.read_table(_require(path, stage)).to_pandas()


def read_split(params: Params, name: str, stage: str = "train") -> pd.DataFrame:
    """One of the train / val / test splits as a DataFrame."""
    return _read(Layout.of(params).split_file(name), stage)


def check_params(params: Params) -> dict[str, Any]:
    """The params file loaded and passed every check (it was, to get here): record that."""
    write_text("the params file passed loopline's checks\n", Layout.of(params).params_checked)
    return {"valid": True}


def ingest(params: Params) -> dict[str, Any]:
    """The source file plus every accepted batch in arrivals/, as one text table."""
    from pipelines.arrivals import arrival_files, read_arrivals
    from pipelines.ingest import read_source

    layout = Layout.of(params)
    result = read_source(params.data.source, params.table_schema, params.data)
    batches = arrival_files(layout.arrivals)
    rows = result.rows
    if batches:
        rows = pa.concat_tables([rows, read_arrivals(batches, list(params.table_schema.columns))])
    write_parquet(rows, layout.ingested)
    write_csv(result.quarantine, layout.ingest_quarantine)
    return {
        "source": str(params.data.source),
        "rows": rows.num_rows,
        "arrival_batches": len(batches),
        "last_arrival": batches[-1].name if batches else "none",
        "rows_quarantined": len(result.quarantine),
    }


def clean(params: Params) -> dict[str, Any]:
    from pipelines.clean import clean_rows

    layout = Layout.of(params)
    rows = pq.read_table(_require(layout.ingested, "clean"))
    result = clean_rows(rows, params.table_schema, params.data, params.clean)
    write_parquet(result.rows, layout.clean)
    write_csv(result.quarantine, layout.clean_quarantine)
    write_json(result.report, layout.clean_report)
    return result.report


def validate(params: Params) -> dict[str, Any]:
    from pipelines.validate import raise_if_failed, validate_frame

    layout = Layout.of(params)
    source = str(layout.clean)
    validation = validate_frame(_read(layout.clean, "validate"), params.table_schema, source)
    # The report is written whatever the outcome: on failure it is what a person opens.
    write_json(validation.result, layout.validation / "result.json")
    write_text(validation.report_html, layout.validation / "report.html")
    raise_if_failed(validation, source, str(layout.validation / "report.html"))
    stats = validation.result["statistics"]
    summary = {"success": True, "expectations": stats["evaluated_expectations"]}
    write_json(summary, layout.validation / "summary.json")
    return summary


def split(params: Params) -> dict[str, Any]:
    from pipelines.split import split_rows

    layout = Layout.of(params)
    stratify = params.data.task == "classification"
    parts = split_rows(_read(layout.clean, "split"), params.split, params.data.target, stratify)
    counts = {}
    for name in ("train", "val", "test"):
        frame = getattr(parts, name)
        write_parquet(frame, layout.split_file(name))
        counts[name] = len(frame)
    return counts


def model_metadata(
    params: Params, family: str, model: Any, train_rows: pd.DataFrame, hyperparams: dict[str, Any]
) -> dict[str, Any]:
    """What a saved or registered model needs beside its weights: the task, the input
    columns, the naive baseline (to report beside its metrics) and the class labels."""
    from pipelines.evaluate import naive_baseline

    return {
        "task": params.data.task,
        "target": params.data.target,
        "features": params.features.columns,
        "family": family,
        "hyperparams": hyperparams,
        "baseline": naive_baseline(train_rows[params.data.target], params.data.task),
        "train_rows": len(train_rows),
        "classes": [str(c) for c in getattr(model, "classes_", [])],
    }


def fit_configured_model(params: Params) -> tuple[Any, dict[str, Any]]:
    """The `train.model` family fitted on the training split, and its metadata."""
    from pipelines.train import build_model, fit_model

    rows = read_split(params, "train")
    model = fit_model(build_model(params), rows, params)
    family = params.train.model
    return model, model_metadata(params, family, model, rows, params.train.hyperparams.get(family, {}))


def train(params: Params) -> dict[str, Any]:
    from pipelines.model_io import save_model

    model, meta = fit_configured_model(params)
    save_model(model, meta, Layout.of(params).models)
    return {"model": params.train.model, "train_rows": meta["train_rows"]}


def evaluate(params: Params) -> dict[str, Any]:
    from pipelines.evaluate import score
    from pipelines.model_io import load_model

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


STAGES: dict[str, Callable[[Params], dict[str, Any]]] = {
    "params": check_params,
    "ingest": ingest,
    "clean": clean,
    "validate": validate,
    "split": split,
    "train": train,
    "evaluate": evaluate,
}


def run_all(params: Params, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Every stage in order, in this process (what `loopline run` does)."""
    summary: dict[str, Any] = {}
    for name, stage in STAGES.items():
        summary[name] = stage(params)
        echo(f"{name}: {summary[name]}" if name != "evaluate" else f"{name}: done")
    return summary
