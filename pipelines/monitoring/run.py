"""One monitoring run's work, as the monitoring flow's tasks call it:

- `measure`: each source of observed rows against the champion's reference, as a window of
  its own: the **served** window (what the champion answered in `monitor.window`, read from
  the prediction log, with the predictions it gave) and the **landed** window (the latest
  batches that landed with features); the labelled rows (labels joined to served answers by
  id or time key: the live metric; the rest scored now: the offline metric); how many
  labelled rows no training has seen; a retrain still pending for labels;
- `record`: the run in the monitoring experiment (decision and reasons as tags, scores as
  metrics per source, the Evidently reports as artifacts).

State between runs (last retrain, a pending retrain, data the last training saw) is read
from MLflow. Results are dataclasses with one renderer (pipelines/monitoring/report.py) for
the CLI and the Prefect artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout
from pipelines.data.arrivals import BatchOutcome
from pipelines.monitoring.drift import Drift
from pipelines.monitoring.estimate import Estimate
from pipelines.monitoring.labels import LabelFeed, LabelFile, LiveMetric
from pipelines.monitoring.policy import Verdict
from pipelines.monitoring.prediction_log import LogSize
from pipelines.monitoring.shadow import ShadowJudgement

Source = Literal["served", "landed"]


@dataclass(frozen=True)
class Window:
    """One source of observed rows, measured against the champion's reference on its own."""

    source: Source
    what: str  # which rows, in words
    rows: int = 0
    status: Literal["measured", "not enough rows", "no rows"] = "no rows"
    detail: str = ""  # why it was not measured
    drift: Drift | None = None  # without its HTML, which is in `report`
    estimate: Estimate | None = None
    report: str = ""  # the Evidently report's path
    snapshot: str = ""  # the same report as an Evidently snapshot (JSON), for the dashboard
    earlier: dict[str, int] = field(default_factory=dict)  # served: rows earlier versions answered meanwhile
    start: str | None = None  # served: the time of the window's first row
    files: list[str] = field(default_factory=list)  # landed: the batches

    @property
    def measured(self) -> bool:
        return self.status == "measured"


@dataclass(frozen=True)
class Measurement:
    status: Literal["measured", "no champion", "no data", "not enough rows"]
    detail: str = ""  # why nothing was measured
    champion: str | None = None  # the champion's version
    champion_run: str | None = None
    champion_metric: float | None = None  # its test metric, as registered
    metric: str = ""
    windows: list[Window] = field(default_factory=list)
    reference_rows: int = 0
    live: LiveMetric | None = None  # the champion's served predictions on labelled rows
    earlier: dict[str, LiveMetric] = field(default_factory=dict)  # ... earlier versions', apart
    offline: LiveMetric | None = None  # the champion on labelled rows nothing served answers
    labels: str = ""  # why a labelled measurement is missing ("no labels in window", too few rows)
    label_files: list[LabelFile] = field(default_factory=list)  # the label feed of this run
    new_rows: int = 0  # labelled rows no training has seen
    pending: str = ""  # an open pending retrain: "<since>: <reason>"
    log: LogSize | None = None  # the prediction log's size after this run's prune
    seconds: float = 0.0
    answered: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)  # labelled answers: the shadow's pairs

    @property
    def primary(self) -> Window | None:
        """The window the loop's history charts (the dashboard, the replay): the served one
        when it was measured, else the landed one."""
        return next((w for w in self.windows if w.measured), None)

    @property
    def drift(self) -> Drift | None:
        return self.primary.drift if self.primary else None

    @property
    def estimate(self) -> Estimate | None:
        return self.primary.estimate if self.primary else None

    @property
    def window_rows(self) -> int:
        return self.primary.rows if self.primary else max((w.rows for w in self.windows), default=0)

    @property
    def report(self) -> str:
        return self.primary.report if self.primary else ""

    @property
    def snapshot(self) -> str:
        return self.primary.snapshot if self.primary else ""

    @property
    def window(self) -> list[str]:
        """The landed batches measured (the landed window's files)."""
        return next((w.files for w in self.windows if w.source == "landed"), [])

    def source(self, name: Source) -> Window | None:
        return next((w for w in self.windows if w.source == name), None)


@dataclass(frozen=True)
class Retrain:
    """What the retrain a monitoring run started came to."""

    outcome: str
    version: str | None = None
    promoted: bool = False
    reason: str = ""
    data_version: str | None = None
    candidate: str | None = None
    flow_run_id: str | None = None  # a retrain started through the deployment
    timings: dict[str, float] = field(default_factory=dict, repr=False)  # the training flow's steps, seconds


@dataclass(frozen=True)
class MonitoringResult:
    at: str
    batches: list[BatchOutcome]
    measured: Measurement
    verdict: Verdict
    mlflow_run_id: str | None = None
    training: Retrain | None = None
    shadow: ShadowJudgement | None = None  # the shadow judged on live rows (None: no shadow)
    # Seconds per step of the run (accept, labels, measure, decide, shadow, prune, record,
    # retrain): where the time from a batch landing to a new champion goes.
    timings: dict[str, float] = field(default_factory=dict)


def last_training_arrival(client, experiment_id: str) -> str | None:
    """The last accepted batch the newest training run read (None: no training run says)."""
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=20):
        if names.LAST_ARRIVAL in run.data.tags:
            return run.data.tags[names.LAST_ARRIVAL]
    return None


def last_retrain(client, experiment_id: str) -> datetime | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{names.DECISION}` = 'retrain'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return datetime.fromisoformat(runs[0].data.tags[names.AT]) if runs else None


def open_pending(client, experiment_id: str) -> str:
    """The pending retrain still open ("<since>: <reason>"): the newest run that decided to
    retrain left it pending, and none has retrained since. Empty when there is none."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{names.DECISION}` LIKE 'retrain%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or runs[0].data.tags.get(names.DECISION) != "retrain pending":
        return ""
    return runs[0].data.tags.get(names.PENDING, "")


def new_rows(files: list[Path], params: Params) -> int:
    """Labelled rows of the batches stored since the last training (landed with their target,
    or labels joined to served answers) that no training has seen: not equal, on the features
    and the target, to a row of the latest splits (the test the promotion's recent-row
    evidence uses), each distinct row counted once. A batch of hours a model already trained
    on is not new data."""
    from pipelines.data.arrivals import typed_rows
    from pipelines.data.ingest import read_arrivals
    from pipelines.data.split import SPLITS, read_split
    from pipelines.registry.evidence import unseen

    if not files:
        return 0
    columns = [*params.features.columns, params.data.target]
    rows = typed_rows(read_arrivals(files, list(params.table_schema.columns)), params).dropna(
        subset=[params.data.target]
    )
    try:
        seen = [read_split(params, split, "monitor") for split in SPLITS]
    except LooplineError:  # no splits here (another machine trained): what arrived since is new
        seen = []
    return len(unseen(rows, seen, columns).drop_duplicates(subset=columns))


class _Champion:
    """The champion and what monitoring reads beside it, loaded once per run, when a window
    first needs it."""

    def __init__(self, client, params: Params, version: str):
        self.client, self.params, self.version = client, params, version
        self.mv = client.get_model_version(params.tracking.model_name, version)
        self._model: tuple | None = None
        self._reference: pd.DataFrame | None = None

    @property
    def model(self):
        return self.loaded[0]

    @property
    def loaded(self) -> tuple:
        if self._model is None:
            from pipelines.registry.tracking import load_model_version

            self._model = load_model_version(self.client, self.params.tracking.model_name, self.version)
        return self._model

    @property
    def reference(self) -> pd.DataFrame:
        if self._reference is None:
            from pipelines.monitoring.reference import champion_drift_reference

            self._reference = champion_drift_reference(self.client, self.mv.run_id, self.model, self.params)
        return self._reference

    def importance(self) -> dict[str, float] | None:
        from pipelines.monitoring.reference import champion_importance

        return champion_importance(self.client, self.mv.run_id, self.params)

    def estimate(self, rows: pd.DataFrame, served) -> Estimate:
        from pipelines.monitoring.estimate import estimate
        from pipelines.monitoring.reference import champion_estimator

        estimator, why = champion_estimator(self.client, self.mv.run_id, self.params)
        if estimator is None:
            metric, _ = self.params.metric
            return Estimate(metric, "DLE" if self.params.data.task == "regression" else "CBPE", None, why, len(rows))
        return estimate(estimator, self.model, rows, self.params.monitor.min_window_rows, served)


def _measure_rows(
    champion: _Champion, source: Source, what: str, rows: pd.DataFrame, served, at: datetime, **extra
) -> Window:
    """Drift of `rows` (features and `prediction`) against the champion's reference, and the
    label-free estimate, as the window of `source`; its Evidently report written."""
    from pipelines.core.storage import write_text
    from pipelines.monitoring.drift import measure_drift

    params = champion.params
    if len(rows) < params.monitor.min_window_rows:
        detail = (
            f"{len(rows)} rows, fewer than monitor.min_window_rows {params.monitor.min_window_rows}: "
            "too few to measure drift or estimate"
        )
        return Window(source, what, len(rows), "not enough rows", detail, **extra)
    drift = measure_drift(champion.reference, rows, params, champion.importance())
    estimate = champion.estimate(rows, served) if params.monitor.estimate_performance else None
    report = (
        Layout.of(params).monitoring
        / "reports"
        / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-v{champion.version}-{source}.html"
    )
    write_text(drift.html, report)
    snapshot = report.with_suffix(".json")
    write_text(drift.snapshot, snapshot)
    return Window(
        source,
        what,
        len(rows),
        "measured",
        drift=replace(drift, html="", snapshot=""),
        estimate=estimate,
        report=str(report.resolve()),
        snapshot=str(snapshot.resolve()),
        **extra,
    )


def _served_window(champion: _Champion, location, at: datetime) -> tuple[Window, pd.DataFrame]:
    """What the champion answered in monitor.window before `at`, from the prediction log."""
    from pipelines.core.postgres import describe
    from pipelines.core.spans import describe_span, parse_span
    from pipelines.monitoring.drift import PREDICTION
    from pipelines.monitoring.prediction_log import prediction_log_exists, read_window

    params = champion.params
    span = parse_span(params.monitor.window)
    if not prediction_log_exists(location):
        what = f"nothing served yet: the prediction log {describe(location)} does not exist"
        return Window("served", what, detail=what), pd.DataFrame()
    window = read_window(location, params.features.columns, champion.version, span, at)
    rows = window.rows
    what = f"{len(rows)} rows served by v{champion.version} " + (
        f"in the {describe_span(span)} to {at:%Y-%m-%d %H:%M}"
        if not isinstance(span, int)
        else f"up to {at:%Y-%m-%d %H:%M}, its latest (monitor.window {span})"
    )
    if window.others:
        what += " (" + ", ".join(f"{n} by v{v}" for v, n in sorted(window.others.items())) + ", reported apart)"
    if rows.empty:
        return Window("served", what, detail=what, earlier=window.others), rows
    typed = _typed_inputs(rows, params)
    served = _served(rows, typed, params)
    typed[PREDICTION] = served.predictions
    return _measure_rows(champion, "served", what, typed, served, at, earlier=window.others, start=window.start), rows


def _typed_inputs(rows: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Logged inputs as the model reads them: numbers as float64, labels as strings."""
    out = {}
    for column in params.features.columns:
        if params.table_schema.columns[column].type == "category":
            out[column] = rows[column].astype(object).where(rows[column].notna(), None)
        else:
            out[column] = pd.to_numeric(rows[column], errors="coerce").astype("float64")
    return pd.DataFrame(out, index=rows.index)


def _served(rows: pd.DataFrame, typed: pd.DataFrame, params: Params):
    """The predictions (and class probabilities) the log holds for `rows`."""
    import json

    from pipelines.monitoring.estimate import Served

    if params.data.task == "regression":
        return Served(pd.to_numeric(rows["prediction"]).to_numpy(dtype="float64"))
    predictions = rows["prediction"].map(lambda v: json.loads(v) if isinstance(v, str) and v.startswith('"') else v)
    probabilities = None
    if rows["probabilities"].notna().all():
        parsed = [json.loads(p) for p in rows["probabilities"]]
        classes = list(parsed[0])
        probabilities = np.array([[p[c] for c in classes] for p in parsed], dtype="float64")
    return Served(np.asarray(predictions.astype(str)), probabilities)


def _landed_window(champion: _Champion, layout: Layout, at: datetime) -> tuple[Window, pd.DataFrame]:
    """The latest monitor.window_batches batches that landed with features (with or without
    their target), scored by the champion now."""
    from pipelines.data.arrivals import stored_files, stored_kind, typed_rows
    from pipelines.data.ingest import read_arrivals
    from pipelines.monitoring.drift import PREDICTION

    params = champion.params
    landed = [f for f in stored_files(layout.arrivals) if stored_kind(f) == "full"] + stored_files(layout.observed)
    files = sorted(landed, key=lambda f: f.name)[-params.monitor.window_batches :]
    if not files:
        return Window("landed", "no batch landed with features", detail="no batch landed with features"), pd.DataFrame()
    id_column = [params.monitor.id_column] if params.monitor.id_column else []
    text = read_arrivals(files, [*params.table_schema.columns, *id_column])
    present = [c for c in params.table_schema.columns if text.column(c).null_count < text.num_rows]
    rows = typed_rows(text.select([*present, *[c for c in id_column if c in text.column_names]]), params, present)
    what = f"{', '.join(f.name for f in files)} ({len(rows)} rows)"
    if rows.empty:
        return Window("landed", what, files=[f.name for f in files]), rows
    rows[PREDICTION] = champion.model.predict(rows[params.features.columns])
    window = _measure_rows(champion, "landed", what, rows, None, at, files=[f.name for f in files])
    return window, rows


def _answers_for(rows: pd.DataFrame, location, params: Params) -> pd.DataFrame:
    """The logged answers the landed rows' ids or time keys name (only those, not the log)."""
    from pipelines.monitoring.prediction_log import prediction_log_exists, read_answers

    cfg = params.monitor
    if rows.empty or not prediction_log_exists(location):
        return pd.DataFrame(columns=["request_id", "model_version", "prediction"])
    ids = rows[cfg.id_column].dropna().astype(str).tolist() if cfg.id_column and cfg.id_column in rows else []
    keyed = cfg.time_key and all(k in rows for k in cfg.time_key)
    return read_answers(
        location,
        list(cfg.time_key),
        request_ids=ids,
        key=cfg.time_key[0] if keyed else None,
        key_values=rows[cfg.time_key[0]].dropna().tolist() if keyed else (),
    )


def measure(params: Params, at: datetime | None = None, feed: LabelFeed | None = None) -> Measurement:
    """Every window against the champion's reference, the labelled rows (the landed window's
    and the label feed's `feed`), the labelled rows no training has seen, and a pending
    retrain still open, at time `at` (default now)."""
    from pipelines.core.names import CHAMPION
    from pipelines.data.arrivals import stored_files
    from pipelines.monitoring.drift import REFERENCE_ROWS
    from pipelines.monitoring.labels import answered_rows, labelled_metrics
    from pipelines.monitoring.prediction_log import log_location, log_size, prediction_log_exists
    from pipelines.registry.champion import alias_version
    from pipelines.registry.tracking import client_for, monitoring_experiment

    at = at or datetime.now(UTC)
    layout = Layout.of(params)
    client, training_id = client_for(params)
    name = params.tracking.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        return Measurement("no champion", f"{name} has no champion yet: run `loopline train`")
    started = time.perf_counter()
    location = log_location(params)
    champion = _Champion(client, params, version)
    served, _ = _served_window(champion, location, at)
    landed, landed_rows = _landed_window(champion, layout, at)
    feed = feed or LabelFeed()
    metric, _ = params.metric
    tested = champion.mv.tags.get(names.version_metric_tag(metric))
    labelled, answered = None, feed.answered
    if not landed_rows.empty or len(feed.answered):
        meta = champion.loaded[1]
        landed_answers = _answers_for(landed_rows, location, params)
        labelled = labelled_metrics(
            landed_rows, landed_answers, params, meta["baseline"], champion=version, answered=feed.answered
        )
        met, _ = answered_rows(landed_rows, landed_answers, params)
        answered = pd.concat([f for f in (feed.answered, met) if len(f)], ignore_index=True) if len(met) else answered
    seen = last_training_arrival(client, training_id)
    since = [f for f in stored_files(layout.arrivals) if seen is None or seen == "none" or f.name > seen]
    windows = [served, landed]
    measured = [w for w in windows if w.measured]
    if measured or (labelled is not None and (labelled.live or labelled.offline or labelled.earlier)):
        status: Literal["measured", "no champion", "no data", "not enough rows"] = "measured"
        detail = ""
    elif any(w.status == "not enough rows" for w in windows):
        status, detail = "not enough rows", "; ".join(f"{w.source}: {w.detail}" for w in windows if w.detail)
    else:
        status, detail = "no data", "; ".join(f"{w.source}: {w.detail}" for w in windows if w.detail)
    reference_rows = 0
    if measured:
        reference_rows = int(champion.reference.attrs.get(REFERENCE_ROWS, len(champion.reference)))
    monitoring_client, monitoring_id = client_for(params, monitoring_experiment(params))
    return Measurement(
        status,
        detail,
        champion=version,
        champion_run=champion.mv.run_id,
        champion_metric=float(tested) if tested is not None else None,
        metric=metric,
        windows=windows,
        reference_rows=reference_rows,
        live=labelled.live if labelled else None,
        earlier=labelled.earlier if labelled else {},
        offline=labelled.offline if labelled else None,
        labels=labelled.note if labelled else "no labels in this run",
        label_files=feed.files,
        new_rows=new_rows(since, params),
        pending=open_pending(monitoring_client, monitoring_id),
        log=log_size(location) if prediction_log_exists(location) else None,
        seconds=round(time.perf_counter() - started, 3),
        answered=answered,
    )


def prune_log(params: Params, measured: Measurement, at: datetime) -> LogSize | None:
    """Rows older than serve.log_retention pruned from the prediction log, never those of the
    served window or written since a pending retrain began to wait for labels."""
    from pipelines.core.spans import parse_duration
    from pipelines.monitoring.prediction_log import log_location, log_size, prediction_log_exists, prune

    location = log_location(params)
    if params.serve.log_retention is None or not prediction_log_exists(location):
        return measured.log
    keep: list[datetime] = []
    served = measured.source("served")
    if served is not None and served.start is not None:
        keep.append(datetime.fromisoformat(served.start))
    if measured.pending:  # the labels a pending retrain waits for answer rows written since
        keep.append(datetime.fromisoformat(measured.pending.split(": ", 1)[0]))
    removed = prune(location, at - parse_duration(params.serve.log_retention), min(keep) if keep else None)
    return replace(log_size(location), pruned=removed)
