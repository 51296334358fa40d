"""Arrivals, drift, live metrics and the retraining policy, without servers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BIKESHARE, bikeshare_sample, write_params
from pipelines.config import MonitorConfig, load_params
from pipelines.monitor import Drift, LiveMetric, decide, degradation, live_metrics, measure_drift

NOW = datetime(2011, 6, 1, tzinfo=UTC)


def _drift(share: float, n: int = 10) -> Drift:
    drifted = [f"f{i}" for i in range(round(share * n))]
    return Drift(
        share=share,
        drifted=drifted,
        scores={f"f{i}": 0.0 for i in range(n)},
        methods={},
        prediction_score=0.0,
        prediction_drifted=False,
        html="",
        weights={f"f{i}": 1 / n for i in range(n)},
        weighted_share=share,
    )


CHAMPION = {"champion_metric": 50.0, "higher_is_better": False, "now": NOW}  # an RMSE: lower is better


def test_policy_triggers_and_holds_back():
    cfg = MonitorConfig(drift_share=0.5, max_degradation=0.25, min_new_rows=100, cooldown_hours=24)
    calm = decide(cfg, drift=_drift(0.2), **CHAMPION, new_rows=500)
    assert not calm.retrain and calm.outcome == "no action"
    drifted = decide(cfg, drift=_drift(0.6), **CHAMPION, new_rows=500)
    assert (
        drifted.retrain and "6 of 10 features drifted" in drifted.reason() and "60% of the weight" in drifted.reason()
    )
    live = LiveMetric(metric="rmse", value=70.0, baseline=120.0, rows=300, served_versions={"1": 300})
    worse = decide(cfg, drift=_drift(0.1), live=live, **CHAMPION, new_rows=500)
    assert worse.retrain and "40% worse" in worse.reason()
    assert not decide(cfg, drift=_drift(0.1), live=replace(live, value=60.0), **CHAMPION, new_rows=500).retrain
    few = decide(cfg, drift=_drift(0.6), **CHAMPION, new_rows=99)
    assert few.outcome == "held back" and "only 99 rows" in few.reason()
    cooling = decide(cfg, drift=_drift(0.6), **CHAMPION, new_rows=500, last_retrain=NOW - timedelta(hours=23))
    assert cooling.outcome == "held back" and "cooling down" in cooling.reason()
    assert decide(cfg, drift=_drift(0.6), **CHAMPION, new_rows=500, last_retrain=NOW - timedelta(hours=25)).retrain


def test_degradation_respects_metric_direction():
    assert degradation(60.0, 50.0, higher_is_better=False) == pytest.approx(0.2)
    assert degradation(0.6, 0.8, higher_is_better=True) == pytest.approx(0.25)
    assert degradation(0.9, 0.8, higher_is_better=True) < 0


@pytest.fixture(scope="module")
def bikes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bikes")
    params = load_params(write_params(tmp, bikeshare_sample(tmp)))
    frame = pd.read_csv(BIKESHARE)
    return tmp, params, frame


def _typed(frame: pd.DataFrame, params) -> pd.DataFrame:
    out = frame[params.features.columns].copy()
    out["mnth"] = pd.Categorical(out["mnth"], categories=params.table_schema.columns["mnth"].values)
    out["prediction"] = frame["bikers"].to_numpy(dtype=float)
    return out


def test_evidently_finds_seasonal_drift_and_not_resampling(bikes):
    _, params, frame = bikes
    winter = _typed(frame.iloc[:1500], params)
    same = winter.sample(400, random_state=0)
    summer = _typed(frame[frame["mnth"] == "July"], params)
    calm = measure_drift(winter, same, params)
    hot = measure_drift(winter, summer, params)
    assert calm.share < params.monitor.drift_share and not calm.drifted
    assert hot.share >= params.monitor.drift_share and {"temp", "atemp", "season", "mnth"} <= set(hot.drifted)
    assert hot.prediction_drifted and hot.prediction_score > calm.prediction_score
    assert set(hot.scores) == set(params.features.columns) and "<html" in hot.html.lower()


def test_reference_profile_gives_the_raw_references_drift_decisions(bikes):
    """The profile drift reads instead of the reference rows (made once per champion) gives
    every window the same tests, the same drifted features and nearly the same scores."""
    from pipelines.monitor import reference_profile

    _, params, frame = bikes
    typed = _typed(frame, params)
    reference = typed.iloc[:5500]  # January to August
    profile = reference_profile(reference, 2000)
    assert len(profile) == 2000
    for column in ["season", "weathersit", "hr"]:  # every value kept, in proportion
        shares = profile[column].value_counts(normalize=True)
        assert shares.sub(reference[column].value_counts(normalize=True)).abs().max() < 1 / 2000
    assert profile["prediction"].std() == pytest.approx(reference["prediction"].std(), rel=0.01)
    windows = [typed[(frame["mnth"] == month).to_numpy()] for month in ["Sept", "Oct", "Nov", "Dec"]]
    windows.append(reference.sample(700, random_state=1))
    decisions = set()
    for window in windows:
        raw, cached = measure_drift(reference, window, params), measure_drift(profile, window, params)
        assert cached.methods == raw.methods
        assert (cached.drifted, cached.share, cached.prediction_drifted) == (
            raw.drifted,
            raw.share,
            raw.prediction_drifted,
        )
        for column, score in raw.scores.items():
            assert cached.scores[column] == pytest.approx(score, abs=0.01), column
        decisions.add(raw.share >= params.monitor.drift_share)
    assert decisions == {True, False}  # windows on both sides of the trigger


def test_reference_profile_keeps_missing_shares_and_small_references():
    from pipelines.monitor import reference_profile

    rng = np.random.default_rng(0)
    values = rng.normal(size=50_000)
    values[rng.random(50_000) < 0.1] = np.nan
    reference = pd.DataFrame(
        {
            "x": values,
            "label": rng.choice(["a", "b", "c"], 50_000, p=[0.7, 0.2999, 0.0001]),
            "unrecorded": np.full(50_000, np.nan),
        }
    )
    profile = reference_profile(reference, 5000)
    assert profile["unrecorded"].isna().all() and len(profile) == 5000
    assert profile["x"].isna().mean() == pytest.approx(reference["x"].isna().mean(), abs=1 / 5000)
    assert profile["x"].dropna().is_monotonic_increasing and set(profile["x"].dropna()) <= set(reference["x"])
    assert set(profile["label"]) == {"a", "b", "c"}  # a rare label is kept, once at least
    assert reference_profile(reference.head(3000), 5000).equals(reference.head(3000))


def test_live_metrics_join_served_predictions_by_request_id(bikes):
    _, params, _ = bikes
    window = pd.DataFrame({"request_id": ["a-0", "a-1", "a-2", "b-0"], "bikers": [10.0, 20.0, 30.0, 40.0]})
    log = pd.DataFrame(
        {
            "request_id": ["a-0", "a-1", "a-1", "a-2", "zz"],
            "prediction": [12.0, 99.0, 18.0, 30.0, 5.0],
            "model_version": ["1", "1", "2", "2", "2"],
        }
    )
    live = live_metrics(window, log, params, baseline=25.0)
    # a-1 was answered twice: the last answer (18) counts; b-0 was never served; zz is not labelled
    assert live.rows == 3 and live.served_versions == {"2": 2, "1": 1}
    assert live.value == pytest.approx(np.sqrt((4 + 4 + 0) / 3))
    assert live.baseline == pytest.approx(np.sqrt((225 + 25 + 25) / 3))
    assert live_metrics(window, log.iloc[4:], params, 25.0) is None


def test_landed_batches_accepted_or_rejected_with_reason(bikes, tmp_path):
    from pipelines.arrivals import accept_landed, arrival_files
    from pipelines.layout import Layout
    from pipelines.stages import ingest

    _, _, frame = bikes
    params = load_params(write_params(tmp_path, bikeshare_sample(tmp_path, 500)))
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    good = frame.iloc[500:700].assign(request_id=[f"g-{i}" for i in range(200)])
    good.to_parquet(layout.landing / "a-good.parquet", index=False)
    broken = frame.iloc[700:800].copy()
    broken["weathersit"] = "sunny"  # not an allowed label
    broken.to_csv(layout.landing / "b-broken.csv", index=False)
    extra = frame.iloc[800:900].assign(station="x")
    extra.to_csv(layout.landing / "c-extra.csv", index=False)
    outcomes = {o.file: o for o in accept_landed(params)}
    assert outcomes["a-good.parquet"].accepted and outcomes["a-good.parquet"].rows == 200
    assert "weathersit" in outcomes["b-broken.csv"].reason and "sunny" in outcomes["b-broken.csv"].reason
    assert "station" in outcomes["c-extra.csv"].reason
    assert [f.name for f in arrival_files(layout.arrivals)] == ["000001-a-good.parquet"]
    assert sorted(p.name for p in layout.rejected.iterdir()) == [
        "b-broken.csv",
        "b-broken.csv.reason.txt",
        "c-extra.csv",
        "c-extra.csv.reason.txt",
    ]
    assert not any(layout.landing.glob("*.csv")) and not any(layout.landing.glob("*.parquet"))
    (layout.arrivals / "000007-by-hand.parquet").write_bytes((layout.arrivals / "000001-a-good.parquet").read_bytes())
    good.iloc[:10].to_csv(layout.landing / "d-later.csv", index=False)
    assert accept_landed(params)[0].stored == "000008-d-later.parquet"  # after the highest, not the count
    for f in ("000007-by-hand.parquet", "000008-d-later.parquet"):
        (layout.arrivals / f).unlink()
    summary = ingest(params)  # the accepted batch is appended to the source, text as read
    assert summary["rows"] == 700 and summary["arrival_batches"] == 1
    ingested = pd.read_parquet(layout.ingested)
    assert list(ingested.columns) == list(params.table_schema.columns)
    assert ingested["temp"].iloc[500:].tolist() == [str(v) for v in good["temp"]]


def test_directory_dependency_fingerprint_changes_with_a_new_batch(tmp_path):
    from pipelines.lineage import path_md5

    folder = tmp_path / "arrivals"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    empty = path_md5(folder)
    (folder / "000001-a.parquet").write_bytes(b"1")
    assert path_md5(folder) != empty and path_md5(tmp_path / "nope") == "missing"


def test_monitor_id_column_must_not_be_a_schema_column(tmp_path):
    from pipelines.errors import LooplineError

    with pytest.raises(LooplineError, match="monitor.id_column 'temp'"):
        load_params(write_params(tmp_path, Path("x.csv"), monitor={"id_column": "temp"}))
