"""`loopline prefect-server` as a user runs it: one Prefect API kept up between commands, and a
warm process that runs the commands with their libraries imported already (loopline/launch.py).
Real processes throughout: the server, the warm process, the commands, their signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    REPO,
    bikeshare_sample,
    free_port,
    hears_ctrl_c,
    own_prefect_home,
    tracking_section,
    venv_bin,
    write_params,
)

pytestmark = pytest.mark.slow


class Server:
    """A `loopline prefect-server` in its own session, its output collected line by line."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = own_prefect_home(dict(os.environ), home)
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [venv_bin("loopline"), "prefect-server", "--port", str(self.port)],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, after: int = 0, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if text in line:
                    return line
            assert self.proc.poll() is None, "\n".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"no line with {text!r} within {timeout:.0f} s:\n" + "\n".join(self.lines))

    def ran(self, after: int = 0, count: int = 0, timeout: float = 30) -> list[str]:
        """The commands the warm process ran (its lines after `after`), once it has said so
        of `count` of them: the command may hear its child's status first."""
        deadline = time.monotonic() + timeout
        while True:
            ran = [line for line in self.lines[after:] if line.startswith("warm commands: loopline ")]
            if len(ran) >= count or time.monotonic() > deadline:
                return ran
            time.sleep(0.1)

    def loopline(self, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
        return subprocess.run(
            [venv_bin("loopline"), *args],
            cwd=cwd,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def start(self, *args: str, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(
            [venv_bin("loopline"), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=hears_ctrl_c,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("prefect-home"))
    try:
        server.wait_for("warm commands: ready in")
        server.wait_for("Prefect API: ")
        yield server
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def small_params(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("warm")
    return write_params(
        tmp,
        bikeshare_sample(tmp, 600),
        tracking=tracking_section(tmp),
        search={"families": ["linear"], "n_trials": 0},
    )


def test_commands_run_in_the_warm_process_with_their_own_directory_streams_and_status(server, small_params, tmp_path):
    """check-params from another directory with a relative path, an expected failure (exit 2,
    one line), then a training and a batch score on the kept API: each answered by the warm
    process, as the cold command answers."""
    seen = len(server.lines)
    (tmp_path / "rel.yaml").write_text(small_params.read_text())
    proc = server.loopline("check-params", "--params", "rel.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("rel.yaml: valid"), proc.stderr
    cold = server.loopline(
        "check-params", "--params", "rel.yaml", env={**server.env, "LOOPLINE_WARM": "0"}, cwd=tmp_path
    )
    assert (cold.returncode, cold.stdout, cold.stderr) == (proc.returncode, proc.stdout, proc.stderr)

    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    bad = server.loopline("check-params", "--params", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [f"error: params: {tmp_path / 'bad.yaml'} is not valid YAML"] or (
        len(bad.stderr.strip().splitlines()) == 1 and "is not valid YAML" in bad.stderr
    ), bad.stderr

    for first in (True, False):  # a training, then a fully cached one
        train = server.loopline("train", "--params", str(small_params))
        assert train.returncode == 0, train.stderr[-3000:]
        # 600 rows of winter: a slice ("heavy rain") holds one test row, whose metric the card
        # once failed to print, so registration was retried and reported "nothing new"
        assert ("promoted to champion — first model" in train.stdout) == first, train.stdout[-2000:]
        assert "Retry" not in train.stderr, train.stderr[-3000:]
        assert f"Prefect API: {server.url} (loopline prefect-server)" in train.stderr
        assert "temporary server" not in train.stderr + train.stdout
        # what the imports set in the environment holds in the child too (NannyML's usage
        # logging off: on a machine without internet its sender logs an ERROR line)
        assert "| ERROR" not in train.stderr + train.stdout, train.stderr[-3000:]
    assert "training skipped" in train.stdout

    import pandas as pd

    pd.read_csv(REPO / "pipelines" / "datasets" / "bikeshare_2011.csv").head(5).drop(columns=["bikers"]).to_csv(
        tmp_path / "five.csv", index=False
    )
    score = server.loopline(
        "score", str(tmp_path / "five.csv"), str(tmp_path / "out.parquet"), "--params", str(small_params)
    )
    assert score.returncode == 0 and "scored 5 rows" in score.stdout, score.stderr[-3000:]
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == 5
    # The command's own environment reaches Prefect's settings in the child: an API given
    # in PREFECT_API_URL is used as configured, not found through the server's record.
    configured = server.loopline(
        "score",
        str(tmp_path / "five.csv"),
        str(tmp_path / "out2.parquet"),
        "--params",
        str(small_params),
        env={**server.env, "PREFECT_API_URL": server.url},
    )
    assert configured.returncode == 0 and "(loopline prefect-server)" not in configured.stderr, configured.stderr

    ran = server.ran(seen, count=6)
    assert [line.split(" (pid")[0] for line in ran] == [
        "warm commands: loopline check-params",
        "warm commands: loopline check-params",
        "warm commands: loopline train",
        "warm commands: loopline train",
        "warm commands: loopline score",
        "warm commands: loopline score",
    ], server.lines[seen:]
    assert [line.split(" exit ")[1].split(" ")[0] for line in ran] == ["0", "2", "0", "0", "0", "0"]


def test_ctrl_c_reaches_the_warm_command_and_a_killed_caller_stops_it(server, small_params):
    """Ctrl-C (SIGINT) stops a training in its search with "aborted" and exit 130, in its own
    process as in a warm one, to which the command passes it on (typer returns Exit(130)
    outside standalone mode: that status used to be dropped, exit 0). A command killed
    outright (SIGKILL) passes nothing on: its warm child sees the connection close and is
    stopped with SIGTERM."""
    import yaml

    raw = yaml.safe_load(small_params.read_text())
    raw["search"] = {"families": ["linear", "random_forest"], "n_trials": 0}  # linear first, then many trees
    raw["train"]["hyperparams"]["random_forest"] = {"n_estimators": 20000, "n_jobs": 1}
    slow = small_params.with_name("slow.yaml")
    slow.write_text(yaml.safe_dump(raw, sort_keys=False))
    for warm, signum in (("0", signal.SIGINT), ("1", signal.SIGINT), ("1", signal.SIGKILL)):
        seen = len(server.lines)
        proc = server.start("train", "--force", "--params", str(slow), env={**server.env, "LOOPLINE_WARM": warm})
        deadline = time.monotonic() + 120
        while not any("search: 1/2" in line for line in _stderr_so_far(proc)):
            assert proc.poll() is None and time.monotonic() < deadline, _stderr_so_far(proc)
            time.sleep(0.2)
        proc.send_signal(signum)
        proc.wait(timeout=120)
        if signum == signal.SIGINT:
            assert proc.returncode == 130, (warm, proc.returncode, _stderr_so_far(proc)[-20:])
            assert _stderr_so_far(proc)[-1] == "aborted\n", _stderr_so_far(proc)[-5:]
        if warm == "1":
            line = server.wait_for("warm commands: loopline train", after=seen, timeout=120)
            assert f"exit {130 if signum == signal.SIGINT else -signal.SIGTERM}" in line, server.lines[seen:]
        else:
            assert server.ran(seen) == []


_STDERR: dict[int, list[str]] = {}


def _stderr_so_far(proc: subprocess.Popen) -> list[str]:
    """The lines a running command has written to stderr (read in a thread)."""
    if proc.pid not in _STDERR:
        _STDERR[proc.pid] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                _STDERR[proc.pid].append(line)

        threading.Thread(target=read, daemon=True).start()
    return list(_STDERR[proc.pid])


def test_edited_code_runs_cold_and_the_warm_process_reloads(server, small_params):
    """A source file changed after the warm process imported it: the command runs in its own
    process (never from the stale import), and the warm process reloads itself; a command
    after that runs warm again."""
    source = REPO / "pipelines" / "core" / "errors.py"
    stat = source.stat()
    seen = len(server.lines)
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        proc = server.loopline("check-params", "--params", str(small_params))
        assert proc.returncode == 0, proc.stderr
        assert server.ran(seen) == []
        server.wait_for("the code changed; reloading", after=seen)
    finally:
        # The old stamp back at once: every warm process of this checkout (the other test
        # workers' too) reloads for a command that comes while the file looks edited, and
        # two reloads each (edited, then back) once cost the suite a minute of CPU.
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    server.wait_for("warm commands: ready in", after=seen)
    # The reload stamped the code before or after the stamp went back: a command runs warm
    # now, or after one more reload.
    for attempt in range(2):
        seen = len(server.lines)
        assert server.loopline("check-params", "--params", str(small_params)).returncode == 0
        if server.ran(seen, count=1, timeout=10):
            break
        assert attempt == 0, server.lines[seen:]
        server.wait_for("warm commands: ready in", after=seen)
    assert [line.split(" (pid")[0] for line in server.ran(seen, count=1)] == ["warm commands: loopline check-params"]


def test_the_warm_process_answers_only_a_loopline_command_of_its_checkout(server):
    """The socket is the owner's only; a hello from another checkout is refused (the command
    then runs in its own process) and forks nothing."""
    path = server.home / "loopline-warm.sock"
    assert path.stat().st_mode & 0o777 == 0o600
    hello = json.dumps(
        {"argv": ["loopline", "check-params"], "cwd": "/", "env": {}, "root": "/elsewhere", "stamp": "x"}
    )
    seen = len(server.lines)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        socket.send_fds(conn, [b"%d\n" % len(hello)], [0, 1, 2])
        conn.sendall(hello.encode())
        assert json.loads(conn.recv(4096)) == {"refused": "another checkout"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # no descriptors: not a command
        conn.connect(str(path))
        conn.sendall(b"12\nnot a hello!")
        assert conn.recv(4096) == b""
    assert server.ran(seen) == [] and server.proc.poll() is None


def test_a_second_server_is_refused_and_sigterm_stops_both_and_their_records(server, small_params):
    """Last in the module: a second server is refused; SIGTERM stops the server and its warm
    process and removes the record and the socket; a command then starts the temporary API."""
    second = server.loopline("prefect-server", "--port", str(free_port()))
    assert second.returncode == 2 and f"already runs at {server.url}" in second.stderr

    record, sock = server.home / "loopline-api.json", server.home / "loopline-warm.sock"
    assert json.loads(record.read_text()) == {"url": server.url, "pid": server.proc.pid}
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert not record.exists() and not sock.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/health", timeout=2)

    record.write_text(json.dumps({"url": server.url, "pid": 1}))  # a stale record: nothing answers there
    proc = server.loopline("train", "--params", str(small_params))
    assert proc.returncode == 0 and "Prefect API" not in proc.stderr
    assert "Starting temporary server" in proc.stdout + proc.stderr
    assert "`loopline prefect-server` keeps one up" in proc.stdout + proc.stderr
