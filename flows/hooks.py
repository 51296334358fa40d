"""Flow state hooks: a failed training or monitoring run is an alert (`alerts:` in params)."""

from __future__ import annotations


def alert_failed_run(flow, flow_run, state) -> None:
    """Prefect's on_failure hook: tell the `alerts:` targets which run failed and why. The
    params are read again here; a params file that does not load has no targets to tell."""
    from pipelines.alerts import Alert, send
    from pipelines.config import load_params
    from pipelines.errors import LooplineError

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
