"""Scheduled deployments served by one long-running process (`loopline deploy`).

The training and monitoring deployments are registered with a Prefect API and their
scheduled and triggered runs are executed by this process. Schedules need the API's
scheduler service, which Prefect's temporary API (the one a flow starts when
PREFECT_API_URL is unset) does not run: without PREFECT_API_URL this process starts a local
`prefect server` of its own for as long as it serves, and stops it on exit.

Paths in the params file are relative to the directory the process runs in: start it from
the repository root.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.monitoring import monitoring_flow
from flows.training import training_flow
from pipelines.config import load_params
from pipelines.names import MONITORING_DEPLOYMENT, TRAINING_DEPLOYMENT
from serving.harness import free_port, venv_bin

STOP_TIMEOUT_S = 20


def build_deployments(params_path: str | Path = "params.yaml") -> list:
    params = load_params(params_path)
    path = str(Path(params_path).resolve())
    schedule = params.schedule
    training = training_flow.to_deployment(
        name=TRAINING_DEPLOYMENT,
        parameters={"params_path": path},
        schedule=Cron(schedule.training, timezone=schedule.timezone) if schedule.training else None,
        description="Data stages, candidate search and guarded promotion on the configured data.",
        tags=["loopline", "training"],
    )
    monitoring = monitoring_flow.to_deployment(
        name=MONITORING_DEPLOYMENT,
        parameters={"params_path": path, "trigger": "deployment"},
        schedule=Cron(schedule.monitoring, timezone=schedule.timezone) if schedule.monitoring else None,
        description="Accept landed batches, measure drift and live metrics, retrain through the "
        "training deployment when the monitor: policy says so.",
        tags=["loopline", "monitoring"],
    )
    return [training, monitoring]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when `loopline deploy` dies, however it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def prefect_api(echo: Callable[[str], None]) -> Iterator[str]:
    """PREFECT_API_URL when set; else a local `prefect server` (with its scheduler) started
    for the duration of the block, its database in PREFECT_HOME as Prefect's own."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # Its own session: a Ctrl-C or SIGTERM to this process group must not take the server down
    # before the runner has paused its schedules through it; it is stopped after the runner.
    server = subprocess.Popen(
        [venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                from pipelines.errors import LooplineError

                raise LooplineError(
                    "deploy",
                    f"the local Prefect server exited with {server.returncode}; "
                    f"start one yourself (`prefect server start`) and set PREFECT_API_URL",
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the local Prefect server on {url} did not answer within 120 s") from None
                time.sleep(0.5)
        echo(f"Prefect API: {url} (a local server for this process; UI at http://127.0.0.1:{port})")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def _serve_until_signalled(deployments: list, echo: Callable[[str], None]) -> None:
    """Serve until SIGINT or SIGTERM, then stop the runner and wait for it. Prefect's own
    `serve` handles SIGTERM by calling the runner's synchronous stop from inside its event
    loop (the stop coroutine is never awaited) and exiting mid-shutdown, which hung one stop
    in two; here the signals only set an event, and the stop is awaited with a time limit."""
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True)
    for deployment in deployments:
        await runner.add_deployment(deployment)  # type: ignore[misc]  # async inside a running loop
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    serving = asyncio.create_task(runner.start())
    while not runner.started and not serving.done():
        await asyncio.sleep(0.05)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after start(), which installs a handler of its own
        loop.add_signal_handler(sig, stop.set)
    echo(f"serving {', '.join(f'{d.flow_name}/{d.name}' for d in deployments)}; stop with Ctrl-C or SIGTERM")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        stopping.cancel()
        serving.result()  # the runner failed on its own: raise why
        return
    echo("stopping: pausing the schedules and cancelling runs in progress")
    try:
        await asyncio.wait_for(runner.astop(), STOP_TIMEOUT_S)
        await asyncio.wait_for(serving, STOP_TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError):
        echo(f"the runner did not stop within {STOP_TIMEOUT_S} s; exiting anyway")


def serve_deployments(params_path: str | Path = "params.yaml", echo: Callable[[str], None] = print) -> None:
    deployments = build_deployments(params_path)
    with prefect_api(echo):
        asyncio.run(_serve_until_signalled(deployments, echo))
