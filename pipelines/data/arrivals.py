"""Arriving data: files land in a folder (CSV or Parquet), are checked with the pipeline's own
rules (ingest's structure checks, clean's typing and quarantine limit, the Great Expectations
suite) and stored by what they hold:

- **full**: every schema column with the target (a back-fill, a labelled export). Stored in
  `arrivals/`, which the ingest stage reads after the source: a new data version, training
  rows, and a landed window monitoring measures;
- **features**: every feature without the target (or with the target empty). Stored in
  `observed/`: measured by monitoring as a landed window, never read by training;
- **labels**: the id column (or the `monitor.time_key` columns) with the target, for rows the
  service answered. Stored in `labels/`; monitoring joins them to the prediction log
  (pipelines/monitoring/labels.py), and the joined rows (the logged inputs with their labels)
  become a batch in `arrivals/`, with their lineage.

A file that fails is moved to `landing/rejected/` with a `.reason.txt` beside it: it reaches
neither training nor monitoring. Files are stored as they arrived (as text), so cleaning them
later is the same code path as cleaning the source.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.config import Params, SchemaConfig
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import file_digest, write_parquet, write_text

STAGE = "arrivals"
LANDING_SUFFIXES = (".csv", ".parquet")
HASH_KEY = b"loopline.landed_sha256"  # Parquet metadata of a stored batch: the landed file's hash
KIND_KEY = b"loopline.kind"  # ... and what it holds: full | features | labels | joined labels
SOURCE_KEY = b"loopline.source"  # joined labels: the label file they came from
Kind = Literal["full", "features", "labels"]


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


def _stored_folders(layout: Layout) -> list[Path]:
    """Where accepted files are stored: one sequence of names runs through them all."""
    return [layout.arrivals, layout.observed, layout.labels, layout.joined_labels]


def stored_files(folder: Path) -> list[Path]:
    """Stored batches of a folder in the order they were accepted."""
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def _stored_hashes(layout: Layout) -> dict[str, str]:
    """Landed-file hash -> the stored batch holding it."""
    hashes = {}
    for folder in _stored_folders(layout):
        for f in stored_files(folder):
            metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
            if HASH_KEY in metadata:
                hashes[metadata[HASH_KEY].decode()] = f.name
    return hashes


def _next_sequence(layout: Layout) -> int:
    """One past the highest sequence number in any store: names sort in acceptance order even
    if a batch was removed by hand."""
    numbers = [int(f.name[:6]) for d in _stored_folders(layout) for f in stored_files(d) if f.name[:6].isdigit()]
    return max(numbers, default=0) + 1


def stored_kind(path: Path) -> str:
    """What a stored batch holds (a batch stored before kinds were recorded is full)."""
    metadata = pq.ParquetFile(path).schema_arrow.metadata or {}
    return metadata.get(KIND_KEY, b"full").decode()


def store_batch(rows: pa.Table, folder: Path, stem: str, layout: Layout, metadata: dict[bytes, bytes]) -> Path:
    """`rows` as the next stored batch of `folder`, on disk (fsync, rename) before this returns."""
    stored = folder / f"{_next_sequence(layout):06d}-{stem}.parquet"
    write_parquet(rows.replace_schema_metadata(metadata), stored)
    return stored


def _keep(params: Params) -> tuple[str, ...]:
    return (params.monitor.id_column,) if params.monitor.id_column else ()


def landed_kind(columns: list[str], params: Params) -> Kind:
    """What a landed file holds, by its columns; an error naming what each kind needs when it
    is none of them."""
    target, features = params.data.target, params.features.columns
    id_column, time_key = params.monitor.id_column, params.monitor.time_key
    if all(c in columns for c in features):
        return "full" if target in columns else "features"
    if target in columns and (
        (id_column and id_column in columns) or (time_key and all(k in columns for k in time_key))
    ):
        return "labels"
    keys = " or ".join(
        [f"the id column {id_column!r}"] * bool(id_column) + [f"the time key {time_key}"] * bool(time_key)
    )
    missing = [c for c in features if c not in columns]
    raise LooplineError(
        STAGE,
        f"its columns {columns} are no batch loopline takes: features to measure need every feature (missing "
        f"{missing}); labels need the target {target!r} with {keys or 'monitor.id_column or monitor.time_key'}",
    )


def _kind_schema(params: Params, kind: Kind, columns: list[str]) -> SchemaConfig:
    """The schema a batch of `kind` is read and checked with: all of it for a full batch; the
    columns it has for features (the target's are empty or absent); the target and the time
    key for labels."""
    schema = params.table_schema
    if kind == "full":
        return schema
    keep = [c for c in schema.columns if c in columns]
    if kind == "features":
        keep = [c for c in keep if c != params.data.target]
    else:
        keep = [c for c in keep if c == params.data.target or c in params.monitor.time_key]
    return schema.model_copy(update={"columns": {c: schema.columns[c] for c in keep}})


def read_batch(path: Path, params: Params) -> tuple[Kind, pa.Table]:
    """A landed file as text columns (the columns of its kind's schema, and the id column when
    present), and its kind."""
    from pipelines.data.ingest import check_columns, read_source

    keep = _keep(params)
    if path.suffix.lower() == ".csv":
        from pipelines.data.ingest import _read_header

        header = _read_header(path)
        kind = _landed_kind(path, header, params)
        schema = _kind_schema(params, kind, header)
        table = read_source(path, schema, params.data, keep, declared=params.table_schema).rows
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise LooplineError(STAGE, f"{path}: cannot be read as Parquet: {err}") from None
        kind = _landed_kind(path, table.column_names, params)
        schema = _kind_schema(params, kind, table.column_names)
        check_columns(path, table.column_names, schema, params.data, keep, params.table_schema)
        if table.num_rows == 0:
            raise LooplineError(STAGE, f"{path}: the file has no rows")
        wanted = [c for c in [*schema.columns, *keep] if c in table.column_names]
        table = pa.table({c: pc.cast(table.column(c), pa.string()) for c in wanted})
    if kind == "full" and table.column(params.data.target).null_count == table.num_rows:
        kind = "features"  # the target column is there, but empty: features to measure
        table = table.drop_columns([params.data.target])
    return kind, table


def _landed_kind(path: Path, columns: list[str], params: Params) -> Kind:
    try:
        return landed_kind(columns, params)
    except LooplineError as err:
        raise LooplineError(STAGE, f"{path}: {err.message}") from None


def check_batch(rows: pa.Table, params: Params, source: str, kind: Kind = "full") -> dict[str, Any]:
    """Clean and validate a batch on its own, with the rules the full dataset gets for the
    columns its kind holds (the table's row-count bounds excepted: a batch is a slice). A label
    file is checked against the target's rules (a negative count, text in a number) and its
    ids or keys must be there. Raises LooplineError naming what failed."""
    from pipelines.data.clean import clean_rows
    from pipelines.data.validate import validate_frame

    schema = _kind_schema(params, kind, rows.column_names)
    schema = schema.model_copy(update={"row_count": schema.row_count.model_copy(update={"min": 1, "max": None})})
    if kind == "labels":  # a label that breaks its rule rejects the whole file: nothing joined
        cfg = params.clean.model_copy(update={"max_quarantine_fraction": 0.0, "drop_duplicates": False})
    else:
        cfg = params.clean
    try:
        cleaned = clean_rows(rows, schema, params.data, cfg)
    except LooplineError as err:
        raise LooplineError(STAGE, f"{source} rejected: {err.message}") from None
    validation = validate_frame(cleaned.rows.to_pandas(), schema, source)
    if not validation.success:
        raise LooplineError(
            STAGE,
            f"{source} rejected: {len(validation.failures)} expectation(s) failed: " + "; ".join(validation.failures),
        )
    id_column = params.monitor.id_column
    keyed = bool(params.monitor.time_key) and all(k in rows.column_names for k in params.monitor.time_key)
    if kind == "labels" and not keyed and id_column in rows.column_names and rows.column(id_column).null_count:
        missing = rows.column(id_column).null_count
        raise LooplineError(
            STAGE, f"{source} rejected: {missing} label(s) name no {id_column!r} and the file has no time key"
        )
    return cleaned.report


def typed_rows(rows: pa.Table, params: Params, columns: list[str] | None = None) -> pd.DataFrame:
    """Text rows typed and cleaned as the pipeline does, with the id column carried along.
    `columns`: the schema columns the rows hold (a batch of features, a label file); default
    every one."""
    from pipelines.data.clean import clean_rows

    schema = params.table_schema
    if columns is not None:
        schema = schema.model_copy(update={"columns": {c: schema.columns[c] for c in columns}})
    # Duplicates stay: two requests with the same inputs are two served predictions.
    cfg = params.clean.model_copy(update={"drop_duplicates": False})
    return clean_rows(rows, schema, params.data, cfg, keep=_keep(params)).rows.to_pandas()


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
    stored: str | None = None  # its name where it was stored
    reason: str | None = None
    kind: str = "full"  # full | features | labels

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def describe(self) -> str:
        """One line, for the CLI, logs and the decision artifact."""
        if self.status == "accepted":
            what = {
                "full": "features and target: training and monitoring",
                "features": "features without the target: measured, never trained on",
                "labels": "labels: joined to the prediction log",
            }[self.kind]
            return f"accepted ({self.rows} rows; {what}) as {self.stored}"
        if self.status == "already accepted":
            return f"already accepted as {self.stored} (by a run that stopped before removing it); removed"
        if self.status == "waiting":
            return f"waiting: {self.reason}"
        return f"REJECTED — {self.reason}"


def accept_landed(params: Params) -> list[BatchOutcome]:
    """Check every settled landed file; store it by its kind (arrivals/, observed/, labels/)
    or move it to landing/rejected/."""
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
        stored_hashes = _stored_hashes(layout)
        for path in ready:
            signature, digest = _signature(path), file_digest(path)
            if digest in stored_hashes:
                path.unlink()
                outcomes.append(BatchOutcome(path.name, "already accepted", stored=stored_hashes[digest]))
                continue
            try:
                kind, rows = read_batch(path, params)
                report = check_batch(rows, params, str(path), kind)
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
            folder = {"full": layout.arrivals, "features": layout.observed, "labels": layout.labels}[kind]
            metadata = {HASH_KEY: digest.encode(), KIND_KEY: kind.encode()}
            stored = store_batch(rows, folder, path.stem, layout, metadata)  # durable first,
            path.unlink()  # then removed
            stored_hashes[digest] = stored.name
            outcomes.append(
                BatchOutcome(
                    path.name,
                    "accepted",
                    rows=rows.num_rows,
                    rows_quarantined=report["rows_quarantined"],
                    stored=stored.name,
                    kind=kind,
                )
            )
    return outcomes
