"""Scale benchmark: ingest → clean → validate → split → xgboost (50 rounds) on synthetic
Bikeshare-shaped data, with the pandas engine (one process; XGBoost on the rows in memory)
and with the Dask engine (execution.data: dask on a LocalCluster of 2 workers with 1 thread
and 6 GiB each; XGBoost through xgboost.dask on the partitions).

For each size and engine a fresh child process generates the CSV (in chunks), runs the
stage functions of `pipelines/` (the ones `dvc repro` runs) and reports seconds per stage,
the peak RSS of every process (itself and each Dask worker: VmHWM), and each Dask task's run
time, from which the parent works out the wall time with 8 and 32 workers on paper.

    python bench/scale.py --rows 1000000 10000000 --engine pandas dask
    python bench/scale.py --rows 10000000 50000000 --engine dask
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MONTHS = ["Jan", "Feb", "March", "April", "May", "June", "July", "Aug", "Sept", "Oct", "Nov", "Dec"]
WEATHER = ["clear", "cloudy/misty", "light rain/snow", "heavy rain/snow"]
STAGES = ["ingest", "clean", "validate", "split", "xgboost"]


def synthesise(rows: int, path: Path, seed: int = 0, chunk: int = 5_000_000) -> None:
    """Rows with the Bikeshare schema and a demand that depends on hour, weather and
    temperature, written in chunks (50M rows never sit in memory at once)."""
    import pyarrow.csv as pacsv

    with pacsv.CSVWriter(path, _chunk(min(rows, chunk), np.random.default_rng(seed)).schema) as writer:
        for start in range(0, rows, chunk):
            writer.write_table(_chunk(min(chunk, rows - start), np.random.default_rng([seed, start])))


def _chunk(rows: int, rng: np.random.Generator):
    import pyarrow as pa

    day = rng.integers(1, 366, rows)
    hr = rng.integers(0, 24, rows)
    month = np.minimum((day - 1) // 31, 11)
    weekday = (day + 5) % 7
    weather = rng.choice(4, rows, p=[0.65, 0.26, 0.089, 0.001])
    temp = np.clip(0.5 - 0.3 * np.cos(2 * np.pi * day / 365) + rng.normal(0, 0.08, rows), 0, 1).round(2)
    hum = rng.uniform(0.2, 1.0, rows).round(2)
    wind = rng.uniform(0, 0.6, rows).round(4)
    rush = np.exp(-((hr - 8) ** 2) / 4) + np.exp(-((hr - 17.5) ** 2) / 5)
    demand = np.maximum(0, 40 + 250 * rush * (weekday < 5) + 200 * temp - 40 * weather + rng.normal(0, 25, rows))
    casual = (demand * 0.2).astype(np.int64)
    bikers = demand.astype(np.int64)
    return pa.table(
        {
            "season": month // 3 + 1,
            "mnth": pa.array(np.array(MONTHS)[month]),
            "day": day,
            "hr": hr,
            "holiday": (rng.random(rows) < 0.03).astype(np.int64),
            "weekday": weekday,
            "workingday": (weekday < 5).astype(np.int64),
            "weathersit": pa.array(np.array(WEATHER)[weather]),
            "temp": temp,
            "atemp": np.clip(temp + rng.normal(0, 0.02, rows), 0, 1).round(4),
            "hum": hum,
            "windspeed": wind,
            "casual": casual,
            "registered": bikers - casual,
            "bikers": bikers,
        }
    )


XGBOOST = {"n_estimators": 50, "max_depth": 6, "learning_rate": 0.3}


def params_for(rows: int, workdir: Path, engine: str, csv: Path):
    from pipelines.core.config import load_params, parse_params

    raw = load_params(REPO / "params.yaml").model_dump(mode="json", by_alias=True)
    raw["data"]["source"] = str(csv)
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["schema"]["row_count"]["max"] = None
    raw["execution"] |= {"data": engine, "dask": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "6GiB"}}
    raw["train"]["sample_rows"] = 100_000 if engine == "dask" else 0  # dask: the feature transform's sample
    return parse_params(raw)


def child(rows: int, workdir: Path, engine: str) -> dict:
    """ingest -> clean -> validate -> split -> xgboost (50 rounds) on one engine, timed, with
    the peak RSS of this process and (dask) of each worker, and every task's run time."""
    from pipelines.core.stages import run_stage
    from pipelines.data.split import training_rows
    from pipelines.model.estimators import fit_family

    started = time.perf_counter()
    import great_expectations  # noqa: F401  (import cost is fixed; keep it out of the per-row figures)

    import_seconds = time.perf_counter() - started
    csv = workdir / f"synthetic_{rows}.csv"  # written by the parent: its memory is not the pipeline's
    params = params_for(rows, workdir, engine, csv)
    seconds: dict[str, float] = {}
    tasks: dict[str, list[float]] = {}
    workers: dict[str, float] = {}

    def stages() -> None:
        for name in ("ingest", "clean", "validate", "split"):
            began = time.perf_counter()
            run_stage(name, params)
            seconds[name] = time.perf_counter() - began
        began = time.perf_counter()
        sample, _ = training_rows(params)
        fit_family(params, "xgboost", XGBOOST, sample)
        seconds["xgboost"] = time.perf_counter() - began

    if engine == "pandas":
        stages()
    else:
        from distributed import get_task_stream

        from pipelines.core.cluster import kept_client

        with kept_client(params) as client:
            client.run(lambda: __import__("great_expectations"))  # as in this process: imports are not per row
            with get_task_stream(client) as stream:
                stages()
            for task in stream.data:
                stage = str(task["key"]).split("-")[0] if str(task["key"]).split("-")[0] in seconds else "xgboost"
                tasks.setdefault(stage, []).extend(
                    s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute"
                )
            workers = {address: kib / 2**20 for address, kib in client.run(_peak_kib).items()}
    return {
        "rows": rows,
        "engine": engine,
        "seconds": seconds,
        "tasks": tasks,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "worker_peak_rss_gib": workers,
        "gx_import_s": import_seconds,
        "csv_mib": csv.stat().st_size / 2**20,
    }


def _peak_kib() -> int:
    """This process's peak resident memory (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def on_paper(result: dict, workers: int) -> float:
    """The Dask run's wall time with `workers` workers, from its measured tasks: each stage's
    tasks placed longest first on the least busy worker, plus what the stage spent outside
    its tasks (this process's share, and the cluster's overheads, measured with 2 workers);
    XGBoost's training divides its rows among the workers, so its time scales by 2 / workers."""
    total = 0.0
    for stage, wall in result["seconds"].items():
        durations = sorted(result["tasks"].get(stage, []), reverse=True)
        if stage == "xgboost":
            total += wall * 2 / workers
            continue
        load = [0.0] * workers
        for duration in durations:
            load[load.index(min(load))] += duration
        two = [0.0, 0.0]
        for duration in durations:
            two[two.index(min(two))] += duration
        total += max(wall - max(two), 0.0) + max(load)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--engine", nargs="+", choices=["pandas", "dask"], default=["pandas"])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.engine[0])))
        return

    results = []
    for rows in args.rows:
        for engine in args.engine:
            with tempfile.TemporaryDirectory(prefix="loopline-scale-") as tmp:
                made = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.scale import "
                        f"synthesise; from pathlib import Path; synthesise({rows}, Path({tmp!r}) / 'synthetic_{rows}.csv')",
                    ],
                    capture_output=True,
                    text=True,
                )
                if made.returncode != 0:
                    sys.exit(made.stderr[-3000:])
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(rows), "--engine", engine, "--workdir", tmp],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    sys.exit(f"{rows} rows on {engine} failed:\n{proc.stderr[-5000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            peaks = [r["peak_rss_gib"], *r["worker_peak_rss_gib"].values()]
            print(
                f"{rows:>11,} rows, {engine:<6}: {sum(r['seconds'].values()):7.1f} s, peak RSS of every process "
                f"{', '.join(f'{g:.2f}' for g in peaks)} GiB (CSV {r['csv_mib']:.0f} MiB; GX import not counted)",
                flush=True,
            )

    print()
    names = [f"{r['rows']:,} {r['engine']}" for r in results]
    print(f"{'stage':<10}" + "".join(f"{n:>22}" for n in names) + "   (seconds)")
    for stage in [*STAGES, "total"]:
        secs = [sum(r["seconds"].values()) if stage == "total" else r["seconds"][stage] for r in results]
        print(f"{stage:<10}" + "".join(f"{s:>22.1f}" for s in secs))
    print(
        f"{'peak GiB':<10}"
        + "".join(f"{max([r['peak_rss_gib'], *r['worker_peak_rss_gib'].values()]):>22.2f}" for r in results)
    )
    total = {(r["rows"], r["engine"]): sum(r["seconds"].values()) for r in results}
    for rows in args.rows:
        if (rows, "pandas") in total and (rows, "dask") in total:
            print(f"\n{rows:,} rows: dask / pandas wall time = {total[(rows, 'dask')] / total[(rows, 'pandas')]:.2f}")
    for engine in args.engine:
        mine = [r for r in results if r["engine"] == engine]
        if len(mine) > 1:
            small, large = mine[0], mine[-1]
            print(
                f"{engine}: time({large['rows']:,}) / time({small['rows']:,}) = "
                f"{total[(large['rows'], engine)] / total[(small['rows'], engine)]:.2f} "
                f"for {large['rows'] / small['rows']:.0f}x the rows"
            )
    for r in results:
        if r["engine"] == "dask":
            print(
                f"dask, {r['rows']:,} rows on paper: "
                + ", ".join(f"{w} workers {on_paper(r, w):.0f} s" for w in (2, 8, 32))
                + f" (measured with 2: {sum(r['seconds'].values()):.0f} s)"
            )


if __name__ == "__main__":
    main()
