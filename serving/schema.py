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

import json
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model

from pipelines.config import LABEL_SPACE, ColumnSpec, Params, label_key
from pipelines.errors import LooplineError

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def nullable(spec: ColumnSpec) -> bool:
    """Whether a request may leave this column empty (the model imputes it)."""
    return spec.max_null_fraction > 0 and spec.missing == "keep"


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


def _category(spec: ColumnSpec) -> Any:
    """The schema's labels, matched by the one label rule (config.label_key) and returned in
    the schema's spelling; the JSON schema says exactly what is accepted."""
    spelling = spec.labels()

    def canonical(value: Any) -> Any:
        return spelling.get(label_key(value), value) if isinstance(value, str) else value

    labels = list(spelling.values())
    shown = {"type": "string", "pattern": _label_pattern(labels), "examples": labels[:1],
             "description": f"one of {labels} (letter case and surrounding white space do not matter)"}
    return Annotated[Literal[tuple(labels)], BeforeValidator(canonical), WithJsonSchema(shown)]  # type: ignore[misc]


def _field_type(spec: ColumnSpec) -> Any:
    bounds = {k: v for k, v in (("ge", spec.min), ("le", spec.max)) if v is not None}
    if spec.type == "category":
        kind: Any = _category(spec)
    elif spec.type == "int":
        base = Literal[tuple(int(v) for v in spec.values)] if spec.values else int  # type: ignore[misc]
        kind = Annotated[base, Field(**bounds), BeforeValidator(_whole_number)]
    else:
        kind = Annotated[float, Field(strict=True, **bounds)]
    if nullable(spec):
        kind = kind | None
    return kind


def record_model(params: Params) -> type[BaseModel]:
    """One record: the feature columns, in the order the model was configured with."""
    columns = params.table_schema.columns
    fields = {name: (_field_type(columns[name]), Field(...)) for name in params.features.columns}
    return create_model("Record", __config__=_STRICT, **fields)


def batch_model(params: Params, record: type[BaseModel]) -> type[BaseModel]:
    limit = params.serve.max_batch_records
    return create_model("RecordBatch", __config__=_STRICT,
                        records=(list[record], Field(min_length=1, max_length=limit,  # type: ignore[valid-type]
                                                     description=f"1 to {limit} records")))


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


class ServiceStatus(BaseModel):
    model_name: str
    model_version: str | None
    run_id: str | None
    source: str
    loaded_at: str | None
    last_check: str | None
    last_error: str | None


def request_records(frame: pd.DataFrame, params: Params) -> list[dict[str, Any]]:
    """Rows as the JSON records /predict accepts: the feature columns, integer columns as
    JSON integers (the service refuses 3.0 for an int), missing values as null."""
    columns = params.table_schema.columns
    ints = {c: "Int64" for c in params.features.columns if columns[c].type == "int"}
    return json.loads(frame[params.features.columns].astype(ints).to_json(orient="records"))


def check_records(frame: pd.DataFrame, params: Params, source: str) -> pd.DataFrame:
    """The batch-scoring counterpart of `Record`, vectorised over a whole file: the same
    columns, types, ranges, allowed values and null rules. Returns the feature columns typed
    as the model expects; the first broken rule raises, naming column, rule, row and value."""
    columns = params.table_schema.columns
    missing = [c for c in params.features.columns if c not in frame.columns]
    if missing:
        raise LooplineError("score", f"{source}: missing column(s) {missing}; the model needs {params.features.columns}")
    out = {}
    for name in params.features.columns:
        spec, raw = columns[name], frame[name]

        def fail(mask: np.ndarray, rule: str, shown: pd.Series = raw) -> None:
            if mask.any():
                row = int(np.flatnonzero(mask)[0])
                value = shown.iloc[row]
                value = value.item() if isinstance(value, np.generic) else value
                raise LooplineError("score", f"{source}: column {name!r}: {int(mask.sum())} row(s) {rule}, "
                                             f"e.g. row {row + 1}: {value!r}")

        if spec.type == "category":
            text = raw.astype("string")
            labels = text.str.strip(LABEL_SPACE).str.lower().map(spec.labels())  # the one label rule
            if not nullable(spec):
                fail(text.isna().to_numpy(), "missing (null is not allowed here)")
            fail((text.notna() & labels.isna()).to_numpy(), f"not one of {spec.values}")
            out[name] = labels.astype(object).where(labels.notna(), None)
            continue
        values = pd.to_numeric(raw, errors="coerce").astype("float64")
        fail((raw.notna() & values.isna()).to_numpy(), "not a number")
        fail(np.isinf(values.to_numpy()), "infinite")
        if not nullable(spec):
            fail(values.isna().to_numpy(), "missing (null is not allowed here)")
        present = values.notna().to_numpy()
        if spec.type == "int":
            fail(present & (values.to_numpy() != np.round(values.to_numpy())), "not a whole number")
        if spec.values:
            fail(present & ~values.isin([float(v) for v in spec.values]).to_numpy(), f"not one of {spec.values}")
        if spec.min is not None:
            fail(present & (values.to_numpy() < spec.min), f"below the minimum {spec.min}")
        if spec.max is not None:
            fail(present & (values.to_numpy() > spec.max), f"above the maximum {spec.max}")
        out[name] = values
    return pd.DataFrame(out, index=frame.index)
