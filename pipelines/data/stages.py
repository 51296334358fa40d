"""The data stages as file-to-file steps: params, ingest, clean, validate, split.

With `execution.data: dask` each runs a partition at a time on a Dask cluster
(pipelines/data/parts.py), through the same functions of ingest.py, clean.py,
validate.py and split.py that these call on the whole table.

Each reads its inputs from the paths in `Layout`, calls the pure functions of its module and
writes its outputs atomically. A stage's code is this function and the modules it imports, so
the imports stay inside the functions: an edit to clean.py is a change to the clean stage
alone (dvc.yaml's deps are checked against this by the tests).
"""

from __future__ import annotations

from typing import Any

from pipelines.core.config import Params
from pipelines.core.layout import Layout
from pipelines.core.storage import write_text


def check_params(params: Params) -> dict[str, Any]:
    """The params file loaded and passed every check (it was, to get here): record that."""
    write_text("the params file passed loopline's checks\n", Layout.of(params).params_checked)
    return {"valid": True}


def ingest(params: Params) -> dict[str, Any]:
    """The source file plus every accepted batch in arrivals/, as one text table."""
    if params.execution.data == "dask":
        from pipelines.data.ingest import ingest_partitioned

        return ingest_partitioned(params)
    import pyarrow as pa

    from pipelines.core.storage import write_csv, write_parquet
    from pipelines.data.ingest import arrival_files, read_arrivals, read_source

    layout = Layout.of(params)
    result = read_source(params.data.source, params.table_schema, params.data)
    batches = arrival_files(layout.arrivals)
    rows = result.rows
    if batches:
        rows = pa.concat_tables([rows, read_arrivals(batches, list(params.table_schema.columns))])
    write_parquet(rows, layout.ingested)
    write_csv(result.quarantine, layout.ingest_quarantine)
    return {
        "source": str(params.data.source),
        "rows": rows.num_rows,
        "arrival_batches": len(batches),
        "last_arrival": batches[-1].name if batches else "none",
        "rows_quarantined": len(result.quarantine),
    }


def clean(params: Params) -> dict[str, Any]:
    if params.execution.data == "dask":
        from pipelines.data.clean import clean_partitioned

        return clean_partitioned(params)
    import pyarrow.parquet as pq

    from pipelines.core.storage import require_input, write_csv, write_json, write_parquet
    from pipelines.data.clean import clean_rows

    layout = Layout.of(params)
    rows = pq.read_table(require_input(layout.ingested, "clean"))
    result = clean_rows(rows, params.table_schema, params.data, params.clean)
    write_parquet(result.rows, layout.clean)
    write_csv(result.quarantine, layout.clean_quarantine)
    write_json(result.report, layout.clean_report)
    return result.report


def validate(params: Params) -> dict[str, Any]:
    if params.execution.data == "dask":
        from pipelines.data.validate import validate_partitioned

        return validate_partitioned(params)
    from pipelines.core.storage import read_input
    from pipelines.data.validate import record_verdict, validate_frame

    layout = Layout.of(params)
    source = str(layout.clean)
    return record_verdict(
        validate_frame(read_input(layout.clean, "validate"), params.table_schema, source), layout, source
    )


def split(params: Params) -> dict[str, Any]:
    if params.execution.data == "dask":
        from pipelines.data.split import split_partitioned

        return split_partitioned(params)
    from pipelines.core.storage import read_input, write_parquet
    from pipelines.data.split import SPLITS, split_rows

    layout = Layout.of(params)
    stratify = params.data.task == "classification"
    parts = split_rows(read_input(layout.clean, "split"), params.split, params.data.target, stratify)
    counts = {}
    for name in SPLITS:
        frame = getattr(parts, name)
        write_parquet(frame, layout.split_file(name))
        counts[name] = len(frame)
    return counts
