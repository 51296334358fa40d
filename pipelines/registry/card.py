"""The model card of a registered version: what the model is, made from what MLflow already
records about it (tags, metrics, the importance and slice files logged beside the model).

`slice_metrics` runs at training, on the test rows: the promotion metric for each value of
each categorical feature, beside the naive baseline's on the same rows. They are logged as
MLflow metrics (`slice.<feature>.<value>.<metric>`), so the MLflow UI compares them across
versions, and as `card/slices.json` with a plot. `build_card` reads it all back and writes
Markdown; `log_card` logs it as `card/model_card.md` in the version's run, after the
promotion decision, which the card reports.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params

FEW_ROWS = 30  # a slice with fewer test rows is flagged: its metric says little


def slice_features(params: Params) -> list[str]:
    """The features sliced on: the categorical ones (features.categorical, category columns)."""
    schema = params.table_schema.columns
    return [c for c in params.features.columns if c in params.features.categorical or schema[c].type == "category"]


def labels(column: pd.Series) -> pd.Series:
    """A column's values as the schema spells them: 1, not 1.0, for a whole number."""
    if pd.api.types.is_numeric_dtype(column):
        values = column.astype("float64")
        whole = values.notna() & (values == values.round())
        return column.astype("string").mask(whole, values.where(whole).astype("Int64").astype("string"))
    return column.astype("string")


def slice_metrics(
    rows: pd.DataFrame, predicted: np.ndarray, params: Params, baseline: float | str, classes: list[str]
) -> pd.DataFrame:
    """The promotion metric of the model and of the naive baseline for each value of each
    categorical feature on `rows` (with their predictions): feature, value, rows, model,
    baseline."""
    from pipelines.core.metrics import classification_metrics, regression_metrics

    metric, _ = params.metric
    target = params.data.target
    regression = params.data.task == "regression"
    y = rows[target].to_numpy(dtype="float64") if regression else rows[target].astype(str).to_numpy()
    pred = np.asarray(predicted, dtype="float64") if regression else np.asarray(predicted).astype(str)
    base = np.full(len(y), float(baseline)) if regression else np.full(len(y), str(baseline), dtype=object)

    def measure(values: np.ndarray, mask: np.ndarray) -> float:
        if regression:
            return regression_metrics(y[mask], values[mask])[metric] if mask.sum() > 1 else float("nan")
        return classification_metrics(y[mask], values[mask], None, classes)[metric]

    out = []
    for feature in slice_features(params):
        column = labels(rows[feature]).fillna("missing").to_numpy()
        for value in pd.unique(column):
            mask = column == value
            out.append((feature, str(value), int(mask.sum()), measure(pred, mask), measure(base, mask)))
    return pd.DataFrame(out, columns=["feature", "value", "rows", "model", "baseline"])


def slice_metric_names(slices: pd.DataFrame, metric: str) -> dict[str, float]:
    """The slices as MLflow metrics: slice.<feature>.<value>.<metric> (and .rows)."""
    values: dict[str, float] = {}
    for s in slices.itertuples():
        key = f"slice.{s.feature}.{re.sub(r'[^0-9A-Za-z_. -]', '_', s.value)}"
        values |= {f"{key}.{metric}": s.model, f"{key}.baseline_{metric}": s.baseline, f"{key}.rows": s.rows}
    return {k: float(v) for k, v in values.items() if np.isfinite(v)}


def slice_figure(slices: pd.DataFrame, metric: str):
    """One panel per feature: the model's and the baseline's metric per value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = list(dict.fromkeys(slices["feature"]))
    fig, axes = plt.subplots(1, len(features), figsize=(3.2 * len(features) + 1, 3.6), squeeze=False)
    for ax, feature in zip(axes[0], features, strict=True):
        part = slices[slices["feature"] == feature]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["model"], 0.4, label="model")
        ax.bar(x + 0.2, part["baseline"], 0.4, label="naive baseline", color="lightgrey")
        ax.set_xticks(x, [f"{v}\n({n})" for v, n in zip(part["value"], part["rows"], strict=True)], fontsize=7)
        ax.set_title(feature)
    axes[0][0].set_ylabel(f"test {metric}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Test {metric} by slice (rows in brackets)")
    fig.tight_layout()
    return fig


def training_facts(train: pd.DataFrame, params: Params) -> dict[str, Any]:
    """What the card's limits section needs of the training rows: the window they span (by
    split.order_by) and the category values they never held."""
    order = params.split.order_by
    if order:
        ends = train.sort_values(order).iloc[[0, -1]][order]
        ends = ends.apply(labels)
        first, last = (" ".join(f"{c} {v}" for c, v in row.items()) for _, row in ends.iterrows())
        window = f"{first} to {last} ({', '.join(order)} order)"
    else:
        window = "not ordered in time (random split)"
    schema = params.table_schema.columns
    unseen = {}
    for feature in slice_features(params):
        known = schema[feature].values or []
        missing = sorted({str(v) for v in known} - set(labels(train[feature]).dropna().unique()))
        if missing:
            unseen[feature] = missing
    return {"window": window, "unseen_values": unseen}


def log_slices(client, run_id: str, slices: pd.DataFrame, facts: dict[str, Any], metric: str) -> None:
    """The slice table, the training facts and the slice plot beside the model, and the
    slices as metrics."""
    import matplotlib.pyplot as plt

    from pipelines.registry.tracking import log_dict_batch

    log_dict_batch(client, run_id, metrics=slice_metric_names(slices, metric))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "slices.json").write_text(slices.to_json(orient="records", indent=1))
        (Path(tmp) / "facts.json").write_text(json.dumps(facts, indent=1))
        client.log_artifact(run_id, str(Path(tmp) / "slices.json"), names.CARD_DIR)
        client.log_artifact(run_id, str(Path(tmp) / "facts.json"), names.CARD_DIR)
    fig = slice_figure(slices, metric)
    client.log_figure(run_id, fig, f"{names.CARD_DIR}/slices.png")
    plt.close(fig)


def _json_artifact(client, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
        except Exception:  # not logged (a version trained before cards)
            return None


def _model_metadata(client, run_id: str) -> dict[str, Any]:
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Model.load(client.download_artifacts(run_id, f"{names.MODEL_ARTIFACT}/MLmodel", tmp)).metadata or {}
        except Exception:
            return {}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(
        [
            f"| {' | '.join(header)} |",
            f"|{'|'.join('---' for _ in header)}|",
            *(f"| {' | '.join(map(str, r))} |" for r in rows),
        ]
    )


def build_card(client, params: Params, name: str, version: str) -> str:
    """The version's model card as Markdown, from what MLflow recorded about it."""
    from pipelines.core.names import CHAMPION
    from pipelines.registry.champion import alias_version

    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    parent = client.get_run(tags[names.PARENT_RUN]).data.tags if names.PARENT_RUN in tags else {}
    metric, higher = params.metric
    meta = _model_metadata(client, mv.run_id)
    # A slice's metric is NaN (null in the JSON) where too few test rows hold its value to measure it
    slices = [
        s | {k: float("nan") if s[k] is None else s[k] for k in ("model", "baseline")}
        for s in _json_artifact(client, mv.run_id, f"{names.CARD_DIR}/slices.json") or []
    ]
    facts = _json_artifact(client, mv.run_id, f"{names.CARD_DIR}/facts.json") or {}
    importance = _json_artifact(client, mv.run_id, names.IMPORTANCE_ARTIFACT) or {}
    champion = alias_version(client, name, CHAMPION)
    task = meta.get("task", params.data.task)
    features = meta.get("features", params.features.columns)
    status = (
        "the champion" if champion == version else f"not the champion (v{champion} is)" if champion else "no champion"
    )
    written = pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%d %H:%M")
    measured = sorted(
        k.removeprefix("test_") for k in metrics if k.startswith("test_") and "baseline" not in k and k != "test_rows"
    )
    lines = [
        f"# Model card: {name} v{version}",
        f"{status} when this card was written ({written} UTC); registered "
        f"{pd.Timestamp(mv.creation_timestamp, unit='ms'):%Y-%m-%d %H:%M} UTC; "
        f"candidate `{mv.tags.get(names.CANDIDATE, tags.get('mlflow.runName', ''))}` "
        f"({meta.get('family', tags.get(names.FAMILY, '?'))}); MLflow run `{mv.run_id}`",
        "## What it does",
        f"{task} of `{meta.get('target', params.data.target)}` from {len(features)} features: "
        + ", ".join(f"`{f}`" for f in features),
        "## Lineage",
        _table(
            ["what", "value"],
            [
                ["git commit", f"`{tags.get(names.GIT_COMMIT, 'unknown')}`"],
                ["source", f"`{tags.get(names.SOURCE, '?')}` md5 `{tags.get(names.SOURCE_MD5, '?')}`"],
                [
                    "clean data md5",
                    f"`{tags.get(names.CLEAN_MD5, '?')}` (dvc.lock: `{tags.get(names.DVC_LOCK_MD5, '?')}`)",
                ],
                [
                    "accepted batches read",
                    f"{tags.get(names.ARRIVAL_BATCHES, '?')} (last: {tags.get(names.LAST_ARRIVAL, '?')})",
                ],
                [
                    "rows train / val / test",
                    " / ".join(tags.get(names.rows_tag(s), "?") for s in ("train", "val", "test")),
                ],
                ["training window", facts.get("window", "not recorded")],
                ["training fingerprint", f"`{mv.tags.get(names.TRAINING_FINGERPRINT, '?')[:16]}`"],
                ["libraries", mv.tags.get(names.LIBRARIES, "not recorded")],
            ],
        ),
        "## Test metrics",
        _table(
            ["metric", "model", "naive baseline"],
            [
                [m, f"{metrics[f'test_{m}']:.4f}", f"{metrics.get(f'test_baseline_{m}', float('nan')):.4f}"]
                for m in measured
            ],
        ),
    ]
    interval = mv.tags.get(names.EVIDENCE_INTERVAL)
    if interval:
        lines.append(
            f"Bootstrap against the champion it was judged with, on test rows: {interval} "
            f"({mv.tags.get(names.EVIDENCE_METHOD, '')})"
        )
    live = mv.tags.get(names.EVIDENCE_LIVE)
    if live:
        lines.append(f"On live shadow rows (labelled requests both models answered): {live}")
    for tag, what in ((names.SHADOW_SINCE, "In shadow since"), (names.SHADOW_OUTCOME, "Shadow")):
        if mv.tags.get(tag):
            lines.append(f"{what}: {mv.tags[tag]}")
    lines.append("## Metrics by slice (test rows)")
    if slices:
        lines.append(
            _table(
                ["feature", "value", "rows", metric, f"baseline {metric}"],
                [
                    [
                        s["feature"],
                        s["value"],
                        s["rows"] if s["rows"] >= FEW_ROWS else f"{s['rows']} (few)",
                        _measured(s["model"]),
                        _measured(s["baseline"]),
                    ]
                    for s in slices
                ],
            )
        )
        lines.append(f"![{metric} by slice](slices.png)")
    else:
        lines.append("not recorded (trained before slice metrics were logged)")
    lines.append("## Feature importance (permutation, test rows)")
    ranked = sorted(importance.items(), key=lambda kv: -kv[1])
    lines.append(
        _table(["feature", "drop in score"], [[f, f"{v:.4f}"] for f, v in ranked]) if ranked else "not recorded"
    )
    lines += [
        "## Promotion decision",
        f"{parent.get(names.DECISION, 'not recorded')}: {parent.get(names.DECISION_REASON, '')}".rstrip(": "),
        "## Known limits",
    ]
    limits = [f"Trained on {facts.get('window', 'an unrecorded window')}: rows outside it are extrapolation."]
    for feature, values in (facts.get("unseen_values") or {}).items():
        limits.append(f"`{feature}` values never seen in training: {', '.join(values)}.")
    few = [f"{s['feature']}={s['value']}" for s in slices if s["rows"] < FEW_ROWS]
    if few:
        limits.append(f"Slices with fewer than {FEW_ROWS} test rows say little: {', '.join(few)}.")
    worse = [f"{s['feature']}={s['value']}" for s in slices if _worse(s["model"], s["baseline"], higher)]
    if worse:
        limits.append(f"No better than the naive baseline on: {', '.join(worse)}.")
    if tags.get(names.GIT_COMMIT, "").endswith("-dirty"):
        limits.append(
            "Trained from a git tree with uncommitted changes: `loopline reproduce` cannot rebuild it exactly."
        )
    lines.append("\n".join(f"- {limit}" for limit in limits))
    return "\n\n".join(lines) + "\n"


def _measured(value: float) -> str:
    return f"{value:.4f}" if np.isfinite(value) else "n/a (too few rows)"


def _worse(model: float, baseline: float, higher: bool) -> bool:
    return bool(np.isfinite(model) and np.isfinite(baseline) and (model <= baseline if higher else model >= baseline))


def log_card(client, params: Params, name: str, version: str) -> str:
    """Write the version's card into its run (card/model_card.md); returns the artifact's URI."""
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_card.md"
        path.write_text(build_card(client, params, name, version))
        client.log_artifact(run_id, str(path), names.CARD_DIR)
    return f"{client.get_run(run_id).info.artifact_uri}/{names.CARD_ARTIFACT}"


def save_card(client, name: str, version: str, text: str, folder: Path) -> Path:
    """The card and its slice plot in `folder` (the card links the plot by its file name)."""
    from pipelines.core.storage import write_text

    folder.mkdir(parents=True, exist_ok=True)
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(Exception):  # a card without slices has no plot
        Path(client.download_artifacts(run_id, f"{names.CARD_DIR}/slices.png", tmp)).replace(folder / "slices.png")
    path = folder / "model_card.md"
    write_text(text, path)
    return path
