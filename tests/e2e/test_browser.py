"""The loop as a person looks at it, in headless Chromium (Debian's, driven by Playwright; no
browser download): the MLflow UI run page of a registered version with its model card, the
Evidently dashboard after a replay with its panels drawn from data points, and BentoML's
/docs listing /predict. Real servers, started by loopline's own commands.

Runs wherever a Chromium is found (`make browser-deps` installs Debian's; CI does) and skips
saying so elsewhere. By default a two-month replay feeds the pages; LOOPLINE_REPLAY names a
finished replay's work directory instead (`make screenshots` after `make replay`), and
LOOPLINE_SCREENSHOTS a folder to keep the screenshots in (the README's come from there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, free_port, raw_params, stop, venv_bin, wait_for_http

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (p for p in (os.environ.get("LOOPLINE_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")) if p),
    None,
)
if CHROMIUM is None:
    pytest.skip(
        "no Chromium found (run `make browser-deps`, or set LOOPLINE_CHROMIUM): browser tests skipped",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def replay(prefect_api, tmp_path_factory) -> Path:
    """A replay's params file: the one named by LOOPLINE_REPLAY, or a two-month replay made here."""
    from flows.replay import run_replay

    if os.environ.get("LOOPLINE_REPLAY"):
        path = (REPO / os.environ["LOOPLINE_REPLAY"] / "params.yaml").resolve()
        assert path.is_file(), f"{path} not found: run `make replay` first"
        return path
    tmp = tmp_path_factory.mktemp("browser")
    raw = raw_params()
    raw["monitor"] = {"workspace": str(tmp / "workspace")}
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cwd = Path.cwd()
    os.chdir(REPO)  # `loopline serve` imports serving.service from here
    try:
        run_replay(tmp / "replay", tmp / "params.yaml", "month", train_months=3, periods=2, echo=lambda s: None)
    finally:
        os.chdir(cwd)
    return tmp / "replay" / "params.yaml"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    yield page
    page.close()


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("LOOPLINE_SCREENSHOTS")
    if keep:
        (REPO / keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, REPO / keep / path.name)
    assert path.stat().st_size > 10_000
    return path


def server(args: list[str], url: str, tmp_path: Path) -> subprocess.Popen:
    log = open(tmp_path / f"{args[0]}.log", "w")  # noqa: SIM115  (the server writes it until stopped)
    proc = subprocess.Popen(
        [venv_bin("loopline"), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
    )
    try:
        wait_for_http(url, timeout=120, proc=proc)
    except Exception:
        stop(proc)
        raise RuntimeError((tmp_path / f"{args[0]}.log").read_text()[-3000:]) from None
    return proc


def test_mlflow_ui_lists_the_model_card_of_a_registered_version(replay, page, tmp_path):
    from pipelines.core.config import load_params
    from pipelines.registry.tracking import registry_client

    params = load_params(replay)
    client = registry_client(params)
    name = params.tracking.model_name
    version = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(version.run_id)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = server(["mlflow-ui", "--params", str(replay), "--port", str(port)], f"{url}/health", tmp_path)
    try:
        page.goto(f"{url}/#/models/{name}/versions/{version.version}")
        page.get_by_text(f"Version {version.version}").first.wait_for(timeout=60_000)
        assert run.info.run_id in page.content() or page.get_by_text(run.info.run_name).count()
        page.goto(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/card/model_card.md")
        page.get_by_text("model_card.md").first.wait_for(timeout=60_000)
        page.get_by_text(f"Model card: {name} v{version.version}").first.wait_for(timeout=60_000)
        for listed in ("slices.png", "slices.json", "model_card.md"):
            assert page.get_by_text(listed).count() >= 1, listed
        assert "Metrics by slice" in page.inner_text("body")
        shot(page, tmp_path, "mlflow-model-card")
    finally:
        stop(proc)


def test_evidently_dashboard_draws_the_replay(replay, page, tmp_path):
    from evidently.ui.workspace import Workspace

    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout

    params = load_params(replay)
    workspace = Layout.of(params).workspace
    [project] = Workspace(str(workspace)).search_project(params.tracking.model_name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = server(["dashboard", "--params", str(replay), "--port", str(port)], url, tmp_path)
    try:
        page.goto(f"{url}/projects/{project.id}")
        page.get_by_text(f"{params.tracking.model_name}: the monitoring loop").wait_for(timeout=60_000)
        periods = len(pd.read_csv(replay.parent / "timeline.csv"))  # one monitoring run per period
        # each line panel: a point per monitoring run for every series it has (MUI X charts)
        for title, series in (
            ("Drift share", 3),
            ("Prediction drift", 1),
            (f"Live {params.metric[0]} against the champion's test {params.metric[0]}", 4),
        ):
            card = page.locator(".MuiCard-root").filter(has=page.get_by_text(title, exact=True))
            card.locator(".MuiMarkElement-root").nth(series * periods - 1).wait_for(timeout=60_000)
            assert card.locator(".MuiMarkElement-root").count() == series * periods, title
            assert "2011-" in card.inner_text(), title  # the replay's own dates on the time axis
        decisions = page.locator(".MuiCard-root").filter(has=page.get_by_text("Decisions", exact=True))
        assert decisions.locator(".MuiBarElement-root").count() >= periods
        retrains = page.locator(".MuiCard-root").filter(has=page.get_by_text("Retrains started", exact=True))
        started = int((pd.read_csv(replay.parent / "timeline.csv")["decision"] == "retrain").sum())
        assert retrains.inner_text().split() == ["Retrains", "started", str(started), "retrains"]
        shot(page, tmp_path, "evidently-dashboard")
    finally:
        stop(proc)


def test_bentoml_docs_list_predict(replay, page, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = server(["serve", "--params", str(replay), "--port", str(port)], f"{url}/readyz", tmp_path)
    try:
        page.goto(f"{url}/docs")
        page.get_by_text("/predict_batch").first.wait_for(timeout=60_000)
        body = page.inner_text("body")
        assert "/predict" in body.replace("/predict_batch", "") and "/readyz" in body
        shot(page, tmp_path, "bentoml-docs")
    finally:
        stop(proc)
