"""What a command costs a user, side by side: `loopline train` (the first, on a new store),
`loopline score` of 5 rows and `loopline monitor --no-retrain` on a landed 300-row batch,
each run as a user runs it (a new process):

- with Prefect's temporary API (no server running: the command starts one);
- against a running `loopline prefect-server`, in the command's own process (LOOPLINE_WARM=0);
- against the same server, in its warm process (the default while it runs).

Everything lives in a scratch directory with a private PREFECT_HOME, on the bundled
Bikeshare data. Runs alternate between the modes; each figure is the median of --runs.

    python bench/commands.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipelines.core.processes import free_port, venv_bin  # noqa: E402  (the repository first)

DATA = REPO / "pipelines" / "datasets" / "bikeshare_2011.csv"
MODES = ("temporary API", "running API", "running API, warm")


def write_params(workdir: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = str(DATA)
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["tracking"] |= {"uri": f"sqlite:///{workdir}/mlflow.db", "artifact_root": str(workdir / "mlruns")}
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([venv_bin("loopline"), *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"loopline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def land(workdir: Path, batch: int, rows: int = 300) -> None:
    """A labelled batch of `rows` hours no earlier batch held, landed as a writer would."""
    import pandas as pd

    frame = pd.read_csv(DATA).iloc[batch * rows : (batch + 1) * rows]
    landing = workdir / "data" / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    hidden = landing / f".batch-{batch}.csv"
    frame.to_csv(hidden, index=False)
    hidden.rename(landing / f"batch-{batch}.csv")
    time.sleep(2.2)  # monitor.settle_seconds: a file modified just now is looked at again later


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="loopline-bench-commands-"))
    home = scratch / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    seconds: dict[tuple[str, str], list[float]] = {}
    batches = iter(range(1000))

    def first_train(mode: str, run_env: dict[str, str]) -> None:
        workdir = scratch / f"train-{len(seconds.get(('first train', mode), []))}-{mode.replace(' ', '-')}"
        workdir.mkdir()
        seconds.setdefault(("first train", mode), []).append(
            timed(["train", "--params", str(write_params(workdir))], run_env)
        )

    shared = scratch / "shared"
    shared.mkdir()
    params = write_params(shared)
    timed(["train", "--params", str(params)], env)  # the champion that score and monitor use
    import pandas as pd

    five = scratch / "five.csv"
    pd.read_csv(DATA).head(5).drop(columns=["bikers"]).to_csv(five, index=False)

    def score_and_monitor(mode: str, run_env: dict[str, str]) -> None:
        seconds.setdefault(("score 5 rows", mode), []).append(
            timed(["score", str(five), str(scratch / "out.parquet"), "--params", str(params)], run_env)
        )
        land(shared, next(batches))
        seconds.setdefault(("monitor, 300-row batch", mode), []).append(
            timed(["monitor", "--no-retrain", "--params", str(params)], run_env)
        )

    for _ in range(args.runs):  # the temporary API: no server
        first_train(MODES[0], env)
        score_and_monitor(MODES[0], env)

    port = free_port()
    server = subprocess.Popen(
        [venv_bin("loopline"), "prefect-server", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not (
            any("warm commands: ready" in line for line in lines) and any("Prefect API" in line for line in lines)
        ):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("".join(lines))
            time.sleep(0.5)
        cold, warm = {**env, "LOOPLINE_WARM": "0"}, env
        for _ in range(args.runs):  # alternating: the same server, in the command's process and warm
            for mode, run_env in ((MODES[1], cold), (MODES[2], warm)):
                first_train(mode, run_env)
                score_and_monitor(mode, run_env)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)

    print(f"\nmedian seconds of {args.runs} runs (bundled Bikeshare data, {os.cpu_count()} CPUs)\n")
    print(f"| command | {' | '.join(MODES)} | warm / own process |")
    print(f"|---|{'---:|' * len(MODES)}---:|")
    for command in ("first train", "score 5 rows", "monitor, 300-row batch"):
        medians = [statistics.median(seconds[(command, mode)]) for mode in MODES]
        print(f"| {command} | {' | '.join(f'{m:.1f}' for m in medians)} | {medians[2] / medians[1]:.2f} |")


if __name__ == "__main__":
    main()
