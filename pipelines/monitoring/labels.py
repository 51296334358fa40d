"""Labelled rows measured, and labels as their own feed.

- **The live metric** of the predictions the service returned (the prediction log) against
  ground truth that arrived later, joined by request id or by time key. It is the champion's:
  rows earlier versions answered are measured apart, never mixed in. Labelled rows no served
  prediction answers are scored by the champion now (the offline metric), so labels without
  ids still count. Each row is measured once.
- **The label feed.** A landed file of ids (or time keys) and the target, accepted into
  `labels/` (pipelines/data/arrivals.py), is joined here to the logged inputs: each label
  meets the last answer to its id or key; ids never served, duplicates and conflicting labels
  are counted and named. The joined rows (the logged inputs with their labels) become a batch
  in `arrivals/`: training rows, with the label file and request ids as their lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.core.config import Params
from pipelines.monitoring.drift import PREDICTION

EXAMPLES = 5  # ids named in a report, of those never served or labelled twice differently


@dataclass(frozen=True)
class LiveMetric:
    """A metric measured on ground truth: of the predictions the service returned (live), or
    of the champion scoring labelled rows nobody was served (offline)."""

    metric: str
    value: float
    baseline: float  # the naive baseline's metric on the same rows
    rows: int
    served_versions: dict[str, int]  # model version -> rows it answered (offline: the champion scored them all)
    by_id: int = 0  # live rows joined by request id ...
    by_time: int = 0  # ... and by monitor.time_key


@dataclass(frozen=True)
class Labelled:
    """How the labelled rows of a monitoring run were measured: each row once, live if a
    served prediction answers it (by request id, else by time key), offline otherwise. Rows
    earlier versions answered are in `earlier`, by version."""

    live: LiveMetric | None = None
    offline: LiveMetric | None = None
    note: str = ""  # why a measurement is missing ("no labels in window", too few rows)
    earlier: dict[str, LiveMetric] = field(default_factory=dict)


def _task_metrics(y: pd.Series, predicted: pd.Series, baseline: float | str, params: Params) -> tuple[float, float]:
    """The promotion metric of `predicted` and of the constant baseline against `y`."""
    from pipelines.core.metrics import classification_metrics, regression_metrics

    metric, _ = params.metric
    if params.data.task == "regression":
        truth = y.to_numpy(dtype="float64")
        model = regression_metrics(truth, predicted.to_numpy(dtype="float64"))
        base = regression_metrics(truth, np.full_like(truth, float(baseline)))
    else:
        truth = y.astype(str).to_numpy()
        classes = sorted(set(truth) | set(predicted.astype(str)))
        model = classification_metrics(truth, predicted.astype(str).to_numpy(), None, classes)
        base = classification_metrics(truth, np.full(len(truth), str(baseline), dtype=object), None, classes)
    return model[metric], base[metric]


def _keys(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The key columns alike whether a value came typed or from the log's JSON: numbers as
    float64 (3, 3.0 and "3" are equal), anything else as text."""
    out = {}
    for c in columns:
        numeric = pd.to_numeric(frame[c], errors="coerce")
        out[c] = numeric.astype("float64") if numeric.notna().all() else frame[c].astype(str)
    return pd.DataFrame(out, index=frame.index)


def match_answers(rows: pd.DataFrame, log: pd.DataFrame, params: Params) -> pd.Series:
    """For each row, the position in `log` of the answer it is about: the last answer to its
    request id (monitor.id_column), else the last answer for its monitor.time_key values;
    -1 where none answers."""
    cfg = params.monitor
    found = pd.Series(-1, index=rows.index, dtype="int64")
    if log.empty:
        return found
    positions = pd.Series(np.arange(len(log)), index=log.index)
    if cfg.id_column and cfg.id_column in rows:
        last = positions.groupby(log["request_id"].astype(str).to_numpy()).last()
        ids = rows[cfg.id_column].astype(str)
        hit = rows[cfg.id_column].notna() & ids.isin(last.index)
        found[hit] = last.reindex(ids[hit]).to_numpy()
    keys = cfg.time_key
    if keys and all(k in rows for k in keys) and all(k in log for k in keys):
        answered = log.dropna(subset=keys)
        last = _keys(answered, keys).assign(_position=positions[answered.index].to_numpy())
        last = last.drop_duplicates(keys, keep="last")  # the last answer for those values
        open_ = found == -1
        wanted = _keys(rows.loc[open_].dropna(subset=keys), keys)
        for c in keys:  # a number on one side, text on the other: compare as text
            if wanted[c].dtype != last[c].dtype:
                wanted[c], last[c] = wanted[c].astype(str), last[c].astype(str)
        matched = wanted.rename_axis("_row").reset_index().merge(last, on=keys, how="inner").set_index("_row")
        found[matched.index] = matched["_position"].to_numpy()
    return found


def _live(answered: pd.DataFrame, params: Params, baseline: float | str) -> LiveMetric:
    metric, _ = params.metric
    value, base = _task_metrics(answered[params.data.target], answered[PREDICTION], baseline, params)
    versions = answered["model_version"].astype(str).value_counts()
    return LiveMetric(
        metric,
        value,
        base,
        len(answered),
        {str(v): int(n) for v, n in versions.items()},
        by_id=int((answered["how"] == "id").sum()),
        by_time=int((answered["how"] == "time").sum()),
    )


def answered_rows(window: pd.DataFrame, log: pd.DataFrame, params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled rows of a landed window that a logged answer in `log` answers (by request
    id, else by monitor.time_key): request_id, ts, model_version, prediction, the target and
    `how` (id | time); and the labelled rows nothing answered."""
    cfg, target = params.monitor, params.data.target
    if target not in window or not window[target].notna().any():
        return pd.DataFrame(), pd.DataFrame()
    rows = window[window[target].notna()]
    at = match_answers(rows, log, params)
    hit = at >= 0
    if not hit.any():
        return pd.DataFrame(), rows
    answers = log.iloc[at[hit].to_numpy()]
    by_id = (
        rows.loc[hit, cfg.id_column].astype(str).to_numpy() == answers["request_id"].astype(str).to_numpy()
        if cfg.id_column and cfg.id_column in rows
        else np.zeros(int(hit.sum()), dtype=bool)
    )
    met = pd.DataFrame(
        {
            "request_id": answers["request_id"].astype(str).to_numpy(),
            "ts": answers["ts"].astype(str).to_numpy() if "ts" in answers else "",
            target: rows.loc[hit, target].to_numpy(),
            PREDICTION: answers[PREDICTION].to_numpy(),
            "model_version": answers["model_version"].astype(str).to_numpy(),
            "how": np.where(by_id, "id", "time"),
        }
    )
    return met, rows[~hit]


def labelled_metrics(
    window: pd.DataFrame,
    log: pd.DataFrame,
    params: Params,
    baseline: float | str,
    champion: str = "",
    answered: pd.DataFrame | None = None,
) -> Labelled:
    """The labelled rows of a monitoring run, each measured once: the window's rows a served
    prediction answers (its request id in `log`, else its monitor.time_key values, the last
    answer for them) and the rows the label feed joined (`answered`) against what was served
    (live: the champion's rows; earlier versions' apart); the window's other labelled rows
    against the champion's predictions on them, in `window[PREDICTION]` (offline). An
    offline metric on fewer than monitor.min_window_rows rows is left out, saying so."""
    cfg, target = params.monitor, params.data.target
    metric, _ = params.metric
    parts = [answered[[target, PREDICTION, "model_version", "how"]]] if answered is not None and len(answered) else []
    met, rest = answered_rows(window, log, params)
    if len(met):
        parts.append(met[[target, PREDICTION, "model_version", "how"]])
    if not parts and rest.empty:
        return Labelled(note="no labels in window")
    live, earlier, notes = None, {}, []
    if parts:
        served = pd.concat(parts, ignore_index=True)
        mine = served["model_version"].astype(str) == str(champion) if champion else pd.Series(True, index=served.index)
        if mine.any():
            live = _live(served[mine], params, baseline)
            if live.rows < cfg.min_window_rows:
                notes.append(
                    f"live {metric} on only {live.rows} labelled predictions: measured, not a trigger "
                    f"(monitor.min_window_rows {cfg.min_window_rows})"
                )
        for version, part in served[~mine].groupby(served.loc[~mine, "model_version"].astype(str)):
            earlier[str(version)] = _live(part, params, baseline)
    offline = None
    if len(rest) >= cfg.min_window_rows and PREDICTION in rest:
        value, base = _task_metrics(rest[target], rest[PREDICTION], baseline, params)
        offline = LiveMetric(metric, value, base, len(rest), {champion: len(rest)} if champion else {})
    elif len(rest) and PREDICTION in rest:
        notes.append(
            f"only {len(rest)} labelled rows without a served prediction: no offline {metric} "
            f"(monitor.min_window_rows {cfg.min_window_rows})"
        )
    return Labelled(live, offline, "; ".join(notes), earlier)


@dataclass(frozen=True)
class LabelFile:
    """What one label file came to."""

    file: str
    labels: int  # label rows read
    joined: int  # ... that met a served answer
    unknown: int  # ... whose id or key nothing served (dropped: the file has no features)
    unknown_examples: list[str]
    duplicates: int  # the same id or key labelled again with the same value (kept once)
    conflicts: int  # ids or keys labelled with different values (all of their labels dropped)
    conflict_examples: list[str]
    stored: str | None = None  # the batch of training rows in arrivals/
    not_stored: str = ""  # why the joined rows did not become training rows

    def describe(self) -> str:
        parts = [f"{self.joined} of {self.labels} labels joined to served answers"]
        if self.unknown:
            parts.append(f"{self.unknown} never served ({', '.join(self.unknown_examples)}…), dropped")
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated with the same label, kept once")
        if self.conflicts:
            parts.append(f"{self.conflicts} labelled twice differently ({', '.join(self.conflict_examples)}…), dropped")
        parts.append(f"training rows: {self.stored}" if self.stored else f"not training rows: {self.not_stored}")
        return f"labels {self.file}: " + "; ".join(parts)


@dataclass(frozen=True)
class LabelFeed:
    """The label files a monitoring run joined, and their joined rows (the answer each label
    met: served prediction, version, inputs), which the live metric reads."""

    files: list[LabelFile] = field(default_factory=list)
    answered: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    @property
    def joined(self) -> int:
        return sum(f.joined for f in self.files)


def _deduplicated(labels: pd.DataFrame, key: list[str], target: str) -> tuple[pd.DataFrame, int, int, list[str]]:
    """One label per id or key: repeats of the same value are kept once; a key labelled with
    different values is dropped whole (which one is true cannot be known)."""
    if labels.empty:
        return labels, 0, 0, []
    spelled = labels[key].astype(str).agg("|".join, axis=1)
    values = labels[target].astype(str)
    distinct = values.groupby(spelled).nunique()
    conflicting = distinct[distinct > 1].index
    clashing = spelled.isin(conflicting)
    kept = labels[~clashing].loc[~spelled[~clashing].duplicated(keep="first")]
    duplicates = int((~clashing).sum()) - len(kept)
    return kept, duplicates, len(conflicting), [str(k) for k in conflicting[:EXAMPLES]]


def join_label_files(params: Params, location) -> LabelFeed:
    """Join every accepted label file (labels/) to the prediction log at `location`; store the
    joined rows as training rows (arrivals/) when the log holds every schema column (features
    and serve.context_columns), and move the file to labels/joined/ with a report."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.layout import Layout
    from pipelines.core.storage import write_json
    from pipelines.data.arrivals import HASH_KEY, KIND_KEY, SOURCE_KEY, store_batch, stored_files, typed_rows
    from pipelines.monitoring.prediction_log import read_answers

    layout = Layout.of(params)
    files = stored_files(layout.labels)
    if not files:
        return LabelFeed()
    cfg, target = params.monitor, params.data.target
    logged = [*params.features.columns, *params.serve.context_columns]
    outcomes, frames = [], []
    # A run that stopped between storing a file's training rows and moving the file: not twice.
    done = {_metadata(f).get(SOURCE_KEY, b"").decode(): f.name for f in stored_files(layout.arrivals)}
    for path in files:
        text = pq.read_table(path)
        labels = typed_rows(text, params, columns=[c for c in text.column_names if c in params.table_schema.columns])
        key = [cfg.id_column] if cfg.id_column and cfg.id_column in labels else list(cfg.time_key)
        kept, duplicates, conflicts, clashes = _deduplicated(labels, key, target)
        ids = kept[cfg.id_column].dropna().astype(str).tolist() if cfg.id_column in kept else []
        time_key = cfg.time_key if cfg.time_key and all(k in kept for k in cfg.time_key) else []
        log = read_answers(
            location,
            logged,
            request_ids=ids,
            key=time_key[0] if time_key else None,
            key_values=kept[time_key[0]].dropna().tolist() if time_key else (),
        )
        at = match_answers(kept, log, params)
        hit = at >= 0
        answers = log.iloc[at[hit].to_numpy()].reset_index(drop=True)
        joined = answers.assign(**{target: kept.loc[hit, target].to_numpy()})
        by_id = (
            kept.loc[hit, cfg.id_column].astype(str).to_numpy() == answers["request_id"].astype(str).to_numpy()
            if cfg.id_column in kept
            else np.zeros(len(answers), dtype=bool)
        )
        joined["how"] = np.where(by_id, "id", "time")
        unknown = kept[~hit]
        shown = unknown[cfg.id_column] if cfg.id_column in unknown else unknown[key].astype(str).agg("|".join, axis=1)
        lacking = [c for c in params.table_schema.columns if c not in joined.columns or joined[c].isna().all()]
        stored, why = done.get(path.name), ""
        if stored is not None:
            pass
        elif joined.empty:
            why = "no label met a served answer"
        elif lacking:
            why = f"the log holds no {lacking} (add them to serve.context_columns so requests carry them)"
        else:
            columns = [*params.table_schema.columns, cfg.id_column or "request_id"]
            training = joined.rename(columns={"request_id": cfg.id_column or "request_id"})[columns]
            table = pa.table({c: pa.array(_as_text(training[c], params, c), pa.string()) for c in columns})
            digest = (_metadata(path).get(HASH_KEY) or b"").decode()
            stored = store_batch(
                table,
                layout.arrivals,
                f"joined-{path.stem.split('-', 1)[-1]}",  # 000004-labels-x -> 00000N-joined-labels-x
                layout,
                {HASH_KEY: f"joined:{digest}".encode(), KIND_KEY: b"joined labels", SOURCE_KEY: path.name.encode()},
            ).name
        outcome = LabelFile(
            path.name,
            len(labels),
            len(joined),
            len(unknown),
            [str(v) for v in shown.head(EXAMPLES)],
            duplicates,
            conflicts,
            clashes,
            stored,
            why,
        )
        outcomes.append(outcome)
        frames.append(joined.assign(_file=path.name))
        layout.joined_labels.mkdir(parents=True, exist_ok=True)
        write_json(vars(outcome), layout.joined_labels / f"{path.stem}.report.json")
        os.replace(path, layout.joined_labels / path.name)  # after its rows are stored: joined once
    answered = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return LabelFeed(outcomes, answered)


def _as_text(values: pd.Series, params: Params, column: str) -> pd.Series:
    """A column as stored batches hold it, text as a landed file would have it: whole numbers
    for an int column (64, not 64.0), missing values as nulls."""
    rule = params.table_schema.columns.get(column)
    if rule is not None and rule.type == "int":
        return pd.to_numeric(values, errors="coerce").round().astype("Int64").astype("string")
    return values.astype("string")


def _metadata(path: Path) -> dict[bytes, bytes]:
    import pyarrow.parquet as pq

    return dict(pq.ParquetFile(path).schema_arrow.metadata or {})
