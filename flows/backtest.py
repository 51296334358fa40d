"""`loopline backtest`: 2011 replayed under several retraining policies side by side.

The first champion trains on the first `backtest.train_months` months; every later month is
a batch. For each policy, each batch is served by that policy's champion of the moment (its
live error is the error of the predictions actually served), then its labels arrive and the
policy decides whether to retrain; a retrained model replaces the champion only through the
policy's gate. The `monitor` policies decide with the monitoring flow's own functions
(Evidently drift weighed by importance, NannyML's estimate, the live metric, `decide`), and
the bootstrap gate is the registry's (`pipelines.registry.evidence.judge_on`).

Work is shared between policies, not repeated: a training is a function of its data prefix
(the same months and params give the same model), so each prefix trains once; the drift and
the estimate of a champion on a batch are measured once. The back-test runs in one process
without a service or Prefect runs: it compares policies, not deployments (`loopline replay`
runs one policy through the real service and flows).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.replay import YEAR, Period, _day_of_year, _fresh_workdir, split_periods
from pipelines.core.config import Params, PolicyConfig
from pipelines.core.progress import progress
from pipelines.monitoring.drift import PREDICTION, Drift
from pipelines.monitoring.estimate import Estimate, PerformanceEstimator


@dataclass
class Model:
    """A model trained on the first months and the first `prefix` batches."""

    prefix: int
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
        self.name = f"m{self.prefix}"


class Shared:
    """Trainings, drift and estimates, each computed once for every policy that needs it."""

    def __init__(self, params: Params, initial: pd.DataFrame, batches: list[tuple[str, pd.DataFrame]], echo):
        self.params, self.initial, self.batches, self.echo = params, initial, batches, echo
        self.models: dict[int, Model] = {}
        self.drifts: dict[tuple[int, int], Drift] = {}
        self.estimates: dict[tuple[int, int], Estimate] = {}
        self.predictions: dict[tuple[int, int], np.ndarray] = {}

    def model(self, prefix: int) -> Model:
        if prefix not in self.models:
            self.models[prefix] = self._train(prefix)
        return self.models[prefix]

    def _train(self, prefix: int) -> Model:
        from pipelines.core.metrics import naive_baseline
        from pipelines.data.split import split_rows
        from pipelines.model.evaluation import feature_importance, score
        from pipelines.monitoring.drift import drift_reference, reference_sample
        from pipelines.monitoring.estimate import fit_estimator
        from pipelines.training.search import search_candidates

        params = self.params
        features, target, task = params.features.columns, params.data.target, params.data.task
        started = time.perf_counter()
        data = pd.concat([self.initial, *(rows for _, rows in self.batches[:prefix])], ignore_index=True)
        parts = split_rows(data, params.split, target, task == "classification")
        best, _ = search_candidates(params, parts.train, parts.val)
        baseline = naive_baseline(parts.train[target], task)
        metric, _ = params.metric
        tested, _ = score(best.model, parts.test, features, target, task, baseline)
        importance = feature_importance(best.model, parts.test, features, target, task, params.train.seed)
        estimator, _ = fit_estimator(best.model, pd.concat([parts.val, parts.test], ignore_index=True), params)
        reference = drift_reference(reference_sample(parts.train, params), best.model, params)
        seconds = time.perf_counter() - started
        self.echo(
            f"  trained m{prefix} on {len(data)} rows ({best.name}): test {metric} {tested[metric]:.2f}, {seconds:.1f}s"
        )
        return Model(
            prefix=prefix,
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
        key = (champion.prefix, batch)
        if key not in self.predictions:
            self.predictions[key] = np.asarray(
                champion.model.predict(self.batches[batch][1][self.params.features.columns])
            )
        return self.predictions[key]

    def drift(self, champion: Model, batch: int) -> Drift:
        from dataclasses import replace

        from pipelines.monitoring.drift import measure_drift

        key = (champion.prefix, batch)
        if key not in self.drifts:
            window = self.batches[batch][1][self.params.features.columns].assign(
                **{PREDICTION: self.predict(champion, batch)}
            )
            self.drifts[key] = replace(measure_drift(champion.reference, window, self.params), html="")
        return self.drifts[key]

    def estimate(self, champion: Model, batch: int) -> Estimate:
        from pipelines.monitoring.estimate import estimate

        key = (champion.prefix, batch)
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


def _live(shared: Shared, champion: Model, batch: int):
    """The live metric of what the champion served on the batch, by the monitoring flow's own
    join of labelled rows to logged predictions (each row its own request id)."""
    from pipelines.monitoring.labels import labelled_metrics

    params = shared.params
    rows = shared.batches[batch][1]
    ids = [f"{batch}-{i}" for i in range(len(rows))]
    id_column = params.monitor.id_column
    assert id_column is not None  # run_backtest sets one
    window = rows[[params.data.target]].assign(**{id_column: ids})
    log = pd.DataFrame({"request_id": ids, PREDICTION: shared.predict(champion, batch), "model_version": champion.name})
    live = labelled_metrics(window, log, params, champion.baseline).live
    assert live is not None  # every row is served and labelled
    return live


def _gate(shared: Shared, policy: PolicyConfig, champion: Model, challenger: Model, batch: int) -> tuple[bool, str]:
    """Whether the challenger replaces the champion, judged on the challenger's test rows and
    (bootstrap gate) on the rows of the batch that triggered the retrain that it did not fit on."""
    from pipelines.model.evaluation import score
    from pipelines.registry.evidence import judge_on, unseen

    params = shared.params
    features, target, task = params.features.columns, params.data.target, params.data.task
    metric, higher = params.metric
    test = challenger.test
    if policy.gate == "point":
        old, _ = score(champion.model, test, features, target, task, champion.baseline)
        better = old[metric] > challenger.test_metric if not higher else old[metric] < challenger.test_metric
        return better, f"point: {metric} {challenger.test_metric:.2f} vs champion {old[metric]:.2f}"
    label, rows = shared.batches[batch]
    recent = unseen(rows, challenger.fitted, [*features, target])
    evidence = judge_on(
        (test[target].to_numpy(), champion.model.predict(test[features]), challenger.model.predict(test[features])),
        (
            recent[target].to_numpy(),
            champion.model.predict(recent[features]),
            challenger.model.predict(recent[features]),
        )
        if len(recent) >= params.promotion.recent_min_rows
        else None,
        f"{len(recent)} rows of {label}",
        metric=metric,
        higher_is_better=higher,
        cfg=params.promotion,
        ordered=bool(params.split.order_by),
    )
    on_recent = evidence.recent.interval if evidence.recent else "none"
    return evidence.better, f"bootstrap: test {evidence.test.interval}, recent {on_recent}: {evidence.verdict}"


def run_policy(shared: Shared, policy: PolicyConfig, advance=lambda **_: None) -> list[dict[str, Any]]:
    """One policy over every batch: what was served, what was decided, what it came to."""
    from pipelines.monitoring.policy import decide

    params = shared.params
    cfg = params.policy_monitor(policy)
    policy_params = params.model_copy(update={"monitor": cfg})
    higher = params.metric[1]
    champion = shared.model(0)
    trained_prefix, last_retrain = 0, None
    rows: list[dict[str, Any]] = []
    for i, (label, batch) in enumerate(shared.batches):
        live = _live(shared, champion, i)
        now = datetime.combine(_day_of_year(int(batch["day"].max())), clock(23, 59), UTC)
        drift = estimate = None
        if policy.retrain == "monitor":
            from pipelines.monitoring.drift import reweigh

            drift = reweigh(shared.drift(champion, i), policy_params, champion.importance)
            estimate = shared.estimate(champion, i) if cfg.estimate_performance else None
            new_rows = sum(len(b) for _, b in shared.batches[trained_prefix : i + 1])
            verdict = decide(
                cfg,
                now=now,
                drift=drift,
                live=live,
                estimate=estimate,
                champion_metric=champion.test_metric,
                higher_is_better=higher,
                new_rows=new_rows,
                last_retrain=last_retrain,
            )
            retrain, reason = verdict.retrain, verdict.reason()
        else:
            retrain = policy.retrain == "every_batch" or (policy.retrain == "scheduled" and (i + 1) % policy.every == 0)
            reason = {"never": "never retrains", "every_batch": "every batch"}.get(
                policy.retrain, f"every {policy.every} batches"
            )
        row = {
            "policy": policy.name,
            "period": label,
            "served": champion.name,
            "live": live.value,
            "baseline": live.baseline,
            "champion_test": champion.test_metric,
            "weighted_drift": drift.weighted_share if drift else np.nan,
            "drift_share": drift.share if drift else np.nan,
            "estimated": estimate.value if estimate and estimate.value is not None else np.nan,
            "retrain": retrain,
            "promoted": False,
            "trained": "",
            "train_seconds": 0.0,
            "gate": "",
            "reason": reason,
        }
        if retrain:
            challenger = shared.model(i + 1)
            promoted, why = _gate(shared, policy, champion, challenger, i)
            row |= {"promoted": promoted, "trained": challenger.name, "train_seconds": challenger.seconds, "gate": why}
            trained_prefix, last_retrain = i + 1, now
            champion = challenger if promoted else champion
        rows.append(row)
        advance(note=f"{policy.name} {label}")
    return rows


def summarise(timeline: pd.DataFrame, policies: list[PolicyConfig]) -> pd.DataFrame:
    """Per policy: mean and worst live error of what was served, retrains, promotions, and
    the training time its retrains cost."""
    out = []
    for policy in policies:
        part = timeline[timeline["policy"] == policy.name]
        out.append(
            {
                "policy": policy.name,
                "mean_live": part["live"].mean(),
                "worst_live": part["live"].max(),
                "retrains": int(part["retrain"].sum()),
                "promotions": int(part["promoted"].sum()),
                "train_seconds": round(float(part["train_seconds"].sum()), 1),
            }
        )
    return pd.DataFrame(out)


def render_summary(summary: pd.DataFrame, metric: str) -> str:
    lines = [
        f"| policy | mean live {metric} | worst live {metric} | retrains | promotions | training s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.policy} | {r.mean_live:.1f} | {r.worst_live:.1f} | {r.retrains} | {r.promotions} | {r.train_seconds} |"
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every policy (or those named); returns (summary, timeline). `train_months`: the
    first champion's months (default backtest.train_months); `period`: month or week batches."""
    import yaml

    from flows.replay import replay_params
    from pipelines.core.config import load_params
    from pipelines.core.errors import LooplineError
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
        f"{len(batches)} {period}ly batches, policies {', '.join(p.name for p in chosen)}; work directory {workdir}"
    )
    shared = Shared(params, initial, batches, echo)
    with progress("backtest", len(chosen) * len(batches), "policy-months") as advance:
        timeline = pd.DataFrame([row for policy in chosen for row in run_policy(shared, policy, advance)])
    summary = summarise(timeline, chosen)
    seconds = time.perf_counter() - started
    metric, _ = params.metric
    timeline.to_csv(workdir / "timeline.csv", index=False)
    summary.to_csv(workdir / "summary.csv", index=False)
    table = render_summary(summary, metric)
    (workdir / "summary.md").write_text(table + "\n")
    png = workdir / "backtest.png"
    backtest_figure(timeline, chosen, metric).savefig(png, dpi=120, bbox_inches="tight")
    if chart is not None:
        Path(chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, chart)
        shutil.copyfile(workdir / "summary.csv", Path(chart).with_suffix(".csv"))
    _log_backtest(params, summary, workdir, seconds, len(shared.models))
    echo(table)
    echo(f"{len(shared.models)} trainings shared by {len(chosen)} policies; {seconds:.0f}s in all")
    return summary, timeline


def backtest_figure(timeline: pd.DataFrame, policies: list[PolicyConfig], metric: str):
    """Live error per month per policy; a marker above a month where the policy retrained
    (filled: the retrained model was promoted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    periods = list(dict.fromkeys(timeline["period"]))
    x = np.arange(len(periods))
    for policy in policies:
        part = timeline[timeline["policy"] == policy.name].set_index("period").loc[periods]
        (line,) = ax.plot(x, part["live"], "o-", label=f"{policy.name} ({int(part['retrain'].sum())} retrains)")
        retrained = part["retrain"].to_numpy(dtype=bool)
        promoted = part["promoted"].to_numpy(dtype=bool)
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
    baseline = timeline.drop_duplicates("period").set_index("period").loc[periods, "baseline"]
    ax.plot(x, baseline, ":", color="#999999", label="naive baseline (first champion's training mean)")
    ax.set_xticks(x, periods)
    ax.set_ylabel(f"live {metric} of the served model")
    ax.set_title(
        f"Back-test of retraining policies over {YEAR} (▲ retrain after the month: filled promoted, open kept)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _log_backtest(params: Params, summary: pd.DataFrame, workdir: Path, seconds: float, trainings: int) -> None:
    from pipelines.core.names import REPLAY
    from pipelines.registry.tracking import client_for, log_dict_batch

    client, experiment_id = client_for(params)
    run = client.create_run(experiment_id, run_name="backtest", tags={REPLAY: "backtest"})
    metrics: dict[str, float] = {"seconds": seconds, "trainings": trainings}
    for r in summary.itertuples():
        metrics |= {
            f"{r.policy}.mean_live": r.mean_live,
            f"{r.policy}.worst_live": r.worst_live,
            f"{r.policy}.retrains": r.retrains,
            f"{r.policy}.promotions": r.promotions,
            f"{r.policy}.train_seconds": r.train_seconds,
        }
    log_dict_batch(client, run.info.run_id, metrics=metrics)
    for name in ("backtest.png", "summary.csv", "summary.md", "timeline.csv"):
        client.log_artifact(run.info.run_id, str(workdir / name), "backtest")
    client.set_terminated(run.info.run_id)
