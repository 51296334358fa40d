"""Alerts: what the loop did while nobody watched, sent to the `alerts:` targets through
Apprise (any of its URLs: json://, slack://, mailto://, ...).

Each alert says what happened, why, and where to look (the MLflow run, the report). Sending
is best effort: a target that cannot be reached is logged and never fails the work that
raised the alert, because a down chat server must not stop a retrain or a promotion.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("loopline.alerts")

Level = Literal["info", "success", "warning", "failure"]


@dataclass(frozen=True)
class Alert:
    event: str  # retrain | promoted | challenger rejected | in shadow | shadow promoted | ... | champion not loaded
    title: str
    what: str  # what happened
    why: str
    where: str  # where to look
    level: Level = "info"

    @property
    def body(self) -> str:
        return f"{self.what}\nWhy: {self.why}\nWhere to look: {self.where}"


def send(targets: list[str], alert: Alert, warn: Callable[[str], object] = log.warning) -> bool:
    """Deliver `alert` to every target; True when all took it (or there are none). Never raises."""
    if not targets:
        return True
    try:
        import apprise

        notifier = apprise.Apprise()
        for url in targets:
            notifier.add(url)
        delivered = bool(
            notifier.notify(
                title=f"[loopline] {alert.title}",
                body=alert.body,
                notify_type=getattr(apprise.NotifyType, alert.level.upper()),
            )
        )
        problem = "a target did not take it"
    except Exception as err:  # an alert must never fail the flow that raised it
        delivered, problem = False, f"{type(err).__name__}: {err}"
    if not delivered:
        warn(f"alert {alert.event!r} ({alert.title}) was not delivered to every target: {problem}")
    return delivered


def send_in_background(targets: list[str], alert: Alert) -> None:
    """`send` in a thread of its own: a service's request and polling paths never wait for a
    slow target."""
    import threading

    if targets:
        threading.Thread(target=send, args=(targets, alert), name="alert", daemon=True).start()
