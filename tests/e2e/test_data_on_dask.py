"""The data stages on Dask (`execution.data: dask`) held to the pandas engine: the same clean
rows, quarantine, split and validation verdict on the bundled data and on the bad-input
corpus; a malformed partition named; a worker killed mid-stage; `dvc repro` on Dask.
Real LocalClusters, and a real scheduler and workers where one is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from corpus import FAILING

from conftest import (
    BIKESHARE,
    WINE,
    copy_of_repo,
    free_port,
    run_cli,
    sh,
    start_dask_scheduler,
    venv_bin,
    write_params,
)

pytestmark = pytest.mark.slow

OUTPUTS = [
    "interim/ingested.parquet",
    "interim/clean.parquet",
    *(f"processed/{s}.parquet" for s in ("train", "val", "test")),
]


@pytest.fixture(autouse=True, scope="module")
def no_cluster_left_running():
    """The LocalCluster the data stages keep for this process (one for the module's tests)
    is closed after them, not left idling beside the rest of the suite."""
    from pipelines.core.cluster import close_kept_clusters

    yield
    close_kept_clusters()


def run_data(tmp: Path, source: Path, engine: str, base: str = "params.yaml", capsys=None, mb: float = 0.05):
    """The data stages (and the rest of `loopline run`) on `engine`, in `tmp`/engine, in
    partitions of `mb` megabytes of CSV (0.05: the bundled 0.57 MB in 11)."""
    root = tmp / engine
    root.mkdir(parents=True, exist_ok=True)
    params = write_params(
        root,
        source,
        base,
        execution={"data": engine, "partition_mb": mb},
        train={"hyperparams": {"hist_gradient_boosting": {"max_iter": 20}}},
    )
    return run_cli("run", "--params", str(params), capsys=capsys), root


def read(root: Path, output: str) -> pd.DataFrame:
    return pd.read_parquet(root / "data" / output)


def assert_same_data(pandas_root: Path, dask_root: Path) -> None:
    for output in OUTPUTS:
        pd.testing.assert_frame_equal(read(pandas_root, output), read(dask_root, output), obj=output)
        parts = list((dask_root / "data" / output).glob("part-*.parquet"))
        assert len(parts) > (1 if output.startswith("interim") else 0), output  # a split may fit in one part
    for quarantine in ("ingest.csv", "clean.csv"):
        a, b = (pd.read_csv(r / "data" / "quarantine" / quarantine) for r in (pandas_root, dask_root))
        pd.testing.assert_frame_equal(a, b, obj=quarantine)
    report = [json.loads((r / "data" / "interim" / "clean_report.json").read_text()) for r in (pandas_root, dask_root)]
    assert report[0] == report[1]
    results = [json.loads((r / "data" / "validation" / "result.json").read_text()) for r in (pandas_root, dask_root)]
    assert results[0]["success"] == results[1]["success"]
    for a, b in zip(results[0]["results"], results[1]["results"], strict=True):
        assert a["success"] == b["success"], a["expectation_config"]
        for key in ("unexpected_count", "element_count", "missing_count", "observed_value"):
            assert a["result"].get(key) == b["result"].get(key), (key, a["expectation_config"])


def test_the_same_rows_quarantine_split_and_verdict_on_the_bundled_data(tmp_path, capsys):
    """Bikeshare: the time-ordered split, every output equal, the Dask ones in partitions."""
    for engine in ("pandas", "dask"):
        (code, _, err), _ = run_data(tmp_path, BIKESHARE, engine, capsys=capsys)
        assert code == 0, err
    assert_same_data(tmp_path / "pandas", tmp_path / "dask")
    metrics = [json.loads((tmp_path / e / "models" / "metrics.json").read_text()) for e in ("pandas", "dask")]
    assert metrics[0]["test"] == metrics[1]["test"]


def test_dirty_rows_and_duplicates_across_partitions_alike(tmp_path, capsys):
    """Values that are not numbers, a missing target, a truncated last row, and rows repeated
    far apart (in other partitions): quarantined and dropped alike, the first kept."""
    frame = pd.read_csv(BIKESHARE, dtype=str, keep_default_na=False)
    frame.loc[[10, 4000], "temp"] = ["warm", "0,31"]
    frame.loc[30, "bikers"] = ""
    repeated = frame.iloc[[100, 101, 5000]]
    frame = pd.concat([frame, repeated, frame.iloc[[100]]], ignore_index=True)  # the same rows, partitions later
    source = tmp_path / "dirty.csv"
    source.write_text(frame.to_csv(index=False) + "1,Jan,30,5,0,0,0,clear,0.2")
    for engine in ("pandas", "dask"):
        (code, _, err), _ = run_data(tmp_path, source, engine, capsys=capsys)
        assert code == 0, err
    assert_same_data(tmp_path / "pandas", tmp_path / "dask")
    report = json.loads((tmp_path / "dask" / "data" / "interim" / "clean_report.json").read_text())
    assert report["duplicates_dropped"] == 4 and report["rows_quarantined"] == 3


def test_a_classification_table_gets_the_same_seeded_stratified_split(tmp_path, capsys):
    for engine in ("pandas", "dask"):
        (code, _, err), _ = run_data(tmp_path, WINE, engine, base="params.wine.yaml", capsys=capsys, mb=0.004)
        assert code == 0, err
    assert_same_data(tmp_path / "pandas", tmp_path / "dask")


def _without_partitions(message: str) -> str:
    """An error as the pandas engine words it: the Dask one also names the partition."""
    message = re.sub(r" \(piece [^)]*\)", "", message)
    return re.sub(r" \(in part-[^)]*\)", "", message)


@pytest.mark.parametrize("case", sorted(FAILING))
def test_the_bad_input_corpus_fails_alike_on_both_engines(case, tmp_path, capsys):
    """Each broken file fails at the same stage with the same message on Dask (which also
    names the partition where the problem lies), and writes nothing in that stage's place."""
    good = tmp_path / "good.csv"
    good.write_text(BIKESHARE.read_text())
    make, stage, words = FAILING[case]
    bad = tmp_path / f"{case}.csv"
    make(good, bad)
    errors = {}
    for engine in ("pandas", "dask"):
        (code, _, err), root = run_data(tmp_path, bad, engine, capsys=capsys)
        assert code == 2 and err.startswith(f"error: {stage}: "), (engine, err)
        assert "Traceback" not in err
        errors[engine] = err.strip().splitlines()[-1]
        for word in words:
            assert word in errors[engine], (engine, word, errors[engine])
        assert not (root / "data" / "interim" / "clean.parquet").exists() or stage == "validate"
    assert (
        _without_partitions(errors["dask"]).replace(str(tmp_path / "dask"), str(tmp_path / "pandas"))
        == errors["pandas"]
    )
    if case in ("non_utf8", "out_of_range", "unknown_category", "negative_target"):  # a problem in one partition
        assert errors["dask"] != errors["pandas"] and ("piece" in errors["dask"] or "part-" in errors["dask"])


def test_a_source_folder_is_read_file_by_file_and_a_malformed_file_is_named(tmp_path, capsys):
    """data.source may be a folder of CSV files: each is a partition (or more), in name
    order, with the same rows as the one file; a file whose columns differ is named."""
    lines = BIKESHARE.read_text().splitlines(keepends=True)
    folder = tmp_path / "source"
    folder.mkdir()
    for i, start in enumerate(range(1, len(lines), 3000)):
        (folder / f"hours-{i}.csv").write_text(lines[0] + "".join(lines[start : start + 3000]))
    (code, _, err), root = run_data(tmp_path, folder, "dask", capsys=capsys)
    assert code == 0, err
    (code, _, err), pandas_root = run_data(tmp_path, BIKESHARE, "pandas", capsys=capsys)
    assert code == 0, err
    assert_same_data(pandas_root, root)

    broken = pd.read_csv(folder / "hours-1.csv").rename(columns={"temp": "temperature"})
    broken.to_csv(folder / "hours-1.csv", index=False)
    (code, _, err), _ = run_data(tmp_path, folder, "dask", capsys=capsys)
    assert code == 2 and f"error: ingest: {folder / 'hours-1.csv'}: column(s) ['temp'] required" in err, err


def test_a_worker_killed_mid_clean_leaves_the_output_whole_and_identical(tmp_path, capsys):
    """A real scheduler and two workers; one is SIGKILLed while clean's partitions are being
    typed. Dask runs its tasks again on the other: the clean rows equal the pandas engine's."""
    from bench.scale import synthesise

    source = tmp_path / "big.csv"
    synthesise(600_000, source)
    for engine in ("dask", "pandas"):
        (tmp_path / engine).mkdir()
    scheduler, address = start_dask_scheduler(tmp_path, None)
    workers = [
        subprocess.Popen(
            [venv_bin("dask"), "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        parts = {"data": "dask", "partition_mb": 1, "dask": {"address": address}}
        params = write_params(tmp_path / "dask", source, execution=parts)
        assert run_cli("stage", "ingest", "--params", str(params), capsys=capsys)[0] == 0
        done: list[tuple] = []
        cleaning = threading.Thread(
            target=lambda: done.append(run_cli("stage", "clean", "--params", str(params), capsys=capsys))
        )
        cleaning.start()
        interim = tmp_path / "dask" / "data" / "interim"
        deadline = time.monotonic() + 120
        while not any(len(list(s.glob("part-*.parquet"))) >= 3 for s in interim.glob(".clean-*")):
            assert cleaning.is_alive() and time.monotonic() < deadline, "clean ended before a worker could be killed"
            time.sleep(0.02)
        os.kill(workers[0].pid, signal.SIGKILL)
        killed_while_running = cleaning.is_alive()
        cleaning.join(timeout=300)
        assert killed_while_running and done and done[0][0] == 0, done
    finally:
        for proc in (*workers, scheduler):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pandas_params = write_params(tmp_path / "pandas", source, execution={"data": "pandas"})
    for stage in ("ingest", "clean"):
        assert run_cli("stage", stage, "--params", str(pandas_params), capsys=capsys)[0] == 0
    pd.testing.assert_frame_equal(
        read(tmp_path / "pandas", "interim/clean.parquet"), read(tmp_path / "dask", "interim/clean.parquet")
    )
    assert not list(interim.glob(".clean-*")), "the stage's scratch files were left behind"


def test_dvc_repro_on_dask_reproduces_its_lock_and_then_has_nothing_to_do(tmp_path):
    """A copy of the repository with execution.data: dask at a running scheduler (a real
    `dask scheduler` and worker, as a team keeps one; the worker in a directory of its own):
    `dvc repro split` writes the data stages' outputs as folders; a second one runs nothing;
    a forced one gives the same lock. The params' paths are relative (`data/...`): the
    worker once wrote ingest's parts below its own directory, and clean found none. (The
    train stage reading the folders is `loopline run`'s, in the first test.)"""
    from pipelines.core.processes import stop

    log = (tmp_path / "dask.log").open("w")
    scheduler, address = start_dask_scheduler(tmp_path, log)
    (tmp_path / "worker").mkdir()
    worker = subprocess.Popen(
        [venv_bin("dask"), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
        cwd=tmp_path / "worker",
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def on_dask(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["execution"] |= {"data": "dask", "partition_mb": 0.05, "dask": {"address": address}}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    try:
        root = copy_of_repo(tmp_path / "loopline", on_dask)
        sh("dvc", "repro", "split", cwd=root)
        lock = (root / "dvc.lock").read_text()
        assert (root / "data" / "processed" / "train.parquet").is_dir()
        assert "Data and pipelines are up to date" in sh("dvc", "repro", "split", cwd=root)
        sh("dvc", "repro", "--force", "--single-item", "ingest", "clean", "validate", "split", cwd=root)
        assert (root / "dvc.lock").read_text() == lock  # the data stages run again wrote the same parts
        assert not list((tmp_path / "worker").rglob("*.parquet")), "a worker wrote below its own directory"
    finally:
        for proc in (worker, scheduler):
            stop(proc)
        log.close()


def test_the_xgboost_family_trains_across_workers_registers_and_is_served_by_onnx(prefect_api, tmp_path, capsys):
    """The training flow on partitioned data: xgboost fits through xgboost.dask on every
    training partition, is registered as champion with its ONNX form, and `loopline serve`
    answers with it on ONNX Runtime; the in-memory fit of the same candidate scores the same."""
    import httpx

    from conftest import GOOD, start_service, stop, tracking_section, wait_for_http
    from pipelines.core.config import load_params

    params = write_params(
        tmp_path,
        BIKESHARE,
        execution={"data": "dask", "partition_mb": 0.05},
        tracking=tracking_section(tmp_path),
        search={"families": ["xgboost"], "n_trials": 0},
        train={"hyperparams": {"xgboost": {"n_estimators": 60, "max_depth": 5}}},
    )
    code, out, err = run_cli("train", "--params", str(params), "--json", capsys=capsys)
    assert code == 0, err
    result = json.loads(out)
    trained = result["trained"]
    assert trained["best"] == "xgboost" and (tmp_path / "data" / "processed" / "train.parquet").is_dir()
    assert result["decision"]["promoted"] and result["decision"]["version"] == "1", result["decision"]
    p = load_params(params)
    from pipelines.data.split import read_split, training_rows
    from pipelines.model.estimators import fit_family
    from pipelines.model.evaluation import score

    in_memory = p.model_copy(update={"execution": p.execution.model_copy(update={"data": "pandas"})})
    rows, _ = training_rows(in_memory)
    local = fit_family(in_memory, "xgboost", p.train.hyperparams["xgboost"], rows)
    metrics, _ = score(local, read_split(p, "test"), p.features.columns, p.data.target, p.data.task, 100.0)
    assert metrics["rmse"] == pytest.approx(trained["test"]["rmse"], rel=1e-6)

    port = free_port()
    service = start_service(["--params", str(params)], tmp_path, port)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=service)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            status = client.get("/model").json()
            assert status["engine"] == "onnx", status
            answer = client.post("/predict", json=GOOD).json()
            assert answer["model_version"] == "1" and answer["prediction"] > 0
    finally:
        stop(service)
