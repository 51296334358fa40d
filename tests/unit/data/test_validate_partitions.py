"""A table validated a partition at a time (as a Dask worker sees it) gets the verdict Great
Expectations gives the same table loaded whole: the same success per expectation, the same
counts and shares, the same first examples, the row count over every partition; a failure
names the partition its examples come from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import BIKESHARE, REPO
from pipelines.core.errors import LooplineError
from pipelines.data.validate import combine_partitions, validate_frame, validate_partition, validate_partitions

COMPARED = (
    "element_count",
    "unexpected_count",
    "missing_count",
    "partial_unexpected_list",
    "observed_value",
)
SHARES = ("unexpected_percent", "missing_percent", "unexpected_percent_total", "unexpected_percent_nonmissing")


@pytest.fixture(scope="module")
def schema():
    from pipelines.core.config import load_params

    return load_params(REPO / "params.yaml").table_schema


def table(rows: int = 1200) -> pd.DataFrame:
    return pd.read_csv(BIKESHARE).head(rows)


def in_parts(frame: pd.DataFrame, bounds: list[int]) -> list[tuple[str, pd.DataFrame]]:
    edges = [0, *bounds, len(frame)]
    return [(f"part.{i}", frame.iloc[a:b]) for i, (a, b) in enumerate(zip(edges, edges[1:], strict=False))]


def assert_same_verdict(whole: dict, combined: dict) -> None:
    assert combined["success"] == whole["success"]
    assert combined["statistics"] == whole["statistics"]
    assert len(combined["results"]) == len(whole["results"])
    for mine, theirs in zip(combined["results"], whole["results"], strict=True):
        assert mine["expectation_config"] == theirs["expectation_config"]
        label = (theirs["expectation_config"]["type"], theirs["expectation_config"]["kwargs"].get("column"))
        assert mine["success"] == theirs["success"], label
        got, want = mine["result"], theirs["result"]
        for key in COMPARED:
            assert got.get(key) == want.get(key), (label, key)
        for key in SHARES:
            assert (got.get(key) is None) == (want.get(key) is None), (label, key)
            if want.get(key) is not None:
                assert got[key] == pytest.approx(want[key], rel=1e-12), (label, key)


def test_a_clean_table_in_three_partitions_passes_as_it_does_whole(schema):
    frame = table()
    whole = validate_frame(frame, schema).result
    assert whole["success"]
    assert_same_verdict(
        whole, combine_partitions([(n, validate_partition(p, schema)) for n, p in in_parts(frame, [400, 800])])
    )


def test_bad_values_spread_over_partitions_are_counted_and_shown_as_gx_counts_them_whole(schema):
    """Out-of-range and unknown values in several partitions, more than GX's 20 examples in
    all; a column whose nulls exceed its allowed share in one partition but not over the
    table (temp): the share is of the table's rows, not a partition's."""
    frame = table()
    rng = np.random.default_rng(3)
    frame.loc[rng.choice(np.arange(0, 400), 15, replace=False), "hr"] = 99
    frame.loc[rng.choice(np.arange(800, 1200), 12, replace=False), "hr"] = -1
    frame.loc[[5, 901], "weathersit"] = "snowstorm"
    frame.loc[[7, 8, 402], "weathersit"] = None
    limit = schema.columns["temp"].max_null_fraction
    crowded = int(400 * limit) + 5  # over the share in the first partition, under it over 1,200 rows
    frame.loc[frame.index[:crowded], "temp"] = np.nan
    assert crowded / 400 > limit >= crowded / len(frame)
    whole = validate_frame(frame, schema)
    parts = in_parts(frame, [400, 800])
    combined = validate_partitions(parts, schema, "bikeshare in 3 partitions")
    assert not whole.success and not combined.success
    assert_same_verdict(whole.result, combined.result)
    by_column = {
        (r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column")): r
        for r in combined.result["results"]
    }
    hr = by_column[("expect_column_values_to_be_between", "hr")]["result"]
    assert hr["unexpected_count"] == 27 and len(hr["partial_unexpected_list"]) == 20
    assert set(hr["partial_unexpected_partitions"]) == {"part.0", "part.2"}
    assert by_column[("expect_column_values_to_not_be_null", "temp")]["success"]  # as whole, not as part.0
    assert not validate_partitions(parts[:1], schema).success  # part.0 alone fails on temp
    # The failure line names the column, the rule, examples and the partitions they come from.
    [line] = [f for f in combined.failures if f.startswith("column 'hr'")]
    assert "27 rows" in line and "99" in line and "part.0" in line and "part.2" in line
    assert "bikeshare in 3 partitions" in combined.report_html


def test_the_row_count_is_over_every_partition(schema):
    """Each partition is below schema.row_count.min; the table is not."""
    minimum = schema.row_count.min
    frame = table(minimum + 10)
    parts = in_parts(frame, [minimum // 2])
    assert all(len(p) < minimum for _, p in parts)
    combined = validate_partitions(parts, schema)
    rows = next(r for r in combined.result["results"] if r["expectation_config"]["type"].startswith("expect_table_row"))
    assert rows["success"] and rows["result"]["observed_value"] == len(frame)
    assert_same_verdict(validate_frame(frame, schema).result, combined.result)


def test_a_partition_without_a_column_fails_the_table_naming_the_partition(schema):
    frame = table(900)
    parts = in_parts(frame, [300, 600])
    parts[1] = (parts[1][0], parts[1][1].drop(columns=["hum"]))
    combined = validate_partitions(parts, schema)
    assert not combined.success
    failed = [f for f in combined.failures if "'hum'" in f]
    assert failed and all("part.1" in f for f in failed), combined.failures


def test_partitions_of_different_suites_or_none_are_refused_and_order_does_not_matter(schema):
    frame = table(400)
    one = validate_partition(frame, schema)
    with pytest.raises(LooplineError, match="no partitions"):
        combine_partitions([])
    fewer = {**one, "results": one["results"][1:]}
    with pytest.raises(LooplineError, match="different suites"):
        combine_partitions([("a", one), ("b", fewer)])
    # results are matched by what they check, not by their place in the list
    shuffled = {**one, "results": list(reversed(one["results"]))}
    assert combine_partitions([("a", one), ("b", shuffled)]) == combine_partitions([("a", one), ("b", one)])
