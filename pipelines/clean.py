"""clean: type every column, normalise categories, drop exact duplicates, quarantine bad rows.

A row that cannot be repaired (a value that is not a number, a missing target, a missing
value where the schema says quarantine) goes to the quarantine table with a reason; nothing
is dropped silently. Range and allowed-value rules are not checked here: validate does that
on the typed data and stops the pipeline, because a value outside the schema means the
schema or the source changed, which a person should look at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import CleanConfig, ColumnSpec, DataConfig, SchemaConfig
from pipelines.errors import LooplineError

STAGE = "clean"


@dataclass(frozen=True)
class Cleaned:
    rows: pd.DataFrame  # numeric columns float64, category columns pandas Categorical
    quarantine: pd.DataFrame  # the original text of each bad row plus a `reason` column
    report: dict[str, int]


def _to_number(text: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse text as float64; return the values (NaN where missing or bad) and the bad mask."""
    stripped = pc.utf8_trim_whitespace(text)
    try:
        values = pc.cast(stripped, pa.float64()).to_numpy().copy()
        bad = np.zeros(len(values), dtype=bool)
    except pa.ArrowInvalid:  # some value is not a number: find which, vectorised
        as_text = stripped.to_pandas()
        values = pd.to_numeric(as_text, errors="coerce").to_numpy(dtype="float64")
        bad = as_text.notna().to_numpy() & np.isnan(values)
    infinite = np.isinf(values)
    values[infinite] = np.nan
    return values, bad | infinite


def _to_category(text: pa.ChunkedArray, allowed: list) -> pd.Categorical:
    """Trim and match labels case-insensitively to the allowed spelling; keep unknown labels
    as they are (validate reports them). Works on the distinct labels only."""
    encoded = pc.dictionary_encode(pc.utf8_trim_whitespace(text)).combine_chunks()
    spelling = {str(v).lower(): str(v) for v in allowed}
    labels = [spelling.get(v.lower(), v) for v in encoded.dictionary.to_pylist()]
    categories = [str(v) for v in allowed] + sorted(set(labels) - set(spelling.values()))
    position = {c: i for i, c in enumerate(categories)}
    remap = np.array([position[label] for label in labels] + [-1], dtype=np.int64)
    codes = encoded.indices.fill_null(len(labels)).to_numpy(zero_copy_only=False)
    return pd.Categorical.from_codes(remap[codes], categories=categories)


def _type_column(text: pa.ChunkedArray, spec: ColumnSpec) -> tuple[object, np.ndarray, str]:
    if spec.type == "category":
        return _to_category(text, spec.values or []), np.zeros(len(text), dtype=bool), ""
    values, bad = _to_number(text)
    reason = "not a number"
    if spec.type == "int":
        fractional = ~bad & ~np.isnan(values) & (values != np.round(values))
        if fractional.any():
            bad, reason = bad | fractional, "not a whole number"
    return values, bad, reason


def clean_rows(rows: pa.Table, schema: SchemaConfig, data: DataConfig, cfg: CleanConfig) -> Cleaned:
    n_in = rows.num_rows
    typed: dict[str, object] = {}
    problems: list[tuple[str, np.ndarray]] = []
    for col, spec in schema.columns.items():
        values, bad, reason = _type_column(rows.column(col), spec)
        typed[col] = values
        if bad.any():
            problems.append((f"{col}: {reason}", bad))
        if col == data.target or spec.missing == "quarantine":
            missing = np.asarray(pd.isna(values)) & ~bad
            if missing.any():
                problems.append((f"{col}: missing value", missing))
    df = pd.DataFrame(typed)

    any_bad = np.zeros(n_in, dtype=bool)
    for _, mask in problems:
        any_bad |= mask
    bad_index = np.flatnonzero(any_bad)
    quarantine = rows.take(pa.array(bad_index)).to_pandas()
    reasons = pd.Series([""] * len(bad_index), dtype=object)
    for label, mask in problems:
        hit = mask[bad_index]
        reasons[hit] = np.where(reasons[hit] == "", label, reasons[hit] + "; " + label)
    quarantine["reason"] = reasons.to_numpy()

    quarantined = len(bad_index)
    if n_in and quarantined / n_in > cfg.max_quarantine_fraction:
        raise LooplineError(STAGE, (
            f"{quarantined} of {n_in} rows ({quarantined / n_in:.1%}) cannot be repaired, more than "
            f"clean.max_quarantine_fraction={cfg.max_quarantine_fraction}: {_summarise(quarantine, problems)}. "
            "The source looks broken rather than dirty; nothing was written."))

    df = df.loc[~any_bad].reset_index(drop=True)
    duplicates = 0
    if cfg.drop_duplicates:
        dup = df.duplicated().to_numpy()
        duplicates = int(dup.sum())
        if duplicates:
            df = df.loc[~dup].reset_index(drop=True)
    report = {"rows_in": n_in, "rows_quarantined": quarantined,
              "duplicates_dropped": duplicates, "rows_out": len(df)}
    return Cleaned(rows=df, quarantine=quarantine, report=report)


def _summarise(quarantine: pd.DataFrame, problems: list[tuple[str, np.ndarray]]) -> str:
    parts = []
    for label, mask in problems:
        col = label.split(":", 1)[0]
        count = int(mask.sum())
        examples = quarantine.loc[quarantine["reason"].str.contains(label, regex=False), col].head(3).tolist()
        shown = f", e.g. {examples}" if "missing" not in label else ""
        parts.append(f"{label} in {count} rows{shown}")
    return "; ".join(parts)
