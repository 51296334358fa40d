"""Spans as params write them: a duration ("7d", "36h", "90m", "45s", "2w") or a row count
("5000"). The served window (`monitor.window`), the prediction log's retention
(`serve.log_retention`) and the replay's label delay all read them here."""

from __future__ import annotations

import re
from datetime import timedelta

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_span(text: str | int) -> timedelta | int:
    """A duration as a timedelta, or a whole number of rows as an int; ValueError naming the
    forms otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"{text} rows: a row count must be at least 1")
        return text
    found = _SPAN.fullmatch(str(text))
    if found is None:
        raise ValueError(f"{text!r} is neither a duration (7d, 36h, 90m, 45s, 2w) nor a row count (5000)")
    number, unit = found.groups()
    if not unit:
        if "." in number or int(number) < 1:
            raise ValueError(f"{text!r}: a row count is a whole number of at least 1")
        return int(number)
    return timedelta(seconds=float(number) * UNITS[unit])


def parse_duration(text: str) -> timedelta:
    """A duration (7d; none at all: 0 or 0d); a row count is refused."""
    span = parse_span(text) if not re.fullmatch(r"\s*0+\s*[smhdw]?\s*", str(text)) else timedelta(0)
    if not isinstance(span, timedelta):
        raise ValueError(f"{text!r} is a row count; give a duration (7d, 36h, 90m, 45s, 2w)")
    return span


def describe_span(span: timedelta | int) -> str:
    """A span in words: "7 days", "36 hours", "5000 rows"."""
    if isinstance(span, int):
        return f"{span} rows"
    seconds = span.total_seconds()
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} seconds"
