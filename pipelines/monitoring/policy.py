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
    retrain: bool
    triggers: list[str]  # thresholds crossed
    held_back: list[str]  # why not now, although a threshold was crossed
    unmeasured: str = ""  # why nothing was measured (no champion, no data, not enough rows)

    @property
    def outcome(self) -> str:
        return "retrain" if self.retrain else ("held back" if self.triggers else "no action")

    def reason(self) -> str:
        if self.unmeasured:
            return f"nothing measured: {self.unmeasured}"
        if not self.triggers:
            return "no threshold crossed"
        return "; ".join(self.triggers) + ("" if self.retrain else " — but " + "; ".join(self.held_back))


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
) -> Verdict:
    """The retraining policy of `monitor:` applied to one monitoring run's measurements."""
    triggers: list[str] = []
    if drift is not None and drift.weighted_share >= cfg.drift_share:
        top = sorted(drift.counted_drifted, key=lambda c: -drift.weights[c])
        triggers.append(
            f"drifted features carry {drift.weighted_share:.0%} of the weight ≥ monitor.drift_share "
            f"{cfg.drift_share:.0%} ({', '.join(f'{c} {drift.weights[c]:.0%}' for c in top)}; "
            f"{len(drift.drifted)} of {len(drift.scores)} features drifted; {drift.weighting})"
        )
    if live is not None and champion_metric is not None:
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
    if estimate is not None and estimate.value is not None and champion_metric is not None:
        worse = degradation(estimate.value, champion_metric, higher_is_better)
        if worse >= cfg.max_estimated_degradation:
            triggers.append(
                f"{estimate.method} estimates {estimate.metric} {estimate.value:.4g} on {estimate.rows} unlabelled "
                f"rows, {worse:.0%} worse than the champion's test {estimate.metric} {champion_metric:.4g} "
                f"(monitor.max_estimated_degradation {cfg.max_estimated_degradation:.0%})"
            )
    held: list[str] = []
    if new_rows < cfg.min_new_rows:
        held.append(f"only {new_rows} rows arrived since the last training (monitor.min_new_rows {cfg.min_new_rows})")
    if last_retrain is not None and now - last_retrain < timedelta(hours=cfg.cooldown_hours):
        held.append(
            f"cooling down: last retrain at {last_retrain.isoformat()}, next allowed after "
            f"{(last_retrain + timedelta(hours=cfg.cooldown_hours)).isoformat()} "
            f"(monitor.cooldown_hours {cfg.cooldown_hours:g})"
        )
    return Verdict(retrain=bool(triggers) and not held, triggers=triggers, held_back=held if triggers else [])
