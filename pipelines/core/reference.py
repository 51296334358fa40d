"""The configuration reference, written from the params models themselves: every section and
key with its type, bounds, default and meaning (the docstring under each field in
pipelines/core/config.py). `loopline check-params --reference` prints it; the manual's
reference page is this text, and a test fails when the committed copy is stale."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipelines.core.config import Params

HEADER = """# Configuration reference

Every section and key of `params.yaml`, written from loopline's params models
(`loopline check-params --reference`; do not edit this page by hand). A file is validated
when it is loaded: an unknown key, a wrong type or a value out of bounds fails, naming the key.
`loopline check-params` checks one; `--show` prints it with every default filled in.
"""


def _type(annotation: Any) -> str:
    """An annotation in the words of a YAML file."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        shown = [_type(a) for a in args if a is not type(None)]
        return " \\| ".join(shown) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {Path: "path", str: "text", int: "integer", float: "number", bool: "true \\| false", typing.Any: "any"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _bounds(field: FieldInfo) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    shown = [f"{words[k]} {getattr(m, k)}" for m in field.metadata for k in words if hasattr(m, k)]
    return f" ({', '.join(shown)})" if shown else ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "below"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} entries"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`"


def _meaning(field: FieldInfo) -> str:
    return " ".join((field.description or "").split()).replace("|", "\\|")


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds, with the path suffix that reaches it (`.*` per mapping, `[]`
    per list)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin is dict:
        model, suffix = _nested(args[1])
        return model, ".*" + suffix
    if origin is list:
        model, suffix = _nested(args[0])
        return model, "[]" + suffix
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, suffix = _nested(arg)
            if model is not None:
                return model, suffix
    return None, ""


def _section(path: str, model: type[BaseModel]) -> list[str]:
    blocks = [f"## `{path}`", " ".join((model.__doc__ or "").split())]
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    below: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        rows.append(f"| `{key}` | {_type(field.annotation)}{_bounds(field)} | {_default(field)} | {_meaning(field)} |")
        inner, suffix = _nested(field.annotation)
        if inner is not None:
            below.append((f"{path}.{key}{suffix}", inner))
    blocks.append("\n".join(rows))
    text = ["\n\n".join(blocks)]
    for sub_path, sub in below:
        text += _section(sub_path, sub)
    return text


def config_reference() -> str:
    """The whole reference, as Markdown."""
    sections = []
    for name, field in Params.model_fields.items():
        model, suffix = _nested(field.annotation)
        key = field.alias or name
        if model is None:  # a top-level key that is not a section (alerts)
            sections.append(
                f"## `{key}`\n\n{_meaning(field)}\n\nType: {_type(field.annotation)}; default {_default(field)}."
            )
        else:
            sections += _section(key + suffix, model)
    return HEADER + "\n" + "\n\n".join(sections) + "\n"
