"""The `loopline` command, above every layer: it runs the flows, the service and the stages.
Heavy libraries are imported inside commands so `--help` is fast.

Conventions every command keeps:
- `--params/-p` names the params file (default params.yaml);
- a command that returns a result prints it for a person, or as JSON with `--json`;
- a command that starts a server takes `--host/--port`, defaulting from the params file
  (`serve:` for the service, `servers:` for MLflow, Prefect and the dashboard);
- an expected failure (bad data, bad params, no champion) is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.core.stages import STAGES

app = typer.Typer(
    help="loopline: data → validated features → tracked models → served predictions.\n\n"
    "Every command takes --params (default params.yaml); one that returns a result prints it as JSON with "
    "--json; one that starts a server takes --host/--port, defaulting from the params file. An expected "
    "failure (bad data, bad params, no champion) is one line on stderr and exit status 2.",
    rich_markup_mode=None,  # typer 0.29's Rich help prints "<bool>" beside --help with click 8.5
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
HostOption = Annotated[str | None, typer.Option(help="The address to listen on (default: from the params file).")]
PortOption = Annotated[int | None, typer.Option(help="The port (default: from the params file).")]
WorkdirOption = Annotated[Path | None, typer.Option(help="Scratch directory (recreated).")]
PeriodsOption = Annotated[int | None, typer.Option(help="Stop after this many batches.")]
TrainMonthsOption = Annotated[
    int | None, typer.Option(help="Months the first champion trains on (default: backtest.train_months).")
]
PeriodOption = Annotated[str, typer.Option(help="Batch size: month or week.")]
ChartOption = Annotated[Path | None, typer.Option(help="Also copy the chart PNG here.")]


def _params(path: Path):
    from pipelines.core.config import load_params

    return load_params(path)


def _emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """A command's result: rendered for a person, or as JSON (`--json`)."""
    if as_json:
        payload = asdict(result) if is_dataclass(result) and not isinstance(result, type) else result
        typer.echo(json.dumps(payload, default=str))
    else:
        typer.echo(render(result))


def _exec(name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """Become one of the tools installed beside loopline (mlflow, bentoml, evidently)."""
    import os

    from pipelines.core.processes import venv_bin

    executable = venv_bin(name)
    if env is None:
        os.execv(executable, [executable, *args])
    os.execve(executable, [executable, *args], env)


def _console_without_expected_errors() -> None:
    """Prefect logs a failed task or flow run with its traceback. For an expected failure
    (bad data, bad params, no champion: a LooplineError) the CLI prints the one line that
    matters and exits with 2, so the console skips those records; Prefect's API still stores
    them for its UI. The temporary API's start-up message loses its second line, a pointer
    to Prefect's docs. Called once Prefect is imported, whose logging set-up adds the handler."""
    import logging

    from pipelines.core.errors import LooplineError

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


# What each command's flows import, loaded while Prefect's temporary API starts (when that
# is the API the command uses): the slowest imports, 1-4 s each here.
TRAINING_IMPORTS = ("great_expectations", "sklearn.ensemble", "mlflow.sklearn", "skl2onnx", "nannyml")
MONITORING_IMPORTS = ("great_expectations", "evidently", "nannyml", "mlflow.sklearn")
SCORING_IMPORTS = ("mlflow.sklearn", "onnxruntime")


def _flow_api(warm: tuple[str, ...] = ()):
    """The Prefect API for a command's flows (flows.api.command_api); its line goes to stderr,
    where it cannot mix with --json output."""
    from flows.api import command_api

    _console_without_expected_errors()
    return command_api(lambda line: typer.echo(line, err=True), warm)


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in metrics["test"] if k != "rows"]
    lines = [f"{'metric':<22}{'val':>12}{'test':>12}"]
    for k in keys:
        lines.append(
            f"{k:<22}{metrics['val'].get(k, float('nan')):>12.4f}{metrics['test'].get(k, float('nan')):>12.4f}"
        )
    lines.append(f"{'rows':<22}{metrics['val']['rows']:>12}{metrics['test']['rows']:>12}")
    return "\n".join(lines)


# --- the pipeline ---------------------------------------------------------------------------


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.")],
    params: ParamsOption = Path("params.yaml"),
    as_json: JsonOption = False,
) -> None:
    """Run one pipeline stage (what each dvc.yaml stage calls)."""
    if name not in STAGES:
        raise typer.BadParameter(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    from pipelines.core.stages import run_stage

    result = run_stage(name, _params(params))
    _emit(result, as_json, lambda r: f"{name}: {json.dumps(r, sort_keys=True)}")


@app.command()
def run(params: ParamsOption = Path("params.yaml"), as_json: JsonOption = False) -> None:
    """Run every stage in this process and print the metrics (no DVC bookkeeping)."""
    from pipelines.core.stages import run_all

    summary = run_all(_params(params), echo=lambda line: typer.echo(line, err=as_json))
    _emit(summary, as_json, lambda s: _metrics_table(s["evaluate"]))


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    force: Annotated[bool, typer.Option(help="Ignore cached stage results and retrain.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the training flow (Prefect): data stages, candidate search, guarded promotion."""
    from pipelines.training.run import check_execution

    check_execution(_params(params))  # a malformed file or setting fails here, before any Prefect start-up
    from flows.training import training_flow
    from pipelines.training.run import render_training

    with _flow_api(TRAINING_IMPORTS):
        result = training_flow(params_path=str(params), force=force)
    _emit(result, as_json, lambda r: "\n" + render_training(r))


@app.command()
def monitor(
    params: ParamsOption = Path("params.yaml"),
    retrain: Annotated[
        bool,
        typer.Option(help="Start the training flow when the policy says so (--no-retrain: decide and record only)."),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Run the monitoring flow: accept landed batches, measure drift and live metrics, retrain if needed."""
    _params(params)
    from flows.monitoring import monitoring_flow
    from pipelines.monitoring.report import render_monitoring

    with _flow_api(MONITORING_IMPORTS):
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
    workdir: WorkdirOption = None,
    period: PeriodOption = "month",
    train_months: TrainMonthsOption = None,
    periods: PeriodsOption = None,
    chart: ChartOption = None,
    label_delay: Annotated[
        str, typer.Option(help="How long after its hour each label lands (0: at the end of the period; 7d, 30d).")
    ] = "0",
    as_json: JsonOption = False,
) -> None:
    """Replay 2011 through a real service: first champion, then each batch served, labelled, monitored, retrained."""
    if period not in ("month", "week"):
        raise typer.BadParameter(f"--period must be month or week, not {period!r}")
    _params(params)
    from flows.replay import run_replay

    workdir = workdir or Path("data/replay")
    with _flow_api():
        frame = run_replay(
            workdir,
            params,
            period,  # type: ignore[arg-type]
            train_months,
            periods,
            chart,
            echo=typer.echo,
            label_delay=label_delay,
        )
    retrains = frame[frame["decision"] == "retrain"]
    summary = {
        "batches": len(frame),
        "alarms": int(frame["alarm"].sum()),
        "retrains": len(retrains),
        "promotions": int(frame["promoted"].sum()),
        "timeline": str(workdir / "timeline.csv"),
        "chart": str(workdir / "timeline.png"),
    }
    _emit(
        summary,
        as_json,
        lambda s: (
            f"\n{s['batches']} batches, {s['alarms']} alarms, {s['retrains']} retrains, {s['promotions']} promotions; "
            f"timeline: {s['chart']} and timeline.csv"
        ),
    )


@app.command()
def backtest(
    params: ParamsOption = Path("params.yaml"),
    workdir: WorkdirOption = None,
    period: PeriodOption = "month",
    train_months: TrainMonthsOption = None,
    periods: PeriodsOption = None,
    policy: Annotated[list[str] | None, typer.Option(help="Run only this policy (repeatable).")] = None,
    label_delay: Annotated[
        list[str] | None,
        typer.Option(
            help="How long after its hour each label arrives (repeatable: 0, 7d, 30d; default backtest.label_delays)."
        ),
    ] = None,
    chart: ChartOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replay 2011 under every policy in `backtest.policies`: live error, retrains, promotions, training time."""
    if period not in ("month", "week"):
        raise typer.BadParameter(f"--period must be month or week, not {period!r}")
    _params(params)
    from flows.backtest import run_backtest

    _console_without_expected_errors()
    workdir = workdir or Path("data/backtest")
    summary, _ = run_backtest(
        workdir,
        params,
        periods,
        policy,
        chart,
        echo=lambda line: typer.echo(line, err=as_json),
        train_months=train_months,
        period=period,  # type: ignore[arg-type]
        label_delays=label_delay,
    )
    _emit(
        summary.to_dict(orient="records"),
        as_json,
        lambda _: f"chart: {workdir / 'backtest.png'}; table: summary.csv, summary.md; per batch: timeline.csv",
    )


@app.command()
def score(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT.csv", help="Records to score (CSV or Parquet).")],
    output_path: Annotated[Path, typer.Argument(metavar="OUTPUT.parquet", help="Where to write predictions.")],
    params: ParamsOption = Path("params.yaml"),
    as_json: JsonOption = False,
) -> None:
    """Batch predictions with the champion (a Prefect flow): same checks and preprocessing as serving."""
    _params(params)
    from flows.scoring import scoring_flow

    with _flow_api(SCORING_IMPORTS):
        result = scoring_flow(params_path=str(params), input_path=str(input_path), output_path=str(output_path))
    _emit(
        result,
        as_json,
        lambda r: f"scored {r['rows']} rows with {r['model_name']} v{r['model_version']} -> {r['output']}",
    )


# --- the registry ---------------------------------------------------------------------------


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The model version to make champion.")],
    params: ParamsOption = Path("params.yaml"),
    as_json: JsonOption = False,
) -> None:
    """Make a registered model version the champion by hand (audited)."""
    from pipelines.registry.champion import promote as promote_version
    from pipelines.registry.tracking import registry_client, registry_lock_target

    p = _params(params)
    replaced = promote_version(registry_client(p), p.tracking.model_name, version, registry_lock_target(p))
    result = {"model_name": p.tracking.model_name, "champion": version, "replaced": replaced}

    def render(r: dict) -> str:
        if r["replaced"] == version:
            return f"{r['model_name']}: v{version} is already the champion; nothing changed"
        return f"{r['model_name']}: champion is v{version} (was {'v' + r['replaced'] if r['replaced'] else 'none'})"

    _emit(result, as_json, render)


@app.command()
def shadow(
    version: Annotated[str | None, typer.Argument(help="The model version to score in shadow.")] = None,
    retire: Annotated[bool, typer.Option("--retire", help="Remove the shadow instead.")] = False,
    params: ParamsOption = Path("params.yaml"),
    as_json: JsonOption = False,
) -> None:
    """Put a registered version in shadow by hand (audited): the service scores every request with
    it too, and monitoring promotes or retires it on labelled live rows. --retire removes it."""
    import functools

    from pipelines.registry.champion import make_shadow, retire_shadow
    from pipelines.registry.tracking import model_features, registry_client, registry_lock_target

    p = _params(params)
    name, client, lock = p.tracking.model_name, registry_client(p), registry_lock_target(p)
    if retire == (version is not None):
        raise typer.BadParameter("give a VERSION to put in shadow, or --retire (not both)")
    if retire:
        was = retire_shadow(client, name, lock, "by hand (loopline shadow --retire)")
        result = {"model_name": name, "shadow": None, "retired": was}
        text = f"{name}: shadow v{was} retired" if was else f"{name}: there was no shadow; nothing changed"
    else:
        assert version is not None
        features = functools.partial(model_features, client, name)
        text = f"{name}: " + make_shadow(client, name, version, lock, "by hand (loopline shadow)", features)
        result = {"model_name": name, "shadow": version, "retired": None}
    _emit(result, as_json, lambda r: text)


@app.command()
def rollback(params: ParamsOption = Path("params.yaml"), as_json: JsonOption = False) -> None:
    """Move the champion back to the version it replaced (audited)."""
    from pipelines.registry.champion import rollback as rollback_champion
    from pipelines.registry.tracking import registry_client, registry_lock_target

    p = _params(params)
    old, new = rollback_champion(registry_client(p), p.tracking.model_name, registry_lock_target(p))
    _emit(
        {"model_name": p.tracking.model_name, "from": old, "to": new},
        as_json,
        lambda r: f"{r['model_name']}: champion rolled back from v{r['from']} to v{r['to']}",
    )


@app.command()
def card(
    version: Annotated[str, typer.Argument(help="The registered model version.")],
    params: ParamsOption = Path("params.yaml"),
    save: Annotated[
        Path | None, typer.Option(help="Also write model_card.md and its slice plot into this folder.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print a registered version's model card, as of now (the one logged with it, card/model_card.md,
    is as of its promotion decision)."""
    from pipelines.core.errors import LooplineError
    from pipelines.registry.card import build_card, save_card
    from pipelines.registry.tracking import registry_client

    p = _params(params)
    client = registry_client(p)
    try:
        client.get_model_version(p.tracking.model_name, version)
    except Exception:
        raise LooplineError("card", f"{p.tracking.model_name} has no version {version!r} in {p.tracking.uri}") from None
    text = build_card(client, p, p.tracking.model_name, version)
    saved = save_card(client, p.tracking.model_name, version, text, save) if save is not None else None
    if saved is not None and not as_json:
        typer.echo(f"saved {saved}", err=True)
    _emit({"version": version, "card": text, "saved": saved}, as_json, lambda r: r["card"].rstrip("\n"))


@app.command()
def reproduce(
    version: Annotated[str, typer.Argument(help="The registered model version to rebuild.")],
    params: ParamsOption = Path("params.yaml"),
    as_json: JsonOption = False,
) -> None:
    """Rebuild a registered version from its commit, data version and params; say whether it is identical
    (exit 0: identical, or identical within 1e-9; 1 otherwise)."""
    from pipelines.registry.reproduce import REBUILT
    from pipelines.registry.reproduce import reproduce as rebuild

    result = rebuild(_params(params), version)
    _emit(result, as_json, lambda r: r.render())
    if result.verdict not in REBUILT:
        sys.exit(1)


@app.command()
def package(params: ParamsOption = Path("params.yaml"), as_json: JsonOption = False) -> None:
    """Build a Bento holding the current champion (serving/bentofile.yaml); prints its tag."""
    from serving.package import build_bento

    tag, _, version, built = build_bento(_params(params))
    _emit(
        {"bento": tag, "registry_version": version, "built": built},
        as_json,
        lambda r: (
            f"bento {tag} (registry version {version}; {'built' if built else 'unchanged, reused'}); "
            f"serve it with `loopline serve --bento {tag}`, containerize it with `bentoml containerize {tag}`"
        ),
    )


@app.command("check-params")
def check_params(
    params: ParamsOption = Path("params.yaml"),
    show: Annotated[bool, typer.Option(help="Also print the file as loaded, with every default filled in.")] = False,
    reference: Annotated[
        bool, typer.Option(help="Print the configuration reference (every section and key) instead.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Validate a params file: one line when it is valid, the key and the rule when it is not."""
    if reference:
        from pipelines.core.reference import config_reference

        typer.echo(config_reference(), nl=False)
        return
    loaded = _params(params).model_dump(mode="json", by_alias=True)
    if as_json:
        typer.echo(json.dumps(loaded))
        return
    typer.echo(f"{params}: valid ({len(loaded)} sections, defaults filled in for the keys it leaves out)")
    if show:
        import yaml

        typer.echo(yaml.safe_dump(loaded, sort_keys=False), nl=False)


# --- servers --------------------------------------------------------------------------------


@app.command()
def serve(
    params: ParamsOption = Path("params.yaml"),
    host: HostOption = None,
    port: PortOption = None,
    bento: Annotated[
        str | None,
        typer.Option(
            help="Serve a Bento built by `loopline package` (its tag, e.g. bikeshare-demand:v1-3f0c9a1b2d) "
            "instead of the registry's champion."
        ),
    ] = None,
) -> None:
    """Serve the champion over HTTP with BentoML (POST /predict, /predict_batch; /docs)."""
    import os

    from pipelines.core.layout import Layout

    p = _params(params)
    env = {**os.environ, "LOOPLINE_PARAMS": str(params.resolve())}
    if bento is not None:  # the Bento's own working dir is not ours: log predictions here
        env["LOOPLINE_PREDICTION_LOG"] = str(Layout.of(p).prediction_log.resolve())
    env["LOOPLINE_SERVE_HOST"] = host or p.serve.host  # admin routes need a token beyond loopback
    where = ["--host", host or p.serve.host, "--port", str(port or p.serve.port)]
    _exec("bentoml", ["serve", bento or "serving.service:Predictor", *where], env)


def _mlflow_server(store: str, options: list[str], host: str, port: int) -> None:
    """Become `mlflow server` on `store`."""
    _exec("mlflow", ["server", "--backend-store-uri", store, *options, "--host", host, "--port", str(port)])


@app.command("mlflow-ui")
def mlflow_ui(params: ParamsOption = Path("params.yaml"), host: HostOption = None, port: PortOption = None) -> None:
    """The MLflow UI on this project's tracking store (mlflow server): runs, metrics, the registry."""
    from pipelines.registry.tracking import tracking_uri

    p = _params(params)
    artifacts = ["--default-artifact-root", str(Path(p.tracking.artifact_root).resolve()), "--workers", "1"]
    _mlflow_server(tracking_uri(p), artifacts, host or p.servers.mlflow.host, port or p.servers.mlflow.port)


app.command("ui", hidden=True, help="The MLflow UI (the older name of `mlflow-ui`).")(mlflow_ui)


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
    params: ParamsOption = Path("params.yaml"),
    host: HostOption = None,
    port: PortOption = None,
    workers: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    """The team's MLflow server: runs and registry in STORE, artifacts served by the server
    (clients need no access to ARTIFACTS). Point tracking.uri (or MLFLOW_TRACKING_URI) at
    http://HOST:PORT."""
    from pipelines.core.postgres import describe
    from pipelines.registry.tracking import check_backend_store

    p = _params(params)
    host, port = host or p.servers.mlflow.host, port or p.servers.mlflow.port
    store = check_backend_store(store)
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    typer.echo(f"MLflow server: store {describe(store)}, artifacts {artifacts}; tracking.uri: http://{host}:{port}")
    served = ["--serve-artifacts", "--artifacts-destination", artifacts, "--workers", str(workers)]
    _mlflow_server(store, served, host, port)


@app.command("prefect-server")
def prefect_server(
    params: ParamsOption = Path("params.yaml"),
    host: HostOption = None,
    port: PortOption = None,
    database: Annotated[
        str | None,
        typer.Option(help="PostgreSQL for the server's database (postgresql://host:5432/prefect); default SQLite."),
    ] = None,
    warm: Annotated[
        bool,
        typer.Option(help="Also keep a warm process that runs loopline commands with their libraries imported."),
    ] = True,
) -> None:
    """Keep a Prefect API (and its UI) up until Ctrl-C; loopline commands meanwhile use it
    instead of starting a temporary one each, and run in a warm process that has their
    libraries imported already (seconds saved per command; --no-warm: not that)."""
    import contextlib

    from flows.api import keep_server
    from loopline.warm import warm_process

    p = _params(params)
    with warm_process(typer.echo) if warm else contextlib.nullcontext():
        keep_server(host or p.servers.prefect.host, port or p.servers.prefect.port, echo=typer.echo, database=database)


@app.command()
def dashboard(
    params: ParamsOption = Path("params.yaml"),
    host: HostOption = None,
    port: PortOption = None,
    workspace: Annotated[
        Path | None, typer.Option(help="The Evidently workspace (default: monitor.workspace of the params).")
    ] = None,
) -> None:
    """Evidently's UI on the monitoring history (one project per model; `make replay` fills it with 2011)."""
    from pipelines.core.layout import Layout

    p = _params(params)
    host, port = host or p.servers.dashboard.host, port or p.servers.dashboard.port
    folder = (workspace or Layout.of(p).workspace).resolve()
    folder.mkdir(parents=True, exist_ok=True)  # an empty workspace: the UI says there are no projects yet
    typer.echo(f"Evidently UI on {folder}: http://{host}:{port}", err=True)
    _exec("evidently", ["ui", "--workspace", str(folder), "--host", host, "--port", str(port)])


# --- schedules ------------------------------------------------------------------------------


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


def main() -> None:
    import os

    from typer._click import exceptions as click  # typer >= 0.29 carries its own click

    from pipelines.core.errors import LooplineError

    # Set here, not only by the Makefile: a user running `loopline` from a shell gets no
    # usage reporting and no telemetry errors from the temporary Prefect API either.
    # MLflow's download bars and INFO lines (database migrations, artifact stores) are noise
    # between the lines a command prints; its warnings still show.
    for var, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("BENTOML_DO_NOT_TRACK", "true"),
        ("GIT_PYTHON_REFRESH", "quiet"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
        ("MLFLOW_LOGGING_LEVEL", "WARNING"),
    ):
        os.environ.setdefault(var, value)

    try:
        # Outside standalone mode typer *returns* the status of an Exit it met: 130 for a
        # Ctrl-C (it turns KeyboardInterrupt into Exit(130)). Commands return nothing else.
        status = app(standalone_mode=False)
    except LooplineError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        status = 130
    if status == 130:
        typer.echo("aborted", err=True)
    if isinstance(status, int) and status:
        sys.exit(status)


def exit_code() -> int:
    """main() as the `loopline` command runs it: its exit status (loopline.launch exits with
    it, here or in a warm process). An uncaught exception propagates, with its traceback."""
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = 0
    if isinstance(code, str):  # sys.exit("message"), as Python itself reports it
        print(code, file=sys.stderr)
    return code if isinstance(code, int) else (0 if code is None else 1)
