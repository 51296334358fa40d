"""params.yaml as pydantic models, validated at load: a typo or a wrong type names the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.core.errors import LooplineError

MODEL_FAMILIES = ("linear", "random_forest", "hist_gradient_boosting", "torch_mlp", "xgboost")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)


class ColumnSpec(_Section):
    """One column of the source: its type and the rules clean, validation and serving apply."""

    type: Literal["int", "float", "category"]
    """int, float or category: how clean types the column."""
    min: float | None = None
    """The smallest value allowed (numbers); smaller values are quarantined by clean and refused by
    serving."""
    max: float | None = None
    """The largest value allowed (numbers)."""
    values: list[str] | list[int] | None = None
    """Allowed values: category labels, or the codes an int column may take."""
    max_null_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """The share of missing values validation accepts; above 0, serving accepts null (the model
    imputes it)."""
    missing: Literal["keep", "quarantine"] = "keep"
    """What clean does with a missing value: keep it (imputed inside the model) or quarantine the
    row. The target's missing values are always quarantined."""
    expected_drift: bool = False
    """The column drifts by construction (a calendar field, a counter): its drift is measured and
    reported, but does not count toward the retrain trigger unless monitor.count_expected_drift.
    Cyclical features are expected to drift without it."""

    @model_validator(mode="after")
    def _check(self) -> ColumnSpec:
        if self.type == "category" and not self.values:
            raise ValueError("a category column needs its allowed 'values'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class RowCount(_Section):
    """How many rows the clean table may have."""

    min: int = Field(1, ge=0)
    """The fewest rows the clean table may have (validation)."""
    max: int | None = None
    """The most rows it may have (none: no limit)."""


class SchemaConfig(_Section):
    """The source's columns and their rules, compiled once (pipelines/data/schema.py)."""

    columns: dict[str, ColumnSpec]
    """Every column of the source, with its type and rules: clean, the Great Expectations suite,
    request models and batch scoring are all built from these."""
    row_count: RowCount = RowCount()
    """Bounds on the clean table's rows (a landed batch is checked without them)."""


class DataConfig(_Section):
    """What the data is and what the model predicts."""

    source: Path
    """The source CSV, relative to the repository root."""
    task: Literal["regression", "classification"]
    """regression or classification."""
    target: str
    """The column the model predicts."""
    drop_columns: list[str] = []
    """Columns in the source file that must never reach the model (identifiers, leakage)."""


class CleanConfig(_Section):
    """What clean does with rows it cannot repair."""

    drop_duplicates: bool = True
    """Drop rows that are exact duplicates of an earlier row."""
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """Above this share of quarantined rows the data is broken, not dirty: clean fails."""


class FeaturesConfig(_Section):
    """The model's input columns and how each is encoded."""

    numeric: list[str] = []
    """Numeric features: imputed (median) and scaled."""
    categorical: list[str] = []
    """Categorical features: one-hot encoded, unknown values ignored."""
    cyclical: dict[str, float] = {}
    """column -> period; category columns use the position of the value in schema values."""
    scale: bool = True
    """Standardise the numeric features."""

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.cyclical]


class SplitConfig(_Section):
    """How the clean rows become train, validation and test rows."""

    order_by: list[str] = []
    """Sort keys that put rows in time order; earlier rows train, later rows validate/test. Leave
    empty for data without time: a seeded (stratified, for classification) shuffle."""
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    """The share of rows for validation (ranks the candidates)."""
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    """The share of rows for the test (the promotion's evidence)."""
    seed: int = 42
    """The seed of a shuffled split."""


class TrainConfig(_Section):
    """The estimator families and their hyperparameters."""

    model: str = "hist_gradient_boosting"
    """The family the `train` stage (dvc repro) fits: linear, random_forest, hist_gradient_boosting,
    torch_mlp or xgboost."""
    seed: int = 42
    """The seed every estimator gets."""
    threads: int = Field(0, ge=0)
    """Native threads per model fit (OpenMP, BLAS, torch); 0: the cores divided among the trainings
    running on this machine at the time (pipelines/core/threads.py)."""
    hyperparams: dict[str, dict[str, Any]] = {}
    """Per model family: keyword arguments of the scikit-learn estimator."""
    importance_rows: int = Field(1000, ge=50)
    """Permutation importance (the drift trigger's weights, the importance plot) is measured on a
    seeded sample of at most this many test rows."""
    sample_rows: int = Field(0, ge=0)
    """The search and the `train` stage fit on a seeded sample of at most this many training rows
    (0: every row), for a table whose fits take too long in full; the run records the sample
    (tag data.train_sample) and the drift reference is drawn from it."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = [m for m in [self.model, *self.hyperparams] if m not in MODEL_FAMILIES]
        if unknown:
            raise ValueError(f"unknown model family {unknown[0]!r}; choose one of {list(MODEL_FAMILIES)}")
        return self


class ParamRange(_Section):
    """One hyperparameter's search range: `low`/`high` (with `log`), or `choices`."""

    low: float | None = None
    """The lowest value."""
    high: float | None = None
    """The highest value."""
    log: bool = False
    """Sample on a log scale."""
    integer: bool | None = None
    """Sample whole numbers; default: true when low and high are whole numbers."""
    choices: list[Any] | None = None
    """The values to choose from, instead of low and high."""

    @model_validator(mode="after")
    def _check(self) -> ParamRange:
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is None and self.low > self.high:  # type: ignore[operator]
            raise ValueError(f"low {self.low} is greater than high {self.high}")
        return self


class SearchConfig(_Section):
    """The candidate search of the training flow."""

    families: list[str] = ["hist_gradient_boosting"]
    """Each family is a candidate with its train.hyperparams; then n_trials Optuna trials sample a
    family and its hyperparameters from `space`."""
    n_trials: int = Field(0, ge=0)
    """Optuna trials after the families (0: the families only)."""
    seed: int = 42
    """The seed of Optuna's sampler."""
    space: dict[str, dict[str, ParamRange]] = {}
    """Per family: the range of each hyperparameter the trials sample."""
    storage: str = ""
    """Where the Optuna study lives: empty = in memory (gone with the process); a file path (a
    journal, for one machine) or an SQLAlchemy URL (postgresql+psycopg://…, for several). A stored
    search killed mid-way resumes with its finished trials kept."""
    trials_per_round: int = Field(1, ge=1)
    """Trials sampled together once Optuna's seeded start-up trials (sampled independently of
    results, so all asked at once) are done: 1 = each trial sees every earlier result, the
    sequential search; more keeps more workers busy. The result depends on this, not on the runner
    or the number of workers."""

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
    """The Dask cluster the search's fits run on (execution.runner: dask)."""

    address: str = ""
    """Empty: a distributed.LocalCluster of n_workers processes, started for the search.
    tcp://host:port: the scheduler of a running cluster (`dask scheduler`, `dask worker`)."""
    n_workers: int = Field(2, ge=1)
    """Workers of the LocalCluster started when address is empty."""
    threads_per_worker: int = Field(1, ge=1)
    """Native threads (OpenMP, BLAS, torch) one candidate's fit uses on a worker; a worker fits one
    candidate at a time."""
    memory_limit: str = "auto"
    """Memory each worker of the LocalCluster may use ("4GiB"; auto: the machine's memory divided
    among the workers). A worker past it is restarted and its tasks run again elsewhere."""
    tls_ca_file: str | None = None
    """With a tls:// address: the certificate authority the scheduler's and workers' certificates
    are signed by (`loopline certs DIR` makes one). With the two below, this client presents its
    certificate; a scheduler started with the same authority refuses clients without one."""
    tls_cert_file: str | None = None
    """This client's certificate (PEM), signed by tls_ca_file."""
    tls_key_file: str | None = None
    """This client's private key (PEM): a file only its owner reads; its contents never go in here."""


class ExecutionConfig(_Section):
    """Where the data stages and the candidate search's fits run."""

    runner: Literal["sequential", "dask"] = "sequential"
    """Where the candidate search's fits run: sequential (in the training process) or dask (each
    family and each Optuna trial a task on a Dask worker)."""
    data: Literal["pandas", "dask"] = "pandas"
    """How the data stages (ingest, clean, validate, split) run: pandas (each loads the whole table
    in one process; outputs are single Parquet files) or dask (a partition at a time, as tasks on
    the cluster of execution.dask; outputs are folders of Parquet parts, which every worker must
    reach: a shared filesystem for a remote cluster)."""
    partition_mb: float = Field(64.0, gt=0.0)
    """With data: dask, the size of a partition: megabytes of source CSV read as one task (a part
    file of every output). Smaller partitions need less memory per worker."""
    dask: DaskConfig = DaskConfig()
    """The cluster, when runner or data is dask."""


class PromotionConfig(_Section):
    """When a new model replaces the champion: a paired bootstrap on the same rows."""

    metric: str | None = None
    """The metric candidates are ranked and the champion judged by; default by task (rmse for
    regression, f1 for classification)."""
    min_improvement: float = Field(0.0, ge=0.0)
    """A challenger replaces the champion only if the lower bound of the (1 - alpha) bootstrap
    interval of its relative improvement on the same test rows exceeds this margin (0.01 = surely
    at least 1% better; 0: surely better at all)."""
    alpha: float = Field(0.1, gt=0.0, lt=1.0)
    """The bootstrap interval is (1 - alpha): 0.1 gives a 90% interval."""
    resamples: int = Field(1000, ge=100)
    """Bootstrap resamples per comparison."""
    block_length: int = Field(0, ge=0)
    """The paired bootstrap of the metric difference (pipelines/registry/evidence.py) resamples
    moving blocks of this many rows when split.order_by orders the rows in time, single rows
    otherwise; 0: the cube root of the rows."""
    seed: int = 0
    """The bootstrap's seed: the same rows give the same verdict."""
    recent_rule: Literal["test", "veto", "both"] = "veto"
    """How the recent labelled rows (the latest monitoring window's, which the champion never read
    and the challenger neither trained nor validated on) combine with the test rows, which must
    always show the challenger surely better: test — recorded, not used; veto — the challenger is
    refused when it is surely worse on them; both — it must be surely better on them too."""
    recent_min_rows: int = Field(100, ge=2)
    """Fewer recent rows than this: the test rows decide alone."""
    shadow: Literal["off", "uncertain", "always"] = "uncertain"
    """A challenger the test rows do not promote can serve in shadow (the registry alias
    `shadow`): the service scores every request with it too, off the request path, and
    monitoring promotes it on its labelled live error. uncertain — a challenger neither surely
    better nor surely worse on the test rows (or vetoed by the recent rows); always — every
    challenger not surely worse; off — none. At most one shadow: a newer one replaces it."""
    shadow_min_rows: int = Field(200, ge=2)
    """Labelled live rows both the shadow and the champion answered before the shadow is
    judged: promoted when surely better on them, retired when surely worse."""
    shadow_max_days: float = Field(14.0, gt=0.0)
    """A shadow not judged better within this many days is retired."""

    @model_validator(mode="after")
    def _check(self) -> PromotionConfig:
        if self.block_length > self.recent_min_rows:
            raise ValueError(
                f"recent_min_rows ({self.recent_min_rows}) must be at least block_length ({self.block_length}): "
                "recent rows are resampled in blocks of block_length rows"
            )
        return self


class TrackingConfig(_Section):
    """The MLflow store and the registered model."""

    uri: str = "sqlite:///mlflow.db"
    """MLFLOW_TRACKING_URI, when set, wins over `uri`."""
    artifact_root: Path = Path("mlruns")
    """Where runs keep their artifacts (a directory; a tracking server keeps its own)."""
    experiment: str = "loopline"
    """The MLflow experiment of the training runs (monitoring runs go to
    `<experiment>-monitoring`)."""
    model_name: str = "loopline-model"
    """The registered model: its `champion` alias is the model in service."""


class LocksConfig(_Section):
    """The lock that serialises promotions across machines."""

    dsn: str = ""
    """A PostgreSQL database (postgresql://…) whose advisory lock serialises promotions across
    machines: needed with an MLflow server (http://…), whose database loopline does not see. Empty:
    the tracking store when it is PostgreSQL, else a file lock."""

    @field_validator("dsn")
    @classmethod
    def _postgres(cls, dsn: str) -> str:
        from pipelines.core.postgres import is_postgres

        if dsn and not is_postgres(dsn):
            raise ValueError(f"{dsn!r} is not a PostgreSQL URL (postgresql://host:port/database)")
        return dsn


class ScheduleConfig(_Section):
    """The crons `loopline deploy` serves."""

    timezone: str = "UTC"
    """The time zone of both crons."""
    training: str | None = "0 3 * * 1"
    """The training deployment's cron (none: no schedule)."""
    monitoring: str | None = "0 * * * *"
    """The monitoring deployment's cron (none: no schedule)."""


class MonitorConfig(_Section):
    """Monitoring: landed batches, the drift and label measurements, and the retraining policy."""

    landing: Path | None = None
    """Where new batches land (CSV or Parquet files); default: <paths.data>/landing."""
    settle_seconds: float = Field(2.0, ge=0.0)
    """A landed file modified less than this long ago is checked again after the rest of this many
    seconds; if it changed meanwhile it is still being written and waits for the next run (0: no
    check; writers that write-then-rename need none)."""
    id_column: str | None = "request_id"
    """A column of labelled batches that names the served prediction each row answers (the
    X-Request-ID of /predict, "<id>-<i>" for /predict_batch). Not a feature."""
    time_key: list[str] = []
    """Columns that name a row's time (Bikeshare: day and hr): a labelled row with no request id is
    matched to the prediction served for the same values. Rows nothing served are scored by the
    champion now (the offline metric). Empty: match by id only."""
    window: str = "7d"
    """The served window: the rows the current champion answered in this long before the
    monitoring run (a duration: 7d, 36h), or its latest N answers (a row count: 5000), read
    from the prediction log. Rows earlier versions answered in the same span are reported
    apart, never mixed in."""
    window_batches: int = Field(1, ge=1)
    """The landed window: the latest N batches that landed with features (with or without the
    target), measured apart from the served window, with its source named."""
    drift_share: float = Field(0.5, gt=0.0, le=1.0)
    """Trigger: retrain when the drifted features carry at least this share of the champion's
    permutation importance (Evidently's per-column tests say which drifted; features expected to
    drift weigh nothing unless count_expected_drift)."""
    weight_by_importance: bool = True
    """false: every counted feature weighs the same (the share of drifted features)."""
    count_expected_drift: bool = False
    """Count cyclical features and `expected_drift` columns toward the drift trigger."""
    max_degradation: float = Field(0.35, gt=0.0)
    """Trigger: the live metric of served predictions (or the offline metric of labelled rows
    nothing served) is this much worse, relative, than the champion's test metric."""
    max_estimated_degradation: float = Field(0.25, gt=0.0)
    """Trigger: the metric NannyML estimates without labels (DLE for regression, CBPE for
    classification, fitted at training on rows the model did not train on) is this much worse than
    the champion's test metric."""
    estimate_performance: bool = True
    """Estimate the metric without labels (NannyML)."""
    min_window_rows: int = Field(50, ge=1)
    """A window with fewer rows is not measured: "not enough rows" is recorded, no retrain."""
    min_new_rows: int = Field(100, ge=0)
    """A trigger retrains only with at least this many rows no training has seen."""
    cooldown_hours: float = Field(24.0, ge=0.0)
    """... and not within this many hours of the last retrain monitoring started."""
    reference_rows: int = Field(200_000, ge=100)
    """The champion's training rows kept as the drift reference (a seeded sample above this)."""
    estimator_rows: int = Field(50_000, ge=100)
    """NannyML's performance estimator is fitted on a seeded sample of at most this many held-out
    (validation and test) rows: DLE's loss model (LightGBM) on 300k rows took 5 s of a 1M-row
    training's logging; on 50k it learns the same error structure for monitoring's windows."""
    reference_profile_rows: int = Field(10_000, ge=0)
    """What drift reads of them: each column's distribution in this many rows, made once per
    champion (pipelines/monitoring/drift.py reference_profile), so a monitoring run costs the same
    whatever the reference's size. 0: every reference row, every run. Above 1000, because Evidently
    picks its tests by the reference's size (KS and chi-square up to 1000 rows, Wasserstein and
    Jensen-Shannon above) and the profile must get the same."""
    dvc_commit: bool = True
    """Record the data version of each training whose data stages ran (a first training, a
    retrain on new batches) in dvc.lock and the DVC cache (`dvc commit`), when loopline runs in
    the DVC workspace of this params file; nothing is staged in git."""
    workspace: Path | None = None
    """The Evidently workspace every monitoring run adds its snapshots to (one project per model
    name; `loopline dashboard` shows it); default <paths.data>/monitoring/workspace."""

    @field_validator("window")
    @classmethod
    def _window(cls, window: str) -> str:
        from pipelines.core.spans import parse_span

        parse_span(window)
        return window

    @model_validator(mode="after")
    def _check(self) -> MonitorConfig:
        if 0 < self.reference_profile_rows <= 1000:
            raise ValueError(
                f"reference_profile_rows {self.reference_profile_rows} must be 0 (every reference row) or above "
                "1000: Evidently tests a reference of up to 1000 rows differently"
            )
        return self


class ServeConfig(_Section):
    """The BentoML service: address, batching, the prediction log, the engine."""

    host: str = "127.0.0.1"
    """The address `loopline serve` listens on (127.0.0.1: this machine only)."""
    port: int = Field(3000, ge=1, le=65535)
    """The port `loopline serve` listens on."""
    max_batch_size: int = Field(64, ge=1)
    """Concurrent single-record requests are predicted together, up to this many at once."""
    batch_wait_ms: float = Field(0.0, ge=0.0)
    """How long the first request of a batch may wait for others (0: predict as soon as the model
    is free; requests arriving meanwhile form the next batch)."""
    max_batch_records: int = Field(1000, ge=1)
    """/predict_batch refuses longer lists (400)."""
    max_body_bytes: int = Field(2_000_000, ge=1024)
    """A request body above this many bytes gets 413, before anything parses it."""
    reload_interval_s: float = Field(10.0, ge=0.0)
    """How often the service asks the registry whether `champion` moved (0: never; the POST
    /admin/reload endpoint still works)."""
    prediction_log: str | None = None
    """Where every served prediction is logged for monitoring: a SQLite file (default
    <paths.data>/serving/predictions.db) or a PostgreSQL DSN (postgresql://…), which several
    service replicas share."""
    log_retention: str | None = None
    """How long the prediction log keeps a served row (a duration: 90d); monitoring prunes older
    rows, never those of the current window or awaiting the labels of a pending retrain. Null:
    keep every row."""
    context_columns: list[str] = []
    """Columns of `schema:` a request may carry beside the features (an id, a day, a timestamp,
    an entity key): checked by the schema's rules, logged with the inputs, never given to the
    model. They let `monitor.time_key` match labels to what was served."""
    request_timeout_s: float = Field(30.0, gt=0.0)
    """A request whose answer has not started within this many seconds gets 504."""
    engine: Literal["auto", "onnx", "python"] = "auto"
    """Which engine runs the model: onnx (the ONNX form logged with the model, run by ONNX Runtime;
    the service refuses a model without one or that fails the parity check), python (the fitted
    pipeline), or auto (onnx when it converted and agrees with the Python model on its reference
    rows, else python, saying why)."""
    shadow_queue_rows: int = Field(10_000, ge=1)
    """Rows waiting for the shadow model at most; when the queue is full, the shadow skips the
    request (counted in /model): it never delays or fails an answer."""
    admin_token_file: str | None = None
    """A file holding the token that POST /admin/* routes require (header Authorization: Bearer
    <token>); $LOOPLINE_ADMIN_TOKEN takes precedence. Required when the service listens beyond
    loopback (serve.host other than 127.0.0.1/localhost/::1): without one, admin routes answer
    401. On loopback without a token they stay open."""
    api_keys_file: str | None = None
    """A file of API keys, `id:key` per line ($LOOPLINE_API_KEYS, the same entries separated by
    commas, takes precedence). When there are keys, /predict, /predict_batch and /predict_columns
    answer 401 without one (Authorization: Bearer <key>, or X-API-Key), and each prediction is
    logged with its key's id (never the key). /livez, /readyz, /model and /docs stay open. None:
    no keys, every request is answered."""
    model_threads: int = Field(1, ge=1)
    """Native threads per worker for model calls (ONNX Runtime's session, OpenMP and BLAS through
    threadpoolctl, torch): a training beside the service cannot make a one-row prediction wait for
    a busy core's worth of threads."""
    tracing: bool = False
    """Trace requests with OpenTelemetry (BentoML's tracing; its exporter is set in BentoML's own
    configuration, BENTOML_CONFIG). Off, requests skip the tracing middleware, which otherwise
    records spans for every request that nothing exports: at 32 concurrent clients it cost a
    third of the service's throughput here."""

    @field_validator("log_retention")
    @classmethod
    def _retention(cls, retention: str | None) -> str | None:
        from pipelines.core.spans import parse_duration

        if retention is not None:
            parse_duration(retention)
        return retention


class PolicyConfig(_Section):
    """One retraining policy of the back-test."""

    name: str
    """The policy's name in the back-test table."""
    retrain: Literal["never", "every_batch", "scheduled", "monitor"]
    """never | every_batch | scheduled (every `every` batches) | monitor (the monitoring decision,
    with `monitor:` overridden by this policy's `monitor` keys)"""
    every: int = Field(1, ge=1)
    """retrain: scheduled retrains every this many batches."""
    monitor: dict[str, Any] = {}
    """Keys of `monitor:` this policy overrides."""
    gate: Literal["bootstrap", "point", "shadow"] = "bootstrap"
    """How a retrained model is promoted: the bootstrap evidence of `promotion:`, the point
    metric alone (better on the test rows by any margin), or shadow: the bootstrap, and a
    challenger it leaves uncertain (`promotion.shadow`) serves in shadow for one period, then
    is promoted if surely better on the labelled rows both answered (retired otherwise)."""


DEFAULT_POLICIES = [
    PolicyConfig(name="never", retrain="never"),
    PolicyConfig(name="every-batch", retrain="every_batch"),
    PolicyConfig(name="monitor", retrain="monitor"),
]


class BacktestConfig(_Section):
    """`loopline backtest` and `loopline replay`: 2011 replayed month by month."""

    train_months: int = Field(3, ge=1, le=11)
    """The first champion trains on this many months; every later month is a batch."""
    policies: list[PolicyConfig] = DEFAULT_POLICIES
    """The policies compared side by side, each a row of the table."""
    label_delays: list[str] = ["0"]
    """How long after its hour each label arrives, one back-test per delay side by side
    (durations: 0, 7d, 30d); `--label-delay` overrides."""
    alpha_max: float = Field(50.0, gt=0.0)
    """The cost-aware score C_α = mean live metric + α × retrains ÷ periods (α: what one
    retrain costs, in metric points of one period) is averaged over α from 0 to this, relative
    to the best policy at each α."""

    @field_validator("label_delays")
    @classmethod
    def _delays(cls, delays: list[str]) -> list[str]:
        from pipelines.core.spans import parse_duration

        for delay in delays:
            parse_duration(delay)
        if not delays:
            raise ValueError("label_delays lists no delay (0: labels at once)")
        return delays

    @model_validator(mode="after")
    def _check(self) -> BacktestConfig:
        names = [p.name for p in self.policies]
        if not names:
            raise ValueError("policies lists no policy")
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must differ: {names}")
        return self


class ServerAddress(_Section):
    """Where one server listens."""

    host: str = "127.0.0.1"
    """The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."""
    port: int = Field(ge=1, le=65535)
    """The port."""


class ServersConfig(_Section):
    """Where loopline's own servers listen when their command is given no --host/--port."""

    mlflow: ServerAddress = ServerAddress(port=5000)
    """`loopline mlflow-ui` and `loopline tracking-server` (MLflow)."""
    prefect: ServerAddress = ServerAddress(port=4200)
    """`loopline prefect-server` (Prefect's API and UI)."""
    dashboard: ServerAddress = ServerAddress(port=8000)
    """`loopline dashboard` (Evidently's UI)."""


class PathsConfig(_Section):
    """Where the stages write."""

    data: Path = Path("data")
    """Where the data stages write (below it: interim, processed, arrivals, landing, monitoring,
    cache)."""
    models: Path = Path("models")
    """Where the `train` and `evaluate` stages write."""


class Params(_Section):
    """params.yaml: one config for everything, validated at load."""

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
    servers: ServersConfig = ServersConfig()
    monitor: MonitorConfig = MonitorConfig()
    backtest: BacktestConfig = BacktestConfig()
    alerts: list[str] = []
    """Where loopline says what it did (a retrain, a promotion or a rejected challenger, a rejected
    batch, a failed flow, a champion the service could not load): Apprise URLs such as
    json://host:port/path, slack://..., mailto://... Empty: no alerts."""

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
        from pipelines.core.metrics import PRIMARY_METRIC, metric_direction

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
        for col in self.serve.context_columns:
            if col not in cols:
                raise ValueError(f"serve.context_columns names {col!r}, which is not in schema.columns")
            if col in self.features.columns or col == target:
                raise ValueError(f"serve.context_columns names {col!r}, which is a feature or the target, not context")
        for i, policy in enumerate(self.backtest.policies):
            try:
                self.policy_monitor(policy)
            except ValidationError as err:
                where = f"backtest.policies.{i}.monitor ({policy.name})"
                raise ValueError(_describe(err, where)) from None
        from pipelines.core.metrics import COMPARABLE, METRICS

        metric, task = self.promotion.metric, self.data.task
        if metric is not None and metric in METRICS[task] and metric not in COMPARABLE[task]:
            raise ValueError(
                f"promotion.metric {metric} has no bootstrap comparison; use one of {list(COMPARABLE[task])}"
            )
        if metric is not None and metric not in METRICS[task]:
            raise ValueError(f"promotion.metric {metric!r} is not a {task} metric; choose one of {list(METRICS[task])}")
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


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:)[^@\s/]+@")


def without_passwords(value: Any) -> Any:
    """`value` (a params dump: dicts, lists, strings) with the password of every URL in it shown
    as ***: what loopline prints, logs or packages of the params never holds one."""
    if isinstance(value, dict):
        return {k: without_passwords(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_passwords(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>***@", value)
    return value


def shown(params: Params, **dump: Any) -> dict[str, Any]:
    """The params as JSON-able values with every key's name as in the file, passwords hidden."""
    return without_passwords(params.model_dump(mode="json", by_alias=True, **dump))


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
