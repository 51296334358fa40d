"""A `loopline serve` of the user's own on a free loopback port, for as long as a block runs:
the end of `make run` (serving/smoke.py) and the replay go through it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipelines.core.processes import free_port, start_server, stop, venv_bin, wait_for_http


@contextmanager
def local_service(
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
