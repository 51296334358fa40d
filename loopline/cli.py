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
    from pipelines.registry.card import build_card, save_card
    from pipelines.registry.champion import require_version
    from pipelines.registry.tracking import registry_client

    p = _params(params)
    client = registry_client(p)
    require_version(client, p.tracking.model_name, version, "card", p.tracking.uri)
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
    from pipelines.core.config import shown

    loaded = shown(_params(params))
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


def _mlflow_server(store: str, options: list[str], host: str, port: int, env: dict[str, str] | None = None) -> None:
    """Become `mlflow server` on `store`. Without MLflow's job execution unless the caller's
    environment asks for it (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true): MLflow 3 starts a job
    runner and seven Huey consumers beside the server for its GenAI jobs (trace rollups,
    scorers, prompt optimisation), which loopline never submits: eight more Python processes,
    22 s more CPU at each start here (31 s against 9 s) and their memory while it runs."""
    import os

    env = dict(os.environ if env is None else env)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    _exec("mlflow", ["server", "--backend-store-uri", store, *options, "--host", host, "--port", str(port)], env)


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
    auth: Annotated[
        bool,
        typer.Option(
            help="Let in only MLflow users (MLflow's basic-auth app): the first start creates the admin from "
            "$MLFLOW_AUTH_ADMIN_PASSWORD; `loopline users add` makes readers and writers."
        ),
    ] = False,
    auth_db: Annotated[
        str | None,
        typer.Option(help="Where the users live (default: sqlite:///mlflow-auth.db beside a local ARTIFACTS folder)."),
    ] = None,
    open_: Annotated[
        bool,
        typer.Option(
            "--open", help="Listen beyond loopback without --auth: anyone who reaches the port may change the registry."
        ),
    ] = False,
) -> None:
    """The team's MLflow server: runs and registry in STORE, artifacts served by the server
    (clients need no access to ARTIFACTS). Point tracking.uri (or MLFLOW_TRACKING_URI) at
    http://HOST:PORT; with --auth, clients set MLFLOW_TRACKING_USERNAME / _PASSWORD."""
    import os

    from pipelines.core.errors import LooplineError
    from pipelines.core.postgres import describe
    from pipelines.registry.tracking import check_backend_store

    p = _params(params)
    host, port = host or p.servers.mlflow.host, port or p.servers.mlflow.port
    _refuse_open_beyond_loopback("tracking-server", host, auth or open_, "--auth (or --open to let anyone in)")
    store = check_backend_store(store)
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    served = ["--serve-artifacts", "--artifacts-destination", artifacts, "--workers", str(workers)]
    env = None
    if auth:
        from pipelines.registry.access import auth_config

        if auth_db is None and "://" in artifacts:
            raise LooplineError(
                "tracking-server --auth", f"artifacts {artifacts} is not a local folder: give --auth-db"
            )
        admin_password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        if admin_password is not None and len(admin_password) < 12:  # MLflow's rule, met before it starts
            raise LooplineError(
                "tracking-server --auth", "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than the 12 characters MLflow requires"
            )
        auth_db = auth_db or f"sqlite:///{Path(artifacts).parent / 'mlflow-auth.db'}"
        config = auth_config(
            Path(artifacts).parent / ".mlflow-auth" if "://" not in artifacts else Path(".mlflow-auth"), auth_db
        )
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config)}
        if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):  # CSRF tokens of the UI's forms: one per start, unless given
            import secrets

            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
        served = ["--app-name", "basic-auth", *served]
    typer.echo(
        f"MLflow server: store {describe(store)}, artifacts {artifacts}; tracking.uri: http://{host}:{port}; "
        + (
            f"users in {describe(auth_db or '')} (clients: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            if auth
            else "no sign-in"
        )
    )
    _mlflow_server(store, served, host, port, env)


def _refuse_open_beyond_loopback(command: str, host: str, secured: bool, remedy: str) -> None:
    """A team server on an address beyond this machine must let in only who belongs."""
    from pipelines.core.errors import LooplineError

    if host not in ("127.0.0.1", "localhost", "::1") and not secured:
        raise LooplineError(
            command,
            f"it would listen on {host}, beyond this machine, letting anyone who reaches the port in: {remedy}",
        )


@app.command()
def users(
    action: Annotated[str, typer.Argument(metavar="add", help="add (the one action).")],
    name: Annotated[str, typer.Argument(help="The user's name.")],
    role: Annotated[
        str, typer.Option(help="reader (browses, changes nothing) or writer (trains, registers, promotes).")
    ] = "reader",
    password_file: Annotated[
        Path | None, typer.Option(help="A file holding the new user's password (default: read from standard input).")
    ] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Add a user to the team's MLflow server (tracking-server --auth), as its admin
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
    from pipelines.core.errors import LooplineError
    from pipelines.registry.access import add_user

    if action != "add":
        raise typer.BadParameter(f"the action is add, not {action!r}")
    p = _params(params)
    try:
        password = password_file.read_text(encoding="utf-8").strip() if password_file else sys.stdin.readline().strip()
    except OSError as err:
        raise LooplineError("users", f"--password-file {password_file}: {err.strerror}") from None
    typer.echo(add_user(p, name, password, role))


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
    open_: Annotated[
        bool,
        typer.Option(
            "--open", help="Listen beyond loopback without an auth string: anyone who reaches the port may run flows."
        ),
    ] = False,
) -> None:
    """Keep a Prefect API (and its UI) up until Ctrl-C; loopline commands meanwhile use it
    instead of starting a temporary one each, and run in a warm process that has their
    libraries imported already (seconds saved per command; --no-warm: not that)."""
    import contextlib
    import os

    from flows.api import keep_server
    from loopline.warm import warm_process

    p = _params(params)
    host = host or p.servers.prefect.host
    secured = bool(os.environ.get("PREFECT_SERVER_API_AUTH_STRING"))
    _refuse_open_beyond_loopback(
        "prefect-server", host, secured or open_, "set PREFECT_SERVER_API_AUTH_STRING=user:password (or --open)"
    )
    with warm_process(typer.echo) if warm else contextlib.nullcontext():
        keep_server(host, port or p.servers.prefect.port, echo=typer.echo, database=database, secured=secured)


@app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="Where to write ca.pem, cert.pem and key.pem.")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="A name or address the scheduler is reached by (repeatable).")
    ] = None,
    port: Annotated[int, typer.Option(help="The scheduler's port, for the commands printed.")] = 8786,
) -> None:
    """Certificates for a Dask cluster with TLS: a certificate authority and one certificate for
    the scheduler, the workers and loopline; prints the commands and the params to use them."""
    from pipelines.core.cluster import make_certificates

    hosts = host or ["127.0.0.1", "localhost"]
    paths = make_certificates(folder.resolve(), hosts)
    tls = f"--tls-ca-file {paths['ca']} --tls-cert {paths['cert']} --tls-key {paths['key']}"
    typer.echo(
        f"wrote {paths['ca']}, {paths['cert']}, {paths['key']} (the key readable by you only; copy it to each "
        "machine of the cluster by a safe way)\n"
        f"dask scheduler --protocol tls --port {port} {tls}\n"
        f"dask worker tls://{hosts[0]}:{port} {tls}\n"
        f"params.yaml, execution.dask: {{address: tls://{hosts[0]}:{port}, tls_ca_file: {paths['ca']}, "
        f"tls_cert_file: {paths['cert']}, tls_key_file: {paths['key']}}}"
    )


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
    except Exception as err:
        from pipelines.registry.access import refusal

        refused = refusal(err, sys.argv[1] if len(sys.argv) > 1 else "loopline")
        if refused is None:
            raise
        typer.echo(f"error: {refused}", err=True)
        sys.exit(2)
    if status == 130:
        typer.echo("aborted", err=True)
    if isinstance(status, int) and status:
        sys.exit(status)


def exit_code() -> int:
    """main() as the `loopline` command runs it: its exit status (loopline.launch exits with
    it, here or in a warm process). An uncaught exception propagates, with its traceback."""
    sys.unraisablehook = _LostInterrupts().hook
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = 0
    if isinstance(code, str):  # sys.exit("message"), as Python itself reports it
        print(code, file=sys.stderr)
    return code if isinstance(code, int) else (0 if code is None else 1)


class _LostInterrupts:
    """Ctrl-C's KeyboardInterrupt raised inside a finaliser (`__del__`, a weakref or garbage
    collection callback: wherever the main thread was when the signal came) is dropped by
    Python with an "Exception ignored" message, and the command would run on to its end.
    `hook` (sys.unraisablehook) sees it dropped and a waiting thread raises it again in the
    main thread a moment later, outside the finaliser and the hook (raised from the hook, or
    from a thread it starts, it lands in the hook and is dropped too); anything else is
    reported as usual."""

    def __init__(self) -> None:
        import threading

        self.lost = threading.Event()
        threading.Thread(target=self._again, name="ctrl-c again", daemon=True).start()

    def _again(self) -> None:
        import _thread
        import time

        while True:
            self.lost.wait()
            self.lost.clear()
            time.sleep(0.02)
            _thread.interrupt_main()

    def hook(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.lost.set()
            return
        sys.__unraisablehook__(unraisable)
