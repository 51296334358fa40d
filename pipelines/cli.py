"""The `loopline` command. Heavy libraries are imported inside commands so `--help` is fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="loopline: data → validated features → tracked models → served predictions.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
STAGE_NAMES = ("ingest", "clean", "validate", "split", "train", "evaluate")


def _params(path: Path):
    from pipelines.config import load_params

    return load_params(path)


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in metrics["test"] if k != "rows"]
    lines = [f"{'metric':<22}{'val':>12}{'test':>12}"]
    for k in keys:
        lines.append(f"{k:<22}{metrics['val'].get(k, float('nan')):>12.4f}{metrics['test'].get(k, float('nan')):>12.4f}")
    lines.append(f"{'rows':<22}{metrics['val']['rows']:>12}{metrics['test']['rows']:>12}")
    return "\n".join(lines)


@app.command()
def stage(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGE_NAMES)}.")],
          params: ParamsOption = Path("params.yaml")) -> None:
    """Run one pipeline stage (what each dvc.yaml stage calls)."""
    if name not in STAGE_NAMES:
        raise typer.BadParameter(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    from pipelines.stages import STAGES

    result = STAGES[name](_params(params))
    typer.echo(f"{name}: {json.dumps(result, sort_keys=True)}")


@app.command()
def run(params: ParamsOption = Path("params.yaml")) -> None:
    """Run every stage in this process and print the metrics (no DVC bookkeeping)."""
    from pipelines.stages import run_all

    summary = run_all(_params(params), echo=typer.echo)
    typer.echo(_metrics_table(summary["evaluate"]))


@app.command("check-params")
def check_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate a params file and print it with defaults filled in."""
    typer.echo(json.dumps(_params(params).model_dump(mode="json", by_alias=True), indent=2))


def main() -> None:
    import click

    from pipelines.errors import LooplineError

    try:
        app(standalone_mode=False)
    except LooplineError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
