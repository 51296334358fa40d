"""Scale benchmark: ingest → clean → validate → featurize → train on synthetic Bikeshare-shaped data.

For each size a fresh child process generates the CSV, runs the stage functions of
`pipelines/` (the ones `dvc repro` runs) and reports seconds, rows/s and its peak RSS;
the parent prints them side by side with time(largest)/time(smallest).

    python bench/scale.py --rows 1000000 10000000
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
STAGES = ["ingest", "clean", "validate", "featurize", "train"]


def synthesise(rows: int, path: Path, seed: int = 0) -> None:
    """Rows with the Bikeshare schema and a demand that depends on hour, weather and temperature."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
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
    table = pa.table(
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
    pacsv.write_csv(table, path)


def child(rows: int, workdir: Path) -> dict:
    import pyarrow.parquet as pq

    from pipelines.core.config import load_params, parse_params
    from pipelines.core.layout import Layout
    from pipelines.data import stages as data_stages
    from pipelines.model.estimators import build_estimator
    from pipelines.model.features import build_preprocessor

    started = time.perf_counter()
    import great_expectations  # noqa: F401  (import cost is fixed; keep it out of the per-row figures)

    import_seconds = time.perf_counter() - started
    csv = workdir / f"synthetic_{rows}.csv"
    synthesise(rows, csv)
    raw = load_params(REPO / "params.yaml").model_dump(mode="json", by_alias=True)
    raw["data"]["source"] = str(csv)
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["schema"]["row_count"]["max"] = None
    params = parse_params(raw)
    seconds: dict[str, float] = {}

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - started
        return result

    timed("ingest", lambda: data_stages.ingest(params))
    timed("clean", lambda: data_stages.clean(params))
    timed("validate", lambda: data_stages.validate(params))
    df = pq.read_table(Layout.of(params).clean).to_pandas()
    X, y = df[params.features.columns], df[params.data.target]
    pre = build_preprocessor(params.features, params.table_schema)
    matrix = timed("featurize", lambda: pre.fit_transform(X))
    model = build_estimator("hist_gradient_boosting", "regression", {"max_iter": 50, "early_stopping": False}, seed=0)
    timed("train", lambda: model.fit(matrix, y))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rows": rows,
        "seconds": seconds,
        "peak_rss_gib": peak_kib / 2**20,
        "gx_import_s": import_seconds,
        "csv_mib": csv.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return

    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="loopline-scale-") as tmp:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(rows), "--workdir", tmp], capture_output=True, text=True
            )
            if proc.returncode != 0:
                sys.exit(f"{rows} rows failed:\n{proc.stderr}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"{rows:>11,} rows: {sum(r['seconds'].values()):7.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
                f"(CSV {r['csv_mib']:.0f} MiB; GX import {r['gx_import_s']:.1f} s not counted)",
                flush=True,
            )

    print()
    header = f"{'stage':<11}" + "".join(f"{r['rows']:>14,} rows/s" for r in results)
    if len(results) > 1:
        header += f"{'time ratio':>14}"
    print(header)
    for stage in [*STAGES, "total"]:
        secs = [sum(r["seconds"].values()) if stage == "total" else r["seconds"][stage] for r in results]
        line = f"{stage:<11}" + "".join(f"{r['rows'] / s:>19,.0f}" for r, s in zip(results, secs, strict=True))
        if len(results) > 1:
            line += f"{secs[-1] / secs[0]:>14.2f}"
        print(line)
    print("peak RSS   " + "".join(f"{r['peak_rss_gib']:>15.2f} GiB" for r in results))
    if len(results) > 1:
        total = [sum(r["seconds"].values()) for r in results]
        print(
            f"\ntime({results[-1]['rows']:,}) / time({results[0]['rows']:,}) = {total[-1] / total[0]:.2f} "
            f"for {results[-1]['rows'] / results[0]['rows']:.0f}x the rows"
        )


if __name__ == "__main__":
    main()
