"""Progress of long work (the candidate search, a replay's or back-test's periods, batch
scoring): a Rich bar with counts and elapsed time on a terminal, plain lines elsewhere (CI,
logs, a Prefect worker), so a log reader sees the same counts without control characters.

    with progress("search", total=10, unit="candidates") as advance:
        advance(note="linear val rmse 92.1")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Advance = Callable[..., None]
_active: list[str] = []  # the work being shown; one bar at a time (Rich allows one live display)


@contextmanager
def progress(task: str, total: int, unit: str, stream: TextIO | None = None) -> Iterator[Advance]:
    """Count `total` steps of `task`; yields `advance(steps=1, note="")`. Inside other work
    being shown (a replay's trainings) it shows nothing: the outer count is the one to read."""
    out = stream if stream is not None else sys.stderr
    started = time.perf_counter()
    if _active:
        yield lambda steps=1, note="": None
        return
    _active.append(task)
    try:
        yield from _show(task, total, unit, out, started)
    finally:
        _active.remove(task)


def _show(task: str, total: int, unit: str, out: TextIO, started: float) -> Iterator[Advance]:
    if out.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=Console(file=out),
            transient=False,
        )
        with bar:
            ident = bar.add_task(task, total=total, note="")
            yield lambda steps=1, note="": bar.update(ident, advance=steps, note=note)
        return
    done = 0

    def line(steps: int = 1, note: str = "") -> None:
        nonlocal done
        done += steps
        print(
            f"{task}: {done}/{total} {unit} ({time.perf_counter() - started:.1f} s)" + (f" {note}" if note else ""),
            file=out,
            flush=True,
        )

    yield line
