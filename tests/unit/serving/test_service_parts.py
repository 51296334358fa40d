"""Serving parts without a server: request models, the batch-file check, the micro-batcher,
the prediction log and the champion holder."""

from __future__ import annotations

import asyncio
import math

import pandas as pd
import pytest
from pydantic import ValidationError

from conftest import GOOD, write_params
from pipelines.core.errors import LooplineError
from serving.runtime import ChampionHolder, MicroBatcher, ServedModel, predict_frame
from serving.schema import batch_model, check_records, record_model, request_records


@pytest.fixture
def params(tmp_path, params_of):
    return params_of(write_params(tmp_path, "unused.csv", serve={"max_batch_records": 3}))


def test_record_model_has_the_feature_columns_then_the_optional_context_fields(params):
    """Bikeshare's context field `day` (serve.context_columns) may come with a record, checked
    by its schema rule; it is logged, never given to the model."""
    from pydantic import ValidationError

    Record = record_model(params)
    assert list(Record.model_fields) == [*params.features.columns, "day"]
    assert Record(**GOOD).day is None and Record(**GOOD, day=45).day == 45
    with pytest.raises(ValidationError, match="day"):
        Record(**GOOD, day=400)  # schema: 1 to 366
    with pytest.raises(ValidationError, match="unused"):
        Record(**GOOD, unused=1)  # still no unknown field
    assert Record(**GOOD).hr == 8
    assert Record(**{**GOOD, "hr": 8.0, "season": 1.0}).model_dump() == Record(**GOOD).model_dump()  # JSON's 8.0 is 8
    # Category labels follow clean's rule: letter case and surrounding white space do not matter.
    assert Record(**{**GOOD, "weathersit": " Clear\t", "mnth": "JAN"}).model_dump() == Record(**GOOD).model_dump()
    assert Record(**{**GOOD, "temp": None}).temp is None  # temp may be missing (imputed)


@pytest.mark.parametrize(
    "change, field, kind",
    [
        ({"hr": 24}, "hr", "less_than_equal"),
        ({"hr": 3.5}, "hr", "value_error"),
        ({"hr": "3"}, "hr", "value_error"),
        ({"hr": True}, "hr", "value_error"),
        ({"workingday": False}, "workingday", "value_error"),
        ({"temp": math.nan}, "temp", "finite_number"),
        ({"temp": math.inf}, "temp", "finite_number"),
        ({"temp": -0.1}, "temp", "greater_than_equal"),
        ({"weathersit": "sunny"}, "weathersit", "literal_error"),
        ({"season": 5}, "season", "literal_error"),
        ({"season": None}, "season", "value_error"),
        ({"extra": 1}, "extra", "extra_forbidden"),
    ],
)
def test_record_model_refuses_bad_values_naming_the_field(params, change, field, kind):
    with pytest.raises(ValidationError) as err:
        record_model(params)(**{**GOOD, **change})
    assert {(e["loc"][0], e["type"]) for e in err.value.errors()} == {(field, kind)}


def test_missing_field_is_refused(params):
    body = dict(GOOD)
    del body["hum"]
    with pytest.raises(ValidationError, match="hum"):
        record_model(params)(**body)


def test_batch_model_limits_the_number_of_records(params):
    Batch = batch_model(params, record_model(params))
    assert len(Batch(records=[GOOD] * 3).records) == 3
    for records in ([], [GOOD] * 4):
        with pytest.raises(ValidationError, match="records"):
            Batch(records=records)


def test_check_records_types_a_good_file_and_names_the_first_bad_value(params):
    frame = pd.DataFrame([GOOD, {**GOOD, "temp": None, "weathersit": " Cloudy/Misty "}, {**GOOD, "extra": "x"}])
    checked = check_records(frame, params, "in.csv")
    assert list(checked.columns) == params.features.columns
    assert checked["hr"].dtype == "float64" and math.isnan(checked["temp"].iloc[1])
    assert checked["weathersit"].iloc[1] == "cloudy/misty"
    bad = {
        "hr": (24, "above the maximum 23.0"),
        "weathersit": ("sunny", "not one of"),
        "season": (None, "missing"),
        "hum": ("wet", "not a number"),
        "weekday": (1.5, "not a whole number"),
    }
    for column, (value, rule) in bad.items():
        broken = frame.copy()
        broken[column] = broken[column].astype(object)
        broken.loc[1, column] = value
        with pytest.raises(LooplineError, match=rf"in.csv: column '{column}': 1 row\(s\) {rule}.*row 2"):
            check_records(broken, params, "in.csv")
    with pytest.raises(LooplineError, match=r"missing column\(s\) \['mnth'\]"):
        check_records(frame.drop(columns="mnth"), params, "in.csv")


def test_micro_batcher_predicts_concurrent_requests_together():
    calls: list[list[int]] = []

    def handle(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 10 for i in items]

    async def burst() -> list[int]:
        batcher = MicroBatcher(handle, max_batch_size=16)
        first = await batcher.submit(-1)  # a lone request goes alone, without waiting
        return [first, *await asyncio.gather(*(batcher.submit(i) for i in range(40)))]

    results = asyncio.run(burst())
    assert results == [-10] + [i * 10 for i in range(40)]
    assert calls[0] == [-1]
    assert max(len(c) for c in calls) == 16 and len(calls) <= 1 + 3


def test_micro_batcher_fails_every_request_of_a_failed_batch_and_recovers():
    def handle(items):
        if 0 in items:
            raise RuntimeError("boom")
        return items

    async def run():
        batcher = MicroBatcher(handle, max_batch_size=8)
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        return failed, await batcher.submit(5)

    failed, after = asyncio.run(run())
    assert all(isinstance(f, RuntimeError) for f in failed) and after == 5


def served(version: str) -> ServedModel:
    return ServedModel(
        model=None,
        name="bikes",
        version=version,
        run_id=f"run{version}",
        task="regression",
        features=["hr"],
        classes=[],
        loaded_at="now",
    )


def test_champion_holder_keeps_serving_when_the_registry_fails(params):
    answers = iter([served("1"), None, ConnectionError("registry down"), served("2")])

    def load(known):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    holder = ChampionHolder(params, load, "test")
    with pytest.raises(LooplineError, match="no version aliased 'champion'"):
        holder.require()
    assert holder.refresh() and holder.require().version == "1"
    assert not holder.refresh() and holder.require().version == "1"  # unchanged
    assert not holder.refresh() and holder.require().version == "1"  # failure: keep v1
    assert "registry down" in holder.status()["last_error"]
    assert holder.refresh() and holder.require().version == "2" and holder.status()["last_error"] is None


def test_predict_frame_gives_labels_and_class_probabilities_for_classifiers():
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = pd.DataFrame({"x": np.linspace(-3, 3, 60)})
    y = np.where(X["x"] > 0, "high", "low")
    model = LogisticRegression().fit(X, y)
    clf = ServedModel(
        model=model,
        name="m",
        version="1",
        run_id="r",
        task="classification",
        features=["x"],
        classes=["high", "low"],
        loaded_at="now",
    )
    labels, probabilities = predict_frame(clf, pd.DataFrame({"x": [-2.0, 2.0]}))
    assert labels == ["low", "high"]
    assert [set(p) for p in probabilities] == [{"high", "low"}] * 2
    assert probabilities[0]["low"] > 0.5 and sum(probabilities[1].values()) == pytest.approx(1.0)


def test_request_records_are_bodies_the_record_model_accepts(params):
    frame = pd.DataFrame([GOOD, {**GOOD, "temp": None}])
    frame[["hr", "season", "weekday"]] = frame[["hr", "season", "weekday"]].astype("float64")  # as clean types them
    bodies = request_records(frame.assign(bikers=3.0), params)
    assert [list(b) for b in bodies] == [params.features.columns] * 2
    assert bodies[0]["hr"] == 8 and isinstance(bodies[0]["hr"], int) and bodies[1]["temp"] is None
    Record = record_model(params)
    assert [Record(**b).model_dump() for b in bodies] == [
        Record(**GOOD).model_dump(),
        Record(**{**GOOD, "temp": None}).model_dump(),
    ]


def test_requests_skip_the_tracing_middleware_unless_serve_tracing_is_on(tmp_path):
    """BentoML's OpenTelemetry middleware records spans for every request even with no exporter
    (a third of the throughput at 32 clients): off by default, every URL is excluded from it."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    seen = {}
    for tracing in (False, True):
        params = write_params(tmp_path, "unused.csv", serve={"tracing": tracing})
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, serving.service as s; print(json.dumps(s.Predictor.config.get('tracing')))",
            ],
            cwd=REPO,
            env={**os.environ, "LOOPLINE_PARAMS": str(params)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        seen[tracing] = json.loads(out.stdout.splitlines()[-1])
    assert seen == {False: {"excluded_urls": [".*"]}, True: {}}
