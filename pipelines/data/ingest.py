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
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.core.config import DataConfig, Params, SchemaConfig
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import atomic_folder, write_csv, write_parquet
from pipelines.data.parts import PART, cluster, run_tasks

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


def _first_invalid_utf8(path: Path, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Byte offset and 1-based line of the first byte sequence that is not UTF-8 in the
    bytes [start, end) of the file (read in blocks: the file may be larger than memory)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines, offset = 1, 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            if end is not None and offset + len(block) > end:
                block = block[: end - offset]
            if offset + len(block) > start:
                checked = block[max(start - offset, 0) :]
                try:
                    decoder.decode(checked, final=end is not None and offset + len(block) >= end)
                except UnicodeDecodeError as err:
                    bad = offset + max(start - offset, 0) + err.start
                    return bad, lines + block[: bad - offset].count(b"\n")
            lines += block.count(b"\n")
            offset += len(block)
            if end is not None and offset >= end:
                break
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
    """The whole file (a CSV file, or every CSV file of a folder, in name order) as one
    table. `keep`: further columns (such as a request id) read as text beside the
    schema's. `declared`: the schema a column must be in to be read (default `schema`,
    which the file must hold whole; a landed batch of another kind holds part of it)."""
    parts = [
        read_range(*piece, schema, data, keep, declared)
        for piece in source_pieces(Path(path), schema, data, None, keep, declared)
    ]
    if len(parts) == 1:
        return parts[0]
    return Ingested(
        rows=pa.concat_tables([p.rows for p in parts]),
        quarantine=pd.concat([p.quarantine for p in parts], ignore_index=True),
    )


Piece = tuple[Path, list[str], int, int, str]  # file, its header, byte range [start, end), partition name


def source_files(path: Path) -> list[Path]:
    """The source's files: the CSV file itself, or the CSV files of a folder in name order."""
    if path.is_dir():
        files = sorted(f for f in path.glob("*.csv") if not f.name.startswith("."))
        if not files:
            raise _fail(path, "the folder has no .csv files (data.source)")
        return files
    if not path.is_file():
        raise _fail(path, "no such file (data.source)")
    return [path]


def source_pieces(
    path: Path,
    schema: SchemaConfig,
    data: DataConfig,
    piece_bytes: int | None,
    keep: tuple[str, ...] = (),
    declared: SchemaConfig | None = None,
) -> list[Piece]:
    """The source cut into pieces to read one at a time: each file's header is checked, and
    its data rows are cut at line ends into ranges of about `piece_bytes` (None: a file is
    one piece). A quoted field holding a line break cannot be cut there: such files are read
    whole (piece_bytes None)."""
    pieces: list[Piece] = []
    for file in source_files(path):
        header = _read_header(file)
        check_columns(file, header, schema, data, keep, declared)
        size = file.stat().st_size
        with open(file, "rb") as fh:
            fh.readline()
            start = fh.tell()
            while start < size:
                end = size if piece_bytes is None else min(start + piece_bytes, size)
                if end < size:
                    fh.seek(end)
                    fh.readline()  # to the end of the line the cut fell in
                    end = fh.tell()
                pieces.append((file, header, start, end, f"{file.name}:{len(pieces)}"))
                start = end
    if not pieces:
        raise _fail(path, "the file has a header but no data rows")
    return pieces


def read_range(
    path: Path,
    header: list[str],
    start: int,
    end: int,
    name: str,
    schema: SchemaConfig,
    data: DataConfig,
    keep: tuple[str, ...] = (),
    declared: SchemaConfig | None = None,
) -> Ingested:
    """The data rows in bytes [start, end) of a CSV file whose header is `header`, every
    column as text; rows with the wrong number of fields quarantined with the reason.
    `name`: the piece's name in messages when the file is read in more than one piece."""
    bad_rows: list[dict[str, object]] = []
    whole = start == _data_start(path) and end == path.stat().st_size
    where = "" if whole else f" (piece {name}, bytes {start}-{end})"

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields, found {row.actual_columns}" + (
            " (truncated row?)" if row.actual_columns < row.expected_columns else ""
        )
        bad_rows.append({"line": row.number, "text": row.text, "reason": reason})
        return "skip"

    if whole:  # streamed from the file, never held whole
        source: Any = path
    else:
        with open(path, "rb") as fh:
            fh.seek(start)
            source = pa.BufferReader(fh.read(end - start))
    try:
        table = pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1 if whole else 0, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                include_columns=[c for c in (declared or schema).columns if c in header]
                + [c for c in keep if c in header],
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        if "UTF8" in str(err):
            offset, line = _first_invalid_utf8(path, start, end)
            raise _fail(
                path,
                f"the file is not valid UTF-8: first bad byte at offset {offset} (line {line}){where}; "
                "re-export it as UTF-8",
            ) from None
        raise _fail(path, f"cannot be parsed as CSV{where}: {err}") from None
    if table.num_rows == 0 and whole:
        raise _fail(
            path,
            "the file has a header but no data rows"
            if not bad_rows
            else f"no row has the {len(header)} fields of the header ({len(bad_rows)} malformed rows)",
        )
    quarantine = pd.DataFrame(bad_rows, columns=["line", "text", "reason"])
    return Ingested(rows=table, quarantine=quarantine)


def _data_start(path: Path) -> int:
    with open(path, "rb") as fh:
        fh.readline()
        return fh.tell()


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


# --- the stage a partition at a time (execution.data: dask; pipelines/data/parts.py) ----------


def ingest_partitioned(params: Params) -> dict[str, Any]:
    from pipelines.data.ingest import arrival_files, source_pieces

    layout = Layout.of(params)
    pieces = source_pieces(
        Path(params.data.source), params.table_schema, params.data, int(params.execution.partition_mb * 2**20)
    )
    batches = arrival_files(layout.arrivals)
    with cluster(params) as client, atomic_folder(layout.ingested) as folder:
        calls: list[tuple] = [(piece, params, folder / PART.format(i)) for i, piece in enumerate(pieces)]
        calls += [(batch, params, folder / PART.format(len(pieces) + i)) for i, batch in enumerate(batches)]
        read = run_tasks(client, _ingest_part, calls, "ingest", params)
        rows = sum(n for n, _ in read)
        if rows == 0:
            raise LooplineError("ingest", f"{params.data.source}: no row has the fields of the header")
    quarantine = pd.concat([q for _, q in read], ignore_index=True)
    write_csv(quarantine, layout.ingest_quarantine)
    return {
        "source": str(params.data.source),
        "rows": rows,
        "arrival_batches": len(batches),
        "last_arrival": batches[-1].name if batches else "none",
        "rows_quarantined": len(quarantine),
        "partitions": len(calls),
    }


def _ingest_part(piece: Any, params: Params, out: Path) -> tuple[int, pd.DataFrame]:
    """A piece of the source (or an accepted batch) read as text into part `out`."""
    from pipelines.data.ingest import read_arrivals, read_range

    if isinstance(piece, Path):  # an accepted batch
        rows, quarantine = read_arrivals([piece], list(params.table_schema.columns)), pd.DataFrame()
    else:
        file, header, start, end, name = piece
        got = read_range(file, header, start, end, name, params.table_schema, params.data)
        rows, quarantine = got.rows, got.quarantine
    write_parquet(rows, out)
    return rows.num_rows, quarantine
