"""clean: type every column, normalise categories, drop exact duplicates, quarantine bad rows.

A row that cannot be repaired (a value that is not a number, a missing target, a missing
value where the schema says quarantine) goes to the quarantine table with a reason; nothing
is dropped silently. Range and allowed-value rules are not checked here: validate does that
on the typed data and stops the pipeline, because a value outside the schema means the
schema or the source changed, which a person should look at.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.config import CleanConfig, DataConfig, Params, SchemaConfig
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import atomic_folder, require_input, write_csv, write_json, write_parquet
from pipelines.data.parts import PART, cluster, parts_of, run_tasks
from pipelines.data.schema import LABEL_SPACE, ColumnRule, Rules, compile_rules, label_key

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


# --- a partition's part of clean, and the decisions taken over the whole table --------------
# The pandas engine cleans its one table as a single partition with these same steps; the
# Dask engine (pipelines/data/partitions.py) runs `type_partition` and `finish_partition` on
# each partition and takes the decisions between them over all of them.


@dataclass(frozen=True)
class TypedPartition:
    """One partition typed: its good rows, its quarantine, and what the whole-table decisions
    need from it."""

    rows: pa.Table  # the good rows typed (category columns with this partition's dictionary), `keep` columns after
    quarantine: pd.DataFrame
    rows_in: int
    problems: dict[str, int]  # rows with each problem (`column: reason`)
    hashes: np.ndarray  # uint64 per good row: equal rows have equal hashes, in any partition
    labels: dict[str, list[str]]  # each category column's labels


def type_partition(
    rows: pa.Table, schema: SchemaConfig, data: DataConfig, keep: tuple[str, ...] = ()
) -> TypedPartition:
    """Type a partition's text rows, quarantine the ones that cannot be repaired, and hash
    the rest for the duplicate search. `keep`: text columns (a request id) carried along
    unchanged, not part of a row's identity."""
    rules = compile_rules(schema, data.target)
    table, problems = _typed_columns(rows, rules)
    quarantine, any_bad = _quarantine(rows, problems)
    good = pa.array(~any_bad)
    if len(quarantine):
        table = table.filter(good)
    hashes = _row_hashes(table)
    for col in keep:
        if col in rows.column_names:
            table = table.append_column(col, rows.column(col).filter(good) if len(quarantine) else rows.column(col))
    labels = {
        c: table.column(c).combine_chunks().dictionary.to_pylist()
        for c, r in rules.columns.items()
        if r.kind == "category"
    }
    return TypedPartition(
        rows=table,
        quarantine=quarantine,
        rows_in=rows.num_rows,
        problems={label: int(mask.sum()) for label, mask in problems},
        hashes=hashes,
        labels=labels,
    )


def check_quarantine_share(rows_in: int, quarantine: pd.DataFrame, problems: dict[str, int], cfg: CleanConfig) -> None:
    """Stop when more of the table's rows cannot be repaired than clean.max_quarantine_fraction."""
    quarantined = len(quarantine)
    if rows_in and quarantined / rows_in > cfg.max_quarantine_fraction:
        raise LooplineError(
            STAGE,
            (
                f"{quarantined} of {rows_in} rows ({quarantined / rows_in:.1%}) cannot be repaired, more than "
                f"clean.max_quarantine_fraction={cfg.max_quarantine_fraction}: {_summarise(quarantine, problems)}. "
                "The source looks broken rather than dirty; nothing was written."
            ),
        )


def categories(schema: SchemaConfig, target: str, labels: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Each category column's categories over every partition: the schema's labels in their
    order, then the others met (which validate reports), sorted."""
    rules = compile_rules(schema, target)
    out = {}
    for col, rule in rules.columns.items():
        if rule.kind == "category":
            known = list(rule.labels.values())
            seen = {label for part in labels for label in part.get(col, [])}
            out[col] = known + sorted(seen - set(known))
    return out


def duplicate_candidates(hashes: list[np.ndarray]) -> list[np.ndarray]:
    """For each partition, the rows whose hash some other row of the table shares: the only
    rows that can be duplicates (a 64-bit hash per row finds them in linear time)."""
    every = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    every.sort()  # in place: 8 bytes a row, where a hash table of every row took several times that
    repeated = np.unique(every[1:][every[1:] == every[:-1]])
    del every
    return [np.flatnonzero(np.isin(h, repeated)) for h in hashes]


def comparable(rows: pa.Table, which: np.ndarray) -> pd.DataFrame:
    """Rows `which` of a typed partition as values to compare exactly: labels, not a
    partition's own category codes."""
    taken = rows.take(pa.array(which, type=pa.int64()))
    return pd.DataFrame(
        {
            name: column.cast(pa.string()).to_pandas() if pa.types.is_dictionary(column.type) else column.to_pandas()
            for name, column in zip(taken.column_names, taken.columns, strict=True)
        }
    )


def duplicates_among(candidates: list[pd.DataFrame]) -> list[np.ndarray]:
    """Which candidate rows equal an earlier row of the table (partitions in order, rows in
    order within each): a mask per partition's candidates."""
    if not candidates or not sum(len(c) for c in candidates):
        return [np.zeros(len(c), dtype=bool) for c in candidates]
    dup = pd.concat(candidates, ignore_index=True).duplicated().to_numpy()
    bounds = np.cumsum([0, *(len(c) for c in candidates)])
    return [dup[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def finish_partition(rows: pa.Table, categories: dict[str, list[str]], drop: np.ndarray | None) -> pa.Table:
    """A typed partition's clean rows: the duplicates dropped, every category column on the
    table's categories (so partitions read back as one table, as the pandas engine writes it)."""
    if drop is not None and drop.any():
        rows = rows.filter(pa.array(~drop))
    for col, wanted in categories.items():
        column = rows.column(col).combine_chunks()
        have = column.dictionary.to_pylist()
        if have == wanted:
            continue
        position = {label: i for i, label in enumerate(wanted)}
        remap = np.array([position[label] for label in have] + [-1], dtype=np.int32)
        codes = remap[column.indices.fill_null(len(have)).to_numpy(zero_copy_only=False)]
        recoded = pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), pa.array(wanted, pa.string()))
        rows = rows.set_column(rows.column_names.index(col), col, recoded)
    return rows


def clean_rows(
    rows: pa.Table, schema: SchemaConfig, data: DataConfig, cfg: CleanConfig, keep: tuple[str, ...] = ()
) -> Cleaned:
    """The whole table as one partition. `keep`: text columns (a request id) carried along
    unchanged, not used to find duplicates."""
    typed = type_partition(rows, schema, data, keep)
    check_quarantine_share(typed.rows_in, typed.quarantine, typed.problems, cfg)
    drop = None
    if cfg.drop_duplicates:
        [which] = duplicate_candidates([typed.hashes])
        [dup] = duplicates_among([comparable(_without(typed.rows, keep), which)])
        drop = np.zeros(typed.rows.num_rows, dtype=bool)
        drop[which[dup]] = True
    table = finish_partition(typed.rows, categories(schema, data.target, [typed.labels]), drop)
    report = {
        "rows_in": typed.rows_in,
        "rows_quarantined": len(typed.quarantine),
        "duplicates_dropped": int(drop.sum()) if drop is not None else 0,
        "rows_out": table.num_rows,
    }
    return Cleaned(rows=table, quarantine=typed.quarantine, report=report)


def _without(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    return table.drop_columns([c for c in columns if c in table.column_names])


def _row_hashes(table: pa.Table) -> np.ndarray:
    """A 64-bit hash per row of the typed columns: category columns by their labels (so a row
    hashes alike whatever partition's dictionary encodes it), numbers by their bits (nulls as
    NaN hash alike)."""
    row_hash = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in table.columns:
            column = column.combine_chunks()
            if pa.types.is_dictionary(column.type):
                label_bits = pd.util.hash_array(np.asarray(column.dictionary.to_pylist(), dtype=object))
                codes = column.indices.fill_null(-1).to_numpy(zero_copy_only=False)
                bits = np.where(codes >= 0, label_bits[np.maximum(codes, 0)] if len(label_bits) else 0, np.uint64(1))
                bits = bits.astype(np.uint64)
            else:
                bits = column.to_numpy(zero_copy_only=False).view(np.uint64)
            row_hash = (row_hash ^ bits) * np.uint64(0x100000001B3) + np.uint64(0x9E3779B97F4A7C15)
            row_hash ^= row_hash >> np.uint64(29)
    return row_hash


def _summarise(quarantine: pd.DataFrame, problems: dict[str, int]) -> str:
    parts = []
    for label, count in problems.items():
        col = label.split(":", 1)[0]
        examples = quarantine.loc[quarantine["reason"].str.contains(label, regex=False), col].head(3).tolist()
        shown = f", e.g. {examples}" if "missing" not in label else ""
        parts.append(f"{label} in {count} rows{shown}")
    return "; ".join(parts)


# --- the stage a partition at a time (execution.data: dask; pipelines/data/parts.py) ----------


def clean_partitioned(params: Params) -> dict[str, Any]:
    from pipelines.data.clean import categories, check_quarantine_share, duplicate_candidates, duplicates_among

    layout = Layout.of(params)
    parts = parts_of(require_input(layout.ingested, "clean"))
    schema, data, cfg = params.table_schema, params.data, params.clean
    layout.clean.parent.mkdir(parents=True, exist_ok=True)
    with (
        cluster(params) as client,
        tempfile.TemporaryDirectory(prefix=".clean-", dir=layout.clean.parent) as scratch,
    ):
        typed_parts = [Path(scratch) / PART.format(i) for i in range(len(parts))]
        typed = run_tasks(
            client, _type_part, [(p, params, t) for p, t in zip(parts, typed_parts, strict=True)], "clean", params
        )
        quarantine = pd.concat([t.quarantine for t in typed], ignore_index=True)
        problems: dict[str, int] = {}
        for t in typed:
            for label, count in t.problems.items():
                problems[label] = problems.get(label, 0) + count
        check_quarantine_share(sum(t.rows_in for t in typed), quarantine, problems, cfg)
        drops: list[np.ndarray | None] = [None] * len(parts)
        if cfg.drop_duplicates:
            candidates = duplicate_candidates([t.hashes for t in typed])
            shared = [i for i, which in enumerate(candidates) if len(which)]
            rows = run_tasks(
                client, _candidate_rows, [(typed_parts[i], candidates[i]) for i in shared], "clean", params
            )
            for i, dup in zip(shared, duplicates_among(rows), strict=True):
                drops[i] = candidates[i][dup]
        wanted = categories(schema, data.target, [t.labels for t in typed])
        with atomic_folder(layout.clean) as folder:
            calls = [(typed_parts[i], wanted, drops[i], folder / PART.format(i)) for i in range(len(parts))]
            rows_out = run_tasks(client, _finish_part, calls, "clean", params)
    report = {
        "rows_in": sum(t.rows_in for t in typed),
        "rows_quarantined": len(quarantine),
        "duplicates_dropped": sum(len(d) for d in drops if d is not None),
        "rows_out": sum(rows_out),
    }
    write_csv(quarantine, layout.clean_quarantine)
    write_json(report, layout.clean_report)
    return report


def _type_part(part: Path, params: Params, out: Path):
    """A partition typed into `out`; what the whole-table decisions need comes back."""
    from pipelines.data.clean import type_partition

    typed = type_partition(pq.read_table(part), params.table_schema, params.data)
    write_parquet(typed.rows, out)
    return replace(typed, rows=typed.rows.schema.empty_table())  # a slice would carry its whole buffers


def _candidate_rows(part: Path, which: np.ndarray) -> pd.DataFrame:
    from pipelines.data.clean import comparable

    return comparable(pq.read_table(part), which)


def _finish_part(part: Path, wanted: dict[str, list[str]], drop: np.ndarray | None, out: Path) -> int:
    from pipelines.data.clean import finish_partition

    rows = pq.read_table(part)
    mask = None
    if drop is not None:
        mask = np.zeros(rows.num_rows, dtype=bool)
        mask[drop] = True
    finished = finish_partition(rows, wanted, mask)
    write_parquet(finished, out)
    return finished.num_rows
