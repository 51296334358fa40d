"""Which Prefect API a command talks to, and `loopline prefect-server`, which keeps one up.

A flow run with no API configured starts Prefect's temporary API inside its process, which
costs seconds per command (≈ 6 s for an empty flow here). `loopline prefect-server` runs
`prefect server start` (database and UI in PREFECT_HOME, as Prefect's own) and, while it
answers, records its address in PREFECT_HOME/loopline-api.json; a later loopline command
that finds no configured API (PREFECT_API_URL, from the environment or the Prefect profile)
uses it. A stale record (the server was killed) is ignored: the command falls back to the
temporary API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from pipelines.core.errors import LooplineError
from pipelines.core.processes import die_with_parent, stop, venv_bin, wait_for_http

RECORD = "loopline-api.json"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20


def record_path() -> Path:
    return Path(get_current_settings().home).expanduser() / RECORD


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError):
        return False


def running_api() -> str | None:
    """The address `loopline prefect-server` recorded, if the server there answers."""
    try:
        url = json.loads(record_path().read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if answers(url) else None


@contextmanager
def command_api(echo: Callable[[str], None], warm: tuple[str, ...] = ()) -> Iterator[str | None]:
    """For one command: the configured API; else the running `loopline prefect-server`,
    for this process and those it starts; else None, and the flows use Prefect's temporary
    API. That one is started here, while this process imports `warm` (the modules the
    command's flows will import anyway): its ≈ 9 s start-up runs beside the imports."""
    configured = get_current_settings().api.url
    if configured:
        yield configured
        return
    url = running_api()
    if url is None:
        start_temporary_api_while(lambda: _import_all(warm))
        yield None
        return
    echo(f"Prefect API: {url} (loopline prefect-server)")
    os.environ["PREFECT_API_URL"] = url  # for the service and processes the command starts
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def start_temporary_api_while(work: Callable[[], None]) -> None:
    """Start Prefect's temporary API (the one a flow run with no API starts for itself) in a
    thread while `work` runs here; back once both are done. If it fails to start, the first
    flow starts it again and fails there, with Prefect's own message. The API's process dies
    with this one however this one ends (a SIGKILL, the OOM killer: no atexit runs then)."""
    import threading

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        work()
        return
    # What the start may import that is not loaded yet are leaf modules (httpx's host-name
    # codec, rich's emoji table for the log line), which two threads cannot deadlock on; the
    # codec is imported here first all the same.
    import encodings.idna  # noqa: F401

    started = threading.Event()

    def start() -> None:
        server = _temporary_api_class()()
        try:
            server.start()
        except Exception:  # said again by the flow's own start, where it is raised
            if not _came_up(server):
                server.stop()  # what did not answer is not left to hold the port
        finally:
            started.set()
        # Linux signals a child whose parent *thread* ends (PR_SET_PDEATHSIG): this thread
        # started the API, so it lives as long as the process.
        threading.Event().wait()

    threading.Thread(target=start, name="prefect-temporary-api", daemon=True).start()
    try:
        work()
    finally:
        started.wait()


def _came_up(server) -> bool:
    """Whether a temporary API that Prefect gave up on (after
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, 20 s: a loaded machine took longer)
    answers within START_TIMEOUT_S after all; then it is the API, as if its start had
    waited. Prefect leaves the process starting, and the flow's own start would run a second
    one on the same port ("address already in use", a traceback in the command's output)."""
    if server.server_process is None:
        return False
    try:
        wait_for_http(f"{server.api_url}/health", timeout=START_TIMEOUT_S, proc=server.server_process)
    except (RuntimeError, TimeoutError):  # it exited, or never answered
        return False
    server.running = True  # what Prefect's start sets once the API answers
    return True


def _temporary_api_class():
    """Prefect's SubprocessASGIServer, its uvicorn process started with die_with_parent. The
    instance is Prefect's one for the default port, so the flows' own start finds it running."""
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class DiesWithUs(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3's own command (prefect/server/api/server.py), plus preexec_fn
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
                + ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1"]
                + ["--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                preexec_fn=die_with_parent,
            )

    return DiesWithUs


def _import_all(modules: tuple[str, ...]) -> None:
    import importlib

    for module in modules:
        importlib.import_module(module)


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def server_database(url: str) -> str:
    """A PostgreSQL URL as Prefect's server takes it (asyncpg), once the database answers."""
    from pipelines.core.postgres import connect, is_postgres, with_driver

    if not is_postgres(url):
        raise LooplineError("prefect-server --database", f"{url!r} is not a PostgreSQL URL (postgresql://host/db)")
    connect(url, "prefect-server --database").close()
    return with_driver(url, "asyncpg")


@contextmanager
def prefect_server(host: str, port: int, command: str, database: str | None = None) -> Iterator[subprocess.Popen]:
    """A `prefect server start` (API, UI and scheduler) at api_url(host, port) for the
    duration of the block, in its own session: a Ctrl-C to the caller's process group
    reaches the caller, which stops its own work first and the server last. Its database:
    `database` (PostgreSQL, for a team) or SQLite in PREFECT_HOME."""
    url = api_url(host, port)
    env = dict(os.environ)
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = server_database(database)
    server = subprocess.Popen(
        [venv_bin("prefect"), "server", "start", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
        env=env,
    )
    try:
        try:
            wait_for_http(f"{url}/health", timeout=START_TIMEOUT_S, proc=server)
        except (RuntimeError, TimeoutError) as err:
            raise LooplineError(
                command,
                f"the Prefect server on {host}:{port} did not start: {err} (is the port taken?); "
                "start one yourself (`prefect server start`) and set PREFECT_API_URL",
            ) from None
        yield server
    finally:
        stop(server, timeout=STOP_TIMEOUT_S)  # its whole group: `prefect server start` runs uvicorn as a child


def keep_server(
    host: str, port: int, echo: Callable[[str], None], database: str | None = None, secured: bool = False
) -> None:
    """`loopline prefect-server`: serve the API until Ctrl-C or SIGTERM, recorded for the
    loopline commands that run meanwhile."""
    from pipelines.core.postgres import describe
    from pipelines.core.storage import write_text

    existing = running_api()
    if existing:
        raise LooplineError("prefect-server", f"loopline's Prefect server already runs at {existing}")
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    record = record_path()
    try:
        with prefect_server(host, port, "prefect-server", database) as server:
            url = api_url(host, port)
            write_text(json.dumps({"url": url, "pid": os.getpid()}), record)
            echo(
                f"Prefect API: {url}; UI at http://{host}:{port}; database: "
                f"{describe(database) if database else 'SQLite in PREFECT_HOME'}\n"
                f"loopline commands with no PREFECT_API_URL use it while it runs ({record}); stop with Ctrl-C\n"
                + (
                    "sign-in: the auth string of PREFECT_SERVER_API_AUTH_STRING; clients and workers set "
                    "PREFECT_API_AUTH_STRING (the events websocket is not covered: keep it behind a proxy)"
                    if secured
                    else "no sign-in (PREFECT_SERVER_API_AUTH_STRING sets one)"
                )
            )
            while not stopping and server.poll() is None:
                time.sleep(0.2)
            if not stopping:
                raise LooplineError("prefect-server", f"the Prefect server exited with {server.returncode}")
            echo("stopping the Prefect server")
    finally:
        try:
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()
        except (OSError, ValueError):
            pass
        for sig, handler in previous.items():
            signal.signal(sig, handler)
