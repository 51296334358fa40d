"""Shared fixtures: params files pointed at temporary directories, and a way to run the CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIKESHARE = REPO / "pipelines" / "datasets" / "bikeshare_2011.csv"
WINE = REPO / "pipelines" / "datasets" / "wine.csv"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def raw_params(name: str = "params.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def write_params(tmp: Path, source: Path | str, base: str = "params.yaml", **sections) -> Path:
    """A params file like `base`, reading `source` and writing below `tmp`; `sections`
    replace keys one level down, e.g. train={"model": "linear"}."""
    raw = raw_params(base)
    raw["data"]["source"] = str(source)
    raw["paths"] = {"data": str(tmp / "data"), "models": str(tmp / "models")}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def bikeshare_sample(tmp: Path, rows: int = 2000) -> Path:
    """The first `rows` hours of 2011 (January to March for 2000), as a CSV file."""
    lines = BIKESHARE.read_text().splitlines(keepends=True)
    path = tmp / "bikeshare_sample.csv"
    path.write_text("".join(lines[: rows + 1]))
    return path


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    """Run `loopline ARGS` through its real entry point in this process."""
    from pipelines.cli import main

    argv = sys.argv
    sys.argv = ["loopline", *args]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def sample_csv(tmp_path: Path) -> Path:
    return bikeshare_sample(tmp_path)


@pytest.fixture
def params_of():
    """Load a params file written by write_params."""
    from pipelines.config import load_params

    return load_params
