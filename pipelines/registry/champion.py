"""The MLflow model registry with aliases: `challenger` for the newest candidate, `champion`
for the model in service. The champion changes only to a model that beats it on the same
test rows, by manual promotion, or by rollback; every change leaves an audit tag.

Promotion decisions run under an exclusive lock, so two trainings finishing at once compare
one after the other and cannot both become champion: a file lock for a SQLite store, an
advisory lock in PostgreSQL for a shared one (locks.dsn).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines.core import names
from pipelines.core.errors import LooplineError
from pipelines.registry.evidence import Evidence


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def lock_path(tracking_uri: str) -> Path:
    """Beside the SQLite database when there is one, else in the temp dir, per tracking URI.
    (A tracking server shared by several machines needs locks.dsn instead.)"""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///") + ".registry.lock")
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"loopline-registry-{digest}.lock"


@contextmanager
def registry_lock(target: str) -> Iterator[None]:
    """Promotions one at a time: a PostgreSQL advisory lock when `target` is a PostgreSQL
    URL (tracking.registry_lock_target), else a file lock per tracking URI."""
    from pipelines.core.postgres import advisory_lock, is_postgres

    if is_postgres(target):
        with advisory_lock(target, "loopline.registry", "locks.dsn"):
            yield
        return
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def alias_version(client, name: str, alias: str) -> str | None:
    """The version `alias` points at; None when the model or the alias does not exist. Any
    other failure (an unreachable or damaged store) is raised, not read as "no alias"."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def register(client, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """A new model version from a logged model, aliased `challenger`."""
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # exists already (maybe created a moment ago by a concurrent training)
        client.create_registered_model(name)
    version = str(client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags).version)
    client.set_registered_model_alias(name, names.CHALLENGER, version)
    return version


@dataclass(frozen=True)
class Decision:
    promoted: bool
    version: str
    champion_before: str | None
    reason: str
    evidence: Evidence | None = None  # None: there was no champion to compare with


def evidence_tags(evidence: Evidence) -> dict[str, str]:
    """The comparisons as tags, set on both versions and on the training run."""
    test, recent = evidence.test, evidence.recent
    return {
        names.EVIDENCE_INTERVAL: f"{test.metric} improvement {test.improvement:+.2%}, "
        f"{1 - test.alpha:.0%} interval {test.interval}",
        names.EVIDENCE_ROWS: str(test.rows),
        names.EVIDENCE_VERDICT: evidence.verdict,
        names.EVIDENCE_METHOD: f"{test.method}, {test.resamples} resamples",
        names.EVIDENCE_RECENT: (
            f"{recent.metric} improvement {recent.improvement:+.2%}, interval {recent.interval} "
            f"({evidence.recent_note})"
            if recent is not None
            else f"none: {evidence.recent_note}"
        )[:5000],
        names.EVIDENCE_RECENT_ROWS: str(recent.rows if recent is not None else 0),
        names.EVIDENCE_RULE: evidence.rule,
    }


def promote_if_better(client, name: str, version: str, judge: Callable[[str], Evidence], tracking_uri: str) -> Decision:
    """Make `version` champion if there is none, or if `judge` (the challenger against the
    champion version it is given: test rows and recent rows) finds it surely better."""
    with registry_lock(tracking_uri):
        current = alias_version(client, name, names.CHAMPION)
        evidence: Evidence | None = None
        if current is None:
            promoted, reason = True, "first model: no champion yet"
        else:
            evidence = judge(current)
            promoted = evidence.better
            reason = f"v{version} against champion v{current}: {evidence.describe()}"
        decision = Decision(promoted, version, current, reason, evidence)
        tags = {
            names.DECISION: "promoted" if promoted else "rejected",
            names.DECISION_REASON: reason[:5000],
            names.DECIDED_AT: _now(),
            **(evidence_tags(evidence) if evidence else {}),
        }
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if promoted:
            if current is not None:
                client.set_model_version_tag(name, version, names.PREVIOUS_CHAMPION, current)
            client.set_registered_model_alias(name, names.CHAMPION, version)
        if current is not None and evidence is not None:
            client.set_model_version_tag(
                name,
                current,
                names.LAST_CHALLENGE,
                f"v{version}: {'lost' if promoted else 'defended'} ({reason})"[:5000],
            )
            for key, value in evidence_tags(evidence).items():
                client.set_model_version_tag(name, current, names.last_challenge_tag(key), value)
        return decision


def promote(client, name: str, version: str, tracking_uri: str, reason: str = "manual") -> str | None:
    """Make `version` champion by hand; returns the version it replaced."""
    with registry_lock(tracking_uri):
        try:
            client.get_model_version(name, version)
        except Exception:
            raise LooplineError("registry", f"model {name!r} has no version {version}") from None
        current = alias_version(client, name, names.CHAMPION)
        if current == version:
            return current
        if current is not None:
            client.set_model_version_tag(name, version, names.PREVIOUS_CHAMPION, current)
        client.set_model_version_tag(name, version, names.PROMOTED, f"{_now()} by {reason}, replacing v{current}")
        client.set_registered_model_alias(name, names.CHAMPION, version)
        return current


def rollback(client, name: str, tracking_uri: str) -> tuple[str, str]:
    """Move `champion` back to the version it replaced; returns (from, to)."""
    with registry_lock(tracking_uri):
        current = alias_version(client, name, names.CHAMPION)
        if current is None:
            raise LooplineError("registry", f"model {name!r} has no champion to roll back")
        previous = client.get_model_version(name, current).tags.get(names.PREVIOUS_CHAMPION)
        if not previous:
            raise LooplineError(
                "registry", f"champion v{current} of {name!r} replaced no earlier champion; nothing to roll back to"
            )
        client.set_model_version_tag(name, current, names.ROLLED_BACK, f"{_now()}: champion returned to v{previous}")
        client.set_model_version_tag(name, previous, names.ROLLED_BACK_TO, f"{_now()}: rollback from v{current}")
        client.set_registered_model_alias(name, names.CHAMPION, previous)
        return current, previous
