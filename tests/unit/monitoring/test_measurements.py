"""Arrivals, drift, live metrics and the retraining policy, without servers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BIKESHARE, bikeshare_sample, write_params
from pipelines.core.config import MonitorConfig, load_params
from pipelines.monitoring.drift import Drift, measure_drift
from pipelines.monitoring.labels import LiveMetric, labelled_metrics
from pipelines.monitoring.policy import decide, degradation

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
    few_labels = replace(live, rows=cfg.min_window_rows - 1)  # a live metric on a handful of rows triggers nothing
    assert decide(cfg, drift=_drift(0.1), live=few_labels, **CHAMPION, new_rows=500).outcome == "no action"
    few = decide(cfg, drift=_drift(0.6), **CHAMPION, new_rows=99)  # decided before enough labels: pending
    assert not few.retrain and few.outcome == "retrain pending" and few.reason().startswith("drifted features")
    assert "waiting for labels: 99 of monitor.min_new_rows 100 labelled rows no training has seen" in few.reason()
    still = decide(cfg, drift=_drift(0.1), **CHAMPION, new_rows=99, pending="2011-06-01: drift")
    assert still.outcome == "retrain pending" and "pending since 2011-06-01: drift" in still.reason()
    now = decide(cfg, drift=_drift(0.1), **CHAMPION, new_rows=100, pending="2011-06-01: drift")
    assert now.retrain and now.reason().startswith("pending since 2011-06-01")  # without a new trigger
    sources = [("served", _drift(0.6), None), ("landed", _drift(0.1), None)]
    named = decide(cfg, windows=sources, **CHAMPION, new_rows=500)
    assert named.retrain and named.reason().startswith("served: drifted features") and "landed:" not in named.reason()
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
    from pipelines.monitoring.drift import reference_profile

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
    from pipelines.monitoring.drift import reference_profile

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
    live = labelled_metrics(window, log, params, baseline=25.0).live
    # a-1 was answered twice: the last answer (18) counts; b-0 was never served; zz is not labelled
    assert live.rows == 3 and live.by_id == 3 and live.served_versions == {"2": 2, "1": 1}
    assert live.value == pytest.approx(np.sqrt((4 + 4 + 0) / 3))
    assert live.baseline == pytest.approx(np.sqrt((225 + 25 + 25) / 3))
    assert labelled_metrics(window, log.iloc[4:], params, 25.0).live is None


def _rmse(y, p) -> float:
    return float(np.sqrt(np.mean((np.asarray(y, float) - np.asarray(p, float)) ** 2)))


def test_a_mixed_window_counts_every_labelled_row_once(bikes):
    """300 rows answered by served predictions (joined by id) and 200 nobody served: live on
    the 300, offline (the champion scoring them now) on the 200."""
    _, params, _ = bikes
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 500, 500)
    window = pd.DataFrame(
        {
            "request_id": [f"r-{i}" if i < 300 else None for i in range(500)],
            "day": np.arange(500) // 24 + 1,
            "hr": np.arange(500) % 24,
            "bikers": truth,
            "prediction": truth + 10.0,  # the champion, scoring now
        }
    )
    served = truth[:300] + rng.normal(0, 30, 300)
    log = pd.DataFrame({"request_id": [f"r-{i}" for i in range(300)], "prediction": served, "model_version": "4"})
    log.loc[250:, "model_version"] = "3"  # the last 50 answered by the champion before
    measured = labelled_metrics(window, log, params, baseline=250.0, champion="4")
    live, offline = measured.live, measured.offline
    assert (live.rows, live.by_id, live.by_time, offline.rows) == (250, 250, 0, 200)
    assert live.value == pytest.approx(_rmse(truth[:250], served[:250])) and live.served_versions == {"4": 250}
    earlier = measured.earlier["3"]  # apart, never mixed into the champion's
    assert earlier.rows == 50 and earlier.value == pytest.approx(_rmse(truth[250:300], served[250:]))
    assert offline.value == pytest.approx(10.0) and offline.served_versions == {"4": 200}
    assert offline.baseline == pytest.approx(_rmse(truth[300:], np.full(200, 250.0)))


def test_rows_without_ids_join_by_time_key_and_a_row_matching_both_counts_once(bikes):
    """A small hourly series: the log holds what was served for some hours (inputs as the
    JSON gives them); labelled rows without ids find theirs by (day, hr)."""
    _, base, _ = bikes
    params = base.model_copy(update={"monitor": base.monitor.model_copy(update={"time_key": ["day", "hr"]})})
    hours = pd.DataFrame({"day": [1] * 6 + [2] * 6, "hr": list(range(6)) * 2})
    window = hours.assign(
        request_id=[None, None, "x-2", None, None, None, None, None, None, None, None, None],
        bikers=np.arange(12) * 10.0,
        prediction=np.arange(12) * 10.0 + 1.0,
    )
    log = pd.DataFrame(  # day 1, hours 0-5: served; hour 1 twice (the later answer counts)
        {
            "request_id": ["s-0", "s-1a", "s-1b", "x-2", "s-3", "s-4", "s-5"],
            "day": ["1", "1", "1", "1", "1", "1", "1"],
            "hr": [0, 1, 1, 2, 3, 4, 5.0],
            "prediction": [3.0, 99.0, 14.0, 25.0, 30.0, 40.0, 50.0],
            "model_version": "1",
        }
    )
    few = labelled_metrics(window, log, params, baseline=0.0)  # 6 rows nothing served: under min_window_rows
    assert (few.live.rows, few.live.by_id, few.live.by_time) == (6, 1, 5)
    assert few.live.value == pytest.approx(_rmse([0, 10, 20, 30, 40, 50], [3, 14, 25, 30, 40, 50]))
    assert few.offline is None and "only 6 labelled rows without a served prediction" in few.note
    cfg = params.monitor.model_copy(update={"min_window_rows": 5})
    both = labelled_metrics(window, log, params.model_copy(update={"monitor": cfg}), baseline=0.0)
    assert both.live.rows + both.offline.rows == 12 and both.offline.value == pytest.approx(1.0)


def test_a_window_whose_labels_are_all_missing_has_no_offline_metric(bikes):
    _, params, _ = bikes
    window = pd.DataFrame({"day": [1, 2], "hr": [0, 1], "bikers": [None, None], "prediction": [1.0, 2.0]})
    measured = labelled_metrics(window, pd.DataFrame(), params, baseline=0.0)
    assert measured.live is None and measured.offline is None and measured.note == "no labels in window"


def test_an_offline_metric_worse_than_the_champion_triggers_naming_it():
    cfg = MonitorConfig(max_degradation=0.35, min_new_rows=100)
    offline = LiveMetric(metric="rmse", value=90.0, baseline=120.0, rows=500, served_versions={"2": 500})
    verdict = decide(cfg, drift=_drift(0.0), offline=offline, **CHAMPION, new_rows=500)
    assert verdict.retrain and verdict.reason().startswith(
        "offline rmse 90 on 500 labelled rows no served prediction answers (scored now by champion v2) is 80% worse"
    )
    assert not decide(cfg, drift=_drift(0.0), offline=replace(offline, value=55.0), **CHAMPION, new_rows=500).retrain


def test_landed_batches_accepted_or_rejected_with_reason(bikes, tmp_path):
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed
    from pipelines.data.ingest import arrival_files
    from pipelines.data.stages import ingest

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
    from pipelines.core.fingerprint import path_md5

    folder = tmp_path / "arrivals"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    empty = path_md5(folder)
    (folder / "000001-a.parquet").write_bytes(b"1")
    assert path_md5(folder) != empty and path_md5(tmp_path / "nope") == "missing"


def test_monitor_id_column_must_not_be_a_schema_column(tmp_path):
    from pipelines.core.errors import LooplineError

    with pytest.raises(LooplineError, match="monitor.id_column 'temp'"):
        load_params(write_params(tmp_path, Path("x.csv"), monitor={"id_column": "temp"}))


def test_rows_a_training_already_read_are_not_new_and_a_row_counts_once(tmp_path):
    """A batch of hours the splits hold (a re-sent January) adds nothing toward
    monitor.min_new_rows; hours they lack count, each distinct row once."""
    from pipelines.core.layout import Layout
    from pipelines.core.stages import DATA_STAGES, run_stage
    from pipelines.data.arrivals import accept_landed
    from pipelines.data.ingest import arrival_files
    from pipelines.monitoring.run import new_rows

    params = load_params(write_params(tmp_path, bikeshare_sample(tmp_path, 2000), monitor={"settle_seconds": 0}))
    for stage in DATA_STAGES:
        run_stage(stage, params)
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    full = pd.read_csv(BIKESHARE)
    seen, fresh = full.iloc[100:400], full.iloc[4000:4200]
    pd.concat([seen, fresh, fresh.head(50)]).to_csv(layout.landing / "batch.csv", index=False)
    [outcome] = accept_landed(params)
    assert outcome.status == "accepted" and outcome.rows == 550
    assert new_rows(arrival_files(layout.arrivals), params) == 200
