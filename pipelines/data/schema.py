"""The `schema:` rules compiled once, to one internal form that every check is built from:
the clean stage (types, labels, what to quarantine), the Great Expectations suite (ranges,
allowed values, null shares, row counts), the service's request models and batch scoring
(types, ranges, allowed values, nulls). A new rule is added here, and each of those reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from pipelines.core.config import SchemaConfig

LABEL_SPACE = " \t\n\r\f\v"  # what a category label may be padded with


def label_key(text: str) -> str:
    """The one rule for category labels everywhere (clean, serving, batch scoring): surrounding
    white space and letter case do not matter."""
    return text.strip(LABEL_SPACE).lower()


@dataclass(frozen=True)
class ColumnRule:
    name: str
    kind: Literal["int", "float", "category"]
    min: float | None
    max: float | None
    values: tuple[str, ...] | tuple[int, ...] | None  # allowed values as the schema writes them: labels or codes
    labels: dict[str, str]  # label_key -> the schema's spelling (category columns)
    max_null_fraction: float
    quarantine_missing: (
        bool  # clean sends a row with no value here to quarantine (the target, or `missing: quarantine`)
    )

    @property
    def allowed(self) -> list[str] | list[float] | None:
        """The allowed values as the checks compare them: labels as text, codes as numbers."""
        if self.values is None:
            return None
        return [str(v) for v in self.values] if self.kind == "category" else [float(v) for v in self.values]

    @property
    def nullable(self) -> bool:
        """Whether a record may leave this column empty (the model imputes it)."""
        return self.max_null_fraction > 0 and not self.quarantine_missing

    def canonical_labels(self, text: pd.Series) -> pd.Series:
        """Text matched to the schema's labels by the one label rule (label_key:
        surrounding white space and letter case do not matter); NaN where none matches."""
        return text.str.strip(LABEL_SPACE).str.lower().map(self.labels)

    def number_violations(self, values: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
        """For float64 values (NaN = missing): a mask per broken rule and the rule in words."""
        present = ~np.isnan(values)
        if self.kind == "int":
            yield present & (values != np.round(values)), "not a whole number"
        if self.values is not None:
            yield (
                present & ~np.isin(values, np.asarray(self.allowed, dtype="float64")),
                f"not one of {list(self.values)}",
            )
        if self.min is not None:
            yield present & (values < self.min), f"below the minimum {self.min}"
        if self.max is not None:
            yield present & (values > self.max), f"above the maximum {self.max}"


@dataclass(frozen=True)
class Rules:
    columns: dict[str, ColumnRule]
    row_count_min: int
    row_count_max: int | None


def compile_rules(schema: SchemaConfig, target: str | None = None) -> Rules:
    """`target`: the column whose missing values are always quarantined."""
    columns = {}
    for name, spec in schema.columns.items():
        columns[name] = ColumnRule(
            name=name,
            kind=spec.type,
            min=spec.min,
            max=spec.max,
            values=tuple(spec.values) if spec.values else None,  # type: ignore[arg-type]
            labels={label_key(str(v)): str(v) for v in spec.values or []} if spec.type == "category" else {},
            max_null_fraction=spec.max_null_fraction,
            quarantine_missing=name == target or spec.missing == "quarantine",
        )
    return Rules(columns=columns, row_count_min=schema.row_count.min, row_count_max=schema.row_count.max)
