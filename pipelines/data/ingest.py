"""ingest: read the source CSV as text and check its structure; read the accepted batches.

Structure is checked here (the file is readable UTF-8 text, has a header with every column
the schema needs, has data rows); values are typed and repaired by clean. Rows with the
wrong number of fields, such as a truncated last line, are quarantined with a reason. The
ingest stage appends every batch accepted into `arrivals/` (pipelines/data/arrivals.py) to
the source, as text too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.core.config import DataConfig, SchemaConfig
from pipelines.core.errors import LooplineError

STAGE = "ingest"
SNIFF_BYTES = 1 << 16
# Longest first: the UTF-32 little-endian mark begins with the UTF-16 one.
UNICODE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


@dataclass(frozen=True)
class Ingested:
    rows: pa.Table  # schema columns (and `keep` ones), every one as text (null where empty)
    quarantine: pd.DataFrame  # columns: line, reason


def _fail(path: Path, message: str) -> LooplineError:
    return LooplineError(STAGE, f"{path}: {message}")


def _first_invalid_utf8(path: Path) -> tuple[int, int]:
    """Byte offset and 1-based line of the first byte sequence that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start, data.count(b"\n", 0, err.start) + 1
    return -1, -1


def _read_header(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if not head:
        raise _fail(path, "the file is empty (0 bytes); expected a CSV file with a header row")
    for bom, encoding in UNICODE_BOMS:
        if head.startswith(bom):
            raise _fail(
                path,
                f"the file is {encoding} text (byte-order mark {bom.hex(' ').upper()}), as Excel's "
                '"Unicode text" saves it; re-export it as CSV UTF-8',
            )
    nul = head.find(b"\x00")
    if nul >= 0:
        raise _fail(
            path,
            f"this is not a CSV text file (NUL byte at offset {nul}); "
            "was a binary or compressed file put in its place?",
        )
    first_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = first_line.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _fail(path, f"the header row is not valid UTF-8 (byte offset {err.start})") from None
    header = next(csv.reader(io.StringIO(text)), [])
    header = [h.strip() for h in header]
    if not any(header):
        raise _fail(path, "the first line is blank; expected a header row naming the columns")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise _fail(path, f"the header names column(s) {dupes} more than once")
    return header


def check_columns(
    path: Path,
    header: list[str],
    schema: SchemaConfig,
    data: DataConfig,
    keep: tuple[str, ...] = (),
    declared_schema: SchemaConfig | None = None,
) -> None:
    """Every column of `schema` is in the header (the target first, named apart), and every
    other column of the file is declared (schema, data.drop_columns or `keep`)."""
    if data.target in schema.columns and data.target not in header:
        raise _fail(path, f"the target column {data.target!r} (data.target) is missing; the file has columns {header}")
    declared = (declared_schema or schema).columns
    missing = [c for c in schema.columns if c not in header]
    if missing:
        raise _fail(path, f"column(s) {missing} required by schema.columns are missing; the file has columns {header}")
    extra = [c for c in header if c not in declared and c not in data.drop_columns and c not in keep]
    if extra:
        raise _fail(
            path,
            f"column(s) {extra} are neither in schema.columns nor in data.drop_columns; declare them in one of the two",
        )


def read_source(
    path: str | Path,
    schema: SchemaConfig,
    data: DataConfig,
    keep: tuple[str, ...] = (),
    declared: SchemaConfig | None = None,
) -> Ingested:
    """`keep`: further columns (such as a request id) read as text beside the schema's.
    `declared`: the schema a column must be in to be read (default `schema`, which the file
    must hold whole; a landed batch of another kind holds part of it)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file (data.source)")
    header = _read_header(path)
    check_columns(path, header, schema, data, keep, declared)

    bad_rows: list[dict[str, object]] = []

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields, found {row.actual_columns}" + (
            " (truncated row?)" if row.actual_columns < row.expected_columns else ""
        )
        bad_rows.append({"line": row.number, "text": row.text, "reason": reason})
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                include_columns=[c for c in (declared or schema).columns if c in header] + [c for c in keep if c in header],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        if "UTF8" in str(err):
            offset, line = _first_invalid_utf8(path)
            raise _fail(
                path,
                f"the file is not valid UTF-8: first bad byte at offset {offset} (line {line}); re-export it as UTF-8",
            ) from None
        raise _fail(path, f"cannot be parsed as CSV: {err}") from None

    if table.num_rows == 0:
        raise _fail(
            path,
            "the file has a header but no data rows"
            if not bad_rows
            else f"no row has the {len(header)} fields of the header ({len(bad_rows)} malformed rows)",
        )
    quarantine = pd.DataFrame(bad_rows, columns=["line", "text", "reason"])
    return Ingested(rows=table, quarantine=quarantine)


def arrival_files(arrivals: Path) -> list[Path]:
    """Accepted batches in the order they were accepted."""
    return sorted(arrivals.glob("*.parquet")) if arrivals.is_dir() else []


def read_arrivals(files: Sequence[Path], columns: list[str]) -> pa.Table:
    """Accepted batches as one text table with `columns` (a column a batch lacks is null)."""
    tables = []
    for f in files:
        table = pq.read_table(f)
        tables.append(
            pa.table(
                {c: table.column(c) if c in table.column_names else pa.nulls(len(table), pa.string()) for c in columns}
            )
        )
    return pa.concat_tables(tables)
