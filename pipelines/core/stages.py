"""The pipeline's stages, in the order dvc.yaml runs them: each name with the function that
runs it, as `module:function`. This table is the one list of stage names; `loopline stage`,
`loopline run`, the training flow and the dvc.yaml check all read it.

A stage function reads its inputs from the paths in `Layout`, writes its outputs atomically
and returns a small JSON-able summary. `dvc repro`, the flows and the tests run the same
functions. The code a stage runs (its function, the top-level imports of its module and
everything those import; pipelines.core.fingerprint) is what dvc.yaml lists as the stage's
code dependencies.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.core.config import Params

STAGES: dict[str, str] = {
    "params": "pipelines.data.stages:check_params",
    "ingest": "pipelines.data.stages:ingest",
    "clean": "pipelines.data.stages:clean",
    "validate": "pipelines.data.stages:validate",
    "split": "pipelines.data.stages:split",
    "train": "pipelines.model.stages:train",
    "evaluate": "pipelines.model.stages:evaluate",
}
DATA_STAGES = ("params", "ingest", "clean", "validate", "split")  # what the training flow runs before its search


def stage_function(name: str) -> Callable[[Params], dict[str, Any]]:
    """The function that runs stage `name`."""
    module, function = STAGES[name].split(":")
    return getattr(importlib.import_module(module), function)


def run_stage(name: str, params: Params) -> dict[str, Any]:
    return stage_function(name)(params)


def run_all(params: Params, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Every stage in order, in this process (what `loopline run` does)."""
    summary: dict[str, Any] = {}
    for name in STAGES:
        summary[name] = run_stage(name, params)
        echo(f"{name}: {summary[name]}" if name != "evaluate" else f"{name}: done")
    return summary
