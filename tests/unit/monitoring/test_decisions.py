"""The loop's decisions and their evidence: importance-weighted drift, calendar features,
NannyML's label-free estimates, the bootstrap promotion gate, the policy params, and a
reduced back-test of retraining policies."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BIKESHARE, REPO, bikeshare_sample, raw_params, write_params
from pipelines.core.config import PromotionConfig, load_params, parse_params
from pipelines.core.errors import LooplineError


@pytest.fixture(scope="module")
def bikes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decisions")
    params = load_params(write_params(tmp, bikeshare_sample(tmp)))
    frame = pd.read_csv(BIKESHARE)
    winter = frame.iloc[:1500].sample(frac=1.0, random_state=0)  # shuffled: halves alike but for what a test changes
    winter["mnth"] = pd.Categorical(winter["mnth"], categories=params.table_schema.columns["mnth"].values)
    return params, winter.assign(prediction=winter["bikers"].astype(float))


def _verdict(params, reference, window, importance):
    from pipelines.monitoring.drift import measure_drift
    from pipelines.monitoring.policy import decide

    drift = measure_drift(reference, window, params, importance)
    verdict = decide(
        params.monitor, now=pd.Timestamp("2011-06-01", tz="UTC").to_pydatetime(), drift=drift, new_rows=10**6
    )
    return drift, verdict


def test_drift_counts_by_importance(bikes):
    params, winter = bikes
    reference, window = winter.iloc[:1000], winter.iloc[1000:].copy()
    importance = {c: 0.0 for c in params.features.columns} | {"temp": 0.6, "workingday": 0.4}
    window["windspeed"] = (window["windspeed"] + 0.4).clip(upper=1.0)  # drifts, but the model ignores it
    drift, verdict = _verdict(params, reference, window, importance)
    assert "windspeed" in drift.drifted and drift.weights["windspeed"] == 0.0
    assert drift.weighted_share == 0.0 and not verdict.retrain, verdict.reason()
    window["temp"] = (window["temp"] + 0.4).clip(upper=1.0)  # drifts, and carries 60% of the importance
    drift, verdict = _verdict(params, reference, window, importance)
    assert drift.weighted_share == pytest.approx(0.6) and verdict.retrain
    assert "temp 60%" in verdict.reason() and "weighted by the champion's permutation importance" in verdict.reason()
    unweighted = params.model_copy(
        update={"monitor": params.monitor.model_copy(update={"weight_by_importance": False})}
    )
    drift, _ = _verdict(unweighted, reference, window, importance)
    assert drift.weights["windspeed"] == drift.weights["temp"] > 0  # every counted feature the same


def test_calendar_drift_alone_does_not_trigger(bikes):
    params, winter = bikes
    reference = winter.iloc[:1000]
    window = reference.copy()  # the same hours, told they are July afternoons
    window["mnth"] = pd.Categorical(["July"] * len(window), categories=reference["mnth"].cat.categories)
    window["season"] = 3
    window["hr"] = (window["hr"] + 6) % 24
    importance = {c: 1.0 for c in params.features.columns}
    drift, verdict = _verdict(params, reference, window, importance)
    assert {"mnth", "season"} <= set(drift.drifted) and drift.weighted_share == 0.0
    assert not verdict.retrain and {"hr", "mnth", "weekday", "season"} == {
        c for c, w in drift.weights.items() if w == 0
    }
    counted = params.model_copy(update={"monitor": params.monitor.model_copy(update={"count_expected_drift": True})})
    drift, verdict = _verdict(counted, reference, window, importance)
    assert drift.weighted_share >= 2 / 11 and "expected to drift" not in drift.weighting


def _regression_params():
    return parse_params(
        {
            "data": {"source": "x.csv", "task": "regression", "target": "y"},
            "schema": {"columns": {"x": {"type": "float"}, "z": {"type": "float"}, "y": {"type": "float"}}},
            "features": {"numeric": ["x", "z"]},
        }
    )


def _rows(rng, n: int, low: float, high: float) -> pd.DataFrame:
    """y grows with x and so does its noise: rows of high x are where any model errs most."""
    x, z = rng.uniform(low, high, n), rng.uniform(0, 1, n)
    return pd.DataFrame({"x": x, "z": z, "y": 3 * x + z + rng.normal(0, 0.1 + 2 * x**2, n)})


def test_dle_estimate_follows_a_shift_and_stays_flat_without_one():
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline

    from pipelines.monitoring.estimate import estimate, fit_estimator

    rng = np.random.default_rng(0)
    params = _regression_params()
    train = _rows(rng, 3000, 0, 1)
    model = make_pipeline(LinearRegression()).fit(train[["x", "z"]], train["y"])
    est, detail = fit_estimator(model, _rows(rng, 2000, 0, 1), params)
    assert est is not None and est.method == "DLE", detail

    def realised(rows):
        return float(np.sqrt(np.mean((rows["y"] - model.predict(rows[["x", "z"]])) ** 2)))

    calm, shifted = _rows(rng, 1000, 0, 1), _rows(rng, 1000, 0.6, 1)
    flat, moved = estimate(est, model, calm, 50), estimate(est, model, shifted, 50)
    assert abs(flat.value - est.reference) / est.reference < 0.1  # no shift: the estimate stays flat
    assert moved.value > 1.3 * flat.value and realised(shifted) > 1.3 * realised(calm)  # it moves as the error does
    for window, got in ((calm, flat), (shifted, moved)):
        assert abs(got.value - realised(window)) / realised(window) < 0.15, (got, realised(window))
    few = estimate(est, model, calm.head(10), 50)
    assert few.value is None and "only 10 rows" in few.detail


def test_cbpe_estimate_follows_a_shift_into_uncertain_rows():
    from sklearn.linear_model import LogisticRegression

    from pipelines.monitoring.estimate import estimate, fit_estimator

    rng = np.random.default_rng(1)
    params = parse_params(
        {
            "data": {"source": "x.csv", "task": "classification", "target": "y"},
            "schema": {"columns": {"x": {"type": "float"}, "y": {"type": "category", "values": ["a", "b"]}}},
            "features": {"numeric": ["x"]},
            "promotion": {"metric": "accuracy"},
        }
    )

    def rows(n, low, high):
        x = rng.uniform(low, high, n)
        return pd.DataFrame({"x": x, "y": np.where(rng.random(n) < 1 / (1 + np.exp(-4 * x)), "b", "a")})

    train = rows(3000, -2, 2)
    model = LogisticRegression().fit(train[["x"]], train["y"])
    est, detail = fit_estimator(model, rows(2000, -2, 2), params)
    assert est is not None and est.method == "CBPE", detail
    calm, uncertain = rows(1500, -2, 2), rows(1500, -0.4, 0.4)  # near the boundary: more mistakes
    flat, moved = estimate(est, model, calm, 50), estimate(est, model, uncertain, 50)

    def realised(window):
        return float((model.predict(window[["x"]]) == window["y"]).mean())

    assert abs(flat.value - est.reference) < 0.05 and moved.value < flat.value - 0.1
    for window, got in ((calm, flat), (uncertain, moved)):
        assert abs(got.value - realised(window)) < 0.06, (got, realised(window))


def test_estimator_says_plainly_what_it_cannot_estimate():
    from sklearn.linear_model import LinearRegression

    from pipelines.monitoring.estimate import fit_estimator

    rng = np.random.default_rng(2)
    raw = {
        "data": {"source": "x.csv", "task": "regression", "target": "y"},
        "schema": {"columns": {"x": {"type": "float"}, "z": {"type": "float"}, "y": {"type": "float"}}},
        "features": {"numeric": ["x", "z"]},
        "promotion": {"metric": "r2"},
    }
    rows = _rows(rng, 500, 0, 1)
    model = LinearRegression().fit(rows[["x", "z"]], rows["y"])
    est, detail = fit_estimator(model, rows, parse_params(raw))
    assert est is None and "no estimate of r2" in detail
    est, detail = fit_estimator(model, rows.head(40), _regression_params())
    assert est is None and "only 40 held-out rows" in detail


def _compare(y, champion, challenger, **kw):
    from pipelines.registry.evidence import compare

    return compare(
        y, champion, challenger, metric="rmse", higher_is_better=False, cfg=PromotionConfig(**kw), ordered=True
    )


def test_bootstrap_gate_promotes_only_a_surely_better_model():
    rng = np.random.default_rng(3)
    n = 2000
    y = 100 + 30 * np.sin(np.arange(n) / 24) + rng.normal(0, 10, n)
    champion = y + rng.normal(0, 20, n)
    better = _compare(y, champion, y + rng.normal(0, 15, n), block_length=24, seed=0)
    assert better.better and better.low > 0 and better.improvement == pytest.approx(0.25, abs=0.05)
    noise = _compare(y, champion, champion + rng.normal(0, 0.05, n), block_length=24, seed=0)
    assert not noise.better and noise.low < 0 < noise.high  # equal up to noise: no promotion
    worse = _compare(y, champion, y + rng.normal(0, 25, n), block_length=24, seed=0)
    assert not worse.better and worse.high < 0
    again = _compare(y, champion, y + rng.normal(0, 15, n), block_length=24, seed=0)
    assert _compare(y, champion, champion * 0 + again.rows, seed=1).rows == n  # any seed runs
    assert "moving-block bootstrap, blocks of 24 rows" in better.describe()
    repeat = _compare(y, champion, champion + rng.normal(0, 0.05, n), block_length=24, seed=0)
    assert (repeat.low, repeat.high) != (0.0, 0.0)
    same_seed = [_compare(y, champion, y * 0.9 + 10, block_length=24, seed=7) for _ in range(2)]
    assert same_seed[0] == same_seed[1]  # deterministic for a seed
    margin = _compare(y, champion, y + rng.normal(0, 15, n), block_length=24, min_improvement=0.5)
    assert not margin.better  # 25% better is not 50% better


def test_recent_rows_combine_with_the_test_rows_by_the_rule():
    from pipelines.registry.evidence import judge_on

    rng = np.random.default_rng(5)

    def pair(n, champion_sd, challenger_sd):
        y = 100 + 30 * np.sin(np.arange(n) / 24) + rng.normal(0, 10, n)
        return y, y + rng.normal(0, champion_sd, n), y + rng.normal(0, challenger_sd, n)

    test = pair(2000, 20, 15)  # surely better on the test rows
    worse_lately, even_lately = pair(600, 15, 20), pair(600, 15, 15)

    def judge(recent, rule, note="600 rows of may"):
        cfg = PromotionConfig(block_length=24, recent_rule=rule, recent_min_rows=100)
        return judge_on(test, recent, note, metric="rmse", higher_is_better=False, cfg=cfg, ordered=True)

    vetoed = judge(worse_lately, "veto")
    assert (
        vetoed.test.better and vetoed.recent.worse and not vetoed.better and vetoed.verdict == "vetoed by recent rows"
    )
    assert "600 rows of may" in vetoed.describe() and "promotion.recent_rule veto" in vetoed.describe()
    assert judge(worse_lately, "test").better  # recorded, not used
    assert judge(even_lately, "veto").better  # not surely worse lately: the test rows decide
    both = judge(even_lately, "both")
    assert not both.better and both.verdict == "vetoed by recent rows"  # not surely better lately
    few = judge(tuple(a[:50] for a in worse_lately), "veto", "50 labelled rows of june")
    assert few.better and few.recent is None and "the test rows decide alone" in few.recent_note
    assert judge(None, "both").better and judge(None, "both").recent is None


def test_unseen_rows_leave_out_the_rows_a_model_was_fit_on():
    from pipelines.registry.evidence import unseen

    fitted = pd.DataFrame({"x": [1.0, 2.0, 3.0], "c": ["a", "b", "c"], "y": [10, 20, 30]})
    rows = pd.DataFrame({"x": [2.0, 2.0, 4.0], "c": ["b", "z", "c"], "y": [20, 20, 40], "request_id": ["p", "q", "r"]})
    left = unseen(rows, [fitted.iloc[:1], fitted.iloc[1:]], ["x", "c", "y"])
    assert list(left["request_id"]) == ["q", "r"]  # only a row equal on every column is left out
    assert unseen(rows, [], ["x"]) is rows


def test_bootstrap_of_100k_rows_is_fast_and_classification_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    from pipelines.registry.evidence import compare

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 100_000).astype(str)
    a, b = np.where(rng.random(len(y)) < 0.7, y, "0"), np.where(rng.random(len(y)) < 0.75, y, "0")
    started = time.perf_counter()
    result = compare(y, a, b, metric="f1", higher_is_better=True, cfg=PromotionConfig(), ordered=False)
    seconds = time.perf_counter() - started
    assert result.champion == pytest.approx(f1_score(y, a, average="macro"))
    assert result.challenger == pytest.approx(f1_score(y, b, average="macro")) and result.better
    assert result.method == "paired bootstrap" and seconds < 10  # the ≤ 2 s figure is bench/bootstrap.py's


def test_bad_policy_and_promotion_params_name_the_key(tmp_path):
    from pipelines.registry.evidence import block_length

    def error(**sections) -> str:
        raw = raw_params()
        raw.update(sections)
        with pytest.raises(LooplineError) as err:
            parse_params(raw)
        return str(err.value)

    assert "backtest.policies.0.retrain" in error(backtest={"policies": [{"name": "x", "retrain": "sometimes"}]})
    message = error(backtest={"policies": [{"name": "x", "retrain": "monitor", "monitor": {"drift_shar": 0.3}}]})
    assert "backtest.policies.0.monitor" in message and "drift_shar: unknown key" in message
    assert "backtest.policies.0.colour: unknown key" in error(
        backtest={"policies": [{"name": "x", "retrain": "never", "colour": 1}]}
    )
    assert "promotion.alpha" in error(promotion={"alpha": 1.5})
    assert "promotion.alpha" in error(promotion={"alpha": 0})
    assert "promotion.recent_rule" in error(promotion={"recent_rule": "sometimes"})
    message = error(promotion={"block_length": 200, "recent_min_rows": 100})
    assert "promotion" in message and "recent_min_rows (100) must be at least block_length (200)" in message
    with pytest.raises(LooplineError, match="promotion.block_length 500 is larger than the 300 rows"):
        block_length(PromotionConfig(block_length=500, recent_min_rows=500), 300)


# The back-tests below are about policies and gates, not the fit: a fifth of the default trees
# at three times the rate (their fits were most of the unit tests' time).
SMALLER_FIT = {"max_iter": 60, "learning_rate": 0.15}


def test_reduced_backtest_shares_trainings_and_writes_the_table(tmp_path, capsys):
    """Two months, three policies, labels at once and 30 days late: with the delay, a retrain
    due before any label has arrived waits for them (pending) and runs a period later."""
    from conftest import run_cli

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(REPO / raw["data"]["source"])
    raw["search"] = {"families": ["linear", "hist_gradient_boosting"], "n_trials": 0}  # the policies are the subject
    raw["train"]["hyperparams"]["hist_gradient_boosting"] |= SMALLER_FIT
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    workdir = tmp_path / "bt"
    code, out, err = run_cli(
        "backtest",
        "--params",
        str(path),
        "--workdir",
        str(workdir),
        "--periods",
        "2",
        "--policy",
        "never",
        "--policy",
        "every-batch",
        "--policy",
        "default",
        "--label-delay",
        "0",
        "--label-delay",
        "30d",
        capsys=capsys,
    )
    assert code == 0, err
    summary = pd.read_csv(workdir / "summary.csv", dtype={"label_delay": str})
    assert list(summary["label_delay"]) == ["0"] * 3 + ["30 days"] * 3
    at_once = summary[summary["label_delay"] == "0"].set_index("policy")
    assert list(at_once.index) == ["never", "every-batch", "default"]
    assert at_once.loc["never", "retrains"] == 0 and at_once.loc["every-batch", "retrains"] == 2
    assert at_once.loc["never", "mean_live"] > at_once.loc["every-batch", "mean_live"]  # spring outgrows winter
    for _, part in summary.groupby("label_delay"):  # relative to the best policy at each α
        assert part["cost_area"].min() >= 1.0 and part["cost_area"].min() < 1.05
    late = summary[summary["label_delay"] == "30 days"].set_index("policy")
    assert late.loc["every-batch", "retrains"] == 1  # April's retrain waited for April's labels
    assert "4 trainings shared by 3 policies and 2 delays" in out and "| every-batch | 30 days |" in out
    timeline = pd.read_csv(workdir / "timeline.csv", dtype={"label_delay": str})
    assert len(timeline) == 12 and set(timeline["period"]) == {"2011-04", "2011-05"}
    waited = timeline[(timeline["policy"] == "every-batch") & (timeline["label_delay"] == "30 days")]
    assert waited["decision"].tolist() == ["retrain pending", "retrain"] and waited["alarm"].all()
    assert waited["labelled_rows"].tolist()[0] == 0  # nothing served was labelled by the end of April
    default = timeline[timeline["policy"] == "default"]
    assert default["reason"].str.len().min() > 0 and default["weighted_drift"].notna().all()
    assert (workdir / "backtest.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(
        "backtest",
        "--params",
        str(REPO / "params.yaml"),
        "--workdir",
        str(tmp_path / "x"),
        "--policy",
        "sometimes",
        capsys=capsys,
    )
    assert code != 0 and "no policy 'sometimes'" in err and not (tmp_path / "x").exists()


def test_the_shadow_gate_serves_a_challenger_in_shadow_for_a_period_then_judges_it_on_live_rows(tmp_path, capsys):
    """`gate: shadow` with promotion.shadow always and a 90% margin: April's retrain is not
    promoted but serves in shadow through May, and is then judged on May's labelled rows that
    both models answered (not 90% better: retired)."""
    from conftest import run_cli

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(REPO / raw["data"]["source"])
    raw["promotion"] |= {"shadow": "always", "min_improvement": 0.9}
    raw["search"] = {"families": ["hist_gradient_boosting"], "n_trials": 0}  # one fit per training
    raw["train"]["hyperparams"]["hist_gradient_boosting"] |= SMALLER_FIT
    raw["backtest"]["policies"] = [{"name": "shadowed", "retrain": "every_batch", "gate": "shadow"}]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    workdir = tmp_path / "bt"
    code, _, err = run_cli(
        "backtest", "--params", str(path), "--workdir", str(workdir), "--periods", "2", capsys=capsys
    )
    assert code == 0, err
    timeline = pd.read_csv(workdir / "timeline.csv", dtype={"label_delay": str}).set_index("period")
    april, may = timeline.loc["2011-04"], timeline.loc["2011-05"]
    assert april["retrain"] and not april["promoted"] and april["gate"].endswith("; in shadow")
    assert may["gate"].startswith(f"shadow {april['trained']}: live [") and "on 744 rows: retired" in may["gate"]
    assert may["served"] == april["served"]  # the shadow never answered a client
