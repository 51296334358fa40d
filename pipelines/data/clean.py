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

from pipelines.core.config import CleanConfig, DataConfig, SchemaConfig
from pipelines.core.errors import LooplineError
from pipelines.data.schema import LABEL_SPACE, label_key, ColumnRule, Rules, compile_rules

STAGE = "clean"


@dataclass(frozen=True)
class Cleaned:
    rows: pa.Table  # numeric columns float64, category columns dictionary-encoded (pandas Categorical)
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


def _to_category(text: pa.ChunkedArray, rule: ColumnRule) -> pa.DictionaryArray:
    """Match labels to the schema's spelling by the one label rule (schema.label_key); keep
    unknown labels, trimmed, as they are (validate reports them). Works on the distinct labels only."""
    encoded = pc.dictionary_encode(pc.utf8_trim(text, characters=LABEL_SPACE)).combine_chunks()
    spelling = rule.labels
    labels = [spelling.get(label_key(v), v) for v in encoded.dictionary.to_pylist()]
    categories = list(spelling.values()) + sorted(set(labels) - set(spelling.values()))
    position = {c: i for i, c in enumerate(categories)}
    remap = np.array([position[label] for label in labels] + [-1], dtype=np.int32)
    codes = remap[encoded.indices.fill_null(len(labels)).to_numpy(zero_copy_only=False)]
    return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), pa.array(categories, pa.string()))


def _type_column(text: pa.ChunkedArray, rule: ColumnRule) -> tuple[pa.Array, np.ndarray, str]:
    if rule.kind == "category":
        return _to_category(text, rule), np.zeros(len(text), dtype=bool), ""
    values, bad = _to_number(text)
    reason = "not a number"
    if rule.kind == "int":
        fractional = ~bad & ~np.isnan(values) & (values != np.round(values))
        if fractional.any():
            bad, reason = bad | fractional, "not a whole number"
    return pa.array(values, from_pandas=True), bad, reason  # NaN becomes null


def _typed_columns(rows: pa.Table, rules: Rules) -> tuple[pa.Table, list[tuple[str, np.ndarray]]]:
    """Every schema column typed, and each problem found on the way: (`column: reason`, row mask)."""
    typed: dict[str, pa.Array] = {}
    problems: list[tuple[str, np.ndarray]] = []
    for col, rule in rules.columns.items():
        values, bad, reason = _type_column(rows.column(col), rule)
        typed[col] = values
        if bad.any():
            problems.append((f"{col}: {reason}", bad))
        if rule.quarantine_missing:
            missing = values.is_null().to_numpy(zero_copy_only=False) & ~bad
            if missing.any():
                problems.append((f"{col}: missing value", missing))
    return pa.table(typed), problems


def _quarantine(rows: pa.Table, problems: list[tuple[str, np.ndarray]]) -> tuple[pd.DataFrame, np.ndarray]:
    """The original text of every row with a problem, plus a `reason` column; and the mask of those rows."""
    any_bad = np.zeros(rows.num_rows, dtype=bool)
    for _, mask in problems:
        any_bad |= mask
    bad_index = np.flatnonzero(any_bad)
    quarantine = rows.take(pa.array(bad_index)).to_pandas()
    reasons = pd.Series([""] * len(bad_index), dtype=object)
    for label, mask in problems:
        hit = mask[bad_index]
        reasons[hit] = np.where(reasons[hit] == "", label, reasons[hit] + "; " + label)
    quarantine["reason"] = reasons.to_numpy()
    return quarantine, any_bad


def clean_rows(
    rows: pa.Table, schema: SchemaConfig, data: DataConfig, cfg: CleanConfig, keep: tuple[str, ...] = ()
) -> Cleaned:
    """`keep`: text columns (a request id) carried along unchanged, not used to find duplicates."""
    n_in = rows.num_rows
    table, problems = _typed_columns(rows, compile_rules(schema, data.target))
    carried = {c: rows.column(c) for c in keep if c in rows.column_names}
    quarantine, any_bad = _quarantine(rows, problems)

    quarantined = len(quarantine)
    if n_in and quarantined / n_in > cfg.max_quarantine_fraction:
        raise LooplineError(
            STAGE,
            (
                f"{quarantined} of {n_in} rows ({quarantined / n_in:.1%}) cannot be repaired, more than "
                f"clean.max_quarantine_fraction={cfg.max_quarantine_fraction}: {_summarise(quarantine, problems)}. "
                "The source looks broken rather than dirty; nothing was written."
            ),
        )

    if quarantined:
        table = table.filter(pa.array(~any_bad))
        carried = {c: v.filter(pa.array(~any_bad)) for c, v in carried.items()}
    duplicates = 0
    if cfg.drop_duplicates:
        dup = _duplicated(table)
        duplicates = int(dup.sum())
        if duplicates:
            table = table.filter(pa.array(~dup))
            carried = {c: v.filter(pa.array(~dup)) for c, v in carried.items()}
    for col, values in carried.items():
        table = table.append_column(col, values)
    report = {
        "rows_in": n_in,
        "rows_quarantined": quarantined,
        "duplicates_dropped": duplicates,
        "rows_out": table.num_rows,
    }
    return Cleaned(rows=table, quarantine=quarantine, report=report)


def _duplicated(table: pa.Table) -> np.ndarray:
    """Rows equal to an earlier row. A 64-bit hash per row finds the candidates in linear
    time; exact comparison then runs on the (few) rows whose hash is not unique."""
    row_hash = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in table.columns:
            column = column.combine_chunks()
            if pa.types.is_dictionary(column.type):
                bits = column.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.uint64)
            else:  # float64; nulls as NaN hash alike
                bits = column.to_numpy(zero_copy_only=False).view(np.uint64)
            row_hash = (row_hash ^ bits) * np.uint64(0x100000001B3) + np.uint64(0x9E3779B97F4A7C15)
            row_hash ^= row_hash >> np.uint64(29)
    candidates = np.flatnonzero(pd.Series(row_hash).duplicated(keep=False).to_numpy())
    dup = np.zeros(table.num_rows, dtype=bool)
    if len(candidates):
        subset = table.take(pa.array(candidates)).to_pandas()
        dup[candidates] = subset.duplicated().to_numpy()
    return dup


def _summarise(quarantine: pd.DataFrame, problems: list[tuple[str, np.ndarray]]) -> str:
    parts = []
    for label, mask in problems:
        col = label.split(":", 1)[0]
        count = int(mask.sum())
        examples = quarantine.loc[quarantine["reason"].str.contains(label, regex=False), col].head(3).tolist()
        shown = f", e.g. {examples}" if "missing" not in label else ""
        parts.append(f"{label} in {count} rows{shown}")
    return "; ".join(parts)
