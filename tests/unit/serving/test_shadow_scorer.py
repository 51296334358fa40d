"""The shadow scorer of the service (serving/shadow.py), with a real SQLite prediction log: it
scores answered rows off the request path, skips (and counts) rows when its bounded queue is
full, and a shadow that raises is counted and reported, never raised to the caller."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import wait_until, write_params
from pipelines.monitoring.prediction_log import PredictionLog, read_answers
from serving.runtime import ServedModel
from serving.shadow import ShadowScorer


class Model:
    """A regression model whose predict can be held (to fill the queue) or made to raise."""

    def __init__(self, fail: bool = False):
        self.fail, self.release = fail, threading.Event()
        self.release.set()

    def predict(self, frame):
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("the shadow's weights are NaN")
        return np.full(len(frame), 7.0)


def served(model: Model, params) -> ServedModel:
    return ServedModel(model, "bikes", "2", "run-2", "regression", list(params.features.columns), [], "now")


def records(params, n: int) -> list[dict]:
    one = {c: 1 for c in params.features.columns} | {"weathersit": "clear", "mnth": "Jan"}
    return [dict(one) for _ in range(n)]


@pytest.fixture
def scorer(params_of, sample_csv, tmp_path):
    def make(model: Model, queue_rows: int = 10_000) -> ShadowScorer:
        params = params_of(write_params(tmp_path, sample_csv, serve={"shadow_queue_rows": queue_rows}))
        log = PredictionLog(tmp_path / "predictions.db")
        shadow = ShadowScorer(params, source=None, prediction_log=log)  # type: ignore[arg-type]  # never refreshed here
        shadow.current = served(model, params)
        return shadow

    return make


def test_answered_rows_are_scored_and_logged_as_the_shadow(scorer, tmp_path):
    shadow = scorer(Model())
    rows = records(shadow.params, 5)
    shadow.offer(rows, [f"r{i}" for i in range(5)])
    wait_until(lambda: shadow.scored == 5)
    shadow._log.flush()
    logged = read_answers(tmp_path / "predictions.db", [], request_ids=[f"r{i}" for i in range(5)], role="shadow")
    assert len(logged) == 5 and set(logged["model_version"]) == {"2"} and set(logged["prediction"]) == {7.0}
    assert read_answers(tmp_path / "predictions.db", [], request_ids=["r0"]).empty  # no champion row was invented
    assert shadow.status()["rows_scored"] == 5 and shadow.status()["last_error"] is None


def test_a_full_queue_skips_rows_and_counts_them_without_waiting(scorer):
    model = Model()
    model.release.clear()  # the worker holds the first burst
    shadow = scorer(model, queue_rows=6)
    shadow.offer(records(shadow.params, 4), ["a0", "a1", "a2", "a3"])
    started = time.monotonic()
    shadow.offer(records(shadow.params, 4), ["b0", "b1", "b2", "b3"])  # 8 > 6: skipped, at once
    assert time.monotonic() - started < 0.1
    assert shadow.skipped == 4
    model.release.set()
    wait_until(lambda: shadow.scored == 4)
    status = shadow.status()
    assert status["rows_skipped"] == 4 and status["queued_rows"] == 0 and status["queue_rows"] == 6


def test_a_shadow_that_raises_is_counted_and_reported_never_raised(scorer):
    shadow = scorer(Model(fail=True))
    shadow.offer(records(shadow.params, 3), ["x0", "x1", "x2"])  # returns: nothing raised to the caller
    wait_until(lambda: shadow.failed == 3)
    status = shadow.status()
    assert status["rows_scored"] == 0 and "shadow v2 failed to predict: RuntimeError" in status["last_error"]
    assert "NaN" in status["last_error"]
