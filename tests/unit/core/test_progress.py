"""Progress of long work: plain lines off a terminal, a Rich bar on one, nothing when nested."""

from __future__ import annotations

import io
import re

from pipelines.core.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_step_is_a_plain_line_with_counts_and_time():
    out = io.StringIO()
    with progress("search", 4, "candidates", stream=out) as advance:
        advance(note="linear val rmse 92.1")
        advance(note="trial-0 val rmse 40.2")
        advance(2)
    lines = out.getvalue().splitlines()
    assert [re.sub(r"\(\d+\.\d s\)", "(t)", line) for line in lines] == [
        "search: 1/4 candidates (t) linear val rmse 92.1",
        "search: 2/4 candidates (t) trial-0 val rmse 40.2",
        "search: 4/4 candidates (t)",
    ]
    assert "\x1b" not in out.getvalue()  # no control characters in a log


def test_on_a_terminal_a_bar_shows_counts_and_elapsed_time():
    out = Terminal()
    with progress("replay", 2, "months", stream=out) as advance:
        advance(note="2011-04: retrain")
        advance(note="2011-05: no action")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "replay" in shown and "2/2 months" in shown and "0:00:0" in shown and "2011-05: no action" in shown


def test_work_inside_shown_work_shows_nothing_of_its_own():
    outer, inner = io.StringIO(), io.StringIO()
    with progress("replay", 1, "months", stream=outer) as advance:
        with progress("search", 4, "candidates", stream=inner) as step:
            step()
        advance()
    assert inner.getvalue() == "" and outer.getvalue().startswith("replay: 1/1 months")
    with progress("search", 1, "candidates", stream=inner) as step:  # and again once the outer work ends
        step()
    assert inner.getvalue().startswith("search: 1/1 candidates")
