"""Promotion evidence: the paired moving-block bootstrap of 100k test rows with 1,000
resamples, as loopline computes it (`pipelines.registry.evidence.compare`: one bincount per resample,
one matrix product per batch) and, side by side, arch's own `apply` (the statistic computed
on every resampled copy of the rows).

    python bench/bootstrap.py [--rows 100000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    from arch.bootstrap import MovingBlockBootstrap

    from pipelines.core.config import PromotionConfig
    from pipelines.registry.evidence import compare

    rng = np.random.default_rng(0)
    y = 100 + 30 * np.sin(np.arange(args.rows) / 24) + rng.normal(0, 10, args.rows)
    champion, challenger = y + rng.normal(0, 20, args.rows), y + rng.normal(0, 19, args.rows)
    cfg = PromotionConfig(resamples=args.resamples, block_length=24, seed=0)
    compare(y[:1000], champion[:1000], challenger[:1000], metric="rmse", higher_is_better=False, cfg=cfg, ordered=True)

    started = time.perf_counter()
    result = compare(y, champion, challenger, metric="rmse", higher_is_better=False, cfg=cfg, ordered=True)
    loopline = time.perf_counter() - started

    def improvement(y, a, b):
        old, new = np.sqrt(np.mean((y - a) ** 2)), np.sqrt(np.mean((y - b) ** 2))
        return (old - new) / old

    started = time.perf_counter()
    values = MovingBlockBootstrap(24, y, champion, challenger, seed=0).apply(improvement, args.resamples)
    plain = time.perf_counter() - started
    low, high = np.quantile(values, [cfg.alpha / 2, 1 - cfg.alpha / 2])
    print(f"{args.rows} rows, {args.resamples} resamples, blocks of 24 rows")
    print(f"loopline compare: {loopline:.2f}s  interval {result.interval}")
    print(f"arch apply:       {plain:.2f}s  interval [{low:+.2%}, {high:+.2%}]")
    print(f"ratio arch/loopline: {plain / loopline:.1f}x")


if __name__ == "__main__":
    main()
