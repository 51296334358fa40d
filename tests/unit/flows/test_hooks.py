"""A cancelled run is not a second failure in the log."""

from __future__ import annotations

import logging
import sys


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord(
            "sqlalchemy.pool", logging.ERROR, __file__, 1, "Error closing cursor", None, sys.exc_info()
        )


def test_a_library_error_raised_while_a_termination_signal_unwinds_is_dropped_and_others_are_kept():
    from prefect.exceptions import TerminationSignal

    from flows.hooks import _Cancellation

    try:
        try:
            raise TerminationSignal(15)
        except TerminationSignal:
            raise RuntimeError("cannot operate on a closed cursor") from None  # noqa: B904  (context kept below)
    except RuntimeError as closing:
        closing.__context__ = TerminationSignal(15)
        interrupted = closing
    assert _Cancellation().filter(_record(interrupted)) is False
    assert _Cancellation().filter(_record(RuntimeError("a real failure"))) is True
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "no exception", None, None)
    assert _Cancellation().filter(plain) is True
