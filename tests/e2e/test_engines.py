"""Compiled inference: every model family and task converts to ONNX and agrees with its
Python form; the service serves the ONNX form through the real `loopline serve`, falls back
to Python (and says why) for a model without one, and holds its native threads to
serve.model_threads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import (
    STORED_FAMILIES,
    STORED_MODELS,
    bikeshare_sample,
    free_port,
    register_family,
    register_stored,
    start_service,
    stop,
    tracking_section,
    wait_for_http,
    wait_for_version,
    write_params,
)
from pipelines.core.errors import LooplineError

FAMILIES = {
    "hist_gradient_boosting": {"max_iter": 60},
    "random_forest": {"n_estimators": 15},
    "linear": {},
    "torch_mlp": {"epochs": 4, "hidden_sizes": [32]},
    "xgboost": {"n_estimators": 40},
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Params and clean rows of the bikeshare sample (the first 2,000 hours of 2011)."""
    from pipelines.core.config import load_params
    from pipelines.data.clean import clean_rows
    from pipelines.data.ingest import read_source

    tmp = tmp_path_factory.mktemp("engines")
    params = load_params(write_params(tmp, bikeshare_sample(tmp)))
    table = read_source(params.data.source, params.table_schema, params.data).rows
    frame = clean_rows(table, params.table_schema, params.data, params.clean).rows.to_pandas()
    return params, frame


def _fit(params, frame, family: str, task: str, y):
    from sklearn.pipeline import Pipeline

    from pipelines.model.estimators import build_estimator
    from pipelines.model.features import build_preprocessor

    estimator = build_estimator(family, task, FAMILIES[family], 0)
    model = Pipeline([("features", build_preprocessor(params.features, params.table_schema)), ("model", estimator)])
    return model.fit(frame[params.features.columns], y)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("task", ["regression", "binary", "three classes"])
def test_every_family_and_task_converts_and_agrees_with_python(rows, family, task):
    from pipelines.model.onnx_engine import OnnxEngine, compile_model, parity, string_columns

    params, frame = rows
    bikers = frame["bikers"].to_numpy()
    y = {
        "regression": bikers,
        "binary": np.where(bikers > 100, "busy", "quiet"),
        "three classes": np.where(bikers > 150, "high", np.where(bikers > 40, "mid", "low")),
    }[task]
    kind = "regression" if task == "regression" else "classification"
    params = params.model_copy(update={"data": params.data.model_copy(update={"task": kind})})
    model = _fit(params, frame, family, kind, y)
    files, note = compile_model(model, params, frame)
    assert set(files) == {"model.onnx", "parity.parquet"}, note
    assert "converted" in note and "reference rows agree" in note
    engine = OnnxEngine(files["model.onnx"], params.features.columns, string_columns(params))
    classes = [str(c) for c in getattr(model, "classes_", [])]
    checked = parity(engine, model, frame, kind, classes)  # every row, not only the logged sample
    assert checked.ok and checked.rows == len(frame), checked.detail
    if kind == "classification":  # probabilities in the model's class order
        proba = engine.run(engine.feeds({c: frame[c].to_numpy() for c in params.features.columns}))
        np.testing.assert_allclose(proba, model.predict_proba(frame[params.features.columns]), atol=1e-4)


def test_a_served_classifier_answers_from_the_engine_with_labels_and_probabilities(rows):
    from pipelines.model.onnx_engine import compile_model
    from serving.runtime import ServedModel, predict_frame, predict_records
    from serving.schema import request_records

    params, frame = rows
    params = params.model_copy(update={"data": params.data.model_copy(update={"task": "classification"})})
    y = np.where(frame["bikers"] > 100, "busy", "quiet")
    model = _fit(params, frame, "hist_gradient_boosting", "classification", y)
    files, _ = compile_model(model, params, frame)
    meta = {"task": "classification", "features": params.features.columns, "classes": ["busy", "quiet"]}
    served = ServedModel.of(model, meta, "m", "1", "run", params, files)
    python = ServedModel.of(
        model,
        meta,
        "m",
        "1",
        "run",
        params.model_copy(update={"serve": params.serve.model_copy(update={"engine": "python"})}),
        files,
    )
    assert (
        served.engine_name == "onnx"
        and python.engine_name == "python"
        and python.engine_reason == "serve.engine is python"
    )
    head = frame.head(30)
    labels, probabilities = predict_records(served, request_records(head, params), params)
    expected_labels, expected = predict_frame(python, head[params.features.columns])
    assert labels == expected_labels
    for got, want in zip(probabilities, expected, strict=True):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in got)


def test_engine_onnx_refuses_a_model_without_an_onnx_form(rows):
    from serving.runtime import ServedModel

    params, frame = rows
    model = _fit(params, frame, "linear", "regression", frame["bikers"])
    meta = {"task": "regression", "features": params.features.columns, "onnx": "no ONNX form: for the test"}
    fallback = ServedModel.of(model, meta, "m", "1", "run", params, {})
    assert fallback.engine_name == "python" and "no ONNX form: for the test" in fallback.engine_reason
    strict = params.model_copy(update={"serve": params.serve.model_copy(update={"engine": "onnx"})})
    with pytest.raises(LooplineError, match="serve.engine is onnx, but the model has no ONNX form"):
        ServedModel.of(model, meta, "m", "1", "run", strict, {})


def test_hours_with_equal_cosines_encode_to_the_same_value():
    from pipelines.model.features import CyclicalEncoder

    encoded = CyclicalEncoder(period=24).fit_transform(pd.DataFrame({"hr": [5.0, 19.0, 7.0, 17.0]}))
    assert encoded[0, 1] == encoded[1, 1] and encoded[2, 1] == encoded[3, 1]  # cos: exactly equal, not 1 ulp apart


@pytest.mark.slow
def test_the_service_serves_every_family_by_onnx_and_a_model_without_one_by_python(tmp_path):
    """One real `loopline serve`: each family in turn becomes champion and is served by ONNX
    Runtime, matching its Python predictions; a model logged without an ONNX form is served
    by Python and /model says why; the worker's native pools hold serve.model_threads. Then
    the models logged by the flat layout (tests/fixtures) are served as they predicted then."""
    import httpx

    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.data.split import read_split
    from pipelines.registry.champion import promote
    from pipelines.registry.tracking import client_for, load_model_version
    from serving.schema import request_records

    path = write_params(
        tmp_path, bikeshare_sample(tmp_path), tracking=tracking_section(tmp_path), serve={"reload_interval_s": 0.5}
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    test = read_split(params, "test").head(50)
    bodies = request_records(test, params)
    versions = {family: register_family(params, family, hyperparams=hp) for family, hp in FAMILIES.items()}
    versions["python"] = register_family(params, "linear", compiled=False)
    client, _ = client_for(params)
    port = free_port()
    proc = start_service(["--params", str(path)], tmp_path, port)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/livez", timeout=120, proc=proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for family, version in versions.items():
                promote(client, "bikes", version, params.tracking.uri, reason="test")
                wait_for_version(http, version)
                model, _ = load_model_version(client, "bikes", version)
                expected = model.predict(test[params.features.columns])
                answer = http.post("/predict_batch", json={"records": bodies}).json()
                single = http.post("/predict", json=bodies[0]).json()
                status = http.post("/model").json()
                np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-4, atol=1e-4)
                assert single["prediction"] == pytest.approx(expected[0], rel=1e-4, abs=1e-4)
                if family == "python":
                    assert status["engine"] == "python", status
                    assert "has no ONNX form (logged without an ONNX form)" in status["engine_reason"]
                else:
                    assert status["engine"] == "onnx", (family, status)
                    assert "reference rows agree" in status["engine_reason"]
                openmp = [n for pool, n in status["threads"].items() if pool.startswith("openmp")]
                assert openmp and set(openmp) == {params.serve.model_threads}, status["threads"]
            for family in STORED_FAMILIES:  # logged by the flat layout: served as they predicted then
                stored = pd.read_parquet(STORED_MODELS / family / "expected.parquet")
                version = register_stored(params, family)
                promote(client, "bikes", version, params.tracking.uri, reason="test")
                wait_for_version(http, version)
                answer = http.post("/predict_batch", json={"records": request_records(stored, params)}).json()
                np.testing.assert_allclose(answer["predictions"], stored["prediction"], rtol=1e-4, atol=1e-4)
                assert http.post("/model").json()["engine"] == "onnx", family
    finally:
        stop(proc)
    log = (tmp_path / f"serve-{port}.log").read_text()
    assert (
        "engine onnx: ONNX Runtime (1 thread(s))" in log and "engine python: python: the model has no ONNX form" in log
    )
