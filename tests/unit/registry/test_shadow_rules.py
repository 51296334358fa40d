"""Which challengers serve in shadow (promotion.shadow), what a shadow needs in common with the
champion, and when live pairs promote, retire or keep it (pipelines/monitoring/shadow.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from conftest import write_params
from pipelines.core.config import PromotionConfig
from pipelines.monitoring.shadow import judge_shadow, shadow_since
from pipelines.registry.champion import feature_difference, shadow_wanted
from pipelines.registry.evidence import Evidence, compare

RNG = np.random.default_rng(0)
TRUTH = RNG.normal(100, 30, 400)


def comparison(shadow_noise: float, min_improvement: float = 0.0, rows: int = 400):
    truth = TRUTH[:rows]
    noise = np.random.default_rng(1)
    champion = truth + noise.normal(0, 10.0, rows)
    shadow = truth + noise.normal(0, shadow_noise, rows)
    cfg = PromotionConfig(resamples=200, min_improvement=min_improvement)
    return compare(truth, champion, shadow, metric="rmse", higher_is_better=False, cfg=cfg, ordered=True)


@pytest.mark.parametrize(
    ("noise", "margin", "uncertain", "always"),
    [(9.0, 0.0, True, True), (20.0, 0.0, False, False), (5.0, 0.9, False, True)],
    ids=["straddles", "surely-worse", "better-but-short-of-the-margin"],
)
def test_uncertain_shadows_a_straddling_interval_and_always_all_but_the_surely_worse(noise, margin, uncertain, always):
    test = comparison(noise, margin)
    assert not test.better  # only a challenger that was not promoted is asked about
    assert (test.low <= margin <= test.high) is uncertain
    evidence = Evidence(test, None, "veto", "")
    assert shadow_wanted("uncertain", evidence) is uncertain
    assert shadow_wanted("always", evidence) is always and shadow_wanted("off", evidence) is False


def test_a_challenger_the_recent_rows_vetoed_is_uncertain():
    better, worse = comparison(5.0), comparison(20.0)
    assert shadow_wanted("uncertain", Evidence(better, worse, "veto", "recent rows"))


def test_a_shadow_must_read_the_champions_features_in_its_order():
    assert feature_difference(["a", "b"], ["a", "b"], "3") is None
    assert "reads ['c'] the champion does not, and lacks ['b']" in feature_difference(["a", "c"], ["a", "b"], "3")
    assert "another order" in feature_difference(["b", "a"], ["a", "b"], "3")


def pairs(shadow_noise: float, rows: int, champion: str = "1") -> pd.DataFrame:
    truth = TRUTH[:rows]
    noise = np.random.default_rng(2)
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows)],
            "ts": [f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}" for i in range(rows)],
            "truth": truth,
            "champion": truth + noise.normal(0, 10, rows),
            "shadow": truth + noise.normal(0, shadow_noise, rows),
            "champion_version": champion,
        }
    )


@pytest.fixture
def params(params_of, sample_csv, tmp_path):
    return params_of(write_params(tmp_path, sample_csv, promotion={"shadow_min_rows": 200, "shadow_max_days": 7}))


NOW = datetime(2026, 1, 10, tzinfo=UTC)


def test_live_pairs_promote_a_surely_better_shadow_only_once_there_are_enough(params):
    few = judge_shadow(params, pairs(5.0, 150), 150, "2", "1", NOW - timedelta(days=1), NOW)
    assert few.outcome == "kept" and "waiting for promotion.shadow_min_rows 200" in few.reason
    enough = judge_shadow(params, pairs(5.0, 300), 150, "2", "1", NOW - timedelta(days=1), NOW)
    assert enough.outcome == "promoted" and enough.live is not None and enough.live.better
    assert (
        "surely better than champion v1 on live shadow rows" in enough.reason
        and "300 live shadow rows" in enough.reason
    )


def test_live_pairs_retire_a_surely_worse_shadow_and_an_undecided_one_after_max_days(params):
    worse = judge_shadow(params, pairs(20.0, 300), 300, "2", "1", NOW - timedelta(days=1), NOW)
    assert worse.outcome == "retired" and "surely worse" in worse.reason
    undecided = pairs(10.0, 300)
    assert judge_shadow(params, undecided, 0, "2", "1", NOW - timedelta(days=6), NOW).outcome == "kept"
    old = judge_shadow(params, undecided, 0, "2", "1", NOW - timedelta(days=8), NOW)
    assert old.outcome == "retired" and "promotion.shadow_max_days 7" in old.reason


def test_pairs_answered_by_another_champion_do_not_count(params):
    judged = judge_shadow(params, pairs(5.0, 300, champion="0"), 0, "2", "1", NOW, NOW)
    assert judged.pairs == 0 and judged.live is None and judged.outcome == "kept"


def test_the_shadow_since_tag_is_read_and_a_missing_one_is_now():
    assert shadow_since("2026-01-03T04:05:06+00:00: promotion.shadow uncertain", NOW) == datetime(
        2026, 1, 3, 4, 5, 6, tzinfo=UTC
    )
    assert shadow_since(None, NOW) == NOW and shadow_since("garbled", NOW) == NOW
