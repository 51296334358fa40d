"""The candidate search beyond one process: a real Dask cluster (scheduler and two worker
processes) behind an MLflow tracking server, a worker killed mid-search, a search killed
mid-way that resumes from its Optuna journal, and the refusal of a cluster with a SQLite
tracking file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import REPO, bikeshare_sample, run_cli, start_tracking_server, stop, venv_bin, write_params

TRACKING = {"experiment": "bikes", "model_name": "bikes"}
# Every family of params.yaml (torch's MLP too) and two trials: six candidates in one round.
CLUSTER_SEARCH = {"n_trials": 2}
# A search of study "resume" in a process of its own, as a training runs it.
SEARCH = (
    "import sys\n"
    "from pipelines.core.config import load_params\n"
    "from pipelines.training.search import search_candidates\n"
    "from pipelines.data.split import read_split\n"
    "p = load_params(sys.argv[1])\n"
    "best, _ = search_candidates(p, read_split(p, 'train'), read_split(p, 'val'), study_name='resume')\n"
    "print('best', best.name)\n"
)
SLOW_TRIALS = {"random_forest": {"n_estimators": {"choices": [300, 400]}, "min_samples_leaf": {"low": 1, "high": 8}}}


def _candidates(candidates) -> list[tuple]:
    return [(c.name, c.family, c.hyperparams) for c in candidates]


@dataclass(frozen=True)
class Reference:
    """The bundled sample's splits and the in-process sequential search of them, which every
    search on a cluster below must equal (same rows, same seeds)."""

    params: Any
    train: Any
    val: Any
    best: Any
    candidates: list

    def on(self, address: str):
        """These params with the search at the cluster `address`."""
        execution = self.params.execution
        dask = execution.dask.model_copy(update={"address": address})
        return self.params.model_copy(
            update={"execution": execution.model_copy(update={"runner": "dask", "dask": dask})}
        )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """Searched once for the module: a sequential search of the default families costs as
    much as the cluster's, and the tests compare with the same one."""
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.data.split import read_split
    from pipelines.training.search import search_candidates

    tmp = tmp_path_factory.mktemp("reference")
    params = load_params(write_params(tmp, bikeshare_sample(tmp), search=CLUSTER_SEARCH))
    assert params.execution.runner == "sequential"
    run_all(params, echo=lambda _: None)
    train, val = read_split(params, "train"), read_split(params, "val")
    best, candidates = search_candidates(params, train, val)
    return Reference(params, train, val, best, candidates)


@pytest.mark.slow
def test_training_on_a_dask_cluster_survives_a_lost_worker_and_matches_the_sequential_search(
    tmp_path, dask_cluster, prefect_api, reference
):
    """`loopline train` with execution.runner dask at a running scheduler, tracking to an
    MLflow server. One worker is SIGKILLed once the first candidates are logged: Dask runs
    its tasks again on the other worker (the data was broadcast to both), the search
    completes, and its candidates and best model equal an in-process sequential search of
    the same splits with the same seeds. Every candidate run names the worker that fitted it."""
    from mlflow.tracking import MlflowClient

    from pipelines.core import names
    from pipelines.core.config import load_params
    from pipelines.data.split import read_split

    address, workers, worker_addresses = dask_cluster
    server, url = start_tracking_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}")
    try:
        path = write_params(
            tmp_path,
            bikeshare_sample(tmp_path),
            tracking={"uri": url, **TRACKING},
            execution={"runner": "dask", "dask": {"address": address}},
            search=CLUSTER_SEARCH,
        )
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
        training = subprocess.Popen(
            [venv_bin("loopline"), "train", "--params", str(path), "--json"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        logged_at_kill = None
        deadline = time.monotonic() + 300
        while training.poll() is None and time.monotonic() < deadline:
            experiment = client.get_experiment_by_name("bikes")
            logged = (
                client.search_runs([experiment.experiment_id], f"tags.`{names.FAMILY}` != ''") if experiment else []
            )
            if len(logged) >= 2:
                logged_at_kill = len(logged)
                os.killpg(workers[1].pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        out, err = training.communicate(timeout=300)
        assert training.returncode == 0, err[-3000:]
        assert logged_at_kill is not None and logged_at_kill < len(reference.candidates), "not killed mid-search"
        assert workers[1].wait(timeout=10) is not None

        result = json.loads(out.strip().splitlines()[-1])
        trained = result["trained"]
        assert result["decision"]["promoted"] is True
        runs = {
            r.info.run_name: r
            for r in client.search_runs(
                [client.get_experiment_by_name("bikes").experiment_id], f"tags.`{names.FAMILY}` != ''"
            )
        }
        assert sorted(runs) == sorted(c["name"] for c in trained["candidates"])
        assert {r.data.tags[names.WORKER] for r in runs.values()} <= set(worker_addresses)
        assert {c["worker"] for c in trained["candidates"]} <= set(worker_addresses)

        dask = load_params(path)
        assert read_split(dask, "train").equals(reference.train) and read_split(dask, "val").equals(reference.val)
        best, candidates = reference.best, reference.candidates
        assert trained["best"] == best.name
        assert [(c["name"], c["family"]) for c in trained["candidates"]] == [(c.name, c.family) for c in candidates]
        for logged_candidate, local in zip(trained["candidates"], candidates, strict=True):
            # scores are rounded to 6 decimals (evaluate.score): a last-bit difference between a
            # worker's one-thread BLAS and this process's can cross a rounding boundary
            assert logged_candidate["val"] == pytest.approx(local.val["rmse"], abs=1.5e-6)
        assert trained["val"] == pytest.approx(best.val, rel=1e-9)
    finally:
        stop(server)


KILL_POINTS = ["while the first round runs", "after two results", "between rounds"]


@pytest.mark.slow
@pytest.mark.parametrize("when", KILL_POINTS)
def test_a_search_whose_workers_all_die_completes_on_a_worker_that_joins_later(dask_cluster, tmp_path, when, reference):
    """Every worker that holds the training rows is SIGKILLed at three points of the search,
    then a new worker joins. The rows are a task with a recipe, not scattered data, so Dask
    computes them again on the new worker and runs the lost fits there; the search ends with
    the candidates of a sequential search of the same splits. (With scattered rows the fits
    that needed them were forgotten: FutureCancelledError, "already forgotten".)"""
    import threading

    from distributed import Client

    from conftest import free_port
    from pipelines.core.processes import start_server
    from pipelines.training.search import STARTUP_TRIALS, search_candidates

    address, workers, _ = dask_cluster
    dask = reference.on(address)
    train, val = reference.train, reference.val
    first_round = len(dask.search.families) + min(STARTUP_TRIALS, dask.search.n_trials)
    seen: list[str] = []
    at_kill: list[int] = []
    log = open(tmp_path / "late-worker.log", "w")  # noqa: SIM115  (the worker writes it until stopped)
    late: list[subprocess.Popen] = []

    def kill_the_holders() -> None:
        """Every worker holding the rows dies; then a worker without them joins."""
        with Client(address, timeout=60) as watcher:
            holders = {w for key, ws in watcher.who_has().items() if str(key).startswith("rows-") for w in ws}
            names = {a: info["name"] for a, info in watcher.scheduler_info(n_workers=-1)["workers"].items()}
        at_kill.append(len(seen))
        for i, proc in enumerate(workers):
            if any(names.get(h) == f"worker-{i}" for h in holders):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        late.append(
            start_server(
                [venv_bin("dask"), "worker", address, "--nthreads", "1", "--name", "late", "--no-dashboard"]
                + ["--host", "127.0.0.1", "--worker-port", str(free_port())],
                log=log,
            )
        )

    def on_candidate(candidate) -> None:
        seen.append(candidate.name)
        if not at_kill and (
            (when == "after two results" and len(seen) == 2) or (when == "between rounds" and len(seen) == first_round)
        ):
            kill_the_holders()

    def kill_while_processing() -> None:
        with Client(address, timeout=60) as watcher:
            deadline = time.monotonic() + 120
            while not any(str(k).startswith("fit-") for keys in watcher.processing().values() for k in keys):
                assert time.monotonic() < deadline, "no fit ever started"
                time.sleep(0.01)
        kill_the_holders()

    watcher = threading.Thread(target=kill_while_processing) if when == "while the first round runs" else None
    try:
        if watcher is not None:
            watcher.start()
        best, on_cluster = search_candidates(dask, train, val, on_candidate=on_candidate)
        if watcher is not None:
            watcher.join(timeout=180)
    finally:
        for proc in late:
            stop(proc)
        log.close()
    expected = {
        "while the first round runs": range(first_round),
        "after two results": [2],
        "between rounds": [first_round],
    }
    assert at_kill and at_kill[0] in expected[when], f"killed after {at_kill} results, not {when}"
    local_best, local = reference.best, reference.candidates
    assert _candidates(on_cluster) == _candidates(local) and best.name == local_best.name
    for remote, here in zip(on_cluster, local, strict=True):
        assert remote.val["rmse"] == pytest.approx(here.val["rmse"], abs=1.5e-6)


@pytest.fixture(params=["journal", "postgresql"])
def search_storage(request, tmp_path) -> str:
    """search.storage: a journal file, or a fresh PostgreSQL database (psycopg 3)."""
    if request.param == "journal":
        return str(tmp_path / "optuna" / "search.journal")
    from pipelines.core.postgres import with_driver

    return with_driver(request.getfixturevalue("postgres_db"), "psycopg")


@pytest.mark.slow
def test_a_killed_search_resumes_from_its_storage_keeping_the_finished_trials(tmp_path, search_storage):
    """A search with search.storage (an Optuna journal file, or PostgreSQL) of four trials is
    SIGKILLed after two finished. Started again, it keeps them (and the family candidates) with
    the same scores an uninterrupted search gets from the same seed, marks the trials the
    killed process left running as failed, and runs only the rest."""
    import optuna
    from optuna.trial import TrialState

    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.data.split import read_split
    from pipelines.training.search import _storage, search_candidates

    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path),
        search={
            "families": ["linear"],
            "n_trials": 4,
            "storage": search_storage,
            "space": SLOW_TRIALS,
        },
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    killed = subprocess.Popen([sys.executable, "-c", SEARCH, str(path)], cwd=REPO)
    deadline = time.monotonic() + 120
    finished = 0
    while time.monotonic() < deadline and killed.poll() is None:
        try:
            study = optuna.load_study(study_name="resume", storage=_storage(search_storage))
            finished = len(study.get_trials(states=(TrialState.COMPLETE,)))
        except KeyError:  # not created yet
            finished = 0
        if finished >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, "the search ended before two trials were stored"
    assert finished < 4

    warnings: list[str] = []
    best, resumed = search_candidates(
        params, read_split(params, "train"), read_split(params, "val"), study_name="resume", warn=warnings.append
    )
    restored = [c for c in resumed if c.restored]
    assert [c.name for c in restored][:1] == ["linear"] and len(restored) >= 1 + finished
    assert any("left running" in w for w in warnings)
    assert len([c for c in resumed if c.name.startswith("trial-")]) == 4
    study = optuna.load_study(study_name="resume", storage=_storage(search_storage))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert study.get_trials(states=(TrialState.FAIL,)), "the trials left running were not marked failed"
    assert best.model is not None and len(best.model.predict(read_split(params, "test"))) > 0

    # The trials kept are the ones an uninterrupted search of the same seed scores: its first
    # trials, as many as were kept (the start-up trials come from the seed alone, in order).
    kept = 1 + max(int(c.name.removeprefix("trial-")) for c in restored if c.name.startswith("trial-"))
    in_memory = params.model_copy(update={"search": params.search.model_copy(update={"storage": "", "n_trials": kept})})
    _, fresh = search_candidates(in_memory, read_split(params, "train"), read_split(params, "val"))
    fresh_by_name = {c.name: c for c in fresh}
    for c in restored:
        assert c.val == fresh_by_name[c.name].val and c.hyperparams == fresh_by_name[c.name].hyperparams


def test_a_cluster_address_with_sqlite_tracking_is_refused_naming_both(tmp_path, capsys):
    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path),
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **TRACKING},
        execution={"runner": "dask", "dask": {"address": "tcp://10.1.2.3:8786"}},
    )
    code, _, err = run_cli("train", "--params", str(path), capsys=capsys)
    assert code == 2
    assert "execution.dask.address" in err and "tcp://10.1.2.3:8786" in err and "tracking.uri" in err
    assert not (tmp_path / "data").exists(), "nothing may run before the refusal"


@pytest.mark.slow
def test_a_local_cluster_started_for_the_search_fits_on_its_workers(tmp_path):
    """execution.dask.address empty: the search starts a LocalCluster of n_workers processes
    for itself, fits there, gives the sequential search's candidates, and stops it."""
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.data.split import read_split
    from pipelines.training.search import search_candidates

    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path, 1000),
        search={"families": ["linear", "hist_gradient_boosting"], "n_trials": 2},
        execution={"runner": "dask", "dask": {"n_workers": 2}},
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    train, val = read_split(params, "train"), read_split(params, "val")
    best, on_cluster = search_candidates(params, train, val)
    sequential = params.model_copy(update={"execution": params.execution.model_copy(update={"runner": "sequential"})})
    local_best, local = search_candidates(sequential, train, val)
    assert all(c.worker.startswith("tcp://127.0.0.1:") for c in on_cluster)
    assert all(c.worker.startswith("local:") for c in local)
    assert [(c.name, c.hyperparams, c.val) for c in on_cluster] == [(c.name, c.hyperparams, c.val) for c in local]
    assert best.name == local_best.name and best.model is not None


@pytest.mark.slow
def test_a_search_whose_running_trials_another_search_took_over_still_finishes(tmp_path):
    """Two searches of one stored study at once (the same training started twice): the
    second marks the first's running trials failed and runs its own; the first, finding its
    trials finished by someone else, says so and completes instead of failing."""
    import optuna
    from optuna.trial import TrialState

    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.data.split import read_split
    from pipelines.training.search import _storage, search_candidates

    journal = str(tmp_path / "search.journal")
    path = write_params(
        tmp_path,
        bikeshare_sample(tmp_path),
        search={"families": ["linear"], "n_trials": 3, "storage": journal, "space": SLOW_TRIALS},
    )
    params = load_params(path)
    run_all(params, echo=lambda _: None)
    first = subprocess.Popen(
        [sys.executable, "-c", SEARCH, str(path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    running = []
    while not running and time.monotonic() < deadline and first.poll() is None:
        try:
            study = optuna.load_study(study_name="resume", storage=_storage(journal))
            running = study.get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            pass
        time.sleep(0.05)
    assert running, "the first search never had a trial running"
    warnings: list[str] = []
    search_candidates(
        params, read_split(params, "train"), read_split(params, "val"), study_name="resume", warn=warnings.append
    )
    assert any("left running" in w for w in warnings)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert "finished by another search" in out and "best " in out
