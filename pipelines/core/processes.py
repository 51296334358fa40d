"""Processes loopline starts: its tools' executables (`venv_bin`), servers started in a
process group of their own, a wait until one answers over HTTP, JSON posts, and a stop of the
whole group (BentoML and Prefect start worker processes). The CLI, the flows, `make run`'s
smoke step, the replay, the tests and the benches all go through these."""

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
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any


def die_with_parent() -> None:
    """For a child, before exec (`preexec_fn`): SIGTERM when the process that started it dies,
    however it dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """A command installed beside this interpreter (loopline, prefect, bentoml, mlflow, dvc,
    evidently, dask), else the one on PATH: the one way loopline finds its tools' executables."""
    import shutil

    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name) or name


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
