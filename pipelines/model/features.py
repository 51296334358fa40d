"""features: the sklearn ColumnTransformer declared in params.yaml.

It is fitted inside the model pipeline on training rows only and saved with the model, so
serving applies exactly the transform the model was trained with.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from pipelines.core.config import FeaturesConfig, SchemaConfig

DECIMALS = 12  # of the cyclical encoding's sines and cosines


class CyclicalEncoder(TransformerMixin, BaseEstimator):
    """Encode a periodic value as (sin, cos) so that hour 23 sits next to hour 0.

    `categories` maps labels to positions (e.g. month names in calendar order); a value
    that is missing or unknown becomes (0, 0), the centre of the circle.
    """

    def __init__(self, period: float = 24.0, categories: list | None = None):
        self.period = period
        self.categories = categories

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).reshape(len(X), -1).shape[1]
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        return self

    def _positions(self, X) -> np.ndarray:
        frame = pd.DataFrame(X)
        if self.categories is None:
            return frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
        lookup = {str(c): i for i, c in enumerate(self.categories)}
        return np.column_stack([frame[c].astype(str).map(lookup).to_numpy(dtype="float64") for c in frame.columns])

    def transform(self, X):
        angle = self._positions(X) * (2.0 * np.pi / self.period)
        # Rounded, so positions with mathematically equal sines or cosines (hours 5 and 19
        # share a cosine) get the same value, not two that differ in the last bit: a tree
        # would otherwise split between them on rounding noise, and a compiled copy of the
        # model, whose sine may differ from numpy's in that bit, would split differently.
        out = np.round(np.concatenate([np.sin(angle), np.cos(angle)], axis=1), DECIMALS)
        return np.nan_to_num(out, nan=0.0)

    def get_feature_names_out(self, input_features=None):
        names = (
            input_features
            if input_features is not None
            else getattr(self, "feature_names_in_", [f"x{i}" for i in range(self.n_features_in_)])
        )
        return np.asarray([f"{n}_sin" for n in names] + [f"{n}_cos" for n in names], dtype=object)


def build_preprocessor(features: FeaturesConfig, schema: SchemaConfig) -> ColumnTransformer:
    numeric_steps = [("impute", SimpleImputer(strategy="median"))]
    if features.scale:
        numeric_steps.append(("scale", StandardScaler()))
    transformers = []
    if features.numeric:
        transformers.append(("numeric", Pipeline(numeric_steps), list(features.numeric)))
    if features.categorical:
        # A missing value becomes its own indicator column; unknown labels encode as all zeros.
        transformers.append(
            ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), list(features.categorical))
        )
    for col, period in features.cyclical.items():
        spec = schema.columns[col]
        categories = [str(v) for v in spec.values or []] if spec.type == "category" else None
        transformers.append((f"cyclical_{col}", CyclicalEncoder(period=period, categories=categories), [col]))
    return ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=True)
