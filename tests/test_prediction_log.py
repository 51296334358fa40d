"""The prediction log: written by a background thread, read back per input field."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pipelines.errors import LooplineError
from pipelines.prediction_log import PredictionLog, read_prediction_log


def served(version: str) -> SimpleNamespace:
    return SimpleNamespace(name="bikes", version=version, run_id=f"run{version}")


def test_prediction_log_appends_in_the_background_and_reads_back_per_field(tmp_path):
    log = PredictionLog(tmp_path / "p.db")
    log.append(
        served("1"), ["a", "b"], [{"hr": 1, "weathersit": "clear"}, {"hr": 2, "weathersit": None}], [10.5, 20.5], None
    )
    time.sleep(0.01)  # timestamps have millisecond resolution
    log.append(served("2"), ["c"], [{"hr": 3, "weathersit": "cloudy/misty"}], [30.0], None)
    log.flush()
    rows = read_prediction_log(tmp_path / "p.db", ["hr", "weathersit"])
    assert rows["request_id"].tolist() == ["a", "b", "c"]
    assert rows["hr"].tolist() == [1, 2, 3] and rows["prediction"].tolist() == [10.5, 20.5, 30.0]
    assert rows["weathersit"].tolist() == ["clear", None, "cloudy/misty"]
    assert rows["model_version"].tolist() == ["1", "1", "2"]
    later = read_prediction_log(tmp_path / "p.db", ["hr"], since=rows["ts"].iloc[2])
    assert later["request_id"].tolist() == ["c"]
    with pytest.raises(LooplineError, match="does not exist"):
        read_prediction_log(tmp_path / "none.db", ["hr"])
