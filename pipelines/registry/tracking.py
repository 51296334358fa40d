"""MLflow tracking: where runs go, what each run records, and reading registered models back.

Everything goes through an `MlflowClient` bound to the configured store and an explicit run
id: no global tracking URI, no active run, so concurrent tasks and flows on different stores
in one process cannot write into each other's runs. The model is written by
`mlflow.sklearn.save_model` (skops format, trusting exactly the types it holds, all within
`model_io.TRUSTED_TYPES`) and uploaded into its run as `model/`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.names import END_REASON, MODEL_ARTIFACT, OWNER

if TYPE_CHECKING:
    from pipelines.model.evaluation import Importance

# MLflow writes "View run ... at: <url>" to stdout for each run on a tracking server; a
# command's stdout is its own output (`--json` included), and the run's link is in our logs.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def tracking_uri(params: Params) -> str:
    """The configured store (MLFLOW_TRACKING_URI wins); a relative SQLite path is made
    absolute, so the URI names one store whatever the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def sqlite_store(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_backend_store(store: str) -> str:
    """An MLflow server's backend store as MLflow takes it (PostgreSQL through psycopg 3),
    after checking that the database answers."""
    from pipelines.core.postgres import connect, is_postgres, with_driver

    if is_postgres(store):
        store = store if "+" in store.split("://", 1)[0] else with_driver(store, "psycopg")
        connect(store, "tracking-server --store").close()
        return store
    if store.startswith("sqlite:///"):
        return store
    raise LooplineError(
        "tracking-server --store", f"{store!r} is not postgresql+psycopg://host:port/database or sqlite:///file.db"
    )


def registry_lock_target(params: Params) -> str:
    """Where the promotion lock is taken: locks.dsn; else the tracking store itself when it
    is a PostgreSQL database; else the tracking URI, a file lock on this machine (enough for
    a SQLite store, which only this machine writes)."""
    return params.locks.dsn or tracking_uri(params)


class StoreMissing(LooplineError):
    def __init__(self, path: Path):
        super().__init__(
            "registry",
            f"tracking store {path} does not exist (tracking.uri); train a model "
            "first (`loopline train`) or point tracking.uri at the store",
        )


def registry_client(params: Params):
    """An MlflowClient for readers of the registry (serving, packaging, scoring): unlike
    `client_for` it creates nothing, and a SQLite store that is not there is an error
    (MLflow would silently create an empty one)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    store = sqlite_store(uri)
    if store is not None and not store.is_file():
        raise StoreMissing(store)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def store_identity(params: Params) -> str:
    """Which tracking store results were logged to: its URI and the training experiment's
    id and creation time (a store deleted and created again gets a new one)."""
    client, experiment_id = client_for(params)
    created = client.get_experiment(experiment_id).creation_time
    return f"{tracking_uri(params)}#experiment={experiment_id}@{created}"


def logged_run_state(client, run_id: str) -> str:
    """'registered', 'logged' (the run and its model exist, no model version yet) or
    'missing' (not in this store, or its model artifact is gone)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        if not client.list_artifacts(run_id, MODEL_ARTIFACT):
            return "missing"
    except MlflowException:
        return "missing"
    return "registered" if client.search_model_versions(f"run_id = '{run_id}'") else "logged"


def monitoring_experiment(params: Params) -> str:
    return f"{params.tracking.experiment}-monitoring"


def client_for(params: Params, experiment: str | None = None):
    """An MlflowClient on the configured store, and the id of `experiment` (default: the
    training experiment), created if needed.

    The first use of a SQLite store creates and migrates its tables; two processes doing
    that at once collide, so it happens under the registry's file lock."""
    from mlflow.tracking import MlflowClient

    from pipelines.registry.champion import registry_lock

    uri = tracking_uri(params)
    with registry_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        name = experiment or params.tracking.experiment
        found = client.get_experiment_by_name(name)
        if found is not None:
            return client, found.experiment_id
        # A tracking server keeps artifacts where it was told to (--artifacts-destination);
        # a store opened directly gets them under tracking.artifact_root.
        remote = uri.startswith(("http://", "https://"))
        location = None if remote else Path(params.tracking.artifact_root).resolve().as_uri()
        return client, client.create_experiment(name, artifact_location=location)


def run_owner() -> str:
    """This process, as a run's owner: host, pid and the process's start time (a pid alone
    can be reused)."""
    import socket

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def _owner_alive(owner: str) -> bool:
    import socket

    import psutil

    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by a process of this host that no longer exists
    (a training killed with SIGKILL cannot close its own runs); returns their ids."""
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(OWNER)
        if owner is None or _owner_alive(owner):
            continue
        client.set_tag(
            run.info.run_id,
            END_REASON,
            f"its process ({owner}) ended without closing the run; marked KILLED at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} by the next training ({run_owner()})",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config as MLflow params: {"train.hyperparams.linear.alpha": "1.0", ...}."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, sub in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return out
    return {prefix: str(value)[:6000]}


def log_dict_batch(
    client,
    run_id: str,
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    p = [Param(k, v) for k, v in (params or {}).items()]
    m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for start in range(0, max(len(p), len(m), len(t), 1), 100):  # MLflow's batch limits
        client.log_batch(
            run_id, metrics=m[start : start + 100], params=p[start : start + 100], tags=t[start : start + 100]
        )


def log_history(client, run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch curves (train_loss, early_stopping_<metric>, lr, epoch_seconds, samples_per_s), step = epoch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(h["epoch"])) for h in history for k, v in h.items() if k != "epoch"]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns as plain strings: what a request carries, and what MLflow's
    signature inference understands."""
    out = df.copy()
    for col in out.columns:
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
    return out


def log_model(
    client, run_id: str, model: Any, example: pd.DataFrame, metadata: dict[str, Any], files: dict[str, bytes]
) -> str:
    """Save the fitted pipeline as an MLflow model into `run_id`, with `files` (its ONNX
    form) in the model's directory; returns its runs:/ URI. MLflow's own loader is told to
    trust the classes loopline's pipelines are made of (pipelines.model.io.MODEL_TYPES), as
    loopline's loader does, so the model is serialised once, by MLflow."""
    import mlflow.sklearn
    import mlflow.utils.environment
    import sklearn
    import skops
    from mlflow.models import infer_signature

    from pipelines.model.io import MODEL_TYPES, skops_io

    skops_io()  # before mlflow.sklearn imports it the slow way
    # The requirements below are this environment's own versions, so MLflow's check that the
    # environment satisfies them cannot fail; it maps every installed distribution to its
    # modules first, 1.5 s in each process that logs a model.
    mlflow.utils.environment.warn_dependency_requirement_mismatches = _requirements_met
    example = plain_frame(example)
    signature = infer_signature(example, model.predict(example))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_ARTIFACT
        mlflow.sklearn.save_model(
            model,
            str(local),
            serialization_format="skops",
            skops_trusted_types=sorted(MODEL_TYPES),
            signature=signature,
            input_example=example,
            metadata=metadata,
            pip_requirements=[
                f"scikit-learn=={sklearn.__version__}",
                f"skops=={skops.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
            ],
        )
        for name, data in files.items():
            (local / name).write_bytes(data)
        client.log_artifacts(run_id, str(local), MODEL_ARTIFACT)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def _requirements_met(model_requirements: list[str]) -> None:
    """MLflow's requirement check, for requirements read from this environment: nothing to warn."""


def log_torch_weights(client, run_id: str, model: Any) -> None:
    """For PyTorch users: the MLP's state_dict (load with torch.load(weights_only=True)) and
    the fitted feature transform (skops), beside the servable pipeline."""
    import torch

    from pipelines.model.io import dumps_model

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model[-1].state_dict(), Path(tmp) / "state_dict.pt")
        (Path(tmp) / "preprocess.skops").write_bytes(dumps_model(model[:-1]))
        client.log_artifacts(run_id, tmp, "torch")


def load_model_version(client, name: str, version: str) -> tuple[Any, dict[str, Any]]:
    """A registered sklearn model and its metadata, loaded through loopline's type allowlist
    (not the trusted-type list stored beside it, which a tampered artifact could widen)."""
    model, metadata, _ = load_model_files(client, name, version)
    return model, metadata


def model_features(client, name: str, version: str) -> list[str]:
    """The feature columns a registered version reads, from its MLmodel metadata only."""
    from mlflow.models import Model

    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/MLmodel", tmp))
        return list((Model.load(str(local)).metadata or {}).get("features", []))


def load_model_files(
    client, name: str, version: str, extra: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Any], dict[str, bytes]]:
    """`load_model_version`, and the files named in `extra` that were logged in the model's
    directory (those it has)."""
    from mlflow.models import Model

    from pipelines.model.io import loads_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, MODEL_ARTIFACT, tmp))
        skops_file = local / "model.skops"
        if not skops_file.is_file():
            raise LooplineError("registry", f"{name} v{version} has no model.skops (not a loopline sklearn model)")
        model = loads_model(skops_file.read_bytes(), f"{name} v{version}")
        metadata = Model.load(str(local / "MLmodel")).metadata or {}
        files = {f: (local / f).read_bytes() for f in extra if (local / f).is_file()}
    return model, metadata, files


def diagnostic_figures(
    predictions: pd.DataFrame, features: list[str], target: str, task: str, importance: Importance
) -> dict[str, Any]:
    """matplotlib figures for a run: predicted vs actual and residuals (regression) or the
    confusion matrix (classification) of the test rows' predictions, and the permutation
    feature importance measured for the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    figures: dict[str, Any] = {}
    if task == "regression":
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
        a.scatter(predictions["actual"], predictions["predicted"], s=4, alpha=0.4)
        top = float(max(predictions["actual"].max(), predictions["predicted"].max()))
        a.plot([0, top], [0, top], color="grey", lw=1)
        a.set(xlabel=f"actual {target}", ylabel="predicted", title="Predicted vs actual (test rows)")
        b.hist(predictions["residual"], bins=50)
        b.set(xlabel="actual - predicted", ylabel="rows", title="Residuals (test rows)")
        figures["predicted_vs_actual.png"] = fig
    else:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ConfusionMatrixDisplay.from_predictions(predictions["actual"], predictions["predicted"], ax=ax)
        ax.set_title("Confusion matrix (test rows)")
        figures["confusion_matrix.png"] = fig

    order = np.argsort(importance.importances_mean)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(features) + 1.2))
    ax.barh(np.array(features)[order], importance.importances_mean[order], xerr=importance.importances_std[order])
    ax.set(xlabel="drop in score when shuffled", title="Permutation feature importance (test rows)")
    fig.tight_layout()
    figures["feature_importance.png"] = fig
    return figures


def log_figures(client, run_id: str, figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"plots/{name}")
        plt.close(fig)
