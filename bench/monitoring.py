"""Monitoring flow time against the size of the reference and of the window.

For each (reference rows, window rows) pair, in one run: a champion is trained through the
training flow on synthetic Bikeshare-shaped data (so its logged reference has the wanted
size), a window batch lands, and the monitoring flow is timed end to end (accept and validate
the batch, load the reference, predict both, Evidently drift, record in MLflow). Evidently's
report alone is timed on the same frames. The last column is each time over the first row's.

    python bench/monitoring.py --sizes 100000:10000 1000000:100000
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from bench.scale import synthesise  # noqa: E402


def run(reference_rows: int, window_rows: int, workdir: Path) -> dict[str, float]:
    import pandas as pd

    from flows.monitoring import monitoring_flow
    from flows.training import training_flow
    from pipelines.config import load_params
    from pipelines.monitor import PREDICTION, measure_drift

    # The training split is the first 70% of rows: size the source so it is `reference_rows`.
    source_rows = math.ceil(reference_rows / 0.7)
    synthesise(source_rows, workdir / "source.csv", seed=1)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(workdir / "source.csv")
    raw["schema"]["row_count"] = {"min": 100}
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["tracking"] = {
        "uri": f"sqlite:///{workdir}/mlflow.db",
        "artifact_root": str(workdir / "mlruns"),
        "experiment": "bench",
        "model_name": "bench",
    }
    raw["search"] = {"families": ["linear"], "n_trials": 0}
    raw["monitor"] = {"reference_rows": reference_rows}
    params_path = workdir / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with contextlib.chdir(REPO):
        started = time.perf_counter()
        training_flow(params_path=str(params_path))
        train_s = time.perf_counter() - started

        synthesise(window_rows, workdir / "window.csv", seed=2)
        landing = workdir / "data" / "landing"
        landing.mkdir(parents=True)
        window = pd.read_csv(workdir / "window.csv")
        window.assign(request_id=[f"w-{i}" for i in range(len(window))]).to_csv(landing / "w.csv", index=False)
        started = time.perf_counter()
        result = monitoring_flow(params_path=str(params_path), trigger="none")
        flow_s = time.perf_counter() - started

    params = load_params(params_path)
    measured = result.measured
    assert measured.reference_rows == reference_rows and measured.window_rows == window_rows, measured
    reference = pd.read_parquet(workdir / "data" / "monitoring" / "reference" / f"{measured['champion_run']}.parquet")
    current = pd.read_parquet(workdir / "data" / "processed" / "train.parquet").head(window_rows)
    for frame in (reference, current):
        frame[PREDICTION] = frame[params.data.target].astype(float)
    started = time.perf_counter()
    measure_drift(reference, current, params)
    evidently_s = time.perf_counter() - started
    return {
        "train_s": train_s,
        "flow_s": flow_s,
        "measure_s": measured["seconds"],
        "evidently_s": evidently_s,
        "drift_share": measured.drift.share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", nargs="+", default=["100000:10000", "1000000:100000"], help="REFERENCE:WINDOW row counts"
    )
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        reference_rows, window_rows = (int(n) for n in size.split(":"))
        with tempfile.TemporaryDirectory(prefix="loopline-bench-monitor-") as tmp:
            results.append((reference_rows, window_rows, run(reference_rows, window_rows, Path(tmp))))
    first = results[0][2]["flow_s"]
    print(
        f"\n{'reference':>10} {'window':>8} {'training flow s':>16} {'monitoring flow s':>18} "
        f"{'measure task s':>15} {'Evidently s':>12} {'flow / first':>13}"
    )
    for reference_rows, window_rows, r in results:
        print(
            f"{reference_rows:>10,} {window_rows:>8,} {r['train_s']:>16.1f} {r['flow_s']:>18.1f} "
            f"{r['measure_s']:>15.1f} {r['evidently_s']:>12.1f} {r['flow_s'] / first:>13.2f}"
        )


if __name__ == "__main__":
    main()
