"""The data catalog: every file and folder the pipeline reads or writes, below `paths.data`
and `paths.models`. The stages, the flows, the service and the monitor all find their
files here, and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.core.config import Params


@dataclass(frozen=True)
class Layout:
    """Where every stage output lives, below `paths.data` and `paths.models`."""

    data: Path
    models: Path
    landing: Path
    workspace: Path

    @classmethod
    def of(cls, params: Params) -> Layout:
        return cls(
            data=params.paths.data,
            models=params.paths.models,
            landing=params.monitor.landing or params.paths.data / "landing",
            workspace=params.monitor.workspace or params.paths.data / "monitoring" / "workspace",
        )

    @property
    def arrivals(self) -> Path:
        """Accepted batches, one Parquet file each (text columns, as ingest reads them)."""
        return self.data / "arrivals"

    @property
    def observed(self) -> Path:
        """Accepted batches of features without the target: measured by monitoring, never
        read by training (not a DVC dependency)."""
        return self.data / "observed"

    @property
    def labels(self) -> Path:
        """Accepted label files (ids or time keys with the target) waiting to be joined to
        the prediction log; once joined, their rows are a batch in arrivals/."""
        return self.data / "labels"

    @property
    def joined_labels(self) -> Path:
        """Label files joined to the log, each beside a report of what joined."""
        return self.labels / "joined"

    @property
    def rejected(self) -> Path:
        return self.landing / "rejected"

    @property
    def monitoring(self) -> Path:
        return self.data / "monitoring"

    @property
    def ingested(self) -> Path:
        return self.data / "interim" / "ingested.parquet"

    @property
    def ingest_quarantine(self) -> Path:
        return self.data / "quarantine" / "ingest.csv"

    @property
    def clean(self) -> Path:
        return self.data / "interim" / "clean.parquet"

    @property
    def clean_quarantine(self) -> Path:
        return self.data / "quarantine" / "clean.csv"

    @property
    def clean_report(self) -> Path:
        return self.data / "interim" / "clean_report.json"

    @property
    def validation(self) -> Path:
        return self.data / "validation"

    def split_file(self, name: str) -> Path:
        return self.data / "processed" / f"{name}.parquet"

    @property
    def params_checked(self) -> Path:
        """Written by the first DVC stage once the params file passes its checks; every other
        stage depends on it, so a malformed file stops `dvc repro` before any stage's outputs
        are removed. Its content never changes, so it invalidates nothing downstream."""
        return self.data / "params.ok"

    @property
    def flow_cache(self) -> Path:
        """Prefect's task results and cache records: per workspace, never the user's home,
        so two clones (or a deleted MLflow store) cannot answer for each other."""
        return self.data / "cache" / "prefect"

    @property
    def prediction_log(self) -> Path:
        return self.data / "serving" / "predictions.db"

    @property
    def metrics(self) -> Path:
        return self.models / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.models / "plots" / "predictions.csv"
