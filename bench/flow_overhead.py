"""Overhead of the Prefect + MLflow training flow over the same pipelines/ functions in a
plain script: same data, same model (HistGradientBoosting, no search), side by side.

Both run as fresh processes, as a user runs them (imports and start-up included), on a new
SQLite MLflow store with cold caches. The flow runs twice: with the temporary Prefect API
that `loopline train` starts when PREFECT_API_URL is unset, and against a Prefect server
that is already running (as under `loopline deploy`). The plain script calls ingest →
clean → validate → split, fits the model and scores the test rows.

    python bench/flow_overhead.py --rows 0 1000000     # 0 = the bundled Bikeshare data
    python bench/flow_overhead.py --rows 0 --search default   # the first `loopline train` of a new clone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipelines.core.processes import venv_bin  # noqa: E402  (the repository first)

HYPERPARAMS = {"max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 31, "early_stopping": False}

PLAIN = """
import sys, time, json
t0 = time.perf_counter()
from pipelines.core.stages import run_stage
from pipelines.core.layout import Layout
from pipelines.core.config import load_params
from pipelines.training.search import search_candidates
from pipelines.core.metrics import naive_baseline
from pipelines.model.evaluation import score
import pyarrow.parquet as pq
params = load_params(sys.argv[1])
seconds = {"imports": time.perf_counter() - t0}
for name in ("ingest", "clean", "validate", "split"):
    t = time.perf_counter(); run_stage(name, params); seconds[name] = time.perf_counter() - t
t = time.perf_counter()
layout = Layout.of(params)
train, val, test = (pq.read_table(layout.split_file(n)).to_pandas() for n in ("train", "val", "test"))
best, _ = search_candidates(params, train, val)
metrics, _ = score(best.model, test, params.features.columns, params.data.target, params.data.task,
                   naive_baseline(train[params.data.target], params.data.task))
seconds["search: fit and score candidates"] = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "test_rmse": metrics["rmse"]}))
"""


def write_params(workdir: Path, source: Path, search: str) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(source)
    raw["schema"]["row_count"].pop("max", None)
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    if search == "single":  # else params.yaml's search, every family and its trials
        raw["search"] = {"families": ["hist_gradient_boosting"], "n_trials": 0}
        raw["train"]["hyperparams"]["hist_gradient_boosting"] = HYPERPARAMS
    raw["tracking"] = {
        "uri": f"sqlite:///{workdir}/mlflow.db",
        "artifact_root": str(workdir / "mlruns"),
        "experiment": "bench",
        "model_name": "bench",
    }
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def timed_process(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return elapsed, proc.stdout


def measure(rows: int, server_url: str, search: str) -> dict:
    from bench.scale import synthesise

    with tempfile.TemporaryDirectory(prefix="loopline-overhead-") as tmp:
        workdir = Path(tmp)
        source = REPO / "pipelines/datasets/bikeshare_2011.csv"
        if rows:
            source = workdir / "synthetic.csv"
            synthesise(rows, source)
        env = dict(os.environ, PREFECT_HOME=str(workdir / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        for sub in ("plain", "flow", "served"):
            (workdir / sub).mkdir()
        plain_params = write_params(workdir / "plain", source, search)
        flow_params = write_params(workdir / "flow", source, search)
        served_params = write_params(workdir / "served", source, search)  # a new store: a first training too

        plain_s, plain_out = timed_process([sys.executable, "-c", PLAIN, str(plain_params)], env)
        plain = json.loads(plain_out.strip().splitlines()[-1])
        train = [venv_bin("loopline"), "train", "--force", "--json", "--params", str(flow_params)]
        flow_s, flow_out = timed_process(train, env)
        flow = json.loads(flow_out.strip().splitlines()[-1])
        served_s, _ = timed_process([*train[:-1], str(served_params)], dict(env, PREFECT_API_URL=server_url))
        empty_s, _ = timed_process(
            [sys.executable, "-c", "from prefect import flow\n@flow\ndef empty(): pass\nempty()"], env
        )
        return {
            "rows": rows or 8645,
            "plain_s": plain_s,
            "flow_s": flow_s,
            "served_s": served_s,
            "empty_flow_s": empty_s,
            "plain": plain["seconds"],
            "flow": flow["timings"],
            "same_model": abs(plain["test_rmse"] - flow["trained"]["test"]["rmse"]) < 1e-6,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[0, 1_000_000],
        help="synthetic row counts; 0 means the bundled Bikeshare data",
    )
    parser.add_argument(
        "--search",
        choices=["single", "default"],
        default="single",
        help="one HistGradientBoosting fit, or params.yaml's whole candidate search",
    )
    args = parser.parse_args()
    from pipelines.core.processes import free_port, stop, wait_for_http

    port = free_port()
    home = tempfile.mkdtemp(prefix="loopline-overhead-prefect-")
    server = subprocess.Popen(
        [venv_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=dict(os.environ, PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_for_http(f"{url}/health", timeout=120, proc=server)
        results = [measure(rows, url, args.search) for rows in args.rows]
    finally:
        stop(server)
    print(
        f"{'rows':>10} {'plain s':>9} {'flow s':>9} {'ratio':>7} {'flow s, running server':>24} {'ratio':>7}  same model"
    )
    for r in results:
        print(
            f"{r['rows']:>10,} {r['plain_s']:>9.1f} {r['flow_s']:>9.1f} {r['flow_s'] / r['plain_s']:>7.2f} "
            f"{r['served_s']:>24.1f} {r['served_s'] / r['plain_s']:>7.2f}  {r['same_model']}"
        )
    for r in results:
        print(f"\nwhere the flow's time goes at {r['rows']:,} rows (seconds, plain script beside it):")
        print(
            f"  {'process start, imports, temporary Prefect API':<48}{r['flow_s'] - sum(r['flow'].values()):>8.1f}"
            f"{r['plain']['imports']:>8.1f}"
        )
        print(f"  {'(an empty flow in a fresh process takes)':<48}{r['empty_flow_s']:>8.1f}")
        for step, secs in r["flow"].items():
            print(f"  {step:<48}{secs:>8.1f}{r['plain'].get(step, float('nan')):>8.1f}")


if __name__ == "__main__":
    main()
