"""Where a warm process listens, and starting one for the life of `loopline prefect-server`
(the warm process itself, and the commands' side of it, are in loopline/launch.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.core.processes import die_with_parent

SOCKET_NAME = "loopline-warm.sock"


def socket_path() -> Path:
    """The warm process's socket: in PREFECT_HOME, as `loopline prefect-server`'s record is
    (read from the environment here, without importing Prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser() / SOCKET_NAME


@contextlib.contextmanager
def warm_process(echo: Callable[[str], None]) -> Iterator[None]:
    """A warm process (`python -m loopline.launch`) for the duration of the block, unless one
    already answers on this PREFECT_HOME's socket; it dies with this process."""
    import subprocess

    path = socket_path()
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass
        else:
            probe.close()
            echo(f"warm commands: another warm process answers on {path}; this server starts none")
            yield
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "loopline.launch", str(path)], preexec_fn=die_with_parent)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
