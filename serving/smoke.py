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
from pathlib import Path

from pipelines.config import load_params
from pipelines.stages import Layout, read_split
from serving.schema import request_records


def post(url: str, body: dict, timeout: float = 10) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    from serving.package import build_bento

    params = load_params(args.params)
    tag, model_tag, version = build_bento(params)
    print(f"packaged {params.tracking.model_name} v{version} as Bento {tag} (model {model_tag})")
    port = free_port()
    loopline = str(Path(sys.executable).with_name("loopline"))
    proc = subprocess.Popen([loopline, "serve", "--params", args.params, "--bento", tag, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        record = request_records(read_split(params, "test", "smoke").head(1), params)[0]
        answer = post(f"{url}/predict", record)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"POST {url}/predict {json.dumps(record)}")
    print(f"-> {json.dumps(answer)}")
    print(f"prediction log: {Layout.of(params).prediction_log}")


if __name__ == "__main__":
    main()
