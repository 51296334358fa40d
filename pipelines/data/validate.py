"""validate: a Great Expectations 1.x suite built from the declarative schema in params.yaml.

Expectations per column: existence, range (min/max), allowed values, and the largest share
of nulls; for the table: row-count bounds. The result is written as GX's JSON and as an
HTML page a person can open; a failure names column, expectation and sample bad values.
A table in partitions (too large for one frame) is validated a partition at a time and the
results combined into the one verdict GX gives for the whole table (`validate_partitions`).
"""

from __future__ import annotations

import collections
import html
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pipelines.core.config import Params, SchemaConfig
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.core.storage import require_input, write_json, write_text
from pipelines.data.parts import cluster, parts_of, run_tasks
from pipelines.data.schema import compile_rules

STAGE = "validate"


@dataclass(frozen=True)
class Validation:
    success: bool
    result: dict[str, Any]  # GX's ExpectationSuiteValidationResult as JSON
    failures: list[str]  # one line per failed expectation
    report_html: str


def build_suite(schema: SchemaConfig):
    """The compiled schema rules (pipelines.data.schema) as expectations."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    rules = compile_rules(schema)
    suite = gx.ExpectationSuite(name="loopline_schema")
    suite.add_expectation(
        gxe.ExpectTableRowCountToBeBetween(min_value=rules.row_count_min, max_value=rules.row_count_max)
    )
    for col, rule in rules.columns.items():
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
        if rule.min is not None or rule.max is not None:
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=rule.min, max_value=rule.max))
        if rule.allowed is not None:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=rule.allowed))
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=1.0 - rule.max_null_fraction))
    return suite


def _without_run_noise(result: dict[str, Any]) -> dict[str, Any]:
    """Drop GX's per-run ids and load time, so the same data gives the same report bytes
    (DVC hashes outputs; a report that changes every run would defeat `dvc repro`)."""
    result["meta"].get("batch_markers", {}).pop("ge_load_time", None)
    for r in result["results"]:
        r["expectation_config"].pop("id", None)
    return result


def _describe_failure(r: dict[str, Any]) -> str:
    cfg = r["expectation_config"]
    kwargs = {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id", "column")}
    rule = f"{cfg['type']}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    where = f"column {cfg['kwargs']['column']!r}" if "column" in cfg["kwargs"] else "table"
    res = r.get("result") or {}
    if (raised := _raised(r)) is not None:
        detail = f"not checked: {raised}"
    elif "unexpected_count" in res:
        examples = [v for v in res.get("partial_unexpected_list", []) if not _is_nan(v)][:5]
        detail = f"{res['unexpected_count']} rows ({res.get('unexpected_percent') or 0:.2f}%)"
        detail += f", e.g. {examples}" if examples else " are null"
        if res.get("partial_unexpected_partitions"):
            detail += f" (in {', '.join(dict.fromkeys(res['partial_unexpected_partitions']))})"
    elif res.get("partitions_without"):
        detail = f"missing in {', '.join(res['partitions_without'])}"
    elif "observed_value" in res:
        detail = f"observed {res['observed_value']}"
    else:
        detail = "not met"
    return f"{where}: {rule}: {detail}"


def _is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _render_html(result: dict[str, Any], failures: list[str], source: str) -> str:
    rows = []
    for r in result["results"]:
        cfg = r["expectation_config"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        status = "pass" if r["success"] else "FAIL"
        res = {
            k: v
            for k, v in (r.get("result") or {}).items()
            if k in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
        }
        rows.append(
            f"<tr class='{status}'><td>{status}</td><td>{html.escape(cfg['type'])}</td>"
            f"<td>{html.escape(str(kwargs))}</td><td>{html.escape(str(res))}</td></tr>"
        )
    stats = result.get("statistics", {})
    verdict = "passed" if result["success"] else "FAILED"
    items = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>loopline validation</title>"
        "<style>body{font-family:sans-serif}td{padding:2px 8px;border-bottom:1px solid #ddd}"
        ".FAIL{background:#fdd}</style></head><body>"
        f"<h1>Validation {verdict}</h1><p>{html.escape(source)} — "
        f"{stats.get('successful_expectations', 0)} of {stats.get('evaluated_expectations', 0)} "
        f"expectations met</p><ul>{items}</ul>"
        "<table><tr><th>status</th><th>expectation</th><th>arguments</th><th>result</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def validate_frame(df: pd.DataFrame, schema: SchemaConfig, source: str = "data") -> Validation:
    """The suite from `schema` run on `df` by GX's pandas engine."""
    return verdict(validate_partition(df, schema), source)


def verdict(result: dict[str, Any], source: str) -> Validation:
    """A GX result (of the table, or combined from its partitions) as the stage's verdict."""
    failures = [_describe_failure(r) for r in result["results"] if not r["success"]]
    return Validation(
        success=bool(result["success"]),
        result=result,
        failures=failures,
        report_html=_render_html(result, failures, source),
    )


def raise_if_failed(validation: Validation, source: str, report_path: str) -> None:
    if not validation.success:
        n, total = len(validation.failures), len(validation.result["results"])
        raise LooplineError(
            STAGE,
            f"{n} of {total} expectations failed on {source}: "
            + "; ".join(validation.failures)
            + f". Full report: {report_path}",
        )


def record_verdict(validation: Validation, layout: Layout, source: str) -> dict[str, Any]:
    """The stage's files for a verdict: the result and the report whatever the outcome (on a
    failure the report is what a person opens), then the error; else the summary."""
    write_json(validation.result, layout.validation / "result.json")
    write_text(validation.report_html, layout.validation / "report.html")
    raise_if_failed(validation, source, str(layout.validation / "report.html"))
    summary = {"success": True, "expectations": validation.result["statistics"]["evaluated_expectations"]}
    write_json(summary, layout.validation / "summary.json")
    return summary


# --- a table in partitions: the same suite on each, one verdict -------------------------
#
# A table too large for one frame is validated a partition at a time, each with GX's pandas
# engine (`validate_partition` is what a Dask worker runs); `combine_partitions` adds the
# partitions' results into the one result GX gives for the whole table: unexpected, missing
# and element counts summed, percentages from the sums, the first examples in partition
# order, the row count over every partition. Every expectation loopline's suite holds is one
# of these four kinds; another kind is refused, never guessed at.

PARTIAL_LIMIT = 20  # GX's partial_unexpected_list holds the first 20 unexpected values
COLUMN_MAP = ("expect_column_values_to_be_between", "expect_column_values_to_be_in_set")
NOT_NULL = "expect_column_values_to_not_be_null"
ROW_COUNT = "expect_table_row_count_to_be_between"
EXISTS = "expect_column_to_exist"


def validate_partition(df: pd.DataFrame, schema: SchemaConfig) -> dict[str, Any]:
    """GX's result (JSON) of the suite from `schema` on one frame (a table or a partition of
    one). The ephemeral context and the suite are built once per process and schema."""
    key = schema.model_dump_json()
    with _RUNNERS_LOCK:
        run = _RUNNERS.get(key)
        if run is None:
            run = _RUNNERS[key] = _runner(schema)
    return run(df)


_RUNNERS: dict[str, Callable[[pd.DataFrame], dict[str, Any]]] = {}
_RUNNERS_LOCK = threading.Lock()


def _runner(schema: SchemaConfig) -> Callable[[pd.DataFrame], dict[str, Any]]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    # This one sets INFO on itself ("Created temporary directory ... for ephemeral docs site").
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        context.data_sources.add_pandas("loopline")
        .add_dataframe_asset("table")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(build_suite(schema))
    lock = threading.Lock()  # one context: a process's threads validate one frame at a time

    def run(df: pd.DataFrame) -> dict[str, Any]:
        with lock:
            result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite)
        return _without_run_noise(result.to_json_dict())

    return run


def _percent(part: float, whole: float) -> float | None:
    return None if whole == 0 else 100.0 * part / whole


def _combined(config: dict[str, Any], named: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One expectation's result over the partitions `named` (partition name, its result)."""
    kind = config["type"]
    raised = [(name, message) for name, r in named if (message := _raised(r)) is not None]
    if raised:  # a partition could not be checked (a column missing there): the table fails
        places = ", ".join(name for name, _ in raised)
        return {
            "success": False,
            "expectation_config": config,
            "result": {},
            "meta": {},
            "exception_info": {
                "raised_exception": True,
                "exception_traceback": None,
                "exception_message": f"in {places}: {raised[0][1]}",
            },
        }
    results = [(name, r.get("result") or {}) for name, r in named]
    if kind == EXISTS:
        without = [name for name, r in named if not r["success"]]
        result = {"partitions_without": without} if without else {}
        return {**named[0][1], "expectation_config": config, "success": not without, "result": result}
    if kind == ROW_COUNT:
        rows = sum(int(res["observed_value"]) for _, res in results)
        low, high = config["kwargs"].get("min_value"), config["kwargs"].get("max_value")
        success = (low is None or rows >= low) and (high is None or rows <= high)
        return {**named[0][1], "expectation_config": config, "success": success, "result": {"observed_value": rows}}
    if kind not in (*COLUMN_MAP, NOT_NULL):
        raise LooplineError(STAGE, f"expectation {kind} cannot be combined over partitions")
    elements = sum(int(res.get("element_count", 0)) for _, res in results)
    unexpected = sum(int(res.get("unexpected_count", 0)) for _, res in results)
    examples: list[Any] = []
    where: list[tuple[str, Any]] = []
    for name, res in results:
        values = res.get("partial_unexpected_list", [])
        indexes = res.get("partial_unexpected_index_list") or [None] * len(values)
        for value, index in zip(values[: PARTIAL_LIMIT - len(examples)], indexes, strict=False):
            examples.append(value)
            where.append((name, index))
    counts = collections.Counter(_hashable(v) for v in examples)
    combined: dict[str, Any] = {
        "element_count": elements,
        "unexpected_count": unexpected,
        "partial_unexpected_list": examples,
        "partial_unexpected_counts": [
            {"value": value, "count": n} for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        ],
        "partial_unexpected_index_list": [index for _, index in where],
        "partial_unexpected_partitions": [name for name, _ in where],
    }
    mostly = config["kwargs"].get("mostly", 1.0)
    if kind == NOT_NULL:  # the nulls are the unexpected rows, out of every row
        combined["unexpected_percent"] = _percent(unexpected, elements)
        checked = elements
    else:  # nulls are missing, not unexpected: the share is of the rows with a value
        missing = sum(int(res.get("missing_count", 0)) for _, res in results)
        checked = elements - missing
        combined |= {
            "unexpected_percent": _percent(unexpected, checked),
            "missing_count": missing,
            "missing_percent": _percent(missing, elements),
            "unexpected_percent_total": _percent(unexpected, elements),
            "unexpected_percent_nonmissing": _percent(unexpected, checked),
        }
    success = checked == 0 or (checked - unexpected) / checked >= mostly
    return {**named[0][1], "expectation_config": config, "success": bool(success), "result": combined}


def _raised(r: dict[str, Any]) -> str | None:
    """The message of the exception GX met checking this expectation (None: it met none).
    GX gives one record, or one per metric it could not compute."""
    info = r.get("exception_info") or {}
    records = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for record in records:
        if record.get("raised_exception"):
            return str(record.get("exception_message") or "an exception")
    return None


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _expectation(r: dict[str, Any]) -> str:
    """What an expectation checks (its type and arguments), the same in every partition."""
    config = r["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return json.dumps([config["type"], kwargs], sort_keys=True, default=str)


def combine_partitions(parts: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The whole table's result from its partitions' results (name, GX result JSON), each
    from the same suite."""
    if not parts:
        raise LooplineError(STAGE, "no partitions to validate")
    first = parts[0][1]
    by_expectation = [{_expectation(r): r for r in result["results"]} for _, result in parts]
    if any(by.keys() != by_expectation[0].keys() for by in by_expectation):
        raise LooplineError(STAGE, "partitions were validated by different suites")
    results = []
    for r in first["results"]:  # in the order GX gave the first partition's
        key = _expectation(r)
        named = [(name, by[key]) for (name, _), by in zip(parts, by_expectation, strict=True)]
        results.append(_combined(r["expectation_config"], named))
    met = sum(r["success"] for r in results)
    meta = {k: v for k, v in first["meta"].items() if k != "batch_markers"}
    return {
        **first,
        "success": met == len(results),
        "results": results,
        "statistics": {
            "evaluated_expectations": len(results),
            "successful_expectations": met,
            "unsuccessful_expectations": len(results) - met,
            "success_percent": _percent(met, len(results)),
        },
        "meta": {**meta, "partitions": len(parts)},
    }


def validate_partitions(
    partitions: Iterable[tuple[str, pd.DataFrame]], schema: SchemaConfig, source: str = "data"
) -> Validation:
    """`validate_frame` for a table given as named partitions, one partition in memory at a
    time; a failure names the partitions its examples come from."""
    combined = combine_partitions([(name, validate_partition(df, schema)) for name, df in partitions])
    return verdict(combined, source)


# --- the stage a partition at a time (execution.data: dask; pipelines/data/parts.py) ----------


def validate_partitioned(params: Params) -> dict[str, Any]:
    layout = Layout.of(params)
    parts = parts_of(require_input(layout.clean, "validate"))
    with cluster(params) as client:
        results = run_tasks(client, _validate_part, [(p, params.table_schema) for p in parts], "validate", params)
    source = str(layout.clean)
    return record_verdict(
        verdict(combine_partitions([(p.name, r) for p, r in zip(parts, results, strict=True)]), source), layout, source
    )


def _validate_part(part: Path, schema) -> dict[str, Any]:
    from pipelines.data.validate import validate_partition

    return validate_partition(pq.read_table(part).to_pandas(), schema)
