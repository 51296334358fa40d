"""The `loopline` command, above every layer: it runs the flows, the service and the stages.
Heavy libraries are imported inside commands so `--help` is fast."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="loopline: data → validated features → tracked models → served predictions.",
    rich_markup_mode=None,  # typer 0.29's Rich help prints "<bool>" beside --help with click 8.5
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
STAGE_NAMES = ("params", "ingest", "clean", "validate", "split", "train", "evaluate")


def _params(path: Path):
    from pipelines.config import load_params

    return load_params(path)


def _console_without_expected_errors() -> None:
    """Prefect logs a failed task or flow run with its traceback. For an expected failure
    (bad data, bad params, no champion: a LooplineError) the CLI prints the one line that
    matters and exits with 2, so the console skips those records; Prefect's API still stores
    them for its UI. The temporary API's start-up message loses its second line, a pointer
    to Prefect's docs. Called once Prefect is imported, whose logging set-up adds the handler."""
    import logging

    from pipelines.errors import LooplineError

    class SkipExpected(logging.Filter):
        seen: set[str] = set()  # texts of the expected errors, quoted again by the "Failed" state lines

        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if isinstance(error, LooplineError):
                self.seen.add(str(error))
                return False
            message = record.getMessage()
            if message.startswith("Starting temporary server on"):
                first = message.split("\n", 1)[0]
                record.msg, record.args = f"{first} (`loopline prefect-server` keeps one up between commands)", None
            return not any(text in message for text in self.seen)

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
            isinstance(f, SkipExpected) for f in handler.filters
        ):
            handler.addFilter(SkipExpected())


def _flow_api():
    """The Prefect API for a command's flows (flows.api.command_api); its line goes to stderr,
    where it cannot mix with --json output."""
    from flows.api import command_api

    return command_api(lambda line: typer.echo(line, err=True))


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in metrics["test"] if k != "rows"]
    lines = [f"{'metric':<22}{'val':>12}{'test':>12}"]
    for k in keys:
        lines.append(
            f"{k:<22}{metrics['val'].get(k, float('nan')):>12.4f}{metrics['test'].get(k, float('nan')):>12.4f}"
        )
    lines.append(f"{'rows':<22}{metrics['val']['rows']:>12}{metrics['test']['rows']:>12}")
    return "\n".join(lines)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGE_NAMES)}.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
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


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    force: Annotated[bool, typer.Option(help="Ignore cached stage results and retrain.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
) -> None:
    """Run the training flow (Prefect): data stages, candidate search, guarded promotion."""
    from pipelines.execution import check_execution

    check_execution(_params(params))  # a malformed file or setting fails here, before any Prefect start-up
    from flows.training import training_flow
    from pipelines.training import render_training

    _console_without_expected_errors()
    with _flow_api():
        result = training_flow(params_path=str(params), force=force)
    if as_json:
        typer.echo(json.dumps(asdict(result), default=str))
        return
    typer.echo("\n" + render_training(result))


@app.command()
def monitor(
    params: ParamsOption = Path("params.yaml"),
    retrain: Annotated[
        bool,
        typer.Option(help="Start the training flow when the policy says so (--no-retrain: decide and record only)."),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the flow's result as JSON.")] = False,
) -> None:
    """Run the monitoring flow: accept landed batches, measure drift and live metrics, retrain if needed."""
    _params(params)
    from flows.monitoring import monitoring_flow
    from pipelines.measure import render_monitoring

    _console_without_expected_errors()
    with _flow_api():
        result = monitoring_flow(params_path=str(params), trigger="subflow" if retrain else "none")
    if as_json:
        payload = asdict(result)
        payload["verdict"] |= {"outcome": result.verdict.outcome, "reason": result.verdict.reason()}
        typer.echo(json.dumps(payload, default=str))
        return
    typer.echo(render_monitoring(result))


@app.command()
def replay(
    params: ParamsOption = Path("params.yaml"),
    workdir: Annotated[Path, typer.Option(help="Scratch directory for the replay (recreated).")] = Path("data/replay"),
    period: Annotated[str, typer.Option(help="Batch size: month or week.")] = "month",
    train_months: Annotated[int, typer.Option(help="Months of data the first champion is trained on.")] = 3,
    periods: Annotated[int | None, typer.Option(help="Stop after this many batches.")] = None,
    chart: Annotated[Path | None, typer.Option(help="Also copy the timeline PNG here.")] = None,
) -> None:
    """Replay 2011: first champion on Jan-Mar, then each later batch served, labelled, monitored, retrained."""
    if period not in ("month", "week"):
        raise typer.BadParameter(f"--period must be month or week, not {period!r}")
    _params(params)
    from flows.replay import run_replay

    _console_without_expected_errors()

    with _flow_api():
        frame = run_replay(workdir, params, period, train_months, periods, chart, echo=typer.echo)  # type: ignore[arg-type]
    retrains = frame[frame["decision"] == "retrain"]
    typer.echo(
        f"\n{len(frame)} batches, {len(retrains)} retrains, {int(frame['promoted'].sum())} promotions; "
        f"timeline: {workdir / 'timeline.png'} and timeline.csv"
    )


@app.command()
def backtest(
    params: ParamsOption = Path("params.yaml"),
    workdir: Annotated[Path, typer.Option(help="Scratch directory for the back-test (recreated).")] = Path(
        "data/backtest"
    ),
    periods: Annotated[int | None, typer.Option(help="Stop after this many monthly batches.")] = None,
    policy: Annotated[list[str] | None, typer.Option(help="Run only this policy (repeatable).")] = None,
    chart: Annotated[Path | None, typer.Option(help="Also copy the chart PNG here (and the table as CSV).")] = None,
) -> None:
    """Replay 2011 under every policy in `backtest.policies`: live error, retrains, promotions, training time."""
    _params(params)
    from flows.backtest import run_backtest

    _console_without_expected_errors()
    run_backtest(workdir, params, periods, policy, chart, echo=typer.echo)
    typer.echo(f"chart: {workdir / 'backtest.png'}; table: summary.csv, summary.md; per month: timeline.csv")


@app.command()
def deploy(
    params: ParamsOption = Path("params.yaml"),
    work_pool: Annotated[
        str | None,
        typer.Option(
            help="Register the deployments on this process work pool (created if missing) and exit; "
            "`prefect worker start --pool NAME` runs them. Default: serve them from this process."
        ),
    ] = None,
) -> None:
    """Serve the scheduled training and monitoring deployments (cron from `schedule:`) until
    stopped, or register them on a work pool for Prefect workers."""
    _params(params)
    if work_pool:
        from flows.deploy import deploy_to_pool

        deploy_to_pool(params, work_pool, echo=typer.echo)
        return
    from flows.deploy import serve_deployments

    serve_deployments(params, echo=typer.echo)


@app.command("prefect-server")
def prefect_server(
    port: Annotated[int, typer.Option(help="The API and UI port.")] = 4200,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    database: Annotated[
        str | None,
        typer.Option(help="PostgreSQL for the server's database (postgresql://host:5432/prefect); default SQLite."),
    ] = None,
) -> None:
    """Keep a Prefect API (and its UI) up until Ctrl-C; loopline commands meanwhile use it
    instead of starting a temporary one each (seconds saved per command)."""
    from flows.api import keep_server

    keep_server(host, port, echo=typer.echo, database=database)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The model version to make champion.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Make a registered model version the champion by hand (audited)."""
    from pipelines.registry import promote as promote_version
    from pipelines.tracking import registry_client, registry_lock_target

    p = _params(params)
    client = registry_client(p)
    replaced = promote_version(client, p.tracking.model_name, version, registry_lock_target(p))
    if replaced == version:
        typer.echo(f"{p.tracking.model_name}: v{version} is already the champion; nothing changed")
    else:
        typer.echo(f"{p.tracking.model_name}: champion is v{version} (was {'v' + replaced if replaced else 'none'})")


@app.command()
def rollback(params: ParamsOption = Path("params.yaml")) -> None:
    """Move the champion back to the version it replaced (audited)."""
    from pipelines.registry import rollback as rollback_champion
    from pipelines.tracking import registry_client, registry_lock_target

    p = _params(params)
    client = registry_client(p)
    old, new = rollback_champion(client, p.tracking.model_name, registry_lock_target(p))
    typer.echo(f"{p.tracking.model_name}: champion rolled back from v{old} to v{new}")


@app.command()
def ui(params: ParamsOption = Path("params.yaml"), port: int = 5000, host: str = "127.0.0.1") -> None:
    """Open the MLflow UI on the tracking store (mlflow server)."""
    from pipelines.tracking import tracking_uri

    p = _params(params)
    artifacts = ["--default-artifact-root", str(Path(p.tracking.artifact_root).resolve())]
    _exec_mlflow_server(tracking_uri(p), artifacts, host, port, workers=1)


def _exec_mlflow_server(store: str, artifacts: list[str], host: str, port: int, workers: int) -> None:
    """Become `mlflow server` (the one installed beside loopline) on `store`."""
    import os

    mlflow = str(Path(sys.executable).with_name("mlflow"))
    os.execv(
        mlflow,
        [mlflow, "server", "--backend-store-uri", store, *artifacts]
        + ["--host", host, "--port", str(port), "--workers", str(workers)],
    )


@app.command("tracking-server")
def tracking_server(
    store: Annotated[
        str,
        typer.Option(
            help="MLflow's backend store: postgresql+psycopg://host:5432/db for a team, or sqlite:///file.db."
        ),
    ],
    artifacts: Annotated[
        str, typer.Option(help="Where the server keeps artifacts it serves: a directory or s3://bucket/prefix.")
    ],
    port: int = 5000,
    host: Annotated[str, typer.Option(help="0.0.0.0 to serve other machines.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """The team's MLflow server: runs and registry in STORE, artifacts served by the server
    (clients need no access to ARTIFACTS). Point tracking.uri (or MLFLOW_TRACKING_URI) at
    http://HOST:PORT."""
    from pipelines.postgres import describe
    from pipelines.tracking import check_backend_store

    store = check_backend_store(store)
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    typer.echo(f"MLflow server: store {describe(store)}, artifacts {artifacts}; tracking.uri: http://{host}:{port}")
    _exec_mlflow_server(store, ["--serve-artifacts", "--artifacts-destination", artifacts], host, port, workers)


@app.command()
def serve(
    params: ParamsOption = Path("params.yaml"),
    port: Annotated[int | None, typer.Option(help="Default: serve.port.")] = None,
    host: Annotated[str | None, typer.Option(help="Default: serve.host.")] = None,
    bento: Annotated[
        str | None,
        typer.Option(help="Serve a Bento built by `loopline package` (e.g. loopline:latest) instead of the registry."),
    ] = None,
) -> None:
    """Serve the champion over HTTP with BentoML (POST /predict, /predict_batch; /docs)."""
    import os

    from pipelines.layout import Layout

    p = _params(params)
    env = {**os.environ, "LOOPLINE_PARAMS": str(params.resolve())}
    if bento is not None:  # the Bento's own working dir is not ours: log predictions here
        env["LOOPLINE_PREDICTION_LOG"] = str(Layout.of(p).prediction_log.resolve())
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    os.execve(
        bentoml,
        [
            bentoml,
            "serve",
            bento or "serving.service:Predictor",
            "--host",
            host or p.serve.host,
            "--port",
            str(port or p.serve.port),
        ],
        env,
    )


@app.command()
def package(params: ParamsOption = Path("params.yaml")) -> None:
    """Build a Bento holding the current champion (serving/bentofile.yaml); prints its tag."""
    from serving.package import build_bento

    tag, model_tag, version, built = build_bento(_params(params))
    typer.echo(
        f"bento {tag}: {model_tag} (registry version {version}; {'built' if built else 'unchanged, reused'}); "
        f"serve it with `loopline serve --bento {tag}`, containerize it with `bentoml containerize {tag}`"
    )


@app.command()
def score(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT.csv", help="Records to score (CSV or Parquet).")],
    output_path: Annotated[Path, typer.Argument(metavar="OUTPUT.parquet", help="Where to write predictions.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Batch predictions with the champion (a Prefect flow): same checks and preprocessing as serving."""
    _params(params)
    from flows.scoring import scoring_flow

    _console_without_expected_errors()
    with _flow_api():
        result = scoring_flow(params_path=str(params), input_path=str(input_path), output_path=str(output_path))
    typer.echo(
        f"scored {result['rows']} rows with {result['model_name']} v{result['model_version']} -> {result['output']}"
    )


@app.command()
def dashboard(
    params: ParamsOption = Path("params.yaml"),
    port: int = 8000,
    host: str = "127.0.0.1",
    workspace: Annotated[
        Path | None, typer.Option(help="The Evidently workspace (default: monitor.workspace of the params).")
    ] = None,
) -> None:
    """Open Evidently's UI on the monitoring history (one project per model; `make replay` fills it with 2011)."""
    import os
    import shutil

    from pipelines.layout import Layout

    folder = (workspace or Layout.of(_params(params)).workspace).resolve()
    folder.mkdir(parents=True, exist_ok=True)  # an empty workspace: the UI says there are no projects yet
    evidently = shutil.which("evidently", path=str(Path(sys.executable).parent)) or "evidently"
    typer.echo(f"Evidently UI on {folder}: http://{host}:{port}", err=True)
    os.execv(evidently, [evidently, "ui", "--workspace", str(folder), "--host", host, "--port", str(port)])


@app.command()
def card(
    version: Annotated[str, typer.Argument(help="The registered model version.")],
    params: ParamsOption = Path("params.yaml"),
    save: Annotated[
        Path | None, typer.Option(help="Also write model_card.md and its slice plot into this folder.")
    ] = None,
) -> None:
    """Print a registered version's model card, as of now (the one logged with it, card/model_card.md,
    is as of its promotion decision)."""
    from pipelines.card import build_card, save_card
    from pipelines.errors import LooplineError
    from pipelines.tracking import registry_client

    p = _params(params)
    client = registry_client(p)
    try:
        client.get_model_version(p.tracking.model_name, version)
    except Exception:
        raise LooplineError("card", f"{p.tracking.model_name} has no version {version!r} in {p.tracking.uri}") from None
    text = build_card(client, p, p.tracking.model_name, version)
    if save is not None:
        typer.echo(f"saved {save_card(client, p.tracking.model_name, version, text, save)}", err=True)
    typer.echo(text, nl=False)


@app.command()
def reproduce(
    version: Annotated[str, typer.Argument(help="The registered model version to rebuild.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Rebuild a registered version from its commit, data version and params; say whether it is identical."""
    from pipelines.reproduce import reproduce as rebuild

    result = rebuild(_params(params), version)
    typer.echo(result.render())
    if result.verdict != "identical":
        sys.exit(1)


@app.command("check-params")
def check_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate a params file and print it, as YAML, with defaults filled in."""
    import yaml

    typer.echo(yaml.safe_dump(_params(params).model_dump(mode="json", by_alias=True), sort_keys=False), nl=False)


def main() -> None:
    import os

    import click

    from pipelines.errors import LooplineError

    # Set here, not only by the Makefile: a user running `loopline` from a shell gets no
    # usage reporting and no telemetry errors from the temporary Prefect API either.
    for var, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("BENTOML_DO_NOT_TRACK", "true"),
        ("GIT_PYTHON_REFRESH", "quiet"),
    ):
        os.environ.setdefault(var, value)

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
