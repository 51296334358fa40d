"""The development harness around a served model: a free loopback port, `loopline serve`
started in its own process group, a wait until it is ready, JSON posts, and a stop of the
whole group (BentoML starts worker processes). `make run`'s smoke step, the replay, the
tests and the benches all start and stop servers through it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (loopline, prefect, bentoml)."""
    return str(Path(sys.executable).with_name(name))


def post(url: str, body: Any, timeout: float = 10, request_id: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | ({"X-Request-ID": request_id} if request_id else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for_http(url: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers with a status below 500; fails at once if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started in its own session, with everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_server(args: Sequence[str], log: IO | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server process in its own session (so `stop` reaches its whole group)."""
    output = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        list(args),
        stdout=output,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
    )


@contextmanager
def serving(
    params_path: str | Path,
    extra_args: Sequence[str] = (),
    log: IO | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[str]:
    """`loopline serve` on a free loopback port until the block ends; yields its URL once
    /readyz answers."""
    port = free_port()
    proc = start_server(
        [venv_bin("loopline"), "serve", "--params", str(params_path), *extra_args, "--port", str(port)],
        log=log,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", timeout=timeout, proc=proc)
        yield url
    finally:
        stop(proc)
