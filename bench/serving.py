"""The BentoML service with each engine (ONNX Runtime, the Python model) vs a bare FastAPI
+ uvicorn app on the same champion, side by side.

All serve the registry champion of the params file (run `make run` first) on loopback, one
worker each, started fresh; the bare app uses the same engine choice as the service's
default (ONNX when the champion has a form that passes parity). The load generator
(aiohttp, this process) sends a fixed number of single-record /predict requests at
concurrency 1, 8 and 32 and records each latency. Then, in this process, one model call per
engine: a single record, and rows/s on a batch; and the batch endpoint: rows/s of
/predict_batch vs the raw engine on the same rows. `--busy` then repeats the BentoML runs
(both engines) with a CPU-bound process beside them (the configured model's
training, over and over, on every core), to show what the bounded model threads keep of p99.

    python bench/serving.py [--params params.yaml] [--requests 2000] [--batch 1000]
    python bench/serving.py --soak 7              # 7 rounds of 10k requests at c=64, BentoML only

    python bench/serving.py --shadow              # the service with a shadow loaded vs without
    python bench/serving.py --batches             # /predict_batch and /predict_columns vs the raw engine

The shadow mode serves a copy of the registry in which a second version of the champion's
model is the `shadow` (the same model: the cost of a challenger of the same family), against
the same service without one, each on a prediction log of its own, alternating twice: p99 and
throughput at each concurrency, and the shadow rows skipped under that load (the goals: p99
at c=32 <= 1.15x, throughput >= 0.85x).

The batches mode serves the champion once and sends --batch rows per call, the four calls in
turn 60 times: as records (/predict_batch), as columns (/predict_columns), and the same rows
to the raw engine in this process, from records and from columns; each one's median call
(the goals: columns >= 0.8x the raw engine, records >= 0.6x).

The soak mode keeps one service under sustained load and prints each round's p99, throughput
and the service's resident memory: p99 creeping up round after round, or RSS growing, is a
leak (the goal: last round's p99 within 1.2x the first's, RSS flat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipelines.core.processes import venv_bin  # noqa: E402  (the repository first)


def start(command: list[str], ready: str) -> subprocess.Popen:
    from pipelines.core.processes import wait_for_http

    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )
    wait_for_http(ready, timeout=120, proc=proc)
    return proc


async def load(url: str, bodies: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, next_index
        while next_index < total:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(min(20, total)):  # warm-up, not counted
            async with session.post(url, data=bodies[0], headers={"Content-Type": "application/json"}) as r:
                await r.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": errors,
    }


def service_rss_mib(proc: subprocess.Popen) -> float:
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def soak(args, bodies: list[bytes], params_path: str) -> None:
    from pipelines.core.processes import free_port, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([venv_bin("loopline"), "serve", "--params", params_path, "--port", str(port)], f"{url}/readyz")
    rounds = []
    try:
        print(f"\n{'round':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'service RSS MiB':>17}")
        for i in range(1, args.soak + 1):
            r = asyncio.run(load(f"{url}/predict", bodies, args.soak_concurrency, args.soak_requests))
            r["rss"] = service_rss_mib(proc)
            rounds.append(r)
            print(
                f"{i:>5}{r['rps']:>9.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}{r['rss']:>17.0f}", flush=True
            )
    finally:
        stop(proc)
    first, last = rounds[0], rounds[-1]
    print(
        f"last/first: p99 {last['p99'] / first['p99']:.2f} (goal <= 1.2), req/s {last['rps'] / first['rps']:.2f}, "
        f"RSS {last['rss'] / first['rss']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    parser.add_argument("--batch", type=int, default=1000, help="records per /predict_batch call")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--busy", action="store_true", help="a CPU-bound training runs beside the services")
    parser.add_argument("--soak", type=int, default=0, help="rounds of sustained load instead of the comparison")
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument("--shadow", action="store_true", help="with a shadow loaded vs without, instead")
    parser.add_argument("--batches", action="store_true", help="batch endpoints vs the raw engine, instead")
    args = parser.parse_args()

    from pipelines.core.config import load_params
    from pipelines.core.processes import free_port, stop
    from pipelines.data.split import read_split
    from serving.runtime import Unavailable, load_registry_champion, predict_records
    from serving.schema import request_records

    params = load_params(args.params)
    try:
        served = load_registry_champion(params)
    except Unavailable as err:
        raise SystemExit(f"{err.message} (run `make run` first)") from None
    records = request_records(read_split(params, "test", "bench"), params)
    bodies = [json.dumps(r).encode() for r in records]
    batch_records = (records * (args.batch // len(records) + 1))[: args.batch]
    print(
        f"model: {served.name} v{served.version} ({type(served.model[-1]).__name__}); "
        f"{args.requests} requests per level; {os.cpu_count()} CPUs"
    )

    env_params = str(Path(args.params).resolve())
    os.environ["LOOPLINE_PARAMS"] = env_params
    if args.soak:
        return soak(args, bodies, env_params)
    if args.shadow:
        return shadow_comparison(args, bodies, params, env_params)
    if args.batches:
        return batch_comparison(args, served, params, batch_records, env_params)
    engine_calls(served, params, records, batch_records)
    python_params = Path(env_params).with_name(".bench-serving-python.yaml")
    raw = yaml.safe_load(Path(env_params).read_text())
    raw.setdefault("serve", {})["engine"] = "python"
    python_params.write_text(yaml.safe_dump(raw))
    results: dict[str, dict[int, dict[str, float]]] = {}
    bento_port, python_port, bare_port = free_port(), free_port(), free_port()
    servers = {
        "bentoml": (
            [venv_bin("loopline"), "serve", "--params", env_params, "--port", str(bento_port)],
            f"http://127.0.0.1:{bento_port}",
        ),
        "bento-py": (
            [venv_bin("loopline"), "serve", "--params", str(python_params), "--port", str(python_port)],
            f"http://127.0.0.1:{python_port}",
        ),
        "fastapi": (
            [
                venv_bin("uvicorn"),
                "bench.bare_app:app",
                "--port",
                str(bare_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            f"http://127.0.0.1:{bare_port}",
        ),
    }
    batch_rps = None

    def run(name: str, command: list[str], url: str, label: str) -> None:
        nonlocal batch_rps
        proc = start(command, f"{url}/readyz" if name != "fastapi" else f"{url}/docs")
        try:
            if name != "fastapi":
                ask = urllib.request.Request(f"{url}/model", b"{}", {"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(ask) as answer:
                    status = json.loads(answer.read())
                print(f"{label}: engine {status['engine']} ({status['engine_reason']})", flush=True)
            results[label] = {
                c: asyncio.run(load(f"{url}/predict", bodies, c, args.requests)) for c in args.concurrency
            }
            if label == "bentoml":
                batch = json.dumps({"records": batch_records}).encode()
                calls = 20
                started = time.perf_counter()
                for _ in range(calls):
                    request = urllib.request.Request(
                        f"{url}/predict_batch", batch, {"Content-Type": "application/json"}
                    )
                    with urllib.request.urlopen(request, timeout=60) as response:
                        assert response.status == 200
                batch_rps = calls * args.batch / (time.perf_counter() - started)
        finally:
            stop(proc)

    try:
        for name, (command, url) in servers.items():
            run(name, command, url, name)
        if args.busy:  # again, beside a CPU-bound neighbour: a training on every core, restarted until done
            busy = subprocess.Popen(
                [sys.executable, "-c", BUSY, env_params], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                for name in ("bentoml", "bento-py"):
                    run(name, *servers[name], f"{name}+busy")
            finally:
                busy.kill()
                busy.wait()
    finally:
        python_params.unlink()

    print(f"\n{'server':<14}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, levels in results.items():
        for c, r in levels.items():
            print(f"{name:<14}{c:>4}{r['rps']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}")
    for c in args.concurrency:
        ratio = results["bentoml"][c]["rps"] / results["fastapi"][c]["rps"]
        print(f"throughput ratio bentoml/fastapi at c={c}: {ratio:.2f}")
        engines = results["bentoml"][c]["rps"] / results["bento-py"][c]["rps"]
        print(f"throughput ratio bentoml onnx/python at c={c}: {engines:.2f}")
        for name in ("bentoml", "bento-py"):
            if f"{name}+busy" in results:
                busy_p99, quiet_p99 = results[f"{name}+busy"][c]["p99"], results[name][c]["p99"]
                print(
                    f"p99 busy/quiet, {name} at c={c}: {busy_p99:.1f} / {quiet_p99:.1f} ms = {busy_p99 / quiet_p99:.2f}"
                )

    started = time.perf_counter()
    for _ in range(20):
        predict_records(served, batch_records, params)
    raw_rps = 20 * args.batch / (time.perf_counter() - started)
    print(
        f"\n/predict_batch ({args.batch} records, engine {served.engine_name}): {batch_rps:,.0f} rows/s over "
        f"HTTP; the raw engine {raw_rps:,.0f} rows/s; HTTP/raw = {batch_rps / raw_rps:.2f}"
    )


def batch_comparison(args, served, params, batch_records: list[dict], params_path: str, calls: int = 60) -> None:
    """Rows/s of /predict_batch (records) and /predict_columns (columns) over HTTP against the
    raw engine in this process on the same rows: the four calls taken in turn, `calls` times,
    and each one's median time (a burst of noise on this shared machine hits one call of
    each, not a whole round of one of them)."""
    from pipelines.core.processes import free_port, stop
    from serving.runtime import predict_records
    from serving.schema import check_columns

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([venv_bin("loopline"), "serve", "--params", params_path, "--port", str(port)], f"{url}/readyz")
    columns = {c: [r.get(c) for r in batch_records] for c in batch_records[0]}
    bodies = {
        "/predict_batch": json.dumps({"records": batch_records}).encode(),
        "/predict_columns": json.dumps(columns).encode(),
    }
    typed = check_columns(columns, params)

    def http(route: str) -> float:
        started = time.perf_counter()
        request = urllib.request.Request(f"{url}{route}", bodies[route], {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200, response.read()
            response.read()
        return time.perf_counter() - started

    def raw(rows) -> float:
        started = time.perf_counter()
        predict_records(served, rows, params)
        return time.perf_counter() - started

    calls_of = {
        "records": lambda: http("/predict_batch"),
        "columns": lambda: http("/predict_columns"),
        "raw records": lambda: raw(batch_records),
        "raw columns": lambda: raw(typed),
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls_of}
    try:
        for call in calls_of.values():  # warm
            call()
        for _ in range(calls):
            for name, call in calls_of.items():
                seconds[name].append(call())
    finally:
        stop(proc)
    rps = {name: args.batch / float(np.median(values)) for name, values in seconds.items()}
    print(f"\n{args.batch} rows per call, engine {served.engine_name}, median of {calls} calls each, taken in turn")
    for name, value in rps.items():
        print(f"  {name:<12}{value:>12,.0f} rows/s")
    print(f"/predict_columns / raw engine (columns): {rps['columns'] / rps['raw columns']:.2f}")
    print(f"/predict_batch / raw engine (records):   {rps['records'] / rps['raw records']:.2f}")
    print(f"/predict_columns / /predict_batch:       {rps['columns'] / rps['records']:.2f}")


def shadow_comparison(args, bodies: list[bytes], params, params_path: str) -> None:
    """The BentoML service with and without a shadow, alternating, on copies of the store."""
    import shutil
    import tempfile

    from pipelines.core.names import CHAMPION, SHADOW
    from pipelines.core.processes import free_port, stop
    from pipelines.registry.tracking import registry_client, sqlite_store, tracking_uri

    store = sqlite_store(tracking_uri(params))
    if store is None:
        raise SystemExit("the shadow bench copies a SQLite tracking store; this one is not")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for label, with_shadow in (("no shadow", False), ("shadow", True)):
            copy = Path(tmp) / label.replace(" ", "-")
            copy.mkdir()
            shutil.copy2(store, copy / "mlflow.db")  # the artifacts stay where they are (absolute paths)
            raw = yaml.safe_load(Path(params_path).read_text())
            raw["tracking"]["uri"] = f"sqlite:///{copy / 'mlflow.db'}"
            raw.setdefault("serve", {})["reload_interval_s"] = 0
            config = copy / "params.yaml"
            config.write_text(yaml.safe_dump(raw))
            if with_shadow:
                from pipelines.core.config import load_params

                copied = load_params(config)
                client, name = registry_client(copied), copied.tracking.model_name
                champion = client.get_model_version_by_alias(name, CHAMPION)
                second = client.create_model_version(name, source=champion.source, run_id=champion.run_id)
                client.set_registered_model_alias(name, SHADOW, str(second.version))
            configs[label] = (config, copy / "predictions.db")
        results: dict[str, list[dict[int, dict[str, float]]]] = {label: [] for label in configs}
        skipped: list[dict] = []
        for _ in range(2):
            for label, (config, log) in configs.items():
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                os.environ["LOOPLINE_PREDICTION_LOG"] = str(log)
                proc = start(
                    [venv_bin("loopline"), "serve", "--params", str(config), "--port", str(port)], f"{url}/readyz"
                )
                try:
                    results[label].append(
                        {c: asyncio.run(load(f"{url}/predict", bodies, c, args.requests)) for c in args.concurrency}
                    )
                    with urllib.request.urlopen(f"{url}/model") as answer:
                        status = json.loads(answer.read())["shadow"]
                    if label == "shadow":
                        skipped.append(status)
                finally:
                    stop(proc)
                    os.environ.pop("LOOPLINE_PREDICTION_LOG", None)
    print(f"\n{'service':<12}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   (best of 2 rounds)")
    best = {
        label: {
            c: {
                "rps": max(r[c]["rps"] for r in rounds),
                "p50": min(r[c]["p50"] for r in rounds),
                "p99": min(r[c]["p99"] for r in rounds),
                "errors": sum(r[c]["errors"] for r in rounds),
            }
            for c in args.concurrency
        }
        for label, rounds in results.items()
    }
    for label, levels in best.items():
        for c, r in levels.items():
            print(f"{label:<12}{c:>4}{r['rps']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}")
    for c in args.concurrency:
        p99 = best["shadow"][c]["p99"] / best["no shadow"][c]["p99"]
        rps = best["shadow"][c]["rps"] / best["no shadow"][c]["rps"]
        print(f"with/without a shadow at c={c}: p99 {p99:.2f}x, throughput {rps:.2f}x")
    for i, status in enumerate(skipped, 1):
        print(
            f"round {i}: the shadow scored {status['rows_scored']:,} rows, skipped {status['rows_skipped']:,} "
            f"(queue {status['queue_rows']:,} rows), failed {status['rows_failed']}"
        )


BUSY = """
import sys
from pipelines.core.config import load_params
from pipelines.model.stages import fit_configured_model
params = load_params(sys.argv[1])
params = params.model_copy(update={"train": params.train.model_copy(update={"threads": 0})})
while True:
    fit_configured_model(params)
"""


def engine_calls(served, params, records, batch_records) -> None:
    """One model call per engine, in this process: a single record (the median of 2,000
    calls), and rows/s on the batch."""
    from dataclasses import replace

    from serving.runtime import predict_frame, predict_records, records_frame

    engines = {"onnx": served, "python": replace(served, engine=None)} if served.engine else {"python": served}
    print(f"\n{'engine':<8}{'1 record ms':>12}{'batch rows/s':>14}")
    figures = {}
    for name, model in engines.items():
        single = []
        for record in (records * 4)[:2000]:
            started = time.perf_counter()
            if name == "python":
                predict_frame(model, records_frame([record], params))
            else:
                predict_records(model, [record], params)
            single.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(10):
            predict_records(model, batch_records, params)
        rows = 10 * len(batch_records) / (time.perf_counter() - started)
        figures[name] = (float(np.median(single)) * 1000, rows)
        print(f"{name:<8}{figures[name][0]:>12.3f}{rows:>14,.0f}")
    if len(figures) == 2:
        print(
            f"onnx/python: single-record call {figures['onnx'][0] / figures['python'][0]:.3f}x the time, "
            f"batch {figures['onnx'][1] / figures['python'][1]:.1f}x the rows/s"
        )


if __name__ == "__main__":
    main()
