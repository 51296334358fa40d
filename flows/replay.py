"""`loopline replay`: the closed loop replayed over 2011 of the Bikeshare data.

The first champion is trained on the first months; every later period (a month or a week)
then goes through the loop as it would in production:

1. its rows are sent to a real `loopline serve` process (POST /predict_batch, every schema
   column but the target: the features and the context fields), which logs each prediction
   under a request id; the replay files each answer under the hour it replays, so the
   served window of a monitoring run at the period's end holds the period;
2. the observed demand of each hour lands as a label file (request id and target)
   `--label-delay` after the hour (0: at the period's end);
3. the monitoring flow joins the labels that landed to the log, measures the served
   window's drift and estimate and the live error of the labelled answers, and retrains on
   the logged inputs with their labels (promoting only a better model) when the policy says
   so; a retrain decided before its labels are there waits for them (pending);
4. a promotion reaches the service through its registry poll (the replay asks it to check
   at once with POST /admin/reload, so the next period is served by the new champion).

Everything lives in its own work directory (params, data, MLflow store); the timeline ends
as a CSV and a PNG chart, also logged to the monitoring experiment in MLflow.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import pandas as pd
import yaml

from pipelines.core.errors import LooplineError
from pipelines.core.names import REPLAY
from pipelines.monitoring.run import MonitoringResult

MARKER = ".loopline-replay"
Period = Literal["month", "week"]
YEAR = 2011


def _day_of_year(day: int) -> date:
    return date(YEAR, 1, 1) + timedelta(days=int(day) - 1)


def split_periods(
    frame: pd.DataFrame, train_months: int, period: Period
) -> tuple[pd.DataFrame, list[tuple[str, pd.DataFrame]]]:
    """The first `train_months` months, and the rest cut into months or weeks (in time order)."""
    months = pd.to_datetime([_day_of_year(d) for d in frame["day"]]).month
    initial = frame[months <= train_months]
    rest = frame[months > train_months]
    if period == "month":
        keys = months[months > train_months]
        labels = {k: f"{YEAR}-{k:02d}" for k in keys.unique()}
    else:
        keys = (rest["day"].to_numpy() - 1) // 7
        labels = {k: f"{YEAR}-W{k + 1:02d}" for k in pd.unique(keys)}
    return initial, [(labels[k], part) for k, part in rest.groupby(keys, sort=True)]


def hours_of(frame: pd.DataFrame) -> pd.Series:
    """The hour of 2011 each row answers (its day of the year and hour), as UTC timestamps."""
    start = pd.Timestamp(YEAR, 1, 1, tz="UTC")
    days = pd.to_timedelta(frame["day"].to_numpy(dtype="int64") - 1, unit="D")
    return pd.Series(start + days + pd.to_timedelta(frame["hr"].to_numpy(dtype="int64"), unit="h"), index=frame.index)


def replay_params(base: dict[str, Any], workdir: Path, workspace: Path, window: str = "31d") -> dict[str, Any]:
    """The project's params, pointed at the work directory, with a quick candidate search
    (a replay trains many times) and a service that checks the registry every second. A
    request carries every schema column that is not a feature (the day) as a context field,
    so joined labels become training rows; the served window is a period (`window`). Its
    monitoring history goes to the project's Evidently `workspace`, so `loopline dashboard`
    shows it beside the real model's."""
    raw = json.loads(json.dumps(base))
    raw["data"]["source"] = str(workdir / "initial.csv")
    raw["paths"] = {"data": str(workdir / "data"), "models": str(workdir / "models")}
    raw["tracking"] = {
        "uri": f"sqlite:///{workdir / 'mlflow.db'}",
        "artifact_root": str(workdir / "mlruns"),
        "experiment": "replay-2011",
        "model_name": "replay-bikeshare",
    }
    raw["search"] = {"families": ["linear", "hist_gradient_boosting"], "n_trials": 0}
    raw.setdefault("serve", {})["reload_interval_s"] = 1.0
    features = {*raw["features"].get("numeric", []), *raw["features"].get("categorical", [])}
    features |= set(raw["features"].get("cyclical", {}))
    context = [c for c in raw["schema"]["columns"] if c not in features and c != raw["data"]["target"]]
    raw["serve"]["context_columns"] = context
    raw.setdefault("monitor", {})["settle_seconds"] = 0  # batches land by write-then-rename
    raw["monitor"]["workspace"] = str(workspace)
    raw["monitor"]["window"] = window
    return raw


def serve_period(url: str, rows: pd.DataFrame, label: str, params, chunk: int) -> list[str]:
    """Predict the period's rows through the service; returns each row's request id."""
    from pipelines.core.processes import post
    from serving.schema import request_records

    records = request_records(rows, params)
    ids: list[str] = []
    for start in range(0, len(records), chunk):
        answer = post(
            f"{url}/predict_batch",
            {"records": records[start : start + chunk]},
            timeout=60,
            request_id=f"{label}.{start}",
        )
        ids += answer["request_ids"]
    return ids


def _fresh_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).is_file():
            raise LooplineError(
                "replay", f"{workdir} exists and is not a replay work directory; choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("created by loopline replay; deleted by the next replay\n")


def run_replay(
    workdir: Path,
    params_path: str | Path = "params.yaml",
    period: Period = "month",
    train_months: int | None = None,
    periods: int | None = None,
    chart: Path | None = None,
    echo=print,
    label_delay: str = "0",
) -> pd.DataFrame:
    """Run the replay; returns the timeline (one row per period). `train_months`: the first
    champion's months (default backtest.train_months); `label_delay`: how long after its
    hour each label lands (a duration: 0, 7d, 30d)."""
    from flows.monitoring import monitoring_flow
    from flows.training import training_flow
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.core.processes import post
    from pipelines.core.progress import progress
    from pipelines.core.spans import parse_duration
    from pipelines.core.storage import write_csv
    from pipelines.monitoring.dashboard import remove_project
    from pipelines.monitoring.prediction_log import log_location, retime, wait_for_answers
    from serving.local import local_service

    try:
        delay = parse_duration(label_delay)
    except ValueError as err:
        raise LooplineError("replay", f"--label-delay {label_delay!r}: {err}") from None
    workdir = Path(workdir).resolve()
    base = yaml.safe_load(Path(params_path).read_text())
    train_months = train_months or load_params(params_path).backtest.train_months
    data = pd.read_csv(base["data"]["source"])
    initial, batches = split_periods(data, train_months, period)
    batches = batches[:periods] if periods else batches
    _fresh_workdir(workdir)
    initial.to_csv(workdir / "initial.csv", index=False)
    replay_path = workdir / "params.yaml"
    workspace = Layout.of(load_params(params_path)).workspace.resolve()
    window = "31d" if period == "month" else "7d"
    replay_path.write_text(yaml.safe_dump(replay_params(base, workdir, workspace, window), sort_keys=False))
    params = load_params(replay_path)
    remove_project(workspace, params.tracking.model_name)  # the dashboard shows this replay, not the last
    layout = Layout.of(params)
    metric, _ = params.metric
    id_column = params.monitor.id_column or "request_id"  # labels name the answers they label
    target = params.data.target

    echo(
        f"replay: first champion on {len(initial)} rows (months 1-{train_months}); "
        f"{len(batches)} {period}ly batches to follow, labels {_delay_words(label_delay)}; work directory {workdir}"
    )
    first = training_flow(params_path=str(replay_path))
    echo(f"  v{first.decision.version} {first.decision.outcome}: test {metric} {first.trained.test[metric]:.2f}")
    timeline: list[dict[str, Any]] = []
    answered: dict[str, tuple[list[str], pd.Series]] = {}  # period -> its request ids and observed demand
    waiting = pd.DataFrame(columns=[id_column, target, "hour"])  # served, labels not landed yet
    with (
        open(workdir / "serve.log", "w") as log,
        local_service(replay_path, log=log) as url,
        progress("replay", len(batches), f"{period}s") as advance,
    ):
        for label, rows in batches:
            ids = serve_period(url, rows, label, params, params.serve.max_batch_records)
            answered[label] = (ids, rows[target])
            hours = hours_of(rows)
            wait_for_answers(log_location(params), ids)  # the service logs after it answers
            retime(log_location(params), ids, hours.dt.to_pydatetime().tolist())
            served = pd.DataFrame({id_column: ids, target: rows[target].to_numpy(), "hour": hours.to_numpy()})
            waiting = pd.concat([waiting, served], ignore_index=True)
            end = datetime.combine(_day_of_year(rows["day"].max()), time(23, 59), UTC)
            due = waiting["hour"] + delay <= pd.Timestamp(end)
            if due.any():
                write_csv(waiting.loc[due, [id_column, target]], layout.landing / f"labels-{label}.csv")
            waiting = waiting[~due]
            started = perf_counter()
            result = monitoring_flow(params_path=str(replay_path), now=end.isoformat())
            monitored = perf_counter() - started
            # at once, not within serve.reload_interval_s: a new champion, or a shadow, serves the next period
            status = post(f"{url}/admin/reload", {}, request_id=f"{label}.reload")
            reloaded = perf_counter() - started - monitored
            timeline.append(_timeline_row(label, len(rows), int(due.sum()), result))
            row = timeline[-1]
            if result.training is not None and result.training.promoted:
                if status["model_version"] != result.training.version:
                    raise LooplineError(
                        "replay",
                        f"the service serves v{status['model_version']} after v{result.training.version} was promoted",
                    )
                row["land_to_serve_s"] = round(monitored + reloaded, 3)
                echo(land_to_serve(result, monitored, reloaded))
            seen = (
                f"live {metric} {row['live_seen']:.1f} on {row['live_rows']} labelled"
                if row["live_rows"]
                else "no labels yet"
            )
            echo(
                f"  {label}: served v{row['served_version']}, {seen}; {row['labels_landed']} labels landed, weighted "
                f"drift {row['weighted_drift']:.0%}, estimated {row['estimated']:.1f} -> {row['decision']}"
                + (f"; v{row['retrained_version']} {result.training.outcome}" if result.training else "")
                + (f"; shadow v{result.shadow.shadow} {result.shadow.outcome}" if result.shadow else "")
            )
            advance(note=f"{label}: {row['decision']}")
    frame = pd.DataFrame(timeline)
    frame = frame.join(served_errors(params, initial, answered), on="period")
    frame.to_csv(workdir / "timeline.csv", index=False)
    figure = timeline_figure(frame, metric, params.monitor.drift_share)
    png = workdir / "timeline.png"
    figure.savefig(png, dpi=120, bbox_inches="tight")
    if chart is not None:  # the PNG and the timeline CSV beside it
        Path(chart).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, chart)
        shutil.copyfile(workdir / "timeline.csv", Path(chart).with_suffix(".csv"))
    _log_replay(params, frame, png)
    return frame


def land_to_serve(result: MonitoringResult, monitored: float, reloaded: float) -> str:
    """One line: the seconds from a monitoring run's start (its batch and labels landed) to
    the service answering with the champion its retrain promoted, step by step."""
    from pipelines.monitoring.report import describe_steps

    assert result.training is not None
    overhead = monitored - sum(result.timings.values())  # the flow's own start and end, its artifacts
    return (
        f"    land to serve v{result.training.version}: {monitored + reloaded:.1f} s = {describe_steps(result)}, "
        f"flow overhead {overhead:.1f}, reload {reloaded:.1f}"
    )


def _delay_words(label_delay: str) -> str:
    return "at the end of each period" if str(label_delay).strip() in ("0", "0d") else f"{label_delay} after each hour"


def served_errors(params, initial: pd.DataFrame, answered: dict[str, tuple[list[str], pd.Series]]) -> pd.DataFrame:
    """Per period, in hindsight (every label known): the error of what the service answered
    (read back from the prediction log by request id) and of the naive baseline (the first
    champion's training mean), whatever the labels' delay was when monitoring ran."""
    from pipelines.core.layout import Layout
    from pipelines.core.metrics import naive_baseline
    from pipelines.monitoring.labels import _task_metrics
    from pipelines.monitoring.prediction_log import read_prediction_log

    log = read_prediction_log(Layout.of(params).prediction_log, []).drop_duplicates("request_id", keep="last")
    predicted = log.set_index("request_id")["prediction"]
    baseline = naive_baseline(initial[params.data.target], params.data.task)
    out = {}
    for label, (ids, truth) in answered.items():
        value, base = _task_metrics(
            truth.reset_index(drop=True), predicted.loc[ids].reset_index(drop=True), baseline, params
        )
        out[label] = {"live": value, "baseline": base}
    return pd.DataFrame.from_dict(out, orient="index")


def _timeline_row(label: str, rows: int, landed: int, result: MonitoringResult) -> dict[str, Any]:
    measured, training, live = result.measured, result.training, result.measured.live
    drift, estimate = measured.drift, measured.estimate
    return {
        "period": label,
        "rows": rows,
        "labels_landed": landed,
        "served_version": measured.champion or "none",
        "live_seen": live.value if live else float("nan"),  # the live error monitoring measured, on the labels landed
        "live_rows": live.rows if live else 0,  # labelled rows measured live (by id or time key) ...
        "offline": measured.offline.value if measured.offline else float("nan"),
        "offline_rows": measured.offline.rows if measured.offline else 0,  # ... and by the champion now
        "champion_test": measured.champion_metric,
        "drift_share": drift.share if drift else float("nan"),
        "weighted_drift": drift.weighted_share if drift else float("nan"),
        "estimated": estimate.value if estimate and estimate.value is not None else float("nan"),
        "drifted": " ".join(drift.drifted) if drift else "",
        "prediction_drift": drift.prediction_score if drift else float("nan"),
        "decision": result.verdict.outcome,
        "alarm": result.verdict.outcome in ("retrain", "retrain pending"),
        "reason": result.verdict.reason(),
        "retrained_version": (training.version or "") if training else "",
        "promoted": bool(training and training.promoted),
        "shadow": result.shadow.describe() if result.shadow else "",
        "shadow_promoted": bool(result.shadow and result.shadow.outcome == "promoted"),
        "monitoring_seconds": measured.seconds,
        "land_to_serve_s": float("nan"),  # batch landed -> the service answers with the promoted champion
    }


def timeline_figure(frame: pd.DataFrame, metric: str, drift_threshold: float):
    """Live error of the serving model (in hindsight: every label known) and the naive
    baseline per period above, drift share below; a red cross marks an alarm that waited for
    labels (retrain pending), a dotted line after a period marks a retrain (green: promoted, so
    the next period is served by the version named there; grey: the champion stayed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(frame))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[2.2, 1])
    top.plot(x, frame["live"], "o-", color="#1f77b4", label=f"live {metric} of the served model")
    top.plot(x, frame["baseline"], "s--", color="#999999", label=f"naive baseline {metric} (training mean)")
    top.step(
        x, frame["champion_test"], where="mid", color="#ff7f0e", alpha=0.8, label=f"serving champion's test {metric}"
    )
    top.plot(x, frame["estimated"], "d:", color="#9467bd", label=f"{metric} estimated without labels (NannyML)")
    for i, row in frame.iterrows():
        top.annotate(
            f"v{row['served_version']}",
            (i, row["live"]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
        if row["decision"] == "retrain pending":
            top.scatter([i], [row["live"]], marker="x", s=120, color="#d62728", zorder=4)
            top.annotate(
                "alarm: waiting for labels",
                (i, row["live"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=7,
                color="#d62728",
            )
        if row["decision"] == "retrain":
            for ax in (top, bottom):
                ax.axvline(i + 0.5, color="#2ca02c" if row["promoted"] else "#7f7f7f", linestyle=":", linewidth=1.5)
            top.annotate(
                f"v{row['retrained_version']} " + ("promoted" if row["promoted"] else "not better"),
                (i + 0.5, top.get_ylim()[0]),
                fontsize=7,
                rotation=90,
                va="bottom",
                ha="right",
                color="#2ca02c" if row["promoted"] else "#7f7f7f",
            )
    top.set_ylabel(f"{metric} (bikers per hour)")
    top.legend(loc="upper right", fontsize=8)
    top.set_title("loopline replay of 2011: serving, monitoring and retraining")
    bottom.bar(
        x, frame["drift_share"], color="none", edgecolor="#d62728", label="share of drifted features (Evidently)"
    )
    bottom.bar(
        x, frame["weighted_drift"], color="#d62728", alpha=0.7, label="importance-weighted, calendar not counted"
    )
    bottom.axhline(drift_threshold, color="black", linewidth=0.8, linestyle="--", label="monitor.drift_share")
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("drift share")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xticks(list(x), frame["period"], rotation=45 if len(frame) > 12 else 0, fontsize=8)
    fig.tight_layout()
    return fig


def _log_replay(params, frame: pd.DataFrame, png: Path) -> None:
    from pipelines.registry.tracking import client_for, log_dict_batch, monitoring_experiment

    client, experiment_id = client_for(params, monitoring_experiment(params))
    run = client.create_run(experiment_id, run_name="replay-timeline", tags={REPLAY: "timeline"})
    log_dict_batch(
        client,
        run.info.run_id,
        metrics={
            "periods": len(frame),
            "retrains": int((frame["decision"] == "retrain").sum()),
            "promotions": int(frame["promoted"].sum() + frame["shadow_promoted"].sum()),
        },
    )
    client.log_artifact(run.info.run_id, str(png), "replay")
    client.log_artifact(run.info.run_id, str(png.with_name("timeline.csv")), "replay")
    client.set_terminated(run.info.run_id)
