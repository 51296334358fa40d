"""Arriving data: batches land in a folder (CSV or Parquet), are checked with the pipeline's
own rules (ingest's structure checks, clean's typing and quarantine limit, the Great
Expectations suite) and, when they pass, are appended to `arrivals/`, which the ingest stage
reads after the source. `arrivals/` is a dependency of the ingest stage in dvc.yaml, so each
accepted batch makes a new data version.

A batch that fails is moved to `landing/rejected/` with a `.reason.txt` beside it: it reaches
neither training nor the monitoring window. Accepted batches are stored as they arrived (as
text), so cleaning them later is the same code path as cleaning the source.

Hand-off and crash safety: hidden and temporary names (`.x.csv`, `~x.csv`, `x.csv.tmp`,
`x.csv.part`) are passed over, so a writer that writes under such a name and renames when
done is never read half-written; a file modified in the last `monitor.settle_seconds` is
looked at again after that long and left for the next run if it changed. Acceptance is keyed
by the landed file's content hash (kept in the stored Parquet's metadata): the stored copy is
on disk before the landed file is removed, and a run after a crash in between finds the hash
already stored and only removes the landed file.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import file_digest, write_parquet, write_text
from pipelines.data.ingest import arrival_files

STAGE = "arrivals"
LANDING_SUFFIXES = (".csv", ".parquet")
HASH_KEY = b"loopline.landed_sha256"  # Parquet metadata of a stored batch: the landed file's hash


def landed_files(landing: Path) -> list[Path]:
    """Files waiting in the landing folder, oldest name first; hidden and temporary names
    (a writer's file before its final rename) are not batches yet."""
    if not landing.is_dir():
        return []
    return sorted(
        p
        for p in landing.iterdir()
        if p.is_file() and not p.name.startswith((".", "~")) and p.suffix.lower() in LANDING_SUFFIXES
    )


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def settled(files: list[Path], settle_seconds: float) -> tuple[list[Path], list[Path]]:
    """(files unchanged for `settle_seconds`, files still being written). A file modified
    more recently is looked at again once that long has passed since its last change."""
    if settle_seconds <= 0 or not files:
        return files, []
    before = {f: _signature(f) for f in files}
    youngest = max(mtime for _, mtime in before.values()) / 1e9
    wait = settle_seconds - (time.time() - youngest)
    if wait <= 0:
        return files, []
    time.sleep(min(wait, settle_seconds))
    moving = [f for f in files if not f.exists() or _signature(f) != before[f]]
    return [f for f in files if f not in moving], moving


def _stored_hashes(arrivals: Path) -> dict[str, str]:
    """Landed-file hash -> the stored batch holding it."""
    hashes = {}
    for f in arrival_files(arrivals):
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
        if HASH_KEY in metadata:
            hashes[metadata[HASH_KEY].decode()] = f.name
    return hashes


def _next_sequence(arrivals: Path) -> int:
    """One past the highest sequence number: names sort in acceptance order even if a
    batch was removed by hand."""
    numbers = [int(f.name[:6]) for f in arrival_files(arrivals) if f.name[:6].isdigit()]
    return max(numbers, default=0) + 1


def _keep(params: Params) -> tuple[str, ...]:
    return (params.monitor.id_column,) if params.monitor.id_column else ()


def read_batch(path: Path, params: Params) -> pa.Table:
    """A landed file as text columns (schema columns plus the id column when present)."""
    from pipelines.data.ingest import check_columns, read_source

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
    from pipelines.data.clean import clean_rows
    from pipelines.data.validate import validate_frame

    schema = params.table_schema.model_copy(
        update={"row_count": params.table_schema.row_count.model_copy(update={"min": 1, "max": None})}
    )
    try:
        cleaned = clean_rows(rows, schema, params.data, params.clean)
    except LooplineError as err:
        raise LooplineError(STAGE, f"{source} rejected: {err.message}") from None
    validation = validate_frame(cleaned.rows.to_pandas(), schema, source)
    if not validation.success:
        raise LooplineError(
            STAGE,
            f"{source} rejected: {len(validation.failures)} expectation(s) failed: " + "; ".join(validation.failures),
        )
    return cleaned.report


def typed_rows(rows: pa.Table, params: Params) -> pd.DataFrame:
    """Text rows typed and cleaned as the pipeline does, with the id column carried along."""
    from pipelines.data.clean import clean_rows

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


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one landed file. `status`: accepted, rejected, already accepted
    (stored by a run that died before removing it), or waiting (still being written)."""

    file: str
    status: Literal["accepted", "rejected", "already accepted", "waiting"]
    rows: int | None = None
    rows_quarantined: int | None = None
    stored: str | None = None  # its name in arrivals/
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def describe(self) -> str:
        """One line, for the CLI, logs and the decision artifact."""
        if self.status == "accepted":
            return f"accepted ({self.rows} rows) as {self.stored}"
        if self.status == "already accepted":
            return f"already accepted as {self.stored} (by a run that stopped before removing it); removed"
        if self.status == "waiting":
            return f"waiting: {self.reason}"
        return f"REJECTED — {self.reason}"


def accept_landed(params: Params) -> list[BatchOutcome]:
    """Check every settled landed file; store it in arrivals/ (accepted) or move it to
    landing/rejected/."""
    layout = Layout.of(params)
    outcomes: list[BatchOutcome] = []
    with _landing_lock(layout.landing):
        ready, moving = settled(landed_files(layout.landing), params.monitor.settle_seconds)
        outcomes += [
            BatchOutcome(
                p.name,
                "waiting",
                reason=f"still being written (changed within monitor."
                f"settle_seconds={params.monitor.settle_seconds:g}); "
                "left for the next run",
            )
            for p in moving
        ]
        stored_hashes = _stored_hashes(layout.arrivals)
        for path in ready:
            signature, digest = _signature(path), file_digest(path)
            if digest in stored_hashes:
                path.unlink()
                outcomes.append(BatchOutcome(path.name, "already accepted", stored=stored_hashes[digest]))
                continue
            try:
                rows = read_batch(path, params)
                report = check_batch(rows, params, str(path))
            except LooplineError as err:
                layout.rejected.mkdir(parents=True, exist_ok=True)
                write_text(str(err) + "\n", layout.rejected / f"{path.name}.reason.txt")
                os.replace(path, layout.rejected / path.name)
                outcomes.append(BatchOutcome(path.name, "rejected", reason=str(err)))
                continue
            if _signature(path) != signature:  # the writer came back while the file was read
                outcomes.append(
                    BatchOutcome(path.name, "waiting", reason="changed while it was being read; left for the next run")
                )
                continue
            stored = layout.arrivals / f"{_next_sequence(layout.arrivals):06d}-{path.stem}.parquet"
            write_parquet(rows.replace_schema_metadata({HASH_KEY: digest.encode()}), stored)  # durable first,
            path.unlink()  # then removed
            stored_hashes[digest] = stored.name
            outcomes.append(
                BatchOutcome(
                    path.name,
                    "accepted",
                    rows=rows.num_rows,
                    rows_quarantined=report["rows_quarantined"],
                    stored=stored.name,
                )
            )
    return outcomes
