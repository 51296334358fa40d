"""validate: a Great Expectations 1.x suite built from the declarative schema in params.yaml.

Expectations per column: existence, range (min/max), allowed values, and the largest share
of nulls; for the table: row-count bounds. The result is written as GX's JSON and as an
HTML page a person can open; a failure names column, expectation and sample bad values.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipelines.core.config import SchemaConfig
from pipelines.core.errors import LooplineError
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
    if "unexpected_count" in res:
        examples = [v for v in res.get("partial_unexpected_list", []) if not _is_nan(v)][:5]
        detail = f"{res['unexpected_count']} rows ({res.get('unexpected_percent', 0):.2f}%)"
        detail += f", e.g. {examples}" if examples else " are null"
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
    result = _without_run_noise(batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite).to_json_dict())
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
