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
from pipelines.registry.evidence import Comparison, Evidence


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
    shadow: str = ""  # what became of the challenger as a shadow (promotion.shadow), "" when nothing


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


def feature_difference(mine: list[str], theirs: list[str], champion: str) -> str | None:
    """Why a model cannot shadow champion `champion` (None: it can): a shadow answers the
    champion's requests, so it must read the same features, in the same order."""
    if list(mine) == list(theirs):
        return None
    extra, missing = [c for c in mine if c not in theirs], [c for c in theirs if c not in mine]
    if not extra and not missing:
        return f"it reads the features of champion v{champion} in another order"
    return (
        f"its features differ from champion v{champion}'s: it reads {extra or 'no column'} the champion does not, "
        f"and lacks {missing or 'no column'}"
    )


def require_version(client, name: str, version: str, action: str = "registry", where: str = ""):
    """The registered version `version` of `name`, or a one-line error saying there is none
    (`where`: the store, for the message). Any other error (a server refusing the caller,
    one not answering) goes on as it is, for the command to report (`access.refusal`)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LooplineError(action, f"{name} has no version {version!r}{f' in {where}' if where else ''}") from None


def make_shadow(
    client, name: str, version: str, tracking_uri: str, why: str, features_of: Callable[[str], list[str]]
) -> str:
    """Alias `version` as the shadow by hand (audited); refused, naming the columns, when its
    features (`features_of(version)`: pipelines.registry.tracking.model_features) are not the
    champion's. Returns what happened."""
    with registry_lock(tracking_uri):
        require_version(client, name, version)
        champion = alias_version(client, name, names.CHAMPION)
        if champion is None:
            raise LooplineError("registry", f"model {name!r} has no champion for a shadow to run beside")
        if champion == version:
            raise LooplineError("registry", f"v{version} is the champion of {name!r}; a shadow is another version")
        refused = feature_difference(features_of(version), features_of(champion), champion)
        if refused:
            raise LooplineError("registry", f"v{version} of {name!r} cannot be the shadow: {refused}")
        return set_shadow(client, name, version, why)


def retire_shadow(client, name: str, tracking_uri: str, why: str) -> str | None:
    """Remove the shadow by hand (audited); returns the version it was, None when there was none."""
    with registry_lock(tracking_uri):
        current = alias_version(client, name, names.SHADOW)
        if current is not None:
            end_shadow(client, name, current, f"retired: {why}")
        return current


def shadow_wanted(mode: str, evidence: Evidence) -> bool:
    """Whether a challenger that was not promoted serves in shadow (promotion.shadow):
    uncertain — its test-row interval straddles min_improvement, or the recent rows vetoed
    it; always — it is not surely worse on the test rows."""
    test = evidence.test
    if mode == "always":
        return not test.worse
    if mode == "uncertain":
        return evidence.vetoed or test.low <= test.min_improvement <= test.high
    return False


def set_shadow(client, name: str, version: str, reason: str) -> str:
    """Alias `version` as the shadow (under the registry lock, which the caller holds),
    replacing any other, audited on both; returns what happened, for the decision."""
    current = alias_version(client, name, names.SHADOW)
    at = _now()
    if current is not None and current != version:
        client.set_model_version_tag(name, current, names.SHADOW_OUTCOME, f"replaced at {at} by v{version}")
    client.set_model_version_tag(name, version, names.SHADOW_SINCE, f"{at}: {reason}"[:5000])
    client.set_registered_model_alias(name, names.SHADOW, version)
    return f"v{version} serves in shadow" + (f", replacing shadow v{current}" if current not in (None, version) else "")


def end_shadow(client, name: str, version: str, outcome: str) -> None:
    """The shadow alias removed from `version` (under the registry lock), with why."""
    client.set_model_version_tag(name, version, names.SHADOW_OUTCOME, f"{outcome} at {_now()}"[:5000])
    client.delete_registered_model_alias(name, names.SHADOW)


def promote_if_better(
    client,
    name: str,
    version: str,
    judge: Callable[[str], Evidence],
    tracking_uri: str,
    shadow: str = "off",
    refuse_shadow: Callable[[str], str | None] = lambda champion: None,
) -> Decision:
    """Make `version` champion if there is none, or if `judge` (the challenger against the
    champion version it is given: test rows and recent rows) finds it surely better. If not,
    and `shadow` (promotion.shadow) says so, it becomes the shadow, unless `refuse_shadow`
    (given the champion's version) names a reason it cannot be one (other features)."""
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
            standing = alias_version(client, name, names.SHADOW)
            if standing is not None and standing != version:  # it was judged against the old champion
                end_shadow(client, name, standing, f"retired: the champion changed to v{version} on test rows")
        elif evidence is not None and shadow_wanted(shadow, evidence):
            refused = refuse_shadow(current or "")
            outcome = (
                f"not a shadow: {refused}"
                if refused
                else set_shadow(client, name, version, f"promotion.shadow {shadow}: {evidence.verdict} on test rows")
            )
            decision = Decision(promoted, version, current, f"{reason}; {outcome}", evidence, outcome)
            client.set_model_version_tag(name, version, names.DECISION_REASON, decision.reason[:5000])
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


def live_evidence_tags(live: Comparison) -> dict[str, str]:
    """The live shadow rows' comparison as tags, beside the test rows' (evidence_tags)."""
    return {
        names.EVIDENCE_LIVE: f"{live.metric} improvement {live.improvement:+.2%}, {1 - live.alpha:.0%} interval "
        f"{live.interval} on {live.rows} live shadow rows ({live.method}, {live.resamples} resamples)",
        names.EVIDENCE_LIVE_ROWS: str(live.rows),
    }


def promote_shadow(
    client, name: str, shadow: str, champion: str, reason: str, tags: dict[str, str], tracking_uri: str
) -> bool:
    """Make the shadow champion on its live evidence, if neither alias moved since it was
    judged (False: one did, nothing changed). Audited as a promotion, on both versions."""
    with registry_lock(tracking_uri):
        if (
            alias_version(client, name, names.SHADOW) != shadow
            or alias_version(client, name, names.CHAMPION) != champion
        ):
            return False
        audit = {
            names.DECISION: "promoted",
            names.DECISION_REASON: reason[:5000],
            names.DECIDED_AT: _now(),
            names.PREVIOUS_CHAMPION: champion,
            **tags,
        }
        for key, value in audit.items():
            client.set_model_version_tag(name, shadow, key, value)
        client.set_model_version_tag(
            name, champion, names.LAST_CHALLENGE, f"v{shadow}: lost on live shadow rows ({reason})"[:5000]
        )
        end_shadow(client, name, shadow, "promoted to champion on live shadow rows")
        client.set_registered_model_alias(name, names.CHAMPION, shadow)
        return True


def promote(client, name: str, version: str, tracking_uri: str, reason: str = "manual") -> str | None:
    """Make `version` champion by hand; returns the version it replaced."""
    with registry_lock(tracking_uri):
        require_version(client, name, version)
        current = alias_version(client, name, names.CHAMPION)
        if current == version:
            return current
        standing = alias_version(client, name, names.SHADOW)
        if standing is not None:
            outcome = f"promoted by {reason}" if standing == version else f"retired: v{version} promoted by {reason}"
            end_shadow(client, name, standing, outcome)
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
