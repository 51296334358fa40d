"""The native thread budget of trainings that share a machine."""

from __future__ import annotations

import os
import subprocess
import sys

from sklearn.base import BaseEstimator, RegressorMixin
from threadpoolctl import threadpool_info

from conftest import REPO, write_params

HOLD_SLOT = """
import sys, time
sys.path.insert(0, {repo!r})
from pipelines.core.threads import training_slot
with training_slot():
    print("holding", flush=True)
    time.sleep(60)
"""


def openmp_threads() -> int:
    return max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "openmp")


class Probe(RegressorMixin, BaseEstimator):
    """Records the OpenMP pool size it is fitted under."""

    seen: list[int] = []

    def fit(self, X, y):
        Probe.seen.append(openmp_threads())
        return self


def test_concurrent_trainings_divide_the_cores(tmp_path, sample_csv, params_of, monkeypatch):
    """Two trainings at once each used every core (OpenMP threads spinning against each
    other): 2.2x the time of running them in series. A fit now gets the cores divided among
    the trainings running on this machine (read back from the OpenMP pool inside the fit),
    unless train.threads says otherwise. The two count only each other (a folder of slots of
    their own): the suite's other trainings run beside them."""
    monkeypatch.setenv("LOOPLINE_TRAINING_SLOTS", str(tmp_path / "slots"))
    from pipelines.core.stages import run_stage
    from pipelines.core.threads import available_cores, fit_threads, training_slot
    from pipelines.data import split as split_module
    from pipelines.model.estimators import build_model, fit_model

    params = params_of(write_params(tmp_path, sample_csv))
    for stage in ("ingest", "clean", "validate", "split"):
        run_stage(stage, params)
    rows = split_module.read_split(params, "train")
    model = build_model(params, "linear")
    model.steps[-1] = ("model", Probe())
    cores = available_cores()
    Probe.seen.clear()
    with training_slot():
        fit_model(model, rows, params)
        other = subprocess.Popen(
            [sys.executable, "-c", HOLD_SLOT.format(repo=str(REPO))],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # with this test's own slots folder
        )
        try:
            assert other.stdout.readline().strip() == "holding"
            fit_model(model, rows, params)
        finally:
            other.kill()
            other.wait()
        fit_model(model, rows, params)  # alone again
    assert Probe.seen == [cores, max(1, cores // 2), cores]
    assert fit_threads(1) == 1 and fit_threads(0) == cores
