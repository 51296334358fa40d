"""Arriving data: batches land in a folder (CSV or Parquet), are checked with the pipeline's
own rules (ingest's structure checks, clean's typing and quarantine limit, the Great
Expectations suite) and, when they pass, are appended to `arrivals/`, which the ingest stage
reads after the source. `arrivals/` is a dependency of the ingest stage in dvc.yaml, so each
accepted batch makes a new data version.

A batch that fails is moved to `landing/rejected/` with a `.reason.txt` beside it: it reaches
neither training nor the monitoring window. Accepted batches are stored as they arrived (as
text), so cleaning them later is the same code path as cleaning the source.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import Params
from pipelines.errors import LooplineError
from pipelines.storage import write_parquet, write_text

STAGE = "arrivals"
LANDING_SUFFIXES = (".csv", ".parquet")


def landed_files(landing: Path) -> list[Path]:
    """Files waiting in the landing folder, oldest name first."""
    if not landing.is_dir():
        return []
    return sorted(p for p in landing.iterdir() if p.is_file() and p.suffix.lower() in LANDING_SUFFIXES)


def arrival_files(arrivals: Path) -> list[Path]:
    """Accepted batches in the order they were accepted."""
    return sorted(arrivals.glob("*.parquet")) if arrivals.is_dir() else []


def _next_sequence(arrivals: Path) -> int:
    """One past the highest sequence number: names sort in acceptance order even if a
    batch was removed by hand."""
    numbers = [int(f.name[:6]) for f in arrival_files(arrivals) if f.name[:6].isdigit()]
    return max(numbers, default=0) + 1


def arrival_rows(files: Sequence[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def read_arrivals(files: Sequence[Path], columns: list[str]) -> pa.Table:
    """Accepted batches as one text table with `columns` (a column a batch lacks is null)."""
    tables = []
    for f in files:
        table = pq.read_table(f)
        tables.append(pa.table({c: table.column(c) if c in table.column_names else pa.nulls(len(table), pa.string())
                                for c in columns}))
    return pa.concat_tables(tables)


def _keep(params: Params) -> tuple[str, ...]:
    return (params.monitor.id_column,) if params.monitor.id_column else ()


def read_batch(path: Path, params: Params) -> pa.Table:
    """A landed file as text columns (schema columns plus the id column when present)."""
    from pipelines.ingest import check_columns, read_source

    keep = _keep(params)
    if path.suffix.lower() == ".csv":
        return read_source(path, params.table_schema, params.data, keep).rows
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise LooplineError(STAGE, f"{path}: cannot be read as Parquet: {err}") from None
    check_columns(path, table.column_names, params.table_schema, params.data, keep)
    if table.num_rows == 0:
        raise LooplineError(STAGE, f"{path}: the file has no rows")
    wanted = [c for c in [*params.table_schema.columns, *keep] if c in table.column_names]
    return pa.table({c: pc.cast(table.column(c), pa.string()) for c in wanted})


def check_batch(rows: pa.Table, params: Params, source: str) -> dict[str, Any]:
    """Clean and validate a batch on its own, with the rules the full dataset gets (the table's
    row-count bounds excepted: a batch is a slice). Raises LooplineError naming what failed."""
    from pipelines.clean import clean_rows
    from pipelines.validate import validate_frame

    schema = params.table_schema.model_copy(update={"row_count": params.table_schema.row_count.model_copy(
        update={"min": 1, "max": None})})
    try:
        cleaned = clean_rows(rows, schema, params.data, params.clean)
    except LooplineError as err:
        raise LooplineError(STAGE, f"{source} rejected: {err.message}") from None
    validation = validate_frame(cleaned.rows.to_pandas(), schema, source)
    if not validation.success:
        raise LooplineError(STAGE, f"{source} rejected: {len(validation.failures)} expectation(s) failed: "
                                   + "; ".join(validation.failures))
    return cleaned.report


def typed_rows(rows: pa.Table, params: Params) -> pd.DataFrame:
    """Text rows typed and cleaned as the pipeline does, with the id column carried along."""
    from pipelines.clean import clean_rows

    # Duplicates stay: two requests with the same inputs are two served predictions.
    cfg = params.clean.model_copy(update={"drop_duplicates": False})
    return clean_rows(rows, params.table_schema, params.data, cfg, keep=_keep(params)).rows.to_pandas()


@contextmanager
def _landing_lock(landing: Path) -> Iterator[None]:
    """Two monitoring runs at once would accept the same file twice."""
    landing.mkdir(parents=True, exist_ok=True)
    with open(landing / ".accept.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def accept_landed(params: Params) -> list[dict[str, Any]]:
    """Check every landed file; move each to arrivals/ (accepted) or landing/rejected/."""
    from pipelines.stages import Layout

    layout = Layout.of(params)
    outcomes: list[dict[str, Any]] = []
    with _landing_lock(layout.landing):
        for path in landed_files(layout.landing):
            try:
                rows = read_batch(path, params)
                report = check_batch(rows, params, str(path))
            except LooplineError as err:
                layout.rejected.mkdir(parents=True, exist_ok=True)
                write_text(str(err) + "\n", layout.rejected / f"{path.name}.reason.txt")
                os.replace(path, layout.rejected / path.name)
                outcomes.append({"file": path.name, "accepted": False, "reason": str(err)})
                continue
            stored = layout.arrivals / f"{_next_sequence(layout.arrivals):06d}-{path.stem}.parquet"
            write_parquet(rows, stored)
            path.unlink()
            outcomes.append({"file": path.name, "accepted": True, "rows": rows.num_rows,
                             "rows_quarantined": report["rows_quarantined"], "stored": stored.name})
    return outcomes
