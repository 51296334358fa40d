"""The team's servers secured, as the README's team section starts them, with real processes:
MLflow with basic auth (readers and writers), Prefect with an auth string, the service with
API keys, and a Dask cluster with TLS. An anonymous caller is refused by each; a writer
trains, registers and promotes; a reader browses but cannot promote; and no secret is
written anywhere a secured round writes."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    GOOD,
    REPO,
    bikeshare_sample,
    free_port,
    start_dask_scheduler,
    start_service,
    stop,
    venv_bin,
    wait_for_http,
    write_params,
)

pytestmark = pytest.mark.slow

SECRETS = {
    "mlflow admin": "adm-7Qz1x9Lw3Pq8",
    "writer": "wrt-4Hs8k2Jd6Fn1",
    "reader": "rdr-9Vb3m5Xc7Zp2",
    "prefect": "pfx-2Lk8s4Df6Gh0",
    "api key": "key-5Tn9q1Wr3Ey7Ui",
}


class Server:
    """A server process in its own session, its output kept in a file and in `lines`."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self) -> None:
        stop(self.proc)


def status_of(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A secured MLflow server (users: admin, writer, reader) and a Prefect server with an
    auth string, each started by its loopline command, and the environments of each user."""
    tmp = tmp_path_factory.mktemp("team")
    mlflow_port, prefect_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    base["PREFECT_HOME"] = str(tmp / "prefect-home")
    servers = []
    try:
        servers.append(
            Server(
                [
                    venv_bin("loopline"),
                    "tracking-server",
                    "--store",
                    f"sqlite:///{tmp}/mlflow.db",
                    "--artifacts",
                    str(tmp / "artifacts"),
                    "--auth",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                ],
                {**base, "MLFLOW_AUTH_ADMIN_PASSWORD": SECRETS["mlflow admin"]},
                tmp / "mlflow.log",
            )
        )
        servers.append(
            Server(
                [venv_bin("loopline"), "prefect-server", "--port", str(prefect_port)],
                {**base, "PREFECT_SERVER_API_AUTH_STRING": f"team:{SECRETS['prefect']}"},
                tmp / "prefect.log",
            )
        )
        mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        wait_for_http(f"{mlflow_url}/health", timeout=120, proc=servers[0].proc)
        wait_for_http(f"{prefect_url}/health", timeout=120, proc=servers[1].proc)
        common = {**base, "PREFECT_API_URL": prefect_url, "PREFECT_API_AUTH_STRING": f"team:{SECRETS['prefect']}"}
        envs = {
            user: {**common, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": SECRETS[key]}
            for user, key in (("admin", "mlflow admin"), ("writer", "writer"), ("reader", "reader"))
        }
        params = write_params(
            tmp,
            bikeshare_sample(tmp, 1500),
            tracking={"uri": mlflow_url, "artifact_root": str(tmp / "client-artifacts"), "model_name": "bikes"},
            search={"families": ["linear"], "n_trials": 0},
        )
        for user in ("writer", "reader"):
            added = subprocess.run(
                [venv_bin("loopline"), "users", "add", user, "--role", user, "--params", str(params)],
                cwd=REPO,
                env=envs["admin"],
                input=SECRETS[user] + "\n",
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert added.returncode == 0 and f"created as a {user}" in added.stdout, added.stderr[-2000:]
        # The writer's first training, which the tests below read (and the service serves).
        trained = loopline("train", "--params", str(params), env=envs["writer"])
        yield {
            "trained": trained,
            "tmp": tmp,
            "params": params,
            "envs": envs,
            "anonymous": base,
            "mlflow": mlflow_url,
            "prefect": prefect_url,
        }
    finally:
        for server in servers:
            server.stop()


def loopline(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [venv_bin("loopline"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_anonymous_callers_are_refused_and_open_team_servers_beyond_loopback_too(team):
    assert status_of(f"{team['mlflow']}/api/2.0/mlflow/experiments/search", b'{"max_results": 1}') == 401
    assert status_of(f"{team['prefect']}/flows/filter", b"{}") == 401
    assert status_of(f"{team['prefect']}/health") == 200  # probes stay open
    for args in (
        ["prefect-server", "--host", "0.0.0.0", "--port", str(free_port())],
        ["tracking-server", "--store", "sqlite:///x.db", "--artifacts", str(team["tmp"] / "x"), "--host", "0.0.0.0"],
    ):
        refused = loopline(*args, env=team["anonymous"], timeout=60)
        assert refused.returncode == 2 and "beyond this machine" in refused.stderr, refused.stderr[-2000:]


def test_a_writer_trains_registers_and_promotes_and_a_reader_browses_but_cannot_promote(team):
    params, trained = str(team["params"]), team["trained"]
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "bikes v1: promoted to champion" in trained.stdout, trained.stdout[-2000:]
    import yaml

    raw = yaml.safe_load(team["params"].read_text())
    raw["train"]["seed"] = 7  # another model: v2, champion or not
    other = team["params"].with_name("params-seed7.yaml")
    other.write_text(yaml.safe_dump(raw))
    second = loopline("train", "--params", str(other), "--json", env=team["envs"]["writer"])
    assert second.returncode == 0, second.stderr[-3000:]
    decision = json.loads(second.stdout)["decision"]
    assert decision["version"] == "2", decision
    not_champion = "1" if decision["promoted"] else "2"
    card = loopline("card", "1", "--params", params, env=team["envs"]["reader"])
    assert card.returncode == 0 and "# Model card: bikes v1" in card.stdout, card.stderr[-2000:]
    refused = loopline("promote", not_champion, "--params", params, env=team["envs"]["reader"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: promote: the MLflow server"), refused.stderr[-2000:]
    assert "refused it: reader may not do this" in lines[0] and "--role writer" in lines[0]
    promoted = loopline("promote", not_champion, "--params", params, env=team["envs"]["writer"])
    assert promoted.returncode == 0 and f"champion is v{not_champion}" in promoted.stdout, promoted.stderr[-2000:]
    anonymous = loopline("card", "1", "--params", params, env=team["anonymous"])
    assert anonymous.returncode == 2 and "wants credentials" in anonymous.stderr, anonymous.stderr[-2000:]


def test_dask_with_tls_refuses_a_client_without_certificates_and_runs_a_configured_search(team, tmp_path):
    certs = loopline("certs", str(tmp_path / "certs"), env=team["anonymous"], timeout=60)
    assert certs.returncode == 0, certs.stderr
    ca, cert, key = (tmp_path / "certs" / f"{n}.pem" for n in ("ca", "cert", "key"))
    assert key.stat().st_mode & 0o777 == 0o600
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    scheduler_log = (tmp_path / "scheduler.log").open("w")
    scheduler, address = start_dask_scheduler(tmp_path, scheduler_log, "--protocol", "tls", *tls)
    worker = Server(
        [venv_bin("dask"), "worker", address, "--nthreads", "1", "--no-dashboard", *tls],
        team["anonymous"],
        tmp_path / "worker.log",
    )
    try:
        import asyncio
        import ssl

        from distributed import Client
        from distributed.comm import connect
        from distributed.security import Security

        # A client that trusts the scheduler but shows no certificate of its own, and one with
        # certificates of another authority: the scheduler ends each handshake, so no task of
        # theirs could ever run.
        trusting = ssl.create_default_context(cafile=str(ca))
        with pytest.raises((OSError, TimeoutError)):
            asyncio.run(connect(address, timeout=5, ssl_context=trusting))
        assert loopline("certs", str(tmp_path / "other"), env=team["anonymous"], timeout=60).returncode == 0
        other = {
            f"tls_{k}": str(tmp_path / "other" / f"{n}.pem")
            for k, n in (("ca_file", "ca"), ("client_cert", "cert"), ("client_key", "key"))
        }
        with pytest.raises((OSError, TimeoutError)):
            Client(address, timeout=5, security=Security(require_encryption=True, **other))
        params = write_params(
            tmp_path,
            bikeshare_sample(tmp_path, 1000),
            tracking={"uri": team["mlflow"], "artifact_root": str(tmp_path / "a"), "model_name": "tls-bikes"},
            search={"families": ["linear", "random_forest"], "n_trials": 0},
            train={"hyperparams": {"random_forest": {"n_estimators": 10}}},
            execution={
                "runner": "dask",
                "dask": {
                    "address": address,
                    "tls_ca_file": str(ca),
                    "tls_cert_file": str(cert),
                    "tls_key_file": str(key),
                },
            },
        )
        # The admin: a writer may change only the model and experiments it was granted.
        trained = loopline("train", "--params", str(params), "--json", env=team["envs"]["admin"])
        assert trained.returncode == 0, trained.stderr[-3000:]
        workers = {c["worker"] for c in json.loads(trained.stdout)["trained"]["candidates"]}
        assert all(w.startswith("tls://127.0.0.1:") for w in workers), workers
    finally:
        worker.stop()
        stop(scheduler)
        scheduler_log.close()


def test_no_secret_is_written_anywhere_a_secured_round_writes(team, tmp_path):
    """Train (above), serve with API keys, monitor the served answers, print the params: then
    every file below the round's folders, every server's log and every output holds none of
    the passwords, the auth string or the key."""
    params, writer = team["params"], team["envs"]["writer"]
    port = free_port()
    service = start_service(
        ["--params", str(params)],
        tmp_path,
        port,
        {**writer, "LOOPLINE_API_KEYS": f"client-a:{SECRETS['api key']}"},
    )
    outputs = []
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=service)
        headers = {"Authorization": f"Bearer {SECRETS['api key']}"}
        body = json.dumps({**GOOD, "day": 20}).encode()
        for _ in range(60):
            assert status_of(f"http://127.0.0.1:{port}/predict", body, headers) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=10) as answer:
            outputs.append(answer.read().decode())
        time.sleep(1)  # the log's writer gathers 50 ms of answers per transaction
    finally:
        stop(service)
    monitored = loopline("monitor", "--no-retrain", "--params", str(params), env=writer)
    assert monitored.returncode == 0, monitored.stderr[-3000:]
    shown = loopline("check-params", "--show", "--params", str(params), env=writer)
    outputs += [monitored.stdout, monitored.stderr, shown.stdout, shown.stderr]
    written = [p for folder in (team["tmp"], tmp_path) for p in folder.rglob("*") if p.is_file()]
    assert len(written) > 50 and any(p.name == "predictions.db" for p in written)
    for what, secret in SECRETS.items():
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"the {what} is in {path}"
        for text in outputs:
            assert secret not in text, f"the {what} is in a command's output"
