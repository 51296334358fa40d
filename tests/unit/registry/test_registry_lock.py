"""The registry lock, without a tracking server."""

from __future__ import annotations

import multiprocessing
import time

from pipelines.registry.champion import lock_path, registry_lock


def test_lock_lives_beside_sqlite_store(tmp_path):
    assert lock_path(f"sqlite:///{tmp_path}/mlflow.db") == tmp_path / "mlflow.db.registry.lock"
    assert lock_path("http://mlflow:5000") == lock_path("http://mlflow:5000")
    assert lock_path("http://mlflow:5000") != lock_path("http://other:5000")


def _hold(uri: str, path: str, started) -> None:
    with registry_lock(uri):
        started.set()
        with open(path, "a") as fh:
            fh.write(f"in {time.monotonic()}\n")
        time.sleep(0.5)
        with open(path, "a") as fh:
            fh.write(f"out {time.monotonic()}\n")


def test_lock_excludes_another_process(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trace = tmp_path / "trace"
    started = multiprocessing.Event()
    other = multiprocessing.Process(target=_hold, args=(uri, str(trace), started))
    other.start()
    started.wait(10)
    with registry_lock(uri):
        entered = time.monotonic()
    other.join()
    out = float(trace.read_text().splitlines()[1].split()[1])
    assert entered >= out  # we got the lock only after the other process let go
