"""The one exception type for expected failures: bad input data or bad configuration.

The CLI prints these as a single paragraph without a traceback and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LooplineError(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message

    def __reduce__(self):
        # Raised on a Dask worker, it travels back pickled: rebuild it from its two parts.
        return LooplineError, (self.stage, self.message)
