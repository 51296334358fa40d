"""Models logged before pipelines/ had its six parts name their classes by the flat layout's
module paths (pipelines.features.CyclicalEncoder, pipelines.torch_model.TorchMLPRegressor,
pipelines.estimate.PerformanceEstimator). Registered in a store today, they load through
loopline's allowlist, through MLflow's own loader, and give the predictions they gave then.
(tests/e2e/test_engines.py serves them through a real service.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import STORED_FAMILIES, STORED_MODELS, register_stored, tracking_section, write_params

# The expected predictions were written on another machine. The sklearn families compute in
# float64 through the same code path everywhere: equal to 1e-12. The torch MLP computes in
# float32, and its matrix products take the CPU's own vector path (AVX2, AVX-512): on another
# CPU the same weights agree to a few float32 ulps (seen: 4.6e-8 relative), not to 1e-12.
RTOL = {"torch_mlp": 1e-6}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from pipelines.core.config import load_params

    tmp = tmp_path_factory.mktemp("stored")
    params = load_params(write_params(tmp, STORED_MODELS / "unused.csv", tracking=tracking_section(tmp)))
    return params, {family: register_stored(params, family) for family in STORED_FAMILIES}


@pytest.mark.parametrize("family", STORED_FAMILIES)
def test_a_flat_layout_model_loads_and_predicts_as_it_did(store, family):
    from pipelines.model.features import CyclicalEncoder
    from pipelines.registry.tracking import client_for, load_model_version

    params, versions = store
    model, meta = load_model_version(client_for(params)[0], "bikes", versions[family])
    expected = pd.read_parquet(STORED_MODELS / family / "expected.parquet")
    predicted = model.predict(expected[meta["features"]])
    np.testing.assert_allclose(predicted, expected["prediction"], rtol=RTOL.get(family, 1e-12))
    cyclical = model[0].named_transformers_["cyclical_hr"]
    assert isinstance(cyclical, CyclicalEncoder)  # the class of today, under its old name in the file
    assert meta["family"] == family


@pytest.mark.parametrize("family", STORED_FAMILIES)
def test_the_onnx_form_logged_then_serves_with_parity(store, family):
    from pipelines.registry.tracking import client_for
    from serving.runtime import RegistrySource, predict_frame

    params, versions = store
    from pipelines.registry.champion import promote

    client, _ = client_for(params)
    promote(client, "bikes", versions[family], params.tracking.uri, reason="test")
    served = RegistrySource(params)(current=None)
    assert served is not None and served.engine_name == "onnx", served.engine_reason
    expected = pd.read_parquet(STORED_MODELS / family / "expected.parquet")
    predicted, _ = predict_frame(served, expected[served.features])
    np.testing.assert_allclose(predicted, expected["prediction"], rtol=1e-4, atol=1e-4)


def test_mlflows_own_loader_reads_a_flat_layout_model_by_its_stored_trusted_types(store):
    import mlflow.pyfunc

    params, _ = store
    model = mlflow.pyfunc.load_model(str(STORED_MODELS / "torch_mlp" / "model"))
    expected = pd.read_parquet(STORED_MODELS / "torch_mlp" / "expected.parquet")
    rows = expected[params.features.columns]
    rows = rows.astype({c: object for c in rows.columns if isinstance(rows[c].dtype, pd.CategoricalDtype)})
    np.testing.assert_allclose(model.predict(rows), expected["prediction"], rtol=RTOL["torch_mlp"])


def test_the_pickled_performance_estimator_of_the_flat_layout_loads_and_estimates(store):
    from pipelines.monitoring.estimate import PerformanceEstimator, estimate, loads_estimator
    from pipelines.registry.tracking import client_for, load_model_version

    params, versions = store
    estimator = loads_estimator((STORED_MODELS / "hist_gradient_boosting" / "reference" / "estimator.pkl").read_bytes())
    assert isinstance(estimator, PerformanceEstimator) and estimator.method == "DLE"
    model, _ = load_model_version(client_for(params)[0], "bikes", versions["hist_gradient_boosting"])
    rows = pd.read_parquet(STORED_MODELS / "hist_gradient_boosting" / "expected.parquet")
    result = estimate(estimator, model, rows, min_rows=10)
    assert result.value is not None and result.value > 0, result


def test_the_train_stage_model_file_of_the_flat_layout_loads():
    from pipelines.model.io import load_model

    model, meta = load_model(STORED_MODELS / "linear" / "dvc-stage")
    expected = pd.read_parquet(STORED_MODELS / "linear" / "expected.parquet")
    predicted = model.predict(expected[meta["features"]])
    np.testing.assert_allclose(predicted, expected["prediction"], rtol=1e-12)


def test_a_reproduction_module_follows_the_layout_of_its_commit(tmp_path):
    from pipelines.registry.reproduce import refit_module

    (tmp_path / "pipelines").mkdir()
    assert refit_module(tmp_path) == "pipelines.registry.reproduce"
    (tmp_path / "pipelines" / "reproduce.py").write_text("")  # a commit of the flat layout runs its own
    assert refit_module(tmp_path) == "pipelines.reproduce"
