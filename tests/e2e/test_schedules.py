"""Schedules that fire. `loopline deploy` serves the training deployment on a cron of every
minute, against a real `prefect server` and against the local server it starts by itself
when PREFECT_API_URL is unset; in both, a run created by the server's scheduler (not
triggered by hand) must appear and complete. This is the guard against the next
incompatible pin: prefect 3.8 with SQLAlchemy 2.1 created no scheduled run at all. On the
real server, a monitoring run then retrains through the training deployment. Last, each
`loopline deploy` must stop within seconds on SIGTERM / SIGINT to its group, cancelling a
run in progress without a traceback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    REPO,
    bikeshare_sample,
    monitoring_retrains_through_the_training_deployment,
    own_prefect_home,
    tracking_section,
    venv_bin,
    write_params,
)
from flows.deploy import STOP_TIMEOUT_S

pytestmark = pytest.mark.slow

EVERY_MINUTE = {"training": "* * * * *", "monitoring": None, "timezone": "UTC"}
NEVER_IN_A_TEST = "30 4 29 2 *"


def slow_training_params(tmp: Path) -> Path:
    """The deployment's params with a search that runs for a minute or more: a training
    stopped while it searches is cancelled, whatever the machine's speed."""
    raw = yaml.safe_load((tmp / "params.yaml").read_text())
    raw["search"] = {"families": ["random_forest"], "n_trials": 0}
    raw["train"]["hyperparams"]["random_forest"] = {"n_estimators": 5000, "n_jobs": 1}
    path = tmp / "slow-params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def deploy(tmp: Path, api_url: str | None, schedule: dict = EVERY_MINUTE) -> tuple[subprocess.Popen, Path]:
    params = write_params(
        tmp,
        bikeshare_sample(tmp, 1000),
        search={"families": ["linear"], "n_trials": 0},
        tracking=tracking_section(tmp),
        schedule=schedule,
    )
    env = own_prefect_home(dict(os.environ), tmp / "prefect-home")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    log = tmp / "deploy.log"
    proc = subprocess.Popen(
        [venv_bin("loopline"), "deploy", "--params", str(params)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, log


def api_url_of(proc: subprocess.Popen, log: Path) -> str:
    """The URL of the local server `loopline deploy` started (it prints it)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        found = re.search(r"Prefect API: (http://\S+/api)", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.5)
    raise TimeoutError(log.read_text()[-3000:])


async def scheduled_runs(api_url: str) -> list:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async with PrefectClient(api=api_url) as client:
        try:
            await client.read_deployment_by_name("training/scheduled-training")
        except Exception:
            return []
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled-training"]))
        )
        return [r for r in runs if r.auto_scheduled]


def wait_for_completed_scheduled_run(api_url: str, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"loopline deploy exited:\n{log.read_text()[-3000:]}"
        runs = asyncio.run(scheduled_runs(api_url))
        done = [r for r in runs if r.state is not None and r.state.is_completed()]
        if done:
            return done[0]
        failed = [r for r in runs if r.state is not None and r.state.is_final()]
        assert not failed, f"a scheduled run ended {failed[0].state}:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    raise TimeoutError(f"no scheduled run completed within {timeout:.0f}s on {api_url}:\n{log.read_text()[-3000:]}")


def stop_within(signals: list[tuple[subprocess.Popen, int]], seconds: float) -> list[float]:
    """Each process's group sent its signal at once; how long each took to exit. One that is
    still there after `seconds` is killed (every one is waited for) and the test fails."""
    started = time.monotonic()
    for proc, sig in signals:
        os.killpg(proc.pid, sig)
    took: list[float] = []
    late: list[str] = []
    for proc, sig in signals:
        try:
            proc.wait(timeout=max(0.0, started + seconds - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            late.append(signal.Signals(sig).name)
        took.append(time.monotonic() - started)
    assert not late, f"loopline deploy did not stop within {seconds}s of {' and '.join(late)}"
    return took


async def read_flow_run(api_url: str, flow_run_id):
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        return await client.read_flow_run(flow_run_id)


def pause_training_schedules(api_urls: list[str]) -> None:
    """No more scheduled trainings on these APIs (each one a training process, every minute,
    for as long as the test runs); runs started by hand still run. And none starting when the
    deploys are stopped: a run whose process is starting when the stop comes is killed by the
    signal (Crashed, with its traceback) rather than cancelled, which is Prefect's engine and
    not what this checks."""
    # Pausing deletes the schedule's future runs. A runner fetches runs up to 10 s before
    # their time (PREFECT_RUNNER_PREFETCH_SECONDS): one it fetched for the next minute and
    # then lost to the pause fails to start with a 404 traceback in its log. Pause mid-minute,
    # away from the cron's ticks, every API in the same window.
    while not 15 <= time.time() % 60 <= 35:
        time.sleep(0.5)
    for api_url in api_urls:
        asyncio.run(pause_training_schedule(api_url))


def training_runs_in_progress(api_urls: list[str], slow_params: Path, timeout: float = 180) -> list:
    """A training run started by hand on each API, on `slow_params` (a search that takes a
    while), and now inside its candidate search: their ids."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ids = []
    for api_url in api_urls:  # started together: they search side by side
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            ids.append(
                run_deployment(
                    "training/scheduled-training",
                    timeout=0,
                    parameters={"force": True, "params_path": str(slow_params)},
                ).id
            )
    deadline = time.monotonic() + timeout
    for api_url, run_id in zip(api_urls, ids, strict=True):
        while not asyncio.run(task_running(api_url, run_id, "search-candidates")):
            state = asyncio.run(read_flow_run(api_url, run_id)).state
            assert state is None or not state.is_final(), f"the training ended before its search: {state}"
            assert time.monotonic() < deadline, f"the training did not reach its search within {timeout:.0f}s"
            time.sleep(0.2)
    return ids


async def task_running(api_url: str, flow_run_id, task: str) -> bool:
    """Whether the flow run's task `task` is running now."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with PrefectClient(api=api_url) as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return any(r.name.startswith(task) and r.state is not None and r.state.is_running() for r in runs)


async def pause_training_schedule(api_url: str) -> None:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api=api_url) as client:
        deployment = await client.read_deployment_by_name("training/scheduled-training")
        await client.pause_deployment(deployment.id)


async def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def test_scheduled_runs_fire_and_deploy_stops_cleanly(prefect_api, tmp_path):
    own_dir, local_dir = tmp_path / "server", tmp_path / "local"
    own_dir.mkdir(), local_dir.mkdir()
    # The monitoring cron is read back below; it must not fire while the test runs (a scheduled
    # monitoring run would be a second one where the test counts one): 04:30 on 29 February.
    on_server, server_log = deploy(own_dir, prefect_api, {**EVERY_MINUTE, "monitoring": NEVER_IN_A_TEST})
    on_local, local_log = deploy(local_dir, None)
    try:
        local_api = api_url_of(on_local, local_log)
        assert local_api != prefect_api
        for api, proc, log in ((prefect_api, on_server, server_log), (local_api, on_local, local_log)):
            run = wait_for_completed_scheduled_run(api, proc, log)
            assert run.auto_scheduled and run.state.is_completed()
            assert run.expected_start_time.second == 0  # made for a minute boundary by the cron
        pause_training_schedules([prefect_api, local_api])
        training = asyncio.run(read_deployment("training/scheduled-training"))
        monitoring = asyncio.run(read_deployment("monitoring/scheduled-monitoring"))
        assert [s.schedule.cron for s in training.schedules] == ["* * * * *"]
        assert [s.schedule.cron for s in monitoring.schedules] == [NEVER_IN_A_TEST]
        assert training.parameters["params_path"] == str(own_dir / "params.yaml")
        assert monitoring.parameters == {"params_path": str(own_dir / "params.yaml"), "trigger": "deployment"}
        monitoring_retrains_through_the_training_deployment(own_dir)
        slow = slow_training_params(own_dir)
        in_progress = training_runs_in_progress([prefect_api, local_api], slow)  # both stopped below while they run
    finally:
        # The deploy bounds its stop at two STOP_TIMEOUT_S phases (runner, then its task); on a
        # loaded two-core machine cancelling a training in progress once took more than 15 s.
        limit = 2 * STOP_TIMEOUT_S + 5
        stopped = stop_within([(on_server, signal.SIGTERM), (on_local, signal.SIGINT)], limit)
    assert on_server.returncode == 0 and on_local.returncode == 0, (
        server_log.read_text()[-2000:],
        local_log.read_text()[-2000:],
    )
    logs = server_log.read_text() + local_log.read_text()
    at = logs.find("Traceback")
    assert at < 0, logs[max(0, at - 1500) : at + 3000]
    final = asyncio.run(read_flow_run(prefect_api, in_progress[0]))  # the local API stopped with its deploy
    # cancelled by the runner, never crashed by the signal
    assert final.state is not None and final.state.is_cancelled(), final.state
    print(f"loopline deploy stopped in {stopped[0]:.1f}s (SIGTERM) and {stopped[1]:.1f}s (SIGINT)")
    from urllib.request import urlopen

    with pytest.raises(OSError):  # the local server went with it
        urlopen(f"{local_api}/health", timeout=2)
