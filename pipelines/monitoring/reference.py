"""What monitoring reads of the champion beside its model, logged at training: the reference
rows and the profile of them that drift compares every window with, the permutation
importance that weighs each feature's drift, and NannyML's fitted performance estimator.
Each is downloaded once per champion run into the monitoring workspace."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.errors import LooplineError
from pipelines.core.layout import Layout


def _cached_path(run_id: str, artifact: str, params: Params) -> Path:
    return Layout.of(params).monitoring / "reference" / f"{run_id}-{Path(artifact).name}"


def _artifact(client, run_id: str, artifact: str, params: Params, required: bool = True) -> Path | None:
    """One of the files logged beside the champion's model, downloaded once per run id."""
    import tempfile

    from pipelines.core.storage import atomic_path

    cached = _cached_path(run_id, artifact, params)
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
                local = client.download_artifacts(run_id, artifact, tmp)
                with atomic_path(cached) as target:
                    Path(local).replace(target)
        except Exception as err:  # MLflow raises several types for a missing artifact
            if not required:
                return None
            raise LooplineError(
                "monitor",
                f"the champion's run {run_id} has no {artifact} (trained before loopline logged it?): {err}",
            ) from None
    return cached


def reference_rows(client, run_id: str, params: Params) -> pd.DataFrame:
    """The champion's training rows."""
    path = _artifact(client, run_id, names.REFERENCE_ARTIFACT, params)
    assert path is not None
    return pd.read_parquet(path)


def champion_drift_reference(client, run_id: str, model, params: Params) -> pd.DataFrame:
    """What drift compares the window with (monitor.drift_reference): the profile logged at
    training, or, for a champion trained with another monitor.reference_profile_rows (or
    before profiles), one made from its reference rows now and kept in the monitoring
    workspace under the same name, so the next run reads it."""
    from pipelines.core.storage import atomic_path
    from pipelines.monitoring.drift import drift_reference

    rows = params.monitor.reference_profile_rows
    if not rows:
        return drift_reference(reference_rows(client, run_id, params), model, params)
    artifact = names.profile_artifact(rows)
    path = _artifact(client, run_id, artifact, params, required=False)
    if path is None:
        profile = drift_reference(reference_rows(client, run_id, params), model, params)
        path = _cached_path(run_id, artifact, params)
        with atomic_path(path) as target:
            profile.to_parquet(target, index=False)
        return profile
    return pd.read_parquet(path)


def champion_importance(client, run_id: str, params: Params) -> dict[str, float] | None:
    """The champion's permutation importance per feature (None: logged before loopline kept it)."""
    import json

    path = _artifact(client, run_id, names.IMPORTANCE_ARTIFACT, params, required=False)
    return json.loads(path.read_text()) if path is not None else None


def champion_estimator(client, run_id: str, params: Params):
    """The champion's fitted NannyML estimator, or why there is none."""
    from pipelines.monitoring.estimate import loads_estimator

    path = _artifact(client, run_id, names.ESTIMATOR_ARTIFACT, params, required=False)
    if path is not None:
        return loads_estimator(path.read_bytes()), ""
    why = client.get_run(run_id).data.tags.get(names.ESTIMATE, "the champion was trained without one")
    return None, f"no performance estimator: {why}"
