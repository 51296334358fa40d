"""The retraining policy of `monitor:`: which thresholds a monitoring run's measurements
cross, and whether that is a retrain now or held back (too few new rows, cooling down)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pipelines.core.config import MonitorConfig
from pipelines.monitoring.drift import Drift
from pipelines.monitoring.estimate import Estimate
from pipelines.monitoring.labels import LiveMetric


def degradation(live: float, reference: float, higher_is_better: bool) -> float:
    """How much worse `live` is than `reference`, relative (0.2 = 20% worse; negative: better)."""
    if reference == 0:
        return 0.0 if live == reference else float("inf")
    change = (live - reference) / abs(reference)
    return -change if higher_is_better else change


@dataclass(frozen=True)
class Verdict:
    retrain: bool  # start a training now
    triggers: list[str]  # thresholds crossed (or the pending retrain still open)
    held_back: list[str]  # why not now, although a threshold was crossed (cooling down)
    unmeasured: str = ""  # why nothing was measured (no champion, no data, not enough rows)
    waiting: str = ""  # a retrain decided, waiting for what it needs (labelled rows): pending

    @property
    def outcome(self) -> str:
        if self.retrain:
            return "retrain"
        if self.waiting:
            return "retrain pending"
        return "held back" if self.triggers else "no action"

    def reason(self) -> str:
        if self.unmeasured:
            return f"nothing measured: {self.unmeasured}"
        if not self.triggers:
            return "no threshold crossed"
        text = "; ".join(self.triggers)
        if self.retrain:
            return text
        if self.waiting:
            return f"{text} — waiting for {self.waiting}"
        return f"{text} — but " + "; ".join(self.held_back)


Evidence = tuple[str, Drift | None, Estimate | None]  # a window's source, its drift and its estimate


def decide(
    cfg: MonitorConfig,
    *,
    now: datetime,
    drift: Drift | None = None,
    live: LiveMetric | None = None,
    offline: LiveMetric | None = None,
    estimate: Estimate | None = None,
    champion_metric: float | None = None,
    higher_is_better: bool = True,
    new_rows: int = 0,
    last_retrain: datetime | None = None,
    windows: list[Evidence] | None = None,
    pending: str = "",
) -> Verdict:
    """The retraining policy of `monitor:` applied to one monitoring run's measurements: the
    drift and estimate of each window (`windows`, by source; or one unnamed `drift` and
    `estimate`), the live and offline metrics (each on at least monitor.min_window_rows labelled
    rows). A trigger retrains when at least
    monitor.min_new_rows labelled rows no training has seen are there, else the retrain is
    pending: recorded, and started by the first run that has them (`pending`: the reason of
    one still open, which triggers again). A retrain within monitor.cooldown_hours of the last
    is held back."""
    triggers: list[str] = []
    for source, window_drift, window_estimate in windows if windows is not None else [("", drift, estimate)]:
        where = f"{source}: " if source else ""
        if window_drift is not None and window_drift.weighted_share >= cfg.drift_share:
            top = sorted(window_drift.counted_drifted, key=lambda c: -window_drift.weights[c])
            triggers.append(
                f"{where}drifted features carry {window_drift.weighted_share:.0%} of the weight ≥ "
                f"monitor.drift_share {cfg.drift_share:.0%} ({', '.join(f'{c} {window_drift.weights[c]:.0%}' for c in top)}; "
                f"{len(window_drift.drifted)} of {len(window_drift.scores)} features drifted; {window_drift.weighting})"
            )
        if window_estimate is not None and window_estimate.value is not None and champion_metric is not None:
            worse = degradation(window_estimate.value, champion_metric, higher_is_better)
            if worse >= cfg.max_estimated_degradation:
                triggers.append(
                    f"{where}{window_estimate.method} estimates {window_estimate.metric} {window_estimate.value:.4g} "
                    f"on {window_estimate.rows} unlabelled rows, {worse:.0%} worse than the champion's test "
                    f"{window_estimate.metric} {champion_metric:.4g} (monitor.max_estimated_degradation "
                    f"{cfg.max_estimated_degradation:.0%})"
                )
    if live is not None and champion_metric is not None and live.rows >= cfg.min_window_rows:
        worse = degradation(live.value, champion_metric, higher_is_better)
        if worse >= cfg.max_degradation:
            triggers.append(
                f"live {live.metric} {live.value:.4g} on {live.rows} labelled predictions is "
                f"{worse:.0%} worse than the champion's test {live.metric} {champion_metric:.4g} "
                f"(monitor.max_degradation {cfg.max_degradation:.0%})"
            )
    if offline is not None and champion_metric is not None:
        worse = degradation(offline.value, champion_metric, higher_is_better)
        if worse >= cfg.max_degradation:
            scored = (
                f" (scored now by champion v{next(iter(offline.served_versions))})" if offline.served_versions else ""
            )
            triggers.append(
                f"offline {offline.metric} {offline.value:.4g} on {offline.rows} labelled rows no served prediction "
                f"answers{scored} is {worse:.0%} worse than the champion's test {offline.metric} "
                f"{champion_metric:.4g} (monitor.max_degradation {cfg.max_degradation:.0%})"
            )
    if pending:  # open since an earlier run: it triggers again; what it already says is not repeated
        triggers = [f"pending since {pending}", *(t for t in triggers if t not in pending)]
    if not triggers:
        return Verdict(False, [], [])
    if last_retrain is not None and now - last_retrain < timedelta(hours=cfg.cooldown_hours):
        held = (
            f"cooling down: last retrain at {last_retrain.isoformat()}, next allowed after "
            f"{(last_retrain + timedelta(hours=cfg.cooldown_hours)).isoformat()} "
            f"(monitor.cooldown_hours {cfg.cooldown_hours:g})"
        )
        return Verdict(False, triggers, [held])
    if new_rows < cfg.min_new_rows:
        waiting = (
            f"labels: {new_rows} of monitor.min_new_rows {cfg.min_new_rows} labelled rows no training has seen; "
            "the retrain starts on the first monitoring run that has them"
        )
        return Verdict(False, triggers, [], waiting=waiting)
    return Verdict(True, triggers, [])
