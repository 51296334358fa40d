"""The service's request and response models, derived from `schema:` in params.yaml.

A record has exactly the model's feature columns, typed and bounded as the schema says:
integers must be whole numbers (8 or 8.0, as JSON Schema's "integer" means, never 8.5, "8"
or true), numbers must be finite, category values must be one of the schema's labels,
ranges are enforced, unknown fields are refused. A column whose schema
allows missing values (`max_null_fraction` > 0) accepts `null` (the model imputes it), but
every field must be present. The OpenAPI spec BentoML publishes is generated from these
models, so it documents the real fields.
"""

from __future__ import annotations

import contextlib
import json
from itertools import repeat
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.data.schema import ColumnRule, compile_rules, label_key

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _whole_number(value: Any) -> Any:
    """What JSON Schema calls an integer: a number without a fractional part (8.0 is 8);
    not a string, not a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("Input should be a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("Input should be a whole number")
        return int(value)
    return value


def _label_pattern(labels: list[str]) -> str:
    """A JSON Schema (ECMA-262) pattern for the label rule: any letter case, surrounding
    white space allowed."""

    def letter(c: str) -> str:
        if c.lower() != c.upper():
            return f"[{c.lower()}{c.upper()}]"
        return "\\" + c if c in "\\^$.|?*+()[]{}" else c

    space = "[ \\t\\n\\r\\f\\v]*"
    return f"^{space}(" + "|".join("".join(letter(c) for c in label) for label in labels) + f"){space}$"


def _category(rule: ColumnRule) -> Any:
    """The schema's labels, matched by the one label rule (pipelines/data/schema.py label_key) and returned in
    the schema's spelling; the JSON schema says exactly what is accepted."""
    spelling = rule.labels

    def canonical(value: Any) -> Any:
        return spelling.get(label_key(value), value) if isinstance(value, str) else value

    labels = list(spelling.values())
    shown = {
        "type": "string",
        "pattern": _label_pattern(labels),
        "examples": labels[:1],
        "description": f"one of {labels} (letter case and surrounding white space do not matter)",
    }
    return Annotated[Literal[tuple(labels)], BeforeValidator(canonical), WithJsonSchema(shown)]


def _field_type(rule: ColumnRule) -> Any:
    bounds: dict[str, Any] = {k: v for k, v in (("ge", rule.min), ("le", rule.max)) if v is not None}
    if rule.kind == "category":
        kind: Any = _category(rule)
    elif rule.kind == "int":
        base = Literal[tuple(int(v) for v in rule.values)] if rule.values else int
        kind = Annotated[base, Field(**bounds), BeforeValidator(_whole_number)]
    else:
        kind = Annotated[float, Field(strict=True, **bounds)]
    if rule.nullable:
        kind = kind | None
    return kind


def record_model(params: Params) -> type[BaseModel]:
    """One record: the feature columns, in the order the model was configured with, then the
    context fields (serve.context_columns), which a request may leave out: checked by the
    same rules, logged with the inputs, never given to the model."""
    rules = compile_rules(params.table_schema, params.data.target).columns
    fields: dict[str, Any] = {name: (_field_type(rules[name]), Field(...)) for name in params.features.columns}
    for name in params.serve.context_columns:
        fields[name] = (
            _field_type(rules[name]) | None,
            Field(None, description=f"context: logged with the prediction, not given to the model; {name!r}"),
        )
    return create_model("Record", __config__=_STRICT, **fields)


def batch_model(params: Params, record: type[BaseModel]) -> type[BaseModel]:
    limit = params.serve.max_batch_records
    return create_model(
        "RecordBatch",
        __config__=_STRICT,
        records=(
            list[record],  # type: ignore[valid-type]  # a model built at run time
            Field(
                min_length=1,
                max_length=limit,
                description=f"1 to {limit} records",
            ),
        ),
    )


def column_batch_model(params: Params, record: type[BaseModel]) -> type[BaseModel]:
    """The columnar form of a batch: one array per field of `record` (each feature, and the
    context fields, which may be left out), all of one length, 1 to serve.max_batch_records.
    Each array's items are documented by the record's rule for that field; the rules are
    checked by `check_columns`, over whole columns, not item by item here."""
    limit = params.serve.max_batch_records
    properties = record.model_json_schema()["properties"]
    fields: dict[str, Any] = {}
    for name, info in record.model_fields.items():
        shown = {
            "type": "array",
            "items": {k: v for k, v in properties[name].items() if k != "description"},
            "minItems": 1,
            "maxItems": limit,
            "description": f"{name}: one value per row; every array has the same length"
            + ("" if info.is_required() else f" ({properties[name].get('description', 'optional')})"),
        }
        kind = Annotated[list[Any], Field(min_length=1, max_length=limit), WithJsonSchema(shown)]
        fields[name] = (kind, Field(...)) if info.is_required() else (kind | None, Field(None))
    return create_model("ColumnBatch", __config__=_STRICT, **fields)


# JSON's types as Python's json module decodes them (a bool is not a number here).
JSON_KINDS = {int: "number", float: "number", str: "string", type(None): "null"}


def _float_or_inf(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def _column_violation(values: list, rule: ColumnRule, nullable: bool) -> tuple[Any, tuple[np.ndarray, str] | None]:
    """One request column checked as `Record` checks a field (JSON types exactly: a number
    is an int or float, never a bool or a string), over the whole array: the column as the
    model takes it (float64, or labels as objects) and the first broken rule, if any. The
    usual columns (numbers only, or labels spelled as the schema spells them) take a short
    way; any other goes through every rule."""
    present = set(map(type, values))
    if rule.kind != "category" and present <= {int, float}:
        with contextlib.suppress(OverflowError):  # an integer beyond float64: the long way names it
            numbers = np.asarray(values, dtype="float64")
            rules = [(~np.isfinite(numbers), "not a finite number"), *rule.number_violations(numbers)]
            return numbers, next(((mask, words) for mask, words in rules if mask.any()), None)
    if rule.kind == "category" and present == {str}:
        spelled = set(rule.labels.values())
        if spelled.issuperset(values):
            return np.array(values, dtype=object), None
    items = np.array(values, dtype=object)
    kinds = np.array(list(map(JSON_KINDS.get, map(type, values), repeat("other"))))
    nulls = kinds == "null"
    checks: list[tuple[np.ndarray, str]] = []
    if not nullable:
        checks.append((nulls, "missing (null is not allowed here)"))
    if rule.kind == "category":
        text_mask = kinds == "string"
        checks.append((~nulls & ~text_mask, "not a string"))
        text = pd.Series(np.where(text_mask, items, pd.NA), dtype="string")
        labels = rule.canonical_labels(text)
        checks.append((text_mask & labels.isna().to_numpy(), f"not one of {list(rule.values or [])}"))
        typed: Any = labels.astype(object).where(labels.notna(), None).to_numpy()
    else:
        numbers = kinds == "number"
        checks.append((~nulls & ~numbers, "not a number"))
        try:
            typed = np.where(numbers, items, np.nan).astype("float64")
        except OverflowError:  # an integer beyond float64, which no rule admits: shown as not finite
            typed = np.array([_float_or_inf(v) for v in np.where(numbers, items, np.nan)])
        checks.append((numbers & ~np.isfinite(typed), "not a finite number"))
        checks += list(rule.number_violations(np.where(np.isfinite(typed), typed, np.nan)))
    broken = next(((mask, words) for mask, words in checks if mask.any()), None)
    return typed, broken


def check_columns(columns: dict[str, list | None], params: Params) -> dict[str, Any]:
    """A columnar batch checked by the rules `Record` enforces per record: one length for
    every array, then per column its JSON types, null rule, allowed values and range. Returns
    the columns as the model takes them (the context fields sent, too); the first broken rule
    raises ValueError naming the column, the rule, the row and its value."""
    rules = compile_rules(params.table_schema, params.data.target).columns
    sent = {name: values for name, values in columns.items() if values is not None}
    lengths = {name: len(values) for name, values in sent.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        other = next(n for n, size in lengths.items() if size != lengths[first])
        raise ValueError(
            f"every column must have one value per row: {first!r} has {lengths[first]}, {other!r} has {lengths[other]}"
        )
    context = set(params.serve.context_columns)
    typed = {}
    for name, values in sent.items():
        typed[name], broken = _column_violation(values, rules[name], nullable=rules[name].nullable or name in context)
        if broken is not None:
            mask, words = broken
            row = int(np.flatnonzero(mask)[0])
            raise ValueError(f"column {name!r}: {int(mask.sum())} row(s) {words}, e.g. row {row + 1}: {values[row]!r}")
    return typed


class Prediction(BaseModel):
    prediction: float | str
    # Classification: the probability of each class label.
    probabilities: dict[str, float] | None = None
    model_name: str
    model_version: str
    run_id: str
    request_id: str


class BatchPrediction(BaseModel):
    predictions: list[float | str]
    probabilities: list[dict[str, float]] | None = None
    model_name: str
    model_version: str
    run_id: str
    # One id per record, in order: "<request id>-<index>".
    request_ids: list[str]


class ShadowStatus(BaseModel):
    version: str | None
    run_id: str | None
    loaded: bool
    rows_scored: int
    rows_skipped: int  # the queue was full: never scored
    rows_failed: int  # the shadow raised
    queued_rows: int
    queue_rows: int  # serve.shadow_queue_rows
    last_error: str | None


class ServiceStatus(BaseModel):
    model_name: str
    model_version: str | None
    run_id: str | None
    source: str
    loaded_at: str | None
    last_check: str | None
    last_error: str | None
    engine: str | None  # onnx | python: what predicts
    engine_reason: str | None  # why that engine
    threads: dict[str, int]  # native thread pools as the threads that call the model hold them
    shadow: ShadowStatus | None = None  # the registry's `shadow`, scored after each answer
    authentication: str = "none"  # who may predict: none, or "API keys: <ids>" (never the keys)


def request_records(frame: pd.DataFrame, params: Params) -> list[dict[str, Any]]:
    """Rows as the JSON records /predict accepts: the feature columns and the context fields
    the frame has, integer columns as JSON integers (the service refuses 3.0 for an int),
    missing values as null."""
    columns = params.table_schema.columns
    sent = [*params.features.columns, *(c for c in params.serve.context_columns if c in frame)]
    ints = {c: "Int64" for c in sent if columns[c].type == "int"}
    return json.loads(frame[sent].astype(ints).to_json(orient="records"))


def _first_violation(
    frame: pd.DataFrame, rule: ColumnRule
) -> tuple[pd.Series, tuple[np.ndarray, str, pd.Series] | None]:
    """The column typed as the model expects it, and its first broken rule (mask, rule in
    words, the values to show), if any."""
    raw = frame[rule.name]
    if rule.kind == "category":
        text = raw.astype("string")
        labels = rule.canonical_labels(text)
        checks = [] if rule.nullable else [(text.isna().to_numpy(), "missing (null is not allowed here)")]
        checks.append(((text.notna() & labels.isna()).to_numpy(), f"not one of {list(rule.values or [])}"))
        typed = labels.astype(object).where(labels.notna(), None)
    else:
        typed = pd.to_numeric(raw, errors="coerce").astype("float64")
        values = typed.to_numpy()
        checks = [((raw.notna() & typed.isna()).to_numpy(), "not a number"), (np.isinf(values), "infinite")]
        if not rule.nullable:
            checks.append((np.isnan(values), "missing (null is not allowed here)"))
        checks += list(rule.number_violations(values))
    broken = next(((mask, words, raw) for mask, words in checks if mask.any()), None)
    return typed, broken


def check_records(frame: pd.DataFrame, params: Params, source: str) -> pd.DataFrame:
    """The batch-scoring counterpart of `Record`, vectorised over a whole file and built from
    the same compiled rules: columns, types, ranges, allowed values and null rules, for the
    features and the context fields the file has. Returns those columns typed as the model
    expects; the first broken rule raises, naming column, rule, row and value."""
    rules = compile_rules(params.table_schema, params.data.target).columns
    checked = [*params.features.columns, *(c for c in params.serve.context_columns if c in frame.columns)]
    missing = [c for c in params.features.columns if c not in frame.columns]
    if missing:
        raise LooplineError(
            "score", f"{source}: missing column(s) {missing}; the model needs {params.features.columns}"
        )
    out = {}
    for name in checked:
        out[name], broken = _first_violation(frame, rules[name])
        if broken is not None:
            mask, words, shown = broken
            row = int(np.flatnonzero(mask)[0])
            value = shown.iloc[row]
            value = value.item() if isinstance(value, np.generic) else value
            raise LooplineError(
                "score", f"{source}: column {name!r}: {int(mask.sum())} row(s) {words}, e.g. row {row + 1}: {value!r}"
            )
    return pd.DataFrame(out, index=frame.index)
