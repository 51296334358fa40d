"""Names that several layers must spell alike: MLflow tags, metrics and artifacts, and the
Prefect deployments. A reader of the MLflow UI or of `prefect deployment ls` finds these."""

from __future__ import annotations

# Registry aliases: the model in service, and the newest registered challenger.
CHAMPION = "champion"
CHALLENGER = "challenger"
SHADOW = "shadow"  # a challenger scored on live traffic beside the champion (promotion.shadow)

# Prefect deployments served by `loopline deploy`; monitoring starts a retrain through the first.
TRAINING_DEPLOYMENT = "scheduled-training"
MONITORING_DEPLOYMENT = "scheduled-monitoring"

# Artifacts logged beside the model.
MODEL_ARTIFACT = "model"
REFERENCE_ARTIFACT = "reference/reference.parquet"  # the champion's training rows, for drift
IMPORTANCE_ARTIFACT = "reference/importance.json"  # permutation importance per feature: drift weights
ESTIMATOR_ARTIFACT = "reference/estimator.pkl"  # NannyML's fitted DLE / CBPE, for label-free estimates
CARD_DIR = "card"  # the model card, the slice metrics and plot, the training facts
CARD_ARTIFACT = f"{CARD_DIR}/model_card.md"


def profile_artifact(rows: int) -> str:
    """The reference rows with the model's predictions, as drift reads them (monitor.reference_profile)."""
    return f"reference/profile-{rows}.parquet"


# Lineage tags of every training run (parent and candidates).
GIT_COMMIT = "git_commit"
CLEAN_MD5 = "data.clean_md5"
SOURCE = "data.source"
SOURCE_MD5 = "data.source_md5"
INGESTED_MD5 = "data.ingested_md5"
ARRIVAL_BATCHES = "data.arrival_batches"
LAST_ARRIVAL = "data.last_arrival"  # the last accepted batch the training read
DVC_LOCK_MD5 = "data.dvc_lock_md5"
TRAIN_SAMPLE = "data.train_sample"  # train.sample_rows: the rows fitted on, of how many, and the seed
FLOW_RUN_ID = "prefect.flow_run_id"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a candidate's run under the training's
PARAMS_FILE = "loopline.params_file"
OWNER = "loopline.owner"  # host:pid of the process that created the run
END_REASON = "loopline.end_reason"

# Training runs.
FAMILY = "loopline.family"
DEVICE = "device"  # where a PyTorch candidate trained: cpu or cuda
GPU_NAME = "gpu_name"
WORKER = "loopline.worker"  # where a candidate was fitted: a Dask worker's address, or local:host:pid
RESTORED = "loopline.restored"  # a candidate finished by an earlier, interrupted search (search.storage)
BEST_CANDIDATE = "loopline.best_candidate"
BEST_RUN_ID = "loopline.best_run_id"
DECISION = "loopline.decision"
DECISION_REASON = "loopline.decision_reason"
MODEL_VERSION = "loopline.model_version"

# Registered model versions.
DATA_MD5 = "loopline.data_md5"
VERSION_GIT_COMMIT = "loopline.git_commit"
CANDIDATE = "loopline.candidate"
TRAINING_FINGERPRINT = "loopline.training_fingerprint"
LIBRARIES = "loopline.libraries"  # the versions that fitted it, as JSON: what `loopline reproduce` compares
# The promotion audit on versions: DECISION and DECISION_REASON (as on training runs), and
DECIDED_AT = "loopline.decided_at"
PREVIOUS_CHAMPION = "loopline.previous_champion"  # the champion it replaced: where a rollback returns
LAST_CHALLENGE = "loopline.last_challenge"  # on a champion: the last challenger and its outcome
PROMOTED = "loopline.promoted"  # promoted by hand (loopline promote): when and replacing which
ROLLED_BACK = "loopline.rolled_back"  # on the champion a rollback left
ROLLED_BACK_TO = "loopline.restored"  # on the version a rollback made champion again

# Monitoring runs.
AT = "loopline.at"
REASON = "loopline.reason"
STATUS = "loopline.status"
BATCHES = "loopline.batches"
REJECTED = "loopline.rejected"
CHAMPION_VERSION = "loopline.champion_version"
WINDOW = "loopline.window"
DRIFTED = "loopline.drifted"
REPLAY = "loopline.replay"
ESTIMATE = "loopline.estimate"  # the label-free estimate, or why there is none
LABELS = "loopline.labels"  # which labelled rows were measured how (live by id / by time, offline)
PENDING = "loopline.pending"  # a retrain decided and waiting for labels: "<since>: <reason>", open until one runs
LOG_SIZE = "loopline.log_size"  # the prediction log's rows and bytes after the run's prune
SHADOW_JUDGEMENT = "loopline.shadow"  # what the run made of the shadow: promoted, retired or kept, and on what


# Promotion evidence, on the challenger's version, the champion's version and the training run.
EVIDENCE_INTERVAL = "loopline.evidence.interval"
EVIDENCE_ROWS = "loopline.evidence.rows"
EVIDENCE_VERDICT = "loopline.evidence.verdict"
EVIDENCE_METHOD = "loopline.evidence.method"
EVIDENCE_RECENT = "loopline.evidence.recent"  # the recent-row interval, or why there was none
EVIDENCE_RECENT_ROWS = "loopline.evidence.recent_rows"
EVIDENCE_RULE = "loopline.evidence.rule"  # promotion.recent_rule
EVIDENCE_LIVE = "loopline.evidence.live"  # the live shadow rows' interval, on a version promoted from shadow
EVIDENCE_LIVE_ROWS = "loopline.evidence.live_rows"
SHADOW_SINCE = "loopline.shadow.since"  # when a version became the shadow, and why
SHADOW_OUTCOME = "loopline.shadow.outcome"  # promoted | retired | replaced: when and why


def last_challenge_tag(evidence_tag: str) -> str:
    """An EVIDENCE_* tag as the champion keeps it from its last challenge."""
    return evidence_tag.replace("loopline.evidence.", "loopline.last_challenge.")


def rows_tag(split: str) -> str:
    """The rows of a split (train, val, test) a training read, on its runs."""
    return f"data.rows_{split}"


def version_metric_tag(metric: str) -> str:
    """The registered version's test metric, as a tag (monitoring compares live error with it)."""
    return f"loopline.test_{metric}"


def training_tag(key: str) -> str:
    """What a retrain started by monitoring reported, on the monitoring run."""
    return f"loopline.training_{key}"


def window_tag(source: str) -> str:
    """Which rows a monitoring run's window of `source` (served, landed) held, in words."""
    return f"loopline.window.{source}"
