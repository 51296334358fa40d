"""Shared fixtures: params files pointed at temporary directories, and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIKESHARE = REPO / "pipelines" / "datasets" / "bikeshare_2011.csv"
WINE = REPO / "pipelines" / "datasets" / "wine.csv"

# Before anything imports prefect or mlflow: a private Prefect home (results, cache records,
# the temporary API's database) and no tracking URI from the caller's environment.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="loopline-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
# Prefect servers the tests start create scheduled runs within seconds, not once a minute.
os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"

from pipelines.core.processes import free_port, stop, venv_bin, wait_for_http  # noqa: E402,F401  (used by the tests)

# The modules `make test` hands to its workers first, longest first (seconds of one run on this
# 2-core machine, two workers): a long module taken last keeps one worker busy while the
# others have nothing left. Modules not named follow in collection order. The Makefile passes
# --no-loadscope-reorder, which keeps this order (xdist would order by test count).
LONGEST_FIRST = (
    "e2e/test_postgres.py",  # 238 s (2026-12-07, two workers; its first test waits for the Prefect server)
    "e2e/test_data_on_dask.py",  # 211
    "e2e/test_schedules.py",  # 178, most of it waiting for a cron minute
    "e2e/test_dask.py",  # 133
    "e2e/test_make_run.py",  # 113
    "e2e/test_dvc.py",  # 113
    "e2e/test_monitoring.py",  # 104
    "e2e/test_training_flow.py",  # 97
    "e2e/test_prefect_server.py",  # 97
    "e2e/test_browser.py",  # 93
    "e2e/test_team_security.py",  # 92
    "e2e/test_serving.py",  # 70
    "e2e/test_shadow.py",  # 66
    "unit/model/test_torch.py",  # 65
    "e2e/test_reproduce.py",  # 51
    "e2e/test_served_stream.py",  # 45
    "e2e/test_engines.py",  # 32
    "e2e/test_offline_metric.py",  # 32
    "unit/monitoring/test_decisions.py",  # 26
    "e2e/test_cli.py",  # 14
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Items of the LONGEST_FIRST modules first, in that order; the rest as collected."""
    rank = {str(REPO / "tests" / name): i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))


# A Bikeshare record the service accepts.
GOOD = {
    "temp": 0.5,
    "atemp": 0.48,
    "hum": 0.6,
    "windspeed": 0.2,
    "season": 1,
    "holiday": 0,
    "workingday": 1,
    "weathersit": "clear",
    "hr": 8,
    "mnth": "Jan",
    "weekday": 2,
}


def raw_params(name: str = "params.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def write_params(tmp: Path, source: Path | str, base: str = "params.yaml", **sections) -> Path:
    """A params file like `base`, reading `source` and writing below `tmp`; `sections`
    replace keys one level down, e.g. train={"model": "linear"}."""
    raw = raw_params(base)
    raw["data"]["source"] = str(source)
    raw["paths"] = {"data": str(tmp / "data"), "models": str(tmp / "models")}
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:  # a list section (alerts)
            raw[section] = values
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
    from loopline.cli import main

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


def loopline_process(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 600):
    """`loopline ARGS` as a process of its own, its output captured as text."""
    return subprocess.run(
        [venv_bin("loopline"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def no_tracking_uri_leaks():
    """A test that sets MLFLOW_TRACKING_URI (mlflow.set_tracking_uri does) would point every
    later test of its worker at its store: each test starts and ends without one."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def sample_csv(tmp_path: Path) -> Path:
    return bikeshare_sample(tmp_path)


@pytest.fixture
def params_of():
    """Load a params file written by write_params."""
    from pipelines.core.config import load_params

    return load_params


# The PostgreSQL server the PostgreSQL tests use, as a postgresql:// URL (trust authentication,
# CREATE DATABASE allowed); where none answers, they skip with this variable's name in the message.
POSTGRES = os.environ.get("LOOPLINE_TEST_POSTGRES", "postgresql://127.0.0.1:5432/postgres")


@pytest.fixture
def postgres_db():
    """The DSN of a new, empty PostgreSQL database, dropped afterwards."""
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL at {POSTGRES} (set LOOPLINE_TEST_POSTGRES to a server's DSN): {err}")
    name = f"loopline_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield urlunsplit(urlsplit(POSTGRES)._replace(path=f"/{name}"))
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real `loopline prefect-server` on a free loopback port in this worker's PREFECT_HOME,
    as a team member keeps one up: the flows the tests run here talk to its API, and the
    `loopline` commands they start with this PREFECT_HOME find it and its warm process (a
    command forked with its libraries imported, not a new interpreter importing them and a
    temporary API of its own: seconds of CPU each). The commands a test means to run cold, or
    on the temporary API as a new user's first one does, get a PREFECT_HOME of their own
    (`own_prefect_home`) or LOOPLINE_WARM=0."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    log = open(tmp_path_factory.mktemp("prefect") / "server.log", "w")  # noqa: SIM115  (closed after the session)
    proc = subprocess.Popen(
        [venv_bin("loopline"), "prefect-server", "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{url}/health", timeout=120, proc=proc)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        stop(proc)
        log.close()


@pytest.fixture(autouse=True)
def e2e_commands_find_the_prefect_server(request):
    """Every end-to-end test runs with this worker's `loopline prefect-server` up (started by
    the first that needs it): the `loopline` commands it starts run warm from the first test
    on, whichever order the tests come in."""
    if "e2e" in request.node.path.parts:
        request.getfixturevalue("prefect_api")


def own_prefect_home(env: dict[str, str], home: Path) -> dict[str, str]:
    """`env` for a command that must not find this worker's Prefect server or warm process:
    a Prefect home of its own (a new user's), no API configured."""
    env = {**env, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return env


def tracking_section(tmp: Path, model_name: str = "bikes") -> dict:
    """params `tracking:` for a private SQLite MLflow store below `tmp`."""
    return {
        "uri": f"sqlite:///{tmp}/mlflow.db",
        "artifact_root": str(tmp / "mlruns"),
        "experiment": "test-bikes",
        "model_name": model_name,
    }


def register_family(params, family: str, compiled: bool = True, hyperparams: dict | None = None) -> str:
    """Fit one model family on the prepared splits, log it to MLflow (with its ONNX form, as
    training logs it, unless `compiled` is False: a model logged before loopline compiled
    models) and register it (alias `challenger`); returns the new version. The splits must
    exist (run_all)."""
    from pipelines.data import split as split_module
    from pipelines.model import stages as model_stages
    from pipelines.model.onnx_engine import compile_model
    from pipelines.registry.champion import register
    from pipelines.registry.tracking import client_for, log_model

    chosen = {**params.train.hyperparams, family: hyperparams} if hyperparams is not None else params.train.hyperparams
    train = params.train.model_copy(update={"model": family, "hyperparams": chosen})
    params = params.model_copy(update={"train": train})
    model, meta = model_stages.fit_configured_model(params)
    client, experiment_id = client_for(params)
    run_id = client.create_run(experiment_id, run_name=family).info.run_id
    rows = split_module.read_split(params, "train")
    files, meta["onnx"] = compile_model(model, params, rows) if compiled else ({}, "logged without an ONNX form")
    uri = log_model(client, run_id, model, rows[params.features.columns].head(5), meta, files)
    client.set_terminated(run_id)
    return register(client, params.tracking.model_name, uri, run_id, {})


STORED_MODELS = REPO / "tests" / "fixtures" / "flat-layout-models"
STORED_FAMILIES = ("linear", "random_forest", "hist_gradient_boosting", "torch_mlp")


def register_stored(params, family: str) -> str:
    """Register one of the models logged by loopline's flat layout (tests/fixtures): its MLflow
    model directory, as it was written then, logged into a new run of this store (with its
    performance estimator where the fixture has one). Returns the new version."""
    from pipelines.registry.champion import register
    from pipelines.registry.tracking import client_for

    client, experiment_id = client_for(params)
    run_id = client.create_run(experiment_id, run_name=f"stored-{family}").info.run_id
    client.log_artifacts(run_id, str(STORED_MODELS / family / "model"), "model")
    if (STORED_MODELS / family / "reference").is_dir():
        client.log_artifacts(run_id, str(STORED_MODELS / family / "reference"), "reference")
    client.set_terminated(run_id)
    return register(client, params.tracking.model_name, f"runs:/{run_id}/model", run_id, {})


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GIT_PYTHON_REFRESH"] = "quiet"
    env.setdefault("GIT_AUTHOR_NAME", "loopline test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@loopline.invalid")
    env["GIT_COMMITTER_NAME"], env["GIT_COMMITTER_EMAIL"] = env["GIT_AUTHOR_NAME"], env["GIT_AUTHOR_EMAIL"]
    return env


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, env=git_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def copy_of_repo(root: Path, edit=lambda root: None) -> Path:
    """The repository's files as a fresh clone has them (mtimes kept), `edit`ed, committed
    in a new git repo at `root`."""
    import shutil

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    edit(root)
    sh("git", "init", "-q", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "clone", cwd=root)
    return root


def client_of(store: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(client, name="bikes") -> str | None:
    from pipelines.core.names import CHAMPION
    from pipelines.registry.champion import alias_version

    return alias_version(client, name, CHAMPION)


def start_service(args: list[str], tmp: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`loopline serve ARGS` on `port`, in `tmp`, its output in tmp/serve-PORT.log (`env`:
    variables to set beside this process's)."""
    log = open(tmp / f"serve-{port}.log", "w")  # noqa: SIM115  (the server writes it until stopped)
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
    return subprocess.Popen(
        [venv_bin("loopline"), "serve", *args, "--port", str(port)],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_until(condition, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Until `condition()` is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout:g} s: {condition}"
        time.sleep(interval)


def wait_for_version(client, version: str, timeout: float = 30) -> None:
    """Until the service (an httpx client) serves `version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.post("/model").json()["model_version"] == version:
            return
        time.sleep(0.3)
    raise TimeoutError(f"the service did not switch to v{version}")


def start_tracking_server(tmp: Path, store: str) -> tuple[subprocess.Popen, str]:
    """A real `loopline tracking-server` on `store`, its artifacts below `tmp`; its URL once
    it answers."""
    from pipelines.core.processes import start_server

    port = free_port()
    log = open(tmp / f"tracking-server-{port}.log", "w")  # noqa: SIM115  (the server writes it until stopped)
    proc = start_server(
        [venv_bin("loopline"), "tracking-server", "--store", store, "--artifacts", str(tmp / "served-artifacts")]
        + ["--port", str(port), "--workers", "1"],
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=120, proc=proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def start_dask_scheduler(folder: Path, log, *options: str) -> tuple[subprocess.Popen, str]:
    """A `dask scheduler` on a port of the system's choosing, and its address, read from the
    scheduler file it writes once it listens (a port picked beforehand can be taken by
    another process before the scheduler binds it: "Address already in use")."""
    import json

    from pipelines.core.processes import start_server

    info = folder / f"scheduler-{time.monotonic_ns()}.json"
    scheduler = start_server(
        [venv_bin("dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
        + ["--scheduler-file", str(info), *options],
        log=log,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            return scheduler, json.loads(info.read_text())["address"]
        except (OSError, ValueError, KeyError):  # not written yet, or not whole yet
            assert scheduler.poll() is None, f"dask scheduler exited with {scheduler.returncode}"
            assert time.monotonic() < deadline, "dask scheduler did not start in 120 s"
            time.sleep(0.1)


@pytest.fixture
def dask_cluster(tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on loopback: the scheduler's
    address, the worker processes and the workers' addresses."""
    from distributed import Client

    from pipelines.core.processes import start_server

    log = open(tmp_path / "dask.log", "w")  # noqa: SIM115  (the cluster writes it until stopped)
    scheduler, address = start_dask_scheduler(tmp_path, log)
    workers = [
        start_server(
            [venv_bin("dask"), "worker", address, "--nthreads", "1", "--name", f"worker-{i}", "--no-dashboard"]
            + ["--host", "127.0.0.1"],
            log=log,
        )
        for i in range(2)
    ]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            names = {info["name"]: addr for addr, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        yield address, workers, [names[f"worker-{i}"] for i in range(2)]
    finally:
        for proc in [*workers, scheduler]:
            stop(proc)
        log.close()


def monitoring_retrains_through_the_training_deployment(tmp: Path) -> None:
    """A drifted batch, a monitoring run started by hand: it decides to retrain and starts the
    training deployment, which whatever runs the deployments (`loopline deploy`, a work
    pool's worker) runs, and which registers v2."""
    import pandas as pd
    from prefect.deployments import run_deployment

    july = pd.read_csv(BIKESHARE).query("mnth == 'July'").head(400)
    (tmp / "data" / "landing").mkdir(parents=True, exist_ok=True)
    july.assign(request_id=[f"july-{i}" for i in range(len(july))]).to_csv(
        tmp / "data" / "landing" / "july.csv", index=False
    )
    run = run_deployment("monitoring/scheduled-monitoring", timeout=300)
    assert run.state.is_completed(), run.state
    deadline = time.monotonic() + 240
    while len(client_of(tmp).search_model_versions("name='bikes'")) < 2:
        assert time.monotonic() < deadline, "the retrain started by monitoring never registered a version"
        time.sleep(2)
    client = client_of(tmp)
    [monitoring] = client.search_runs([client.get_experiment_by_name("test-bikes-monitoring").experiment_id])
    assert monitoring.data.tags["loopline.decision"] == "retrain"
    assert monitoring.data.tags["loopline.training_outcome"] == "started"


class AlertReceiver:
    """A real HTTP endpoint on loopback that keeps every JSON body posted to it: Apprise's
    json:// target delivers here."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.received)

    def titles(self) -> list[str]:
        return [m["title"] for m in self.received]


@pytest.fixture
def alert_receiver():
    receiver = AlertReceiver()
    yield receiver
    receiver.server.shutdown()


def hears_ctrl_c() -> None:
    """preexec_fn for a child a test interrupts with SIGINT: Ctrl-C at its default, as from a
    terminal. A shell starts a background job (`make test &`) with SIGINT ignored, every
    process below inherits that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
