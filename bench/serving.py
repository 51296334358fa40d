"""BentoML service vs a bare FastAPI + uvicorn app on the same champion, side by side.

Both serve the registry champion of the params file (run `make run` first) on loopback,
one worker each, started fresh. The load generator (aiohttp, this process) sends a fixed
number of single-record /predict requests at concurrency 1, 8 and 32 and records each
latency. Then the batch endpoint: rows/s of /predict_batch vs raw model.predict on the
same rows in this process.

    python bench/serving.py [--params params.yaml] [--requests 2000] [--batch 1000]
    python bench/serving.py --soak 7              # 7 rounds of 10k requests at c=64, BentoML only

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def start(command: list[str], ready: str) -> subprocess.Popen:
    from serving.harness import wait_for_http

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
    from serving.harness import free_port, stop

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([str(BIN / "loopline"), "serve", "--params", params_path, "--port", str(port)], f"{url}/readyz")
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
    parser.add_argument("--soak", type=int, default=0, help="rounds of sustained load instead of the comparison")
    parser.add_argument("--soak-requests", type=int, default=10_000)
    parser.add_argument("--soak-concurrency", type=int, default=64)
    args = parser.parse_args()

    from pipelines.config import load_params
    from pipelines.stages import read_split
    from serving.harness import free_port, stop
    from serving.runtime import Unavailable, load_registry_champion, predict_frame, records_frame
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
    results: dict[str, dict[int, dict[str, float]]] = {}
    bento_port, bare_port = free_port(), free_port()
    servers = {
        "bentoml": (
            [str(BIN / "loopline"), "serve", "--params", env_params, "--port", str(bento_port)],
            f"http://127.0.0.1:{bento_port}",
        ),
        "fastapi": (
            [
                str(BIN / "uvicorn"),
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
    for name, (command, url) in servers.items():
        proc = start(command, f"{url}/readyz" if name == "bentoml" else f"{url}/docs")
        try:
            results[name] = {c: asyncio.run(load(f"{url}/predict", bodies, c, args.requests)) for c in args.concurrency}
            if name == "bentoml":
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

    print(f"\n{'server':<9}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, levels in results.items():
        for c, r in levels.items():
            print(f"{name:<9}{c:>4}{r['rps']:>10.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['errors']:>8}")
    for c in args.concurrency:
        ratio = results["bentoml"][c]["rps"] / results["fastapi"][c]["rps"]
        print(f"throughput ratio bentoml/fastapi at c={c}: {ratio:.2f}")

    batch_frame = records_frame(batch_records, params)
    started = time.perf_counter()
    for _ in range(20):
        predict_frame(served, batch_frame)
    raw_rps = 20 * args.batch / (time.perf_counter() - started)
    print(
        f"\n/predict_batch ({args.batch} records): {batch_rps:,.0f} rows/s over HTTP; "
        f"raw model.predict {raw_rps:,.0f} rows/s; HTTP/raw = {batch_rps / raw_rps:.2f}"
    )


if __name__ == "__main__":
    main()
