"""Package the champion, serve the Bento over HTTP, print one prediction, stop it.

    python -m serving.smoke [--params params.yaml]      (the end of `make run`)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipelines.config import load_params
from pipelines.stages import Layout, read_split
from serving.schema import request_records


def post(url: str, body: Any, timeout: float = 10, request_id: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | ({"X-Request-ID": request_id} if request_id else {})
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the Bento server exited with {proc.returncode}; see its output above")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise SystemExit(f"the Bento server did not become ready within {timeout:.0f}s")


@contextmanager
def serving(params_path: str | Path, extra_args: list[str] = (), log: IO | None = None) -> Iterator[str]:
    """`loopline serve` on a free loopback port until the block ends; yields its URL once
    it is ready. Stops the whole process group (BentoML starts worker processes)."""
    port = free_port()
    loopline = str(Path(sys.executable).with_name("loopline"))
    output = log or subprocess.DEVNULL
    proc = subprocess.Popen([loopline, "serve", "--params", str(params_path), *extra_args, "--port", str(port)],
                            stdout=output, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    from pipelines.errors import LooplineError

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # `make run` sets nothing for us

    try:
        smoke()
    except LooplineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def smoke() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    from serving.package import build_bento

    params = load_params(args.params)
    tag, _, version, built = build_bento(params)
    print(f"packaged {params.tracking.model_name} v{version} as Bento {tag}" + ("" if built else " (unchanged: reused)"))
    with serving(args.params, ["--bento", tag]) as url:
        record = request_records(read_split(params, "test", "smoke").head(1), params)[0]
        answer = post(f"{url}/predict", record)
    print(f"POST {url}/predict {json.dumps(record)}")
    print(f"-> {json.dumps(answer)}")
    print(f"prediction log: {Layout.of(params).prediction_log}")


if __name__ == "__main__":
    main()
