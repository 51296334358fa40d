"""Unit tests of the pure stage functions on small frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import raw_params
from pipelines.core.config import parse_params
from pipelines.core.errors import LooplineError
from pipelines.data.clean import clean_rows
from pipelines.data.split import split_rows
from pipelines.model.features import CyclicalEncoder, build_preprocessor

PARAMS = parse_params(raw_params())


def _text_table(**cols) -> pa.Table:
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def _bike_rows(n: int = 10, **override) -> pa.Table:
    cols = {
        "season": ["1"] * n,
        "mnth": ["Jan"] * n,
        "day": [str(i + 1) for i in range(n)],
        "hr": [str(i % 24) for i in range(n)],
        "holiday": ["0"] * n,
        "weekday": ["6"] * n,
        "workingday": ["0"] * n,
        "weathersit": ["clear"] * n,
        "temp": ["0.24"] * n,
        "atemp": ["0.28"] * n,
        "hum": ["0.81"] * n,
        "windspeed": ["0"] * n,
        "bikers": [str(10 + i) for i in range(n)],
    }
    cols.update(override)
    return _text_table(**cols)


def test_clean_types_and_normalises_categories():
    rows = _bike_rows(4, mnth=[" jan", "JAN", "Jan ", "feb"], weathersit=["Clear", "clear", " CLEAR", "tornado"])
    out = clean_rows(
        rows, PARAMS.table_schema, PARAMS.data, PARAMS.clean.model_copy(update={"max_quarantine_fraction": 1.0})
    )
    df = out.rows.to_pandas()
    assert df["temp"].dtype == np.float64
    assert list(df["mnth"]) == ["Jan", "Jan", "Jan", "Feb"]
    # unknown labels are kept as they are, for validate to report
    assert list(df["weathersit"]) == ["clear", "clear", "clear", "tornado"]


def test_clean_quarantines_unparseable_and_missing_target_with_reasons():
    rows = _bike_rows(40, temp=["warm"] + ["0.3"] * 39, bikers=[None] + ["5"] * 38 + ["1.5"])
    cfg = PARAMS.clean.model_copy(update={"max_quarantine_fraction": 0.5})
    out = clean_rows(rows, PARAMS.table_schema, PARAMS.data, cfg)
    assert out.report == {"rows_in": 40, "rows_quarantined": 2, "duplicates_dropped": 0, "rows_out": 38}
    reasons = list(out.quarantine["reason"])
    assert reasons[0] == "temp: not a number; bikers: missing value"
    assert reasons[1] == "bikers: not a whole number"
    assert out.quarantine["temp"].iloc[0] == "warm"  # the original text is kept


def test_clean_drops_exact_duplicates_and_counts_them():
    rows = _bike_rows(5, day=["1"] * 5, hr=["0"] * 5, bikers=["3"] * 5)
    out = clean_rows(rows, PARAMS.table_schema, PARAMS.data, PARAMS.clean)
    assert out.report["duplicates_dropped"] == 4 and out.rows.num_rows == 1


def test_clean_fails_when_most_rows_are_broken():
    rows = _bike_rows(10, hum=["high"] * 10)
    with pytest.raises(LooplineError) as info:
        clean_rows(rows, PARAMS.table_schema, PARAMS.data, PARAMS.clean)
    msg = str(info.value)
    assert "hum: not a number" in msg and "'high'" in msg and "10 of 10" in msg


def test_clean_keeps_or_quarantines_missing_values_per_schema():
    raw = raw_params()
    raw["schema"]["columns"]["hum"]["missing"] = "quarantine"
    params = parse_params(raw)
    rows = _bike_rows(30, hum=[None] + ["0.5"] * 29, temp=[None] + ["0.2"] * 29)
    out = clean_rows(rows, params.table_schema, params.data, params.clean)
    assert out.report["rows_quarantined"] == 1
    assert out.quarantine["reason"].iloc[0] == "hum: missing value"  # temp's is kept: imputed later
    kept = clean_rows(rows, PARAMS.table_schema, PARAMS.data, PARAMS.clean)
    assert kept.report["rows_quarantined"] == 0 and kept.rows.to_pandas()["hum"].isna().sum() == 1


def test_cyclical_encoder_wraps_around_and_handles_labels():
    enc = CyclicalEncoder(period=24).fit(pd.DataFrame({"hr": [0, 23]}))
    out = enc.transform(pd.DataFrame({"hr": [0, 23, 12]}))
    assert np.linalg.norm(out[0] - out[1]) < 0.3 < np.linalg.norm(out[0] - out[2])
    months = CyclicalEncoder(period=12, categories=["Jan", "Feb", "Mar"]).fit(pd.DataFrame({"m": ["Jan"]}))
    coded = months.transform(pd.DataFrame({"m": ["Jan", "Feb", "Unknown", None]}))
    assert coded.shape == (4, 2)
    np.testing.assert_allclose(coded[0], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(coded[2:], 0.0)
    assert list(months.get_feature_names_out(["m"])) == ["m_sin", "m_cos"]


def test_preprocessor_is_fitted_on_train_rows_only():
    train = pd.DataFrame(
        {
            "temp": [0.0, 1.0],
            "atemp": [0.0, 1.0],
            "hum": [0.5, 0.5],
            "windspeed": [0.1, 0.1],
            "season": [1.0, 2.0],
            "holiday": [0.0, 0.0],
            "workingday": [1.0, 0.0],
            "weathersit": ["clear", "clear"],
            "hr": [0.0, 12.0],
            "mnth": ["Jan", "Feb"],
            "weekday": [1.0, 2.0],
        }
    )
    pre = build_preprocessor(PARAMS.features, PARAMS.table_schema).fit(train)
    later = train.assign(temp=[10.0, 20.0], weathersit=["heavy rain/snow", None])
    out = pd.DataFrame(pre.transform(later), columns=pre.get_feature_names_out())
    # scaled with the training mean/std (0.5/0.5), not refitted on the new rows
    assert list(out["numeric__temp"]) == [19.0, 39.0]
    # an unseen category is all zeros, not an error
    assert out.filter(like="weathersit").to_numpy().sum() == 0


def test_time_split_never_trains_on_the_future():
    df = pd.DataFrame(
        {"day": np.repeat(np.arange(1, 11), 24), "hr": np.tile(np.arange(24), 10), "bikers": np.arange(240.0)}
    ).sample(frac=1, random_state=0)
    parts = split_rows(df, PARAMS.split, "bikers", stratify=False)
    key = lambda f: f["day"] * 24 + f["hr"]  # noqa: E731
    assert key(parts.train).max() < key(parts.val).min()
    assert key(parts.val).max() < key(parts.test).min()
    assert len(parts.train) + len(parts.val) + len(parts.test) == 240


def test_shuffled_split_is_seeded_and_stratified():
    df = pd.DataFrame({"x": np.arange(100.0), "y": ["a"] * 80 + ["b"] * 20})
    cfg = PARAMS.split.model_copy(update={"order_by": [], "val_fraction": 0.2, "test_fraction": 0.2})
    one, two = split_rows(df, cfg, "y", stratify=True), split_rows(df, cfg, "y", stratify=True)
    pd.testing.assert_frame_equal(one.test, two.test)
    assert (one.test["y"] == "b").sum() == 4


def test_split_refuses_too_few_rows():
    with pytest.raises(LooplineError, match="too few"):
        split_rows(pd.DataFrame({"day": [1, 2], "hr": [0, 0], "bikers": [1, 2]}), PARAMS.split, "bikers", False)


def test_duplicates_found_exactly_including_missing_values():
    rows = _bike_rows(
        6,
        day=["1", "1", "1", "2", "1", "1"],
        hr=["0"] * 6,
        bikers=["3"] * 6,
        temp=[None, None, "0.5", None, "0.5", "0.25"],
        weathersit=["clear"] * 5 + ["CLEAR"],
    )
    out = clean_rows(rows, PARAMS.table_schema, PARAMS.data, PARAMS.clean)
    # rows 1 (= row 0, both temp missing) and 4 (= row 2) are duplicates; row 5 differs in temp
    assert out.report["duplicates_dropped"] == 2
    assert out.rows.to_pandas()["temp"].tolist()[:3] == pytest.approx([float("nan"), 0.5, float("nan")], nan_ok=True)


def test_a_training_sample_is_seeded_in_order_and_only_when_the_rows_are_more(params_of, tmp_path):
    """train.sample_rows: at most that many training rows, the same for the same seed, in
    the order of the split; fewer rows (or 0) fit on every row and record nothing."""
    from conftest import write_params
    from pipelines.data.split import training_sample

    rows = pd.DataFrame({"hr": np.arange(1000), "bikers": np.arange(1000) * 2})
    params = params_of(write_params(tmp_path, tmp_path / "none.csv", train={"sample_rows": 250, "seed": 5}))
    sample, note = training_sample(rows, params)
    again, _ = training_sample(rows, params)
    assert len(sample) == 250 and sample.equals(again)
    assert sample["hr"].is_monotonic_increasing and set(sample["hr"]) <= set(rows["hr"])
    assert note == "250 of 1000 training rows (train.sample_rows, seed 5)"
    other = params.model_copy(update={"train": params.train.model_copy(update={"seed": 6})})
    assert not training_sample(rows, other)[0].equals(sample)
    for limit in (0, 1000, 5000):
        every = params.model_copy(update={"train": params.train.model_copy(update={"sample_rows": limit})})
        kept, none = training_sample(rows, every)
        assert kept is rows and none is None
