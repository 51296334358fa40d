"""The candidate search (params.yaml's families and Optuna trials) sequential vs on Dask
workers, side by side in one run on the bundled Bikeshare data, and the whole training flow
with each runner.

- search: `search_candidates` in this process, then on a LocalCluster of --workers
  processes (its start-up timed apart), then at the address of that cluster again with the
  cluster already up; the candidates must be the same.
- flow: `loopline train --force` as a user runs it, once per runner, on a fresh MLflow store.
- on paper: the wall time with 8 and 32 workers, from the measured per-candidate times
  (each round's candidates dealt longest-first to the least-loaded worker) plus the
  measured fixed cost of a round on the cluster.

    python bench/dask_search.py --workers 2
"""

from __future__ import annotations

import argparse
import heapq
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.core.processes import venv_bin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def params_file(workdir: Path, runner: str, workers: int, address: str = "") -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(REPO / raw["data"]["source"])
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["tracking"]["uri"] = f"sqlite:///{workdir / runner / 'mlflow.db'}"
    raw["tracking"]["artifact_root"] = str(workdir / runner / "mlruns")
    raw["execution"] = {"runner": runner, "dask": {"n_workers": workers, "address": address}}
    path = workdir / f"params-{runner}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def makespan(seconds: list[float], workers: int) -> float:
    """Longest-first onto the least-loaded worker."""
    loads = [0.0] * workers
    for s in sorted(seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + s)
    return max(loads)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-flow", action="store_true", help="Only the search.")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from pipelines.core.config import load_params
    from pipelines.core.stages import run_stage
    from pipelines.data.split import read_split
    from pipelines.training.search import search_candidates

    workdir = Path(tempfile.mkdtemp(prefix="loopline-bench-dask-"))
    sequential = load_params(params_file(workdir, "sequential", args.workers))
    for stage in ("params", "ingest", "clean", "validate", "split"):
        run_stage(stage, sequential)
    train, val = read_split(sequential, "train"), read_split(sequential, "val")
    print(f"{len(train)} training rows, {len(val)} validation rows; {os.cpu_count()} cores")

    started = time.perf_counter()
    best, local = search_candidates(sequential, train, val)
    seq_s = time.perf_counter() - started

    started = time.perf_counter()
    dask = load_params(params_file(workdir, "dask", args.workers))
    _, fresh_cluster = search_candidates(dask, train, val)
    fresh_s = time.perf_counter() - started

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster:
        started = time.perf_counter()
        with Client(cluster) as client:
            client.wait_for_workers(args.workers)
        start_s = time.perf_counter() - started
        running = load_params(params_file(workdir, "dask", args.workers, cluster.scheduler_address))
        started = time.perf_counter()
        best_dask, remote = search_candidates(running, train, val)
        dask_s = time.perf_counter() - started

    same = (
        [(c.name, c.val) for c in local]
        == [(c.name, c.val) for c in remote]
        == [(c.name, c.val) for c in fresh_cluster]
    )
    fits = [c.fit_seconds for c in remote]
    workers_used = sorted({c.worker for c in remote})
    print(f"\nsearch: {len(local)} candidates; same candidates and scores on every runner: {same}; best {best.name}")
    print(f"{'runner':<44}{'wall s':>9}{'ratio':>8}")
    print(f"{'sequential (this process)':<44}{seq_s:>9.2f}{1.0:>8.2f}")
    print(f"{f'dask, {args.workers} workers, cluster started by the search':<44}{fresh_s:>9.2f}{seq_s / fresh_s:>8.2f}")
    print(f"{f'dask, {args.workers} workers, cluster already up':<44}{dask_s:>9.2f}{seq_s / dask_s:>8.2f}")
    print(f"(cluster start alone {start_s:.2f} s; fits ran on {len(workers_used)} workers)")
    print(f"per-candidate fit seconds: {', '.join(f'{c.name} {c.fit_seconds:.2f}' for c in remote)}")

    # One round holds every candidate here (families + up to 10 start-up trials); the fixed
    # cost is what the run on the running cluster took beyond its busiest worker's fits.
    overhead = max(0.0, dask_s - makespan(fits, args.workers))
    print(f"\non paper (round overhead {overhead:.2f} s measured at {args.workers} workers):")
    for n in (args.workers, 8, 32):
        projected = overhead + makespan(fits, n)
        print(f"  {n:>2} workers: {projected:6.2f} s  ({seq_s / projected:.2f}x the sequential search)")
    longest = max(remote, key=lambda c: c.fit_seconds)
    print(f"  the floor is the longest single fit: {longest.name} ({longest.family}), {longest.fit_seconds:.2f} s")

    if args.no_flow:
        return
    print(f"\nflow: `loopline train --force`, {args.workers} LocalCluster workers for dask")
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    walls = {}
    for runner in ("sequential", "dask"):
        path = params_file(workdir, runner, args.workers)
        started = time.perf_counter()
        subprocess.run(
            [venv_bin("loopline"), "train", "--force", "--params", str(path)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        walls[runner] = time.perf_counter() - started
    print(f"{'sequential':<12}{walls['sequential']:>8.2f} s")
    print(f"{'dask':<12}{walls['dask']:>8.2f} s  ({walls['dask'] / walls['sequential']:.2f}x)")


if __name__ == "__main__":
    main()
