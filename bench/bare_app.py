"""The baseline for bench/serving.py: a bare FastAPI app that loads the same champion once
and calls predict once per request (no batching, no logging, no middleware).

    LOOPLINE_PARAMS=params.yaml uvicorn bench.bare_app:app
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from pipelines.core.config import load_params
from serving.runtime import load_registry_champion, predict_records
from serving.schema import record_model

PARAMS = load_params(os.environ.get("LOOPLINE_PARAMS", "params.yaml"))
SERVED = load_registry_champion(PARAMS)
Record = record_model(PARAMS)
app = FastAPI()


@app.post("/predict")
def predict(record: Record) -> dict:  # type: ignore[valid-type]
    predictions, _ = predict_records(SERVED, [record.model_dump()], PARAMS)
    return {"prediction": predictions[0], "model_version": SERVED.version}
