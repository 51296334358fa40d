"""Stage functions on real files: validation, training, evaluation, model files, both examples."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from conftest import WINE, run_cli, write_params
from pipelines.core import stages as core_stages
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.data import stages as data_stages
from pipelines.model.estimators import build_model
from pipelines.model.io import dumps_model, load_model, loads_model


@pytest.fixture(scope="module")
def bikeshare_run(tmp_path_factory):
    """One full run on January–March (2000 hours), shared by the tests below."""
    from conftest import bikeshare_sample
    from pipelines.core.config import load_params

    tmp = tmp_path_factory.mktemp("bike")
    params = load_params(write_params(tmp, bikeshare_sample(tmp), train={"model": "hist_gradient_boosting"}))
    summary = core_stages.run_all(params, echo=lambda s: None)
    return params, summary


def test_full_run_beats_the_naive_baseline(bikeshare_run):
    _, summary = bikeshare_run
    test = summary["evaluate"]["test"]
    assert test["rmse"] < 0.7 * test["baseline_rmse"]
    assert test["r2"] > 0.5
    assert summary["split"] == {"train": 1400, "val": 300, "test": 300}


def test_outputs_written_and_model_reloads_with_same_predictions(bikeshare_run):
    params, summary = bikeshare_run
    layout = Layout.of(params)
    model, meta = load_model(layout.models)
    assert meta["features"] == params.features.columns and meta["family"] == "hist_gradient_boosting"
    test = pd.read_parquet(layout.split_file("test"))
    preds = pd.read_csv(layout.predictions)
    assert preds["predicted"].to_numpy() == pytest.approx(model.predict(test[meta["features"]]), rel=1e-9)
    assert json.loads(layout.metrics.read_text()) == summary["evaluate"]
    report = (layout.validation / "report.html").read_text()
    assert "Validation passed" in report


def test_model_bytes_are_reproducible(bikeshare_run):
    params, _ = bikeshare_run
    model, _ = load_model(Layout.of(params).models)
    assert dumps_model(model) == dumps_model(model)
    fitted_threads = model[-1]._bin_mapper.n_threads
    model[-1]._bin_mapper.n_threads = 7  # as if fitted on a machine with other trainings running
    assert dumps_model(model) == dumps_model(loads_model(dumps_model(model)))
    model[-1]._bin_mapper.n_threads = fitted_threads


def test_model_file_with_untrusted_type_is_refused(bikeshare_run):
    params, _ = bikeshare_run
    model, _ = load_model(Layout.of(params).models)
    model.steps.append(("extra", io.StringIO))  # a type no loopline pipeline contains
    import skops.io as sio

    with pytest.raises(LooplineError, match="outside loopline's allowlist"):
        loads_model(sio.dumps(model), "tampered.skops")
    with pytest.raises(LooplineError, match="not a skops model file"):
        loads_model(b"not a zip", "junk.skops")


def test_unknown_hyperparameter_is_named(tmp_path, sample_csv, params_of):
    params = params_of(
        write_params(
            tmp_path, sample_csv, train={"hyperparams": {"random_forest": {"n_trees": 5}}, "model": "random_forest"}
        )
    )
    with pytest.raises(LooplineError, match=r"train.hyperparams.random_forest.n_trees"):
        build_model(params)


@pytest.mark.parametrize("family", ["linear", "random_forest"])
def test_other_families_train(tmp_path, sample_csv, params_of, family):
    hp = {"random_forest": {"n_estimators": 20, "n_jobs": 1}}
    params = params_of(write_params(tmp_path, sample_csv, train={"model": family, "hyperparams": hp}))
    test = core_stages.run_all(params, echo=lambda s: None)["evaluate"]["test"]
    assert test["rmse"] < test["baseline_rmse"]


def test_classification_example_end_to_end(tmp_path, capsys):
    path = write_params(tmp_path, WINE, base="params.wine.yaml")
    code, out, err = run_cli("run", "--params", str(path), capsys=capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "models" / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] > 0.85 and metrics["f1"] > 0.85 and metrics["roc_auc"] > 0.9
    assert metrics["accuracy"] > metrics["baseline_accuracy"] + 0.3
    assert "roc_auc" in out
    preds = pd.read_csv(tmp_path / "models" / "plots" / "predictions.csv")
    assert set(preds["actual"]) <= {"cultivar_a", "cultivar_b", "cultivar_c"}


def test_validation_failure_names_column_rule_and_values(tmp_path, sample_csv, params_of):
    df = pd.read_csv(sample_csv)
    df.loc[[3, 9], "hum"] = [5.0, 7.5]
    df.to_csv(sample_csv, index=False)
    params = params_of(write_params(tmp_path, sample_csv))
    data_stages.ingest(params), data_stages.clean(params)
    with pytest.raises(LooplineError) as info:
        data_stages.validate(params)
    msg = str(info.value)
    assert "column 'hum'" in msg and "expect_column_values_to_be_between" in msg
    assert "5.0" in msg and "7.5" in msg and "report.html" in msg
    layout = Layout.of(params)
    assert "Validation FAILED" in (layout.validation / "report.html").read_text()
    assert not (layout.validation / "summary.json").exists()
