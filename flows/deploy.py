"""Scheduled deployments served by one long-running process (`loopline deploy`).

The training and monitoring deployments are registered with a Prefect API and their
scheduled and triggered runs are executed by this process. Schedules need the API's
scheduler service, which Prefect's temporary API (the one a flow starts when
PREFECT_API_URL is unset) does not run: with no API configured and no `loopline
prefect-server` running, this process starts a local `prefect server` of its own for as long
as it serves, and stops it on exit.

Paths in the params file are relative to the directory the process runs in: start it from
the repository root.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.api import STOP_TIMEOUT_S, api_url, command_api, prefect_server
from flows.monitoring import monitoring_flow
from flows.training import training_flow
from pipelines.core.config import load_params
from pipelines.core.errors import LooplineError
from pipelines.core.names import MONITORING_DEPLOYMENT, TRAINING_DEPLOYMENT
from pipelines.core.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"training": "flows/training.py:training_flow", "monitoring": "flows/monitoring.py:monitoring_flow"}


def _deployment_specs(params_path: str | Path) -> list[tuple[Any, str, dict[str, Any]]]:
    """Each deployment: its flow, the flow's entrypoint in the repository, and its settings."""
    params = load_params(params_path)
    path = str(Path(params_path).resolve())
    schedule = params.schedule
    return [
        (
            training_flow,
            ENTRYPOINTS["training"],
            {
                "name": TRAINING_DEPLOYMENT,
                "parameters": {"params_path": path},
                "schedule": Cron(schedule.training, timezone=schedule.timezone) if schedule.training else None,
                "description": "Data stages, candidate search and guarded promotion on the configured data.",
                "tags": ["loopline", "training"],
            },
        ),
        (
            monitoring_flow,
            ENTRYPOINTS["monitoring"],
            {
                "name": MONITORING_DEPLOYMENT,
                "parameters": {"params_path": path, "trigger": "deployment"},
                "schedule": Cron(schedule.monitoring, timezone=schedule.timezone) if schedule.monitoring else None,
                "description": "Accept landed batches, measure drift and live metrics, retrain through the "
                "training deployment when the monitor: policy says so.",
                "tags": ["loopline", "monitoring"],
            },
        ),
    ]


def build_deployments(params_path: str | Path = "params.yaml") -> list:
    return [flow.to_deployment(**spec) for flow, _, spec in _deployment_specs(params_path)]


def deploy_to_pool(params_path: str | Path, pool: str, echo: Callable[[str], None] = print) -> None:
    """Register the deployments on a process work pool (created if missing) of the configured
    Prefect server, their code read from this checkout: `prefect worker start --pool POOL`
    on a machine with the checkout at the same path runs them."""
    specs = _deployment_specs(params_path)
    with command_api(echo) as url:
        if url is None:
            raise LooplineError(
                "deploy",
                f"--work-pool {pool} needs a Prefect server that workers reach: set PREFECT_API_URL "
                "or start `loopline prefect-server`",
            )
        kind = asyncio.run(_ensure_pool(pool))
        if kind != "process":
            raise LooplineError("deploy", f"work pool {pool!r} is of type {kind!r}; loopline deploys to a process pool")
        for flow, entrypoint, spec in specs:
            flow.from_source(str(REPO_ROOT), entrypoint).deploy(
                work_pool_name=pool, build=False, push=False, print_next_steps=False, **spec
            )
        registered = ", ".join(f"{flow.name}/{spec['name']}" for flow, _, spec in specs)
        echo(
            f"registered {registered} on work pool {pool} "
            f"at {url}; run them with `prefect worker start --pool {pool}` (PREFECT_API_URL={url}) on a machine "
            f"holding this checkout at {REPO_ROOT}"
        )


async def _ensure_pool(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return (await client.read_work_pool(name)).type
        except ObjectNotFound:
            return (await client.create_work_pool(WorkPoolCreate(name=name, type="process"))).type


@contextmanager
def prefect_api(echo: Callable[[str], None]) -> Iterator[str]:
    """The configured API, or the running `loopline prefect-server`; else a local `prefect
    server` (with its scheduler) started for the duration of the block, its database in
    PREFECT_HOME as Prefect's own."""
    with command_api(echo) as url:
        if url is not None:
            yield url
            return
    port = free_port()
    with prefect_server("127.0.0.1", port, "deploy"):
        url = api_url("127.0.0.1", port)
        echo(f"Prefect API: {url} (a local server for this process; UI at http://127.0.0.1:{port})")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url


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
