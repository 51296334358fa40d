"""Permutation importance: measured on a bounded sample, in one prediction call, and it
ranks the columns the model reads above those it ignores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression

from pipelines.model.evaluation import feature_importance


class Counting(LinearRegression):
    """A linear model that counts the rows of each predict call."""

    calls: list[int]

    def predict(self, X):
        self.calls.append(len(X))
        return super().predict(X)


def test_one_call_on_a_bounded_sample_ranks_what_the_model_reads():
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {"strong": rng.normal(size=5000), "weak": rng.normal(size=5000), "unused": rng.normal(size=5000)}
    )
    rows["y"] = 3 * rows["strong"] + 0.5 * rows["weak"] + rng.normal(scale=0.1, size=5000)
    model = Counting().fit(rows[["strong", "weak"]].assign(unused=0.0), rows["y"])
    model.coef_[2] = 0.0
    model.calls = []
    result = feature_importance(model, rows, ["strong", "weak", "unused"], "y", "regression", seed=1, max_rows=400)
    assert model.calls == [400 * (1 + 3 * 3)]  # the sample as it is, then 3 shuffles of each column
    assert result.importances.shape == (3, 3)
    strong, weak, unused = result.importances_mean
    assert strong > 1.0 > weak > 0.01 and unused == pytest.approx(0.0, abs=1e-12)
    again = feature_importance(model, rows, ["strong", "weak", "unused"], "y", "regression", seed=1, max_rows=400)
    np.testing.assert_array_equal(again.importances, result.importances)  # seeded


def test_a_classifier_is_scored_by_accuracy_on_string_labels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=600)
    rows = pd.DataFrame({"x": x, "noise": rng.normal(size=600), "label": np.where(x > 0, "up", "down")})
    model = LogisticRegression().fit(rows[["x", "noise"]], rows["label"])
    result = feature_importance(model, rows, ["x", "noise"], "label", "classification", seed=0, max_rows=1000)
    assert result.importances_mean[0] > 0.3 and abs(result.importances_mean[1]) < 0.05
    assert 0.0 <= result.importances_std[0] < 0.1
