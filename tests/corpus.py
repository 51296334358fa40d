"""The broken-input corpus: files made from a good one, each broken in one way, with the stage
whose error it is and words that error must contain (tests/unit/data/test_bad_inputs.py runs
it on the pandas engine, tests/e2e/test_data_on_dask.py on both)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def _rewrite(df_change):
    def make(good: Path, bad: Path) -> None:
        df = pd.read_csv(good, dtype=str, keep_default_na=False)
        df_change(df)
        df.to_csv(bad, index=False)

    return make


def _bytes(transform):
    def make(good: Path, bad: Path) -> None:
        bad.write_bytes(transform(good.read_bytes()))

    return make


def _set(col, value, rows=slice(0, 5)):
    def change(df):
        df.loc[df.index[rows], col] = value

    return change


def _drop(col):
    return lambda df: df.drop(columns=[col], inplace=True)


def _non_utf8(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[7] = lines[7].replace(b"clear", b"cl\xe9ar")  # latin-1 é
    return b"\n".join(lines)


FAILING = {
    # name: (make, stage whose error it is, words the message must contain)
    "zero_byte": (_bytes(lambda d: b""), "ingest", ["empty (0 bytes)"]),
    "header_only": (_bytes(lambda d: d.split(b"\n", 1)[0] + b"\n"), "ingest", ["no data rows"]),
    "missing_feature_column": (_rewrite(_drop("temp")), "ingest", ["['temp']", "missing"]),
    "missing_target": (_rewrite(_drop("bikers")), "ingest", ["target column 'bikers'", "missing"]),
    "wrong_dtype_everywhere": (
        _rewrite(_set("temp", "warm", slice(None))),
        "clean",
        ["temp: not a number", "'warm'", "max_quarantine_fraction"],
    ),
    "out_of_range": (
        _rewrite(_set("hum", "5.5")),
        "validate",
        ["column 'hum'", "expect_column_values_to_be_between", "5.5"],
    ),
    "unknown_category": (
        _rewrite(_set("weathersit", "tornado")),
        "validate",
        ["column 'weathersit'", "expect_column_values_to_be_in_set", "tornado"],
    ),
    "all_null_column": (
        _rewrite(_set("windspeed", "", slice(None))),
        "validate",
        ["column 'windspeed'", "expect_column_values_to_not_be_null"],
    ),
    "negative_target": (
        _rewrite(_set("bikers", "-4")),
        "validate",
        ["column 'bikers'", "expect_column_values_to_be_between", "-4.0"],
    ),
    "non_utf8": (_bytes(_non_utf8), "ingest", ["not valid UTF-8", "line 8"]),
    "random_binary": (_bytes(lambda d: os.urandom(4096)), "ingest", ["not a CSV text file"]),
    "utf16_excel_unicode_text": (
        _bytes(lambda d: d.decode("utf-8").encode("utf-16")),
        "ingest",
        ["UTF-16", "re-export it as CSV UTF-8"],
    ),
}
