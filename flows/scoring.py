"""Batch scoring (`loopline score IN OUT`): the champion over a whole file, as a Prefect flow.

The file is checked with the rules the service applies to each request (serving.schema),
vectorised; any broken rule fails the run naming column, row and value, and writes
nothing. Predictions are made in chunks and written atomically as Parquet: the input
columns, `prediction` (and `proba_<class>` for classifiers), the model version and run id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from pipelines.core.config import load_params
from pipelines.core.errors import LooplineError

CHUNK_ROWS = 200_000


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise LooplineError("score", f"input {path} does not exist")
    parquet = path.suffix.lower() == ".parquet"
    try:
        return pd.read_parquet(path) if parquet else pd.read_csv(path, engine="pyarrow")
    except Exception as err:  # unreadable, wrong format, not CSV
        raise LooplineError(
            "score", f"cannot read {path} as {'Parquet' if parquet else 'CSV'}: {type(err).__name__}: {err}"
        ) from None


@task(name="score-file")
def score_file(params_path: str, input_path: str, output_path: str) -> dict[str, Any]:
    from pipelines.core.progress import progress
    from pipelines.core.storage import write_parquet
    from serving.runtime import Unavailable, load_registry_champion, predict_frame
    from serving.schema import check_records

    params = load_params(params_path)
    frame = read_table(Path(input_path))
    if frame.empty:
        raise LooplineError("score", f"{input_path} has no rows")
    features = check_records(frame, params, input_path)
    try:
        served = load_registry_champion(params)
    except Unavailable as err:
        raise LooplineError("score", err.message) from None
    predictions: list[Any] = []
    probabilities: list[dict[str, float]] = []
    with progress("score", len(features), "rows") as advance:
        for start in range(0, len(features), CHUNK_ROWS):
            preds, probs = predict_frame(served, features.iloc[start : start + CHUNK_ROWS])
            predictions += preds
            probabilities += probs or []
            advance(len(preds))
    out = frame.copy()
    out["prediction"] = predictions
    if probabilities:
        out = out.join(pd.DataFrame(probabilities, index=out.index).add_prefix("proba_"))
    out["model_name"], out["model_version"], out["run_id"] = served.name, served.version, served.run_id
    write_parquet(out, output_path)
    return {
        "rows": len(out),
        "model_name": served.name,
        "model_version": served.version,
        "run_id": served.run_id,
        "output": str(output_path),
    }


@flow(name="batch-scoring")
def scoring_flow(params_path: str = "params.yaml", input_path: str = "", output_path: str = "") -> dict[str, Any]:
    """Score a CSV or Parquet file with the registry's champion."""
    result = score_file(params_path, input_path, output_path)
    create_markdown_artifact(
        f"Scored **{result['rows']}** rows of `{input_path}` with {result['model_name']} "
        f"v{result['model_version']} (run `{result['run_id']}`) into `{result['output']}`",
        key="batch-scoring",
        description="Batch scoring summary",
    )
    return result
