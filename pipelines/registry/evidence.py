"""Promotion with evidence: a paired bootstrap of the metric difference between challenger
and champion on the same rows.

Each metric is written as per-row components whose column means determine it (squared
errors for rmse, per-class hit counts for f1, ...). A resample is then one gather and one
mean per component, and the metric of both models on every resample is computed at once.
The resampling itself is arch's: `MovingBlockBootstrap` when the rows are in time order
(neighbouring hours share errors, so rows are drawn in blocks), `IIDBootstrap` otherwise.

A promotion weighs two comparisons (`Evidence`): on the challenger's test rows, and on the
latest monitoring window's labelled rows that neither model was fit on, combined by
`promotion.recent_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from pipelines.core.config import PromotionConfig
from pipelines.core.errors import LooplineError
from pipelines.core.metrics import METRICS

STAGE = "promotion"
BATCH = 32  # resamples whose row counts are multiplied at once


@dataclass(frozen=True)
class Comparison:
    """Challenger against champion on the same rows; improvements are relative to the
    champion's value, positive when the challenger is better."""

    metric: str
    challenger: float
    champion: float
    improvement: float
    low: float  # the (1 - alpha) percentile interval of the improvement
    high: float
    rows: int
    method: str
    resamples: int
    alpha: float
    min_improvement: float

    @property
    def better(self) -> bool:
        return self.low > self.min_improvement

    @property
    def worse(self) -> bool:
        """Surely worse: the whole interval of the improvement is below 0."""
        return self.high < 0

    @property
    def interval(self) -> str:
        return f"[{self.low:+.2%}, {self.high:+.2%}]"

    def describe(self) -> str:
        relation = "surely better" if self.better else "not surely better"
        return (
            f"challenger {self.metric}={self.challenger:.4f} vs champion {self.champion:.4f} on the same "
            f"{self.rows} rows: improvement {self.improvement:+.2%}, {1 - self.alpha:.0%} interval "
            f"{self.interval} ({self.method}, {self.resamples} resamples); {relation} than "
            f"promotion.min_improvement {self.min_improvement:.1%}"
        )


@dataclass(frozen=True)
class Evidence:
    """What a promotion is decided on: the comparison on the challenger's test rows, and the
    one on recent labelled rows (None: there were too few, `recent_note` says why),
    combined by `rule` (promotion.recent_rule)."""

    test: Comparison
    recent: Comparison | None
    rule: str
    recent_note: str

    @property
    def vetoed(self) -> bool:
        """The test rows say better, the recent rows overrule them."""
        if not self.test.better or self.recent is None or self.rule == "test":
            return False
        return self.recent.worse if self.rule == "veto" else not self.recent.better

    @property
    def better(self) -> bool:
        return self.test.better and not self.vetoed

    @property
    def verdict(self) -> str:
        return "better" if self.better else "vetoed by recent rows" if self.vetoed else "not surely better"

    def describe(self) -> str:
        recent = (
            f"recent rows ({self.recent_note}): {self.recent.metric} {self.recent.challenger:.4f} vs "
            f"{self.recent.champion:.4f}, improvement {self.recent.improvement:+.2%}, interval {self.recent.interval}"
            if self.recent is not None
            else f"no recent-row comparison: {self.recent_note}"
        )
        return f"test rows: {self.test.describe()}; {recent}; promotion.recent_rule {self.rule}: {self.verdict}"


def unseen(rows: pd.DataFrame, seen: Sequence[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """`rows` less those equal, on `columns`, to a row of `seen` (rows a model was fit on)."""
    if rows.empty or not seen:
        return rows
    fitted = pd.concat([s[columns] for s in seen], ignore_index=True)
    known = pd.util.hash_pandas_object(fitted, index=False).to_numpy()
    keys = pd.util.hash_pandas_object(rows[columns].astype(fitted.dtypes.to_dict()), index=False).to_numpy()
    return rows[~np.isin(keys, known)]


def judge_on(
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    recent: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    recent_note: str,
    *,
    metric: str,
    higher_is_better: bool,
    cfg: PromotionConfig,
    ordered: bool,
) -> Evidence:
    """Both comparisons, each given as (truth, champion's predictions, challenger's); `recent`
    None or fewer than promotion.recent_min_rows rows: the test rows decide alone, and the
    note (which says how many recent rows there were) says so."""
    on = partial(compare, metric=metric, higher_is_better=higher_is_better, cfg=cfg, ordered=ordered)
    if recent is None or len(recent[0]) < cfg.recent_min_rows:
        note = f"{recent_note}; the test rows decide alone (promotion.recent_min_rows {cfg.recent_min_rows})"
        return Evidence(on(*test), None, cfg.recent_rule, note)
    return Evidence(on(*test), on(*recent), cfg.recent_rule, recent_note)


Components = tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]


def _components(metric: str, y: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> Components:
    """Per-row columns whose means give the metric, and the function from those means (any
    leading shape, components last) to the metric of (champion, challenger) on the last axis."""
    if metric in METRICS["regression"]:
        y = np.asarray(y, dtype="float64")
        errors = [y - np.asarray(p, dtype="float64") for p in (champion, challenger)]
        if metric == "mae":
            return np.column_stack([np.abs(e) for e in errors]), lambda m: m
        if metric == "rmse":
            return np.column_stack([e * e for e in errors]), np.sqrt
        columns = np.column_stack([errors[0] ** 2, errors[1] ** 2, y, y * y])

        def r2(m: np.ndarray) -> np.ndarray:
            variance = m[..., 3] - m[..., 2] ** 2
            return 1.0 - m[..., :2] / variance[..., None]

        return columns, r2
    y = np.asarray(y).astype(str)
    predictions = [np.asarray(p).astype(str) for p in (champion, challenger)]
    if metric == "accuracy":
        return np.column_stack([(p == y).astype("float64") for p in predictions]), lambda m: m
    if metric not in ("precision", "recall", "f1"):
        raise LooplineError(
            STAGE,
            f"promotion.metric {metric!r} has no bootstrap comparison; use rmse, mae, r2, "
            "accuracy, precision, recall or f1",
        )
    classes = np.unique(np.concatenate([y, *predictions]))
    k = len(classes)
    truth = (y[:, None] == classes).astype("float64")
    hits = [(p[:, None] == classes).astype("float64") for p in predictions]
    # per model: true positives, predicted counts; and the true counts, per class
    columns = np.column_stack([*(h * truth for h in hits), *hits, truth])

    def macro(m: np.ndarray) -> np.ndarray:
        out = []
        actual = m[..., 4 * k : 5 * k]
        for i in range(2):
            tp, predicted = m[..., i * k : (i + 1) * k], m[..., (2 + i) * k : (3 + i) * k]
            with np.errstate(invalid="ignore", divide="ignore"):
                precision = np.where(predicted > 0, tp / predicted, 0.0)
                recall = np.where(actual > 0, tp / actual, 0.0)
                f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
            out.append({"precision": precision, "recall": recall, "f1": f1}[metric].mean(axis=-1))
        return np.stack(out, axis=-1)

    return columns, macro


def block_length(cfg: PromotionConfig, rows: int) -> int:
    """The configured block length, or the cube root of the rows; longer than the rows is an error."""
    length = cfg.block_length or max(1, round(rows ** (1 / 3)))
    if length > rows:
        raise LooplineError(
            STAGE, f"promotion.block_length {cfg.block_length} is larger than the {rows} rows it resamples"
        )
    return length


def compare(
    y: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    *,
    metric: str,
    higher_is_better: bool,
    cfg: PromotionConfig,
    ordered: bool,
) -> Comparison:
    """The paired bootstrap interval of the challenger's relative improvement over the
    champion. `ordered`: the rows are in time order (moving-block resampling)."""
    from arch.bootstrap import IIDBootstrap, MovingBlockBootstrap

    rows = len(y)
    if rows < 2 or len(champion) != rows or len(challenger) != rows:
        raise LooplineError(
            STAGE, f"cannot compare models on {rows} rows with {len(champion)}/{len(challenger)} predictions"
        )
    columns, finish = _components(metric, y, champion, challenger)
    bootstrap: IIDBootstrap
    if ordered:
        length = block_length(cfg, rows)
        bootstrap = MovingBlockBootstrap(length, np.arange(rows), seed=cfg.seed)
        method = f"moving-block bootstrap, blocks of {length} rows"
    else:
        bootstrap = IIDBootstrap(np.arange(rows), seed=cfg.seed)
        method = "paired bootstrap"
    # A resample's component means are its row counts times the components: one bincount per
    # resample, one matrix product per batch of resamples.
    means = np.empty((cfg.resamples, columns.shape[1]))
    counts = np.empty((BATCH, rows))
    done = filled = 0
    for (index,), _ in bootstrap.bootstrap(cfg.resamples):
        counts[filled] = np.bincount(index, minlength=rows)
        filled += 1
        if filled == BATCH or done + filled == cfg.resamples:
            means[done : done + filled] = counts[:filled] @ columns / len(index)
            done, filled = done + filled, 0
    values = finish(means)  # (resamples, 2): champion, challenger
    point = finish(columns.mean(axis=0))
    improvement = _relative(point[1], point[0], higher_is_better)
    resampled = _relative(values[:, 1], values[:, 0], higher_is_better)
    low, high = np.nanquantile(resampled, [cfg.alpha / 2, 1 - cfg.alpha / 2])
    return Comparison(
        metric=metric,
        challenger=float(point[1]),
        champion=float(point[0]),
        improvement=float(improvement),
        low=float(low),
        high=float(high),
        rows=rows,
        method=method,
        resamples=cfg.resamples,
        alpha=cfg.alpha,
        min_improvement=cfg.min_improvement,
    )


def _relative(challenger, champion, higher_is_better: bool):
    scale = np.where(np.abs(champion) > 0, np.abs(champion), 1.0)
    change = (challenger - champion) / scale
    return change if higher_is_better else -change
