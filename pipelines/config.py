"""params.yaml as pydantic models, validated at load: a typo or a wrong type names the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.errors import LooplineError

MODEL_FAMILIES = ("linear", "random_forest", "hist_gradient_boosting", "torch_mlp")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


LABEL_SPACE = " \t\n\r\f\v"  # what a category label may be padded with


def label_key(text: str) -> str:
    """The one rule for category labels everywhere (clean, serving, batch scoring): surrounding
    white space and letter case do not matter."""
    return text.strip(LABEL_SPACE).lower()


class ColumnSpec(_Section):
    type: Literal["int", "float", "category"]
    min: float | None = None
    max: float | None = None
    # Allowed values: category labels, or the codes an int column may take.
    values: list[str] | list[int] | None = None
    max_null_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # What clean does with a missing value: keep it (imputed inside the model) or
    # quarantine the row. The target's missing values are always quarantined.
    missing: Literal["keep", "quarantine"] = "keep"
    # The column drifts by construction (a calendar field, a counter): its drift is measured
    # and reported, but does not count toward the retrain trigger unless
    # monitor.count_expected_drift. Cyclical features are expected to drift without it.
    expected_drift: bool = False

    @model_validator(mode="after")
    def _check(self) -> ColumnSpec:
        if self.type == "category" and not self.values:
            raise ValueError("a category column needs its allowed 'values'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class RowCount(_Section):
    min: int = Field(1, ge=0)
    max: int | None = None


class SchemaConfig(_Section):
    columns: dict[str, ColumnSpec]
    row_count: RowCount = RowCount()


class DataConfig(_Section):
    source: Path
    task: Literal["regression", "classification"]
    target: str
    # Columns in the source file that must never reach the model (identifiers, leakage).
    drop_columns: list[str] = []


class CleanConfig(_Section):
    drop_duplicates: bool = True
    # Above this share of quarantined rows the data is broken, not dirty: clean fails.
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)


class FeaturesConfig(_Section):
    numeric: list[str] = []
    categorical: list[str] = []
    # column -> period; category columns use the position of the value in schema values.
    cyclical: dict[str, float] = {}
    scale: bool = True

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.cyclical]


class SplitConfig(_Section):
    # Sort keys that put rows in time order; earlier rows train, later rows validate/test.
    # Leave empty for data without time: a seeded (stratified, for classification) shuffle.
    order_by: list[str] = []
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    seed: int = 42


class TrainConfig(_Section):
    model: str = "hist_gradient_boosting"
    seed: int = 42
    # Native threads per model fit (OpenMP, BLAS, torch); 0: the cores divided among the
    # trainings running on this machine at the time (pipelines/threads.py).
    threads: int = Field(0, ge=0)
    # Per model family: keyword arguments of the scikit-learn estimator.
    hyperparams: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = [m for m in [self.model, *self.hyperparams] if m not in MODEL_FAMILIES]
        if unknown:
            raise ValueError(f"unknown model family {unknown[0]!r}; choose one of {list(MODEL_FAMILIES)}")
        return self


class ParamRange(_Section):
    """One hyperparameter's search range: `low`/`high` (with `log`), or `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool | None = None  # default: true when low and high are whole numbers
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is None and self.low > self.high:  # type: ignore[operator]
            raise ValueError(f"low {self.low} is greater than high {self.high}")
        return self


class SearchConfig(_Section):
    # Each family is a candidate with its train.hyperparams; then n_trials Optuna trials
    # sample a family and its hyperparameters from `space`.
    families: list[str] = ["hist_gradient_boosting"]
    n_trials: int = Field(0, ge=0)
    seed: int = 42
    space: dict[str, dict[str, ParamRange]] = {}
    # Where the Optuna study lives: empty = in memory (gone with the process); a file path
    # (a journal, for one machine) or an SQLAlchemy URL (postgresql+psycopg://…, for
    # several). A stored search killed mid-way resumes with its finished trials kept.
    storage: str = ""
    # Trials sampled together once Optuna's seeded start-up trials (sampled independently
    # of results, so all asked at once) are done: 1 = each trial sees every earlier result,
    # the sequential search; more keeps more workers busy. The result depends on this, not
    # on the runner or the number of workers.
    trials_per_round: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        for family in [*self.families, *self.space]:
            if family not in MODEL_FAMILIES:
                raise ValueError(f"unknown model family {family!r}; choose from {list(MODEL_FAMILIES)}")
        if self.n_trials and not self.space:
            raise ValueError("n_trials > 0 needs a search space")
        if not self.families and not self.n_trials:
            raise ValueError("nothing to train: no families and no trials")
        return self


class DaskConfig(_Section):
    # Empty: a distributed.LocalCluster of n_workers processes, started for the search.
    # tcp://host:port: the scheduler of a running cluster (`dask scheduler`, `dask worker`).
    address: str = ""
    n_workers: int = Field(2, ge=1)
    # Native threads (OpenMP, BLAS, torch) one candidate's fit uses on a worker; a worker
    # fits one candidate at a time.
    threads_per_worker: int = Field(1, ge=1)


class ExecutionConfig(_Section):
    # Where the candidate search's fits run: sequential (in the training process) or dask
    # (each family and each Optuna trial a task on a Dask worker).
    runner: Literal["sequential", "dask"] = "sequential"
    dask: DaskConfig = DaskConfig()


class PromotionConfig(_Section):
    # The metric candidates are ranked and the champion judged by; default by task
    # (rmse for regression, f1 for classification).
    metric: str | None = None
    # A challenger replaces the champion only if the lower bound of the (1 - alpha) bootstrap
    # interval of its relative improvement on the same test rows exceeds this margin
    # (0.01 = surely at least 1% better; 0: surely better at all).
    min_improvement: float = Field(0.0, ge=0.0)
    # The paired bootstrap of the metric difference (pipelines/evidence.py): time-blocked
    # (moving blocks of block_length rows) when split.order_by orders the rows in time,
    # plain paired otherwise. block_length 0: the cube root of the test rows.
    alpha: float = Field(0.1, gt=0.0, lt=1.0)
    resamples: int = Field(1000, ge=100)
    block_length: int = Field(0, ge=0)
    seed: int = 0
    # The second piece of evidence: the latest monitoring window's labelled rows (the last
    # monitor.window_batches accepted batches) that the champion never read and the
    # challenger neither trained nor validated on, when there are at least recent_min_rows.
    # How it combines with the test rows (which must always show the challenger surely
    # better): test — recent rows are recorded, not used; veto — the challenger is refused
    # when it is surely worse on the recent rows (interval wholly below 0); both — it must be
    # surely better on the recent rows too. Too few recent rows: the test rows decide alone.
    recent_rule: Literal["test", "veto", "both"] = "veto"
    recent_min_rows: int = Field(100, ge=2)

    @model_validator(mode="after")
    def _check(self) -> PromotionConfig:
        if self.block_length > self.recent_min_rows:
            raise ValueError(
                f"recent_min_rows ({self.recent_min_rows}) must be at least block_length ({self.block_length}): "
                "recent rows are resampled in blocks of block_length rows"
            )
        return self


class TrackingConfig(_Section):
    # MLFLOW_TRACKING_URI, when set, wins over `uri`.
    uri: str = "sqlite:///mlflow.db"
    artifact_root: Path = Path("mlruns")
    experiment: str = "loopline"
    model_name: str = "loopline-model"


class LocksConfig(_Section):
    # A PostgreSQL database (postgresql://…) whose advisory lock serialises promotions
    # across machines: needed with an MLflow server (http://…), whose database loopline
    # does not see. Empty: the tracking store when it is PostgreSQL, else a file lock.
    dsn: str = ""

    @field_validator("dsn")
    @classmethod
    def _postgres(cls, dsn: str) -> str:
        from pipelines.postgres import is_postgres

        if dsn and not is_postgres(dsn):
            raise ValueError(f"{dsn!r} is not a PostgreSQL URL (postgresql://host:port/database)")
        return dsn


class ScheduleConfig(_Section):
    timezone: str = "UTC"
    training: str | None = "0 3 * * 1"  # cron
    monitoring: str | None = "0 * * * *"  # cron


class MonitorConfig(_Section):
    # Where new batches land (CSV or Parquet files); default: <paths.data>/landing.
    landing: Path | None = None
    # A landed file modified less than this long ago is checked again after the rest of
    # this many seconds; if it changed meanwhile it is still being written and waits for the
    # next run (0: no check; writers that write-then-rename need none).
    settle_seconds: float = Field(2.0, ge=0.0)
    # A column of labelled batches that names the served prediction each row answers
    # (the X-Request-ID of /predict, "<id>-<i>" for /predict_batch). Not a feature.
    id_column: str | None = "request_id"
    # Columns that name a row's time (Bikeshare: day and hr): a labelled row with no request
    # id is matched to the prediction served for the same values. Rows nothing served are
    # scored by the champion now (the offline metric). Empty: match by id only.
    time_key: list[str] = []
    # The window compared with the champion's reference: the latest N accepted batches.
    window_batches: int = Field(1, ge=1)
    # Retrain when the drifted features carry at least this share of the model's feature
    # importance (permutation importance at training time; Evidently's per-column tests say
    # which drifted; features expected to drift count for nothing unless
    # count_expected_drift)...
    drift_share: float = Field(0.5, gt=0.0, le=1.0)
    # false: every counted feature weighs the same (the share of drifted features).
    weight_by_importance: bool = True
    count_expected_drift: bool = False
    # ... or when the served predictions' live metric is this much worse (relative) than
    # the champion's test metric, once ground truth has arrived for them.
    max_degradation: float = Field(0.35, gt=0.0)
    # ... or when the metric NannyML estimates without labels (DLE for regression, CBPE for
    # classification, fitted at training time on rows the model did not train on) is this
    # much worse than the champion's test metric...
    max_estimated_degradation: float = Field(0.25, gt=0.0)
    estimate_performance: bool = True
    # A window with fewer rows is not measured: "not enough rows" is recorded, no retrain.
    min_window_rows: int = Field(50, ge=1)
    # ... and only with at least this many rows the last training did not see, and not
    # within cooldown_hours of the last retrain the monitor started.
    min_new_rows: int = Field(100, ge=0)
    cooldown_hours: float = Field(24.0, ge=0.0)
    # The champion's training rows kept as the drift reference (a seeded sample above this).
    reference_rows: int = Field(200_000, ge=100)
    # What drift reads of them: each column's distribution in this many rows, made once
    # per champion (pipelines/monitor.py reference_profile), so a monitoring run costs the
    # same whatever the reference's size. 0: every reference row, every run. Above 1000,
    # because Evidently picks its tests by the reference's size (KS and chi-square up to
    # 1000 rows, Wasserstein and Jensen-Shannon above) and the profile must get the same.
    reference_profile_rows: int = Field(10_000, ge=0)
    # After a retrain, record the new data version in dvc.lock and the DVC cache
    # (`dvc commit`), when loopline runs in the DVC workspace of this params file.
    dvc_commit: bool = True
    # The Evidently workspace every monitoring run adds its snapshots to (one project per
    # model name; `loopline dashboard` shows it); default <paths.data>/monitoring/workspace.
    workspace: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> MonitorConfig:
        if 0 < self.reference_profile_rows <= 1000:
            raise ValueError(
                f"reference_profile_rows {self.reference_profile_rows} must be 0 (every reference row) or above "
                "1000: Evidently tests a reference of up to 1000 rows differently"
            )
        return self


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    # Concurrent single-record requests are predicted together, up to this many at once.
    max_batch_size: int = Field(64, ge=1)
    # How long the first request of a batch may wait for others (0: predict as soon as
    # the model is free; requests arriving meanwhile form the next batch).
    batch_wait_ms: float = Field(0.0, ge=0.0)
    # /predict_batch refuses longer lists; any request body above max_body_bytes gets 413.
    max_batch_records: int = Field(1000, ge=1)
    max_body_bytes: int = Field(2_000_000, ge=1024)
    # How often the service asks the registry whether `champion` moved (0: never; the
    # POST /admin/reload endpoint still works).
    reload_interval_s: float = Field(10.0, ge=0.0)
    # Where every served prediction is logged for monitoring: a SQLite file (default
    # <paths.data>/serving/predictions.db) or a PostgreSQL DSN (postgresql://…), which
    # several service replicas share.
    prediction_log: str | None = None
    # A request whose answer has not started within this many seconds gets 504.
    request_timeout_s: float = Field(30.0, gt=0.0)
    # Which engine runs the model: onnx (the ONNX form logged with the model, run by ONNX
    # Runtime; the service refuses a model without one or that fails the parity check),
    # python (the fitted pipeline), or auto (onnx when it converted and agrees with the
    # Python model on its reference rows, else python, saying why).
    engine: Literal["auto", "onnx", "python"] = "auto"
    # Native threads per worker for model calls (ONNX Runtime's session, OpenMP and BLAS
    # through threadpoolctl, torch): a training beside the service cannot make a one-row
    # prediction wait for a busy core's worth of threads.
    model_threads: int = Field(1, ge=1)


class PolicyConfig(_Section):
    """One retraining policy of the back-test."""

    name: str
    # never | every_batch | scheduled (every `every` batches) | monitor (the monitoring
    # decision, with `monitor:` overridden by this policy's `monitor` keys)
    retrain: Literal["never", "every_batch", "scheduled", "monitor"]
    every: int = Field(1, ge=1)
    monitor: dict[str, Any] = {}
    # How a retrained model is promoted: the bootstrap evidence of `promotion:`, or the
    # point metric alone (better on the test rows by any margin).
    gate: Literal["bootstrap", "point"] = "bootstrap"


DEFAULT_POLICIES = [
    PolicyConfig(name="never", retrain="never"),
    PolicyConfig(name="every-batch", retrain="every_batch"),
    PolicyConfig(name="monitor", retrain="monitor"),
]


class BacktestConfig(_Section):
    # The first champion trains on this many months; every later month is a batch.
    train_months: int = Field(3, ge=1, le=11)
    policies: list[PolicyConfig] = DEFAULT_POLICIES

    @model_validator(mode="after")
    def _check(self) -> BacktestConfig:
        names = [p.name for p in self.policies]
        if not names:
            raise ValueError("policies lists no policy")
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must differ: {names}")
        return self


class PathsConfig(_Section):
    data: Path = Path("data")
    models: Path = Path("models")


class Params(_Section):
    data: DataConfig
    table_schema: SchemaConfig = Field(alias="schema")
    clean: CleanConfig = CleanConfig()
    features: FeaturesConfig
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    paths: PathsConfig = PathsConfig()
    search: SearchConfig = SearchConfig()
    execution: ExecutionConfig = ExecutionConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig = TrackingConfig()
    locks: LocksConfig = LocksConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    backtest: BacktestConfig = BacktestConfig()
    # Where loopline says what it did (a retrain, a promotion or a rejected challenger, a
    # rejected batch, a failed flow, a champion the service could not load): Apprise URLs
    # such as json://host:port/path, slack://..., mailto://... Empty: no alerts.
    alerts: list[str] = []

    @field_validator("alerts")
    @classmethod
    def _check_alerts(cls, urls: list[str]) -> list[str]:
        if urls:
            import apprise

            for url in urls:
                if apprise.Apprise.instantiate(url) is None:
                    raise ValueError(f"{url!r} is not an Apprise URL loopline can send to (see the Apprise wiki)")
        return urls

    def policy_monitor(self, policy: PolicyConfig) -> MonitorConfig:
        """`monitor:` with a back-test policy's overrides."""
        return MonitorConfig.model_validate({**self.monitor.model_dump(), **policy.monitor})

    @property
    def metric(self) -> tuple[str, bool]:
        """The promotion metric and whether larger is better."""
        from pipelines.evaluate import PRIMARY_METRIC, metric_direction

        name = self.promotion.metric or PRIMARY_METRIC[self.data.task][0]
        return name, metric_direction(name)

    @model_validator(mode="after")
    def _cross_check(self) -> Params:
        cols = self.table_schema.columns
        target = self.data.target
        if target not in cols:
            raise ValueError(f"data.target {target!r} is not a column in schema.columns")
        if self.data.task == "classification" and cols[target].type != "category":
            raise ValueError(f"a classification target must be a category column; {target!r} is {cols[target].type}")
        if self.data.task == "regression" and cols[target].type == "category":
            raise ValueError(f"a regression target must be numeric; {target!r} is a category column")
        for col in self.data.drop_columns:
            if col in cols:
                raise ValueError(f"data.drop_columns names {col!r}, which is also in schema.columns")
        seen: set[str] = set()
        for col in self.features.columns:
            if col == target:
                raise ValueError(f"features list the target {target!r}: that leaks the answer")
            if col not in cols:
                raise ValueError(f"feature {col!r} is not a column in schema.columns")
            if col in seen:
                raise ValueError(f"feature {col!r} is listed twice in features")
            seen.add(col)
        for col in self.features.cyclical:
            if cols[col].type == "category" and not cols[col].values:
                raise ValueError(f"cyclical feature {col!r} is a category without values")
        for col in self.split.order_by:
            if col not in cols:
                raise ValueError(f"split.order_by names {col!r}, which is not in schema.columns")
        if not self.features.columns:
            raise ValueError("features lists no columns")
        if self.monitor.id_column is not None and self.monitor.id_column in cols:
            raise ValueError(
                f"monitor.id_column {self.monitor.id_column!r} is also in schema.columns; an identifier is not data"
            )
        for col in self.monitor.time_key:
            if col not in cols:
                raise ValueError(f"monitor.time_key names {col!r}, which is not in schema.columns")
        for i, policy in enumerate(self.backtest.policies):
            try:
                self.policy_monitor(policy)
            except ValidationError as err:
                where = f"backtest.policies.{i}.monitor ({policy.name})"
                raise ValueError(_describe(err, where)) from None
        if self.promotion.metric == "roc_auc":
            raise ValueError(
                "promotion.metric roc_auc has no bootstrap comparison; use f1, accuracy, precision or recall"
            )
        metric = self.promotion.metric
        valid = {
            "regression": ["rmse", "mae", "r2"],
            "classification": ["accuracy", "precision", "recall", "f1", "roc_auc"],
        }[self.data.task]
        if metric is not None and metric not in valid:
            raise ValueError(f"promotion.metric {metric!r} is not a {self.data.task} metric; choose one of {valid}")
        return self


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (check the spelling; allowed keys are in the README)")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] != "value_error":
                msg += f" (got {e.get('input')!r})"
            lines.append(f"{key}: {msg}" if key else msg)
    return f"{source} is not valid: " + "; ".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise LooplineError("params", _describe(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LooplineError("params", f"{path} does not exist") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise LooplineError("params", f"{path} is not valid YAML: {err.problem}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LooplineError("params", f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise LooplineError("params", f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, str(path))
