"""`loopline backtest`: 2011 replayed under several retraining policies side by side, at one
or more label delays.

The first champion trains on the first `backtest.train_months` months; every later month is
a batch. For each policy and each label delay (`backtest.label_delays`, `--label-delay`),
each batch is served by that policy's champion of the moment at its time (its live error is
the error of the predictions actually served), and its labels arrive that much later: a
monitoring run at the end of a period sees the drift and the estimate of what was just
served at once, but measures the live error only on the labels that have arrived, and can
retrain only on labelled rows. A retrain decided before its labels is pending, as in the
monitoring flow, and runs when they are there. A retrained model replaces the champion
only through the policy's gate. The `monitor` policies decide with the monitoring flow's own
functions (Evidently drift weighed by importance, NannyML's estimate, the live metric,
`decide`), and the bootstrap gate is the registry's (`pipelines.registry.evidence.judge_on`).

Per policy and delay the summary gives the live error, retrains and promotions, the
detection delay (from the end of the first period whose served error is
`monitor.max_degradation` worse than the serving champion's test error, to the first alarm:
a retrain decided, pending or not), the time from there to a new champion, and a
cost-aware score: C_α = mean live error + α × retrains ÷ periods (α: what one retrain costs,
in metric points of one period), divided by the best policy's C_α at the same delay and
averaged over α in [0, `backtest.alpha_max`] (1.00: the best policy at every α).

Work is shared between policies and delays, not repeated: a training is a function of the
rows it learns from (the first n rows in time order; the same rows and params give the same
model), so each n trains once; the drift and the estimate of a champion on a batch are
measured once. The back-test runs in one process without a service or Prefect runs: it
compares policies, not deployments (`loopline replay` runs one policy through the real
service and flows).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.replay import YEAR, Period, _day_of_year, _fresh_workdir, hours_of, split_periods
from pipelines.core.config import Params, PolicyConfig
from pipelines.core.progress import progress
from pipelines.monitoring.drift import PREDICTION, Drift
from pipelines.monitoring.estimate import Estimate, PerformanceEstimator


@dataclass
class Model:
    """A model trained on the first `rows` rows (in time order) of the data."""

    rows: int
    model: Any
    baseline: float | str
    test: pd.DataFrame
    fitted: list[pd.DataFrame]  # the rows it trained and validated on
    test_metric: float
    reference: pd.DataFrame  # training rows with the model's predictions: the drift reference
    importance: dict[str, float]
    estimator: PerformanceEstimator | None
    seconds: float
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"m{self.rows}"


class Shared:
    """Trainings, predictions, drift and estimates, each computed once for every policy and
    delay that needs it. `data` is every row in time order (the first months, then each
    batch); `hours` the time each row answers."""

    def __init__(self, params: Params, initial: pd.DataFrame, batches: list[tuple[str, pd.DataFrame]], echo):
        self.params, self.initial, self.batches, self.echo = params, initial, batches, echo
        self.data = pd.concat([initial, *(rows for _, rows in batches)], ignore_index=True)
        self.hours = hours_of(self.data).dt.tz_localize(None).to_numpy()  # UTC, as datetime64
        if not (np.diff(self.hours) >= np.timedelta64(0)).all():
            raise ValueError("the back-test's rows are not in time order")
        bounds = np.cumsum([len(initial), *(len(rows) for _, rows in batches)])
        self.spans = list(zip(bounds[:-1], bounds[1:], strict=True))  # each batch's rows in `data`
        self.models: dict[int, Model] = {}
        self.drifts: dict[tuple[int, int], Drift] = {}
        self.estimates: dict[tuple[int, int], Estimate] = {}
        self.predictions: dict[tuple[int, int], np.ndarray] = {}

    def labelled(self, now: datetime, delay: timedelta) -> int:
        """How many rows (a prefix of `data`) have their labels by `now`."""
        cutoff = np.datetime64((now - delay).astimezone(UTC).replace(tzinfo=None))
        return int(np.searchsorted(self.hours, cutoff, side="right"))

    def model(self, rows: int) -> Model:
        if rows not in self.models:
            self.models[rows] = self._train(rows)
        return self.models[rows]

    def _train(self, n: int) -> Model:
        from pipelines.core.metrics import naive_baseline
        from pipelines.data.split import split_rows
        from pipelines.model.evaluation import feature_importance, score
        from pipelines.monitoring.drift import drift_reference, reference_sample
        from pipelines.monitoring.estimate import fit_estimator
        from pipelines.training.search import search_candidates

        params = self.params
        features, target, task = params.features.columns, params.data.target, params.data.task
        started = time.perf_counter()
        data = self.data.iloc[:n]
        parts = split_rows(data, params.split, target, task == "classification")
        best, _ = search_candidates(params, parts.train, parts.val)
        baseline = naive_baseline(parts.train[target], task)
        metric, _ = params.metric
        tested, _ = score(best.model, parts.test, features, target, task, baseline)
        importance = feature_importance(
            best.model, parts.test, features, target, task, params.train.seed, params.train.importance_rows
        )
        estimator, _ = fit_estimator(best.model, pd.concat([parts.val, parts.test], ignore_index=True), params)
        reference = drift_reference(reference_sample(parts.train, params), best.model, params)
        seconds = time.perf_counter() - started
        self.echo(f"  trained m{n} on {n} rows ({best.name}): test {metric} {tested[metric]:.2f}, {seconds:.1f}s")
        return Model(
            rows=n,
            model=best.model,
            baseline=baseline,
            test=parts.test,
            fitted=[parts.train, parts.val],
            test_metric=float(tested[metric]),
            reference=reference,
            importance=dict(zip(features, map(float, importance.importances_mean), strict=True)),
            estimator=estimator,
            seconds=seconds,
        )

    def predict(self, champion: Model, batch: int) -> np.ndarray:
        key = (champion.rows, batch)
        if key not in self.predictions:
            self.predictions[key] = np.asarray(
                champion.model.predict(self.batches[batch][1][self.params.features.columns])
            )
        return self.predictions[key]

    def drift(self, champion: Model, batch: int) -> Drift:
        from dataclasses import replace

        from pipelines.monitoring.drift import measure_drift

        key = (champion.rows, batch)
        if key not in self.drifts:
            window = self.batches[batch][1][self.params.features.columns].assign(
                **{PREDICTION: self.predict(champion, batch)}
            )
            self.drifts[key] = replace(measure_drift(champion.reference, window, self.params), html="")
        return self.drifts[key]

    def estimate(self, champion: Model, batch: int) -> Estimate:
        from pipelines.monitoring.estimate import estimate

        key = (champion.rows, batch)
        if key not in self.estimates:
            metric, _ = self.params.metric
            if champion.estimator is None:
                self.estimates[key] = Estimate(metric, "", None, "no estimator")
            else:
                rows = self.batches[batch][1]
                self.estimates[key] = estimate(
                    champion.estimator, champion.model, rows, self.params.monitor.min_window_rows
                )
        return self.estimates[key]


def _live(params: Params, truth: pd.Series, predicted: np.ndarray, served_by: np.ndarray, baseline):
    """The live metric of what was served on these labelled rows, by the monitoring flow's own
    join of labelled rows to logged predictions (each row its own request id)."""
    from pipelines.monitoring.labels import labelled_metrics

    id_column = params.monitor.id_column
    assert id_column is not None  # run_backtest sets one
    ids = [f"r{i}" for i in truth.index]
    window = pd.DataFrame({params.data.target: truth.to_numpy(), id_column: ids})
    log = pd.DataFrame({"request_id": ids, PREDICTION: predicted, "model_version": served_by})
    return labelled_metrics(window, log, params, baseline)


def _gate(
    shared: Shared, policy: PolicyConfig, champion: Model, challenger: Model, recent: pd.DataFrame, label: str
) -> tuple[bool, str, bool]:
    """Whether the challenger replaces the champion, judged on the challenger's test rows and
    (bootstrap and shadow gates) on the labelled rows of this run (`recent`) that it did not
    fit on; and (shadow gate) whether it serves in shadow instead."""
    from pipelines.model.evaluation import score
    from pipelines.registry.champion import shadow_wanted
    from pipelines.registry.evidence import judge_on, unseen

    params = shared.params
    features, target, task = params.features.columns, params.data.target, params.data.task
    metric, higher = params.metric
    test = challenger.test
    if policy.gate == "point":
        old, _ = score(champion.model, test, features, target, task, champion.baseline)
        better = old[metric] > challenger.test_metric if not higher else old[metric] < challenger.test_metric
        return better, f"point: {metric} {challenger.test_metric:.2f} vs champion {old[metric]:.2f}", False
    fresh = unseen(recent, challenger.fitted, [*features, target])
    evidence = judge_on(
        (test[target].to_numpy(), champion.model.predict(test[features]), challenger.model.predict(test[features])),
        (
            fresh[target].to_numpy(),
            champion.model.predict(fresh[features]),
            challenger.model.predict(fresh[features]),
        )
        if len(fresh) >= params.promotion.recent_min_rows
        else None,
        f"{len(fresh)} rows labelled by {label}",
        metric=metric,
        higher_is_better=higher,
        cfg=params.promotion,
        ordered=bool(params.split.order_by),
    )
    on_recent = evidence.recent.interval if evidence.recent else "none"
    why = f"bootstrap: test {evidence.test.interval}, recent {on_recent}: {evidence.verdict}"
    mode = params.promotion.shadow if params.promotion.shadow != "off" else "uncertain"
    shadow = policy.gate == "shadow" and not evidence.better and shadow_wanted(mode, evidence)
    return evidence.better, why + ("; in shadow" if shadow else ""), shadow


def _judge_shadow(shared: Shared, truth: np.ndarray, champion: np.ndarray, shadow: np.ndarray):
    """The shadow against the champion on the labelled rows both answered (time order)."""
    from pipelines.registry.evidence import compare

    params = shared.params
    metric, higher = params.metric
    cfg = params.promotion.model_copy(update={"block_length": min(params.promotion.block_length, len(truth))})
    return compare(truth, champion, shadow, metric=metric, higher_is_better=higher, cfg=cfg, ordered=True)


def run_policy(
    shared: Shared, policy: PolicyConfig, delay: timedelta = timedelta(0), advance=lambda **_: None
) -> list[dict[str, Any]]:
    """One policy over every batch at one label delay: what was served, what was decided on
    the labels that had arrived, what it came to."""
    from pipelines.core.spans import describe_span
    from pipelines.monitoring.policy import decide

    params = shared.params
    cfg = params.policy_monitor(policy)
    policy_params = params.model_copy(update={"monitor": cfg})
    target = params.data.target
    higher = params.metric[1]
    champion = shared.model(len(shared.initial))
    trained, known, last_retrain, pending = champion.rows, champion.rows, None, ""
    served = np.full(len(shared.data), np.nan)  # what was served for each row, once served
    served_by = np.full(len(shared.data), "", dtype=object)
    shadowed = np.full(len(shared.data), np.nan)  # the shadow's answers (shadow gate)
    shadow: Model | None = None
    shadow_since: tuple[int, datetime] = (0, datetime.min.replace(tzinfo=UTC))  # its first row, and when
    rows: list[dict[str, Any]] = []
    for i, (label, batch) in enumerate(shared.batches):
        start, end = shared.spans[i]
        served[start:end], served_by[start:end] = shared.predict(champion, i), champion.name
        if shadow is not None:
            shadowed[start:end] = shared.predict(shadow, i)
        hindsight = _live(params, batch[target], served[start:end], served_by[start:end], champion.baseline).live
        assert hindsight is not None  # every row of the batch is served; all labels, in hindsight
        now = datetime.combine(_day_of_year(int(batch["day"].max())), clock(23, 59), UTC)
        labelled = min(shared.labelled(now, delay), end)
        arrived = shared.data.iloc[known:labelled]  # labels that landed since the last run
        mine = served_by[known:labelled] == champion.name
        live = None
        if mine.any():
            live = _live(
                params,
                arrived[target][mine],
                served[known:labelled][mine],
                served_by[known:labelled][mine],
                champion.baseline,
            ).live
        known = labelled
        shadow_note, promoted_shadow = "", False
        if shadow is not None:  # one period in shadow, then judged on the labelled rows both answered
            first, since = shadow_since
            both = slice(first, labelled)
            pairs = max(labelled - first, 0)
            if pairs >= params.promotion.shadow_min_rows:  # as the monitoring flow judges it
                live_cmp = _judge_shadow(
                    shared, shared.data[target].to_numpy()[both], served[both], shadowed[both].astype("float64")
                )
                promoted_shadow = live_cmp.better
                shadow_note = f"shadow {shadow.name}: live {live_cmp.interval} on {pairs} rows: " + (
                    "promoted" if promoted_shadow else "retired"
                )
                champion = shadow if promoted_shadow else champion
                shadow = None
            elif now - since > timedelta(days=params.promotion.shadow_max_days):
                shadow_note, shadow = f"shadow {shadow.name}: retired, {pairs} labelled rows in time", None
        drift = estimate = None
        outcome, reason = "no action", ""
        if policy.retrain == "monitor":
            from pipelines.monitoring.drift import reweigh

            drift = reweigh(shared.drift(champion, i), policy_params, champion.importance)
            estimate = shared.estimate(champion, i) if cfg.estimate_performance else None
            verdict = decide(
                cfg,
                now=now,
                drift=drift,
                live=live,
                estimate=estimate,
                champion_metric=champion.test_metric,
                higher_is_better=higher,
                new_rows=labelled - trained,
                last_retrain=last_retrain,
                pending=pending,
            )
            outcome, reason = verdict.outcome, verdict.reason()
        else:
            due = policy.retrain == "every_batch" or (policy.retrain == "scheduled" and (i + 1) % policy.every == 0)
            if due or (pending and policy.retrain != "never"):
                outcome = "retrain" if labelled > trained else "retrain pending"
            reason = {"never": "never retrains", "every_batch": "every batch"}.get(
                policy.retrain, f"every {policy.every} batches"
            )
        row = {
            "policy": policy.name,
            "label_delay": describe_span(delay) if delay else "0",
            "period": label,
            "at": now.isoformat(),
            "served": champion.name,
            "live": hindsight.value,
            "baseline": hindsight.baseline,
            "live_seen": live.value if live else np.nan,  # the live error the decision saw
            "labelled_rows": int(mine.sum()),
            "champion_test": champion.test_metric,
            "weighted_drift": drift.weighted_share if drift else np.nan,
            "drift_share": drift.share if drift else np.nan,
            "estimated": estimate.value if estimate and estimate.value is not None else np.nan,
            "decision": outcome,
            "alarm": outcome in ("retrain", "retrain pending"),
            "retrain": outcome == "retrain",
            "promoted": promoted_shadow,
            "trained": "",
            "train_seconds": 0.0,
            "gate": shadow_note,
            "reason": reason,
        }
        pending = (pending or f"{now.isoformat()}: {reason}") if outcome == "retrain pending" else ""
        if outcome == "retrain":
            challenger = shared.model(labelled)
            promoted, why, in_shadow = _gate(shared, policy, champion, challenger, arrived, label)
            row |= {
                "promoted": promoted or promoted_shadow,
                "trained": challenger.name,
                "train_seconds": challenger.seconds,
                "gate": "; ".join(w for w in (shadow_note, why) if w),
            }
            trained, last_retrain = labelled, now
            champion = challenger if promoted else champion
            if promoted:
                shadow = None  # judged against the old champion
            elif in_shadow:
                shadow, shadow_since = challenger, (end, now)  # it answers from the next period on
        rows.append(row)
        advance(note=f"{policy.name} {label}")
    return rows


def episodes(part: pd.DataFrame, max_degradation: float, higher_is_better: bool) -> list[dict[str, Any]]:
    """Each stretch of degraded service under one policy: it starts at the first period whose
    served error is `max_degradation` worse than the serving champion's test error, and ends
    when a new champion is promoted; with the first alarm in it."""
    from pipelines.monitoring.policy import degradation

    found: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for r in part.itertuples():
        at = datetime.fromisoformat(r.at)
        if current is None and degradation(r.live, r.champion_test, higher_is_better) >= max_degradation:
            current = {"start": at, "alarm": None, "champion": None}
        if current is None:
            continue
        if r.alarm and current["alarm"] is None:
            current["alarm"] = at
        if r.promoted:
            current["champion"] = at
            found.append(current)
            current = None
    return found + ([current] if current is not None else [])


def _days(spans: list[timedelta]) -> float:
    return float(np.mean([s / timedelta(days=1) for s in spans])) if spans else np.nan


def summarise(timeline: pd.DataFrame, policies: list[PolicyConfig], params: Params) -> pd.DataFrame:
    """Per policy and label delay: mean and worst live error of what was served, retrains,
    promotions, training time, detection delay and time to a new champion (days, mean over
    the degraded stretches; `missed`: stretches with no alarm), and the cost-aware score."""
    metric, higher = params.metric
    out = []
    for delay in dict.fromkeys(timeline["label_delay"]):
        for policy in policies:
            part = timeline[(timeline["policy"] == policy.name) & (timeline["label_delay"] == delay)]
            found = episodes(part, params.monitor.max_degradation, higher)
            out.append(
                {
                    "policy": policy.name,
                    "label_delay": delay,
                    "mean_live": part["live"].mean(),
                    "worst_live": part["live"].max() if not higher else part["live"].min(),
                    "retrains": int(part["retrain"].sum()),
                    "promotions": int(part["promoted"].sum()),
                    "train_seconds": round(float(part["train_seconds"].sum()), 1),
                    "degraded": len(found),
                    "missed": sum(e["alarm"] is None for e in found),
                    "detection_days": _days([e["alarm"] - e["start"] for e in found if e["alarm"] is not None]),
                    "to_champion_days": _days([e["champion"] - e["start"] for e in found if e["champion"] is not None]),
                    "periods": len(part),
                }
            )
    summary = pd.DataFrame(out)
    alphas = np.linspace(0.0, params.backtest.alpha_max, 101)
    summary["cost_area"] = np.nan
    for _, part in summary.groupby("label_delay", sort=False):
        sign = -1.0 if higher else 1.0  # a cost: lower is better
        cost = sign * part["mean_live"].to_numpy()[:, None] + alphas[None, :] * (
            part["retrains"].to_numpy()[:, None] / part["periods"].to_numpy()[:, None]
        )
        best = cost.min(axis=0)
        relative = cost / best if (best > 0).all() else cost - best + 1.0
        summary.loc[part.index, "cost_area"] = relative.mean(axis=1)
    summary["cost_at_alpha_max"] = summary["mean_live"] + params.backtest.alpha_max * (
        summary["retrains"] / summary["periods"]
    )
    return summary


def _cell(days: float, count: int) -> str:
    if count == 0:
        return "—"
    return "never" if np.isnan(days) else f"{days:.0f}"


def render_summary(summary: pd.DataFrame, metric: str, alpha_max: float) -> str:
    lines = [
        f"| policy | label delay | mean live {metric} | worst live {metric} | retrains | promotions | training s "
        f"| degraded | detection (days) | to new champion (days) | cost at α={alpha_max:g} | cost area |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        detected = _cell(r.detection_days, r.degraded) + (f" ({r.missed} missed)" if r.missed else "")
        lines.append(
            f"| {r.policy} | {r.label_delay} | {r.mean_live:.1f} | {r.worst_live:.1f} | {r.retrains} | {r.promotions} "
            f"| {r.train_seconds} | {r.degraded} | {detected} | {_cell(r.to_champion_days, r.degraded)} "
            f"| {r.cost_at_alpha_max:.1f} | {r.cost_area:.3f} |"
        )
    return "\n".join(lines)


def run_backtest(
    workdir: Path,
    params_path: str | Path = "params.yaml",
    periods: int | None = None,
    policies: list[str] | None = None,
    chart: Path | None = None,
    echo=print,
    train_months: int | None = None,
    period: Period = "month",
    label_delays: list[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every policy (or those named) at every label delay (default
    backtest.label_delays); returns (summary, timeline). `train_months`: the first
    champion's months (default backtest.train_months); `period`: month or week batches."""
    import yaml

    from flows.replay import replay_params
    from pipelines.core.config import load_params
    from pipelines.core.errors import LooplineError
    from pipelines.core.spans import parse_duration
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import read_source

    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    params = load_params(params_path)  # every check, the policies' included, before anything runs
    chosen = params.backtest.policies
    if policies:
        unknown = [p for p in policies if p not in {c.name for c in chosen}]
        if unknown:
            raise LooplineError(
                "backtest", f"no policy {unknown[0]!r} in backtest.policies: {[c.name for c in chosen]}"
            )
        chosen = [c for c in chosen if c.name in policies]
    delays = []
    for text in label_delays or params.backtest.label_delays:
        try:
            delays.append(parse_duration(text))
        except ValueError as err:
            raise LooplineError("backtest", f"--label-delay {text!r}: {err}") from None
    _fresh_workdir(workdir)
    base = yaml.safe_load(Path(params_path).read_text())
    # an Evidently workspace of its own, left empty: the back-test runs no monitoring flow
    raw = replay_params(base, workdir, workdir / "data" / "monitoring" / "workspace")
    raw["tracking"]["experiment"] = "backtest-2011"
    raw["monitor"]["id_column"] = raw["monitor"].get("id_column") or "request_id"  # served rows joined by id
    raw["data"]["source"] = str(Path(base["data"]["source"]).resolve())
    run_path = workdir / "params.yaml"
    run_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(run_path)
    source = read_source(params.data.source, params.table_schema, params.data)
    typed = typed_rows(source.rows, params)
    train_months = train_months or params.backtest.train_months
    initial, batches = split_periods(typed, train_months, period)
    batches = batches[:periods] if periods else batches
    echo(
        f"backtest of {YEAR}: first champion on months 1-{train_months} ({len(initial)} rows), "
        f"{len(batches)} {period}ly batches, policies {', '.join(p.name for p in chosen)}, label delays "
        f"{', '.join(label_delays or params.backtest.label_delays)}; work directory {workdir}"
    )
    shared = Shared(params, initial, batches, echo)
    with progress("backtest", len(delays) * len(chosen) * len(batches), "policy-months") as advance:
        timeline = pd.DataFrame(
            [row for delay in delays for policy in chosen for row in run_policy(shared, policy, delay, advance)]
        )
    summary = summarise(timeline, chosen, params)
    seconds = time.perf_counter() - started
    metric, _ = params.metric
    timeline.to_csv(workdir / "timeline.csv", index=False)
    summary.to_csv(workdir / "summary.csv", index=False)
    table = render_summary(summary, metric, params.backtest.alpha_max)
    (workdir / "summary.md").write_text(table + "\n")
    png = workdir / "backtest.png"
    backtest_figure(timeline, chosen, metric).savefig(png, dpi=120, bbox_inches="tight")
    if chart is not None:
        Path(chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, chart)
        shutil.copyfile(workdir / "summary.csv", Path(chart).with_suffix(".csv"))
    _log_backtest(params, summary, workdir, seconds, len(shared.models))
    echo(table)
    echo(
        f"{len(shared.models)} trainings shared by {len(chosen)} policies and {len(delays)} delays; {seconds:.0f}s in all"
    )
    return summary, timeline


def backtest_figure(timeline: pd.DataFrame, policies: list[PolicyConfig], metric: str):
    """Live error per month per policy, one panel per label delay; a marker above a month
    where the policy retrained (filled: the retrained model was promoted), a cross where it
    raised an alarm still waiting for labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = list(dict.fromkeys(timeline["label_delay"]))
    fig, axes = plt.subplots(len(delays), 1, figsize=(11, 4.2 * len(delays)), sharex=True, squeeze=False)
    periods = list(dict.fromkeys(timeline["period"]))
    x = np.arange(len(periods))
    for ax, delay in zip(axes[:, 0], delays, strict=True):
        for policy in policies:
            part = timeline[(timeline["policy"] == policy.name) & (timeline["label_delay"] == delay)]
            part = part.set_index("period").loc[periods]
            (line,) = ax.plot(x, part["live"], "o-", label=f"{policy.name} ({int(part['retrain'].sum())} retrains)")
            retrained = part["retrain"].to_numpy(dtype=bool)
            promoted = part["promoted"].to_numpy(dtype=bool)
            waiting = (part["decision"] == "retrain pending").to_numpy()
            for mask, face in ((retrained & promoted, line.get_color()), (retrained & ~promoted, "none")):
                ax.scatter(
                    x[mask],
                    part["live"].to_numpy()[mask],
                    s=140,
                    marker="^",
                    facecolors=face,
                    edgecolors=line.get_color(),
                    zorder=3,
                )
            ax.scatter(x[waiting], part["live"].to_numpy()[waiting], s=90, marker="x", color=line.get_color(), zorder=3)
        baseline = timeline.drop_duplicates("period").set_index("period").loc[periods, "baseline"]
        ax.plot(x, baseline, ":", color="#999999", label="naive baseline (first champion's training mean)")
        ax.set_ylabel(f"live {metric} of the served model")
        ax.set_title(f"labels arrive {'at once' if delay == '0' else delay + ' later'}", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xticks(x, periods)
    fig.suptitle(
        f"Back-test of retraining policies over {YEAR} (▲ retrain after the period: filled promoted, open kept; "
        "× alarm waiting for labels)"
    )
    fig.tight_layout()
    return fig


def _log_backtest(params: Params, summary: pd.DataFrame, workdir: Path, seconds: float, trainings: int) -> None:
    from pipelines.core.names import REPLAY
    from pipelines.registry.tracking import client_for, log_dict_batch

    client, experiment_id = client_for(params)
    run = client.create_run(experiment_id, run_name="backtest", tags={REPLAY: "backtest"})
    metrics: dict[str, float] = {"seconds": seconds, "trainings": trainings}
    for r in summary.itertuples():
        key = f"{r.policy}.{str(r.label_delay).replace(' ', '_')}"
        metrics |= {
            f"{key}.mean_live": r.mean_live,
            f"{key}.worst_live": r.worst_live,
            f"{key}.retrains": r.retrains,
            f"{key}.promotions": r.promotions,
            f"{key}.train_seconds": r.train_seconds,
            f"{key}.cost_area": r.cost_area,
        }
        for name in ("detection_days", "to_champion_days"):
            if not np.isnan(getattr(r, name)):
                metrics[f"{key}.{name}"] = getattr(r, name)
    log_dict_batch(client, run.info.run_id, metrics=metrics)
    for name in ("backtest.png", "summary.csv", "summary.md", "timeline.csv"):
        client.log_artifact(run.info.run_id, str(workdir / name), "backtest")
    client.set_terminated(run.info.run_id)
