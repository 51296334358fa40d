"""Alerts through Apprise to a real HTTP receiver on loopback: delivered with what, why and
where; an unreachable target is logged, never raised; a bad target URL fails at load."""

from __future__ import annotations

import socket

import pytest

from conftest import write_params
from pipelines.core.alerts import Alert, send

ALERT = Alert(
    event="retrain",
    title="bikes: monitoring started a retrain",
    what="monitoring decided to retrain champion v3",
    why="drifted features carry 61% of the weight",
    where="MLflow run abc123",
    level="warning",
)


def test_an_alert_arrives_with_what_why_and_where(alert_receiver):
    assert send([alert_receiver.url], ALERT)
    [message] = alert_receiver.wait_for(1)
    assert message["title"] == "[loopline] bikes: monitoring started a retrain"
    assert message["type"] == "warning"
    assert message["message"].splitlines() == [
        "monitoring decided to retrain champion v3",
        "Why: drifted features carry 61% of the weight",
        "Where to look: MLflow run abc123",
    ]


def test_an_unreachable_target_is_logged_and_the_others_still_get_it(alert_receiver):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"json://127.0.0.1:{s.getsockname()[1]}/alerts"
    warnings: list[str] = []
    assert not send([dead, alert_receiver.url], ALERT, warn=warnings.append)
    assert len(alert_receiver.wait_for(1)) == 1
    assert warnings == [
        "alert 'retrain' (bikes: monitoring started a retrain) was not delivered to every target: "
        "a target did not take it"
    ]
    assert send([], ALERT, warn=warnings.append) and len(warnings) == 1  # no targets: nothing to do


def test_a_target_that_is_not_an_apprise_url_fails_at_load_naming_it(tmp_path, sample_csv):
    from pipelines.core.config import load_params
    from pipelines.core.errors import LooplineError

    path = write_params(tmp_path, sample_csv, alerts=["json://127.0.0.1:9/ok", "pager://ops"])
    with pytest.raises(LooplineError, match=r"alerts: 'pager://ops' is not an Apprise URL"):
        load_params(path)
