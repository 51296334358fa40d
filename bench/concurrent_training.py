"""Two trainings on one machine: one after the other vs both at once, side by side.

Each training is `loopline run` (every stage in one process, one HistGradientBoosting model)
on its own synthetic Bikeshare-shaped data. With every fit taking all cores, two at once
took 2.2x the time of running them in series; with the cores divided among the running
trainings (pipelines/core/threads.py) they should take no longer than the series.

    python bench/concurrent_training.py --rows 300000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.core.processes import venv_bin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def params_file(workdir: Path, rows: int, seed: int, threads: int) -> Path:
    from bench.scale import synthesise

    workdir.mkdir(parents=True)
    synthesise(rows, workdir / "source.csv", seed=seed)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(workdir / "source.csv")
    raw["schema"]["row_count"] = {"min": 100}
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["train"]["threads"] = threads
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def timed(commands: list[list[str]]) -> float:
    started = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(err.decode()[-3000:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    from pipelines.core.threads import available_cores

    with tempfile.TemporaryDirectory(prefix="loopline-concurrent-") as tmp:
        print(f"{args.rows:,} rows per training, {available_cores()} cores")
        print(f"{'thread budget':<34}{'series s':>10}{'together s':>12}{'together / series':>19}")
        for label, threads in (
            ("every core per fit (threads: cores)", available_cores()),
            ("divided among trainings (default)", 0),
        ):
            a, b = (
                params_file(Path(tmp) / f"{threads}-{name}", args.rows, seed, threads)
                for name, seed in (("a", 1), ("b", 2))
            )
            run = [[venv_bin("loopline"), "run", "--params", str(p)] for p in (a, b)]
            series = timed(run[:1]) + timed(run[1:])
            together = timed(run)
            print(f"{label:<34}{series:>10.1f}{together:>12.1f}{together / series:>19.2f}", flush=True)


if __name__ == "__main__":
    main()
