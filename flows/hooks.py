"""Flow state hooks: a failed training or monitoring run is an alert (`alerts:` in params);
a cancelled one is not an error in the log."""

from __future__ import annotations

import logging


def alert_failed_run(flow, flow_run, state) -> None:
    """Prefect's on_failure hook: tell the `alerts:` targets which run failed and why. The
    params are read again here; a params file that does not load has no targets to tell."""
    from pipelines.core.alerts import Alert, send
    from pipelines.core.config import load_params
    from pipelines.core.errors import LooplineError

    params_path = str(flow_run.parameters.get("params_path", "params.yaml"))
    try:
        targets = load_params(params_path).alerts
    except LooplineError:
        return
    send(
        targets,
        Alert(
            event="flow failed",
            title=f"{flow.name} flow run {flow_run.name} failed",
            what=f"Prefect flow run {flow_run.name} ({flow_run.id}) of flow {flow.name!r} ended {state.name}",
            why=(state.message or "no message")[:2000],
            where=f"`prefect flow-run inspect {flow_run.id}` or the Prefect UI; params {params_path}",
            level="failure",
        ),
    )


class _Cancellation(logging.Filter):
    """A run being cancelled is told so by a termination signal that Prefect raises wherever
    the process stands (TerminationSignal). Inside a database call, the library that was
    interrupted may log its own error with a traceback (SQLAlchemy's "Error closing cursor");
    that is the cancellation, already reported as such by Prefect, not a second failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import TerminationSignal

        error: BaseException | None = record.exc_info[1] if record.exc_info else None
        seen = 0
        while error is not None and seen < 20:
            if isinstance(error, TerminationSignal):
                return False
            error, seen = error.__context__ or error.__cause__, seen + 1
        return True


def quiet_cancellation() -> None:
    """Drop the interrupted libraries' tracebacks of a cancelled run from this process's log
    handlers (Prefect's console among them), once."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Cancellation) for f in handler.filters):
            handler.addFilter(_Cancellation())
