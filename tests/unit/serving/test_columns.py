"""The columnar batch (/predict_columns) is checked by the rules a record is: the same values
are refused or accepted, the same way, whether sent as records or as columns."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import GOOD, write_params
from serving.schema import check_columns, column_batch_model, record_model


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    from pipelines.core.config import load_params

    return load_params(write_params(tmp_path_factory.mktemp("columns"), "unused.csv"))


# Per field, values at and beyond its rule (and of the wrong JSON type).
PROBES = {
    "temp": [0.0, 1.0, 0.5, 1, None, 1.5, -0.1, "0.5", True, float("nan"), float("inf"), 10**400],
    "hr": [0, 23, 8.0, 8.5, 24, -1, "8", True, False, None, 10**20, -(10**400)],
    "weathersit": ["clear", " Clear ", "CLEAR", "sunny", 1, None, ""],
    "mnth": ["Jan", "jan", "January", None, 3],
    "holiday": [0, 1, 2, 0.0, None],
    "day": ["2011-01-01", None, 5],
}


def _record_accepts(record_model_, field: str, value) -> bool:
    try:
        record_model_(**{**GOOD, field: value})
    except ValidationError:
        return False
    return True


def _columns_accept(params, field: str, value) -> bool:
    columns = {k: [v, v] for k, v in GOOD.items()}
    columns[field] = [GOOD.get(field, value), value]
    try:
        check_columns(columns, params)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("field", list(PROBES))
def test_each_value_is_accepted_as_a_column_exactly_when_a_record_accepts_it(params, field):
    record = record_model(params)
    verdicts = {repr(v): (_record_accepts(record, field, v), _columns_accept(params, field, v)) for v in PROBES[field]}
    assert {k: r for k, (r, _) in verdicts.items()} == {k: c for k, (_, c) in verdicts.items()}
    assert any(r for r, _ in verdicts.values()) and not all(r for r, _ in verdicts.values())


def test_columns_come_back_typed_as_the_model_takes_them(params):
    columns = {k: [v, v, v] for k, v in GOOD.items()}
    columns["weathersit"] = ["clear", " CLEAR", "clear "]
    columns["temp"] = [0.5, None, 1]
    typed = check_columns(columns, params)
    assert list(typed["weathersit"]) == ["clear"] * 3
    assert typed["hr"].dtype == np.float64 and list(typed["hr"]) == [8.0] * 3
    np.testing.assert_array_equal(typed["temp"], [0.5, np.nan, 1.0])
    assert set(typed) == set(GOOD)  # the context field `day` was not sent: not made up


def test_a_broken_rule_names_the_column_the_rule_the_row_and_the_value(params):
    columns = {k: [v] * 4 for k, v in GOOD.items()}
    columns["hr"] = [1, 2, 30, 40]
    with pytest.raises(ValueError, match=r"column 'hr': 2 row\(s\) above the maximum 23.0, e.g. row 3: 30"):
        check_columns(columns, params)
    columns["hr"] = [1, 2]
    with pytest.raises(ValueError, match="one value per row: 'temp' has 4, 'hr' has 2"):
        check_columns(columns, params)


def test_the_column_model_refuses_unknown_fields_and_empty_or_long_arrays(params):
    model = column_batch_model(params, record_model(params))
    one = {k: [v] for k, v in GOOD.items()}
    model(**one)
    with pytest.raises(ValidationError, match="extra"):
        model(**one, color=["red"])
    with pytest.raises(ValidationError, match="at least 1"):
        model(**{**one, "hr": []})
    limit = params.serve.max_batch_records
    with pytest.raises(ValidationError, match=f"at most {limit}"):
        model(**{**one, "hr": [1] * (limit + 1)})
    with pytest.raises(ValidationError, match="Field required"):
        model(**{k: v for k, v in one.items() if k != "hr"})
    schema = model.model_json_schema()
    assert schema["properties"]["hr"]["items"]["maximum"] == 23 and "day" not in schema["required"]
