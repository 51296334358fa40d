"""`make run`, the README's first command, as a new user meets it: in two clones of the
project on one machine (one Prefect home, as `~/.prefect` is, one BENTOML_HOME), and after
the MLflow store is deleted. Each run must train into its own store, register a champion there,
and end with a prediction from the packaged Bento."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_of_repo, own_prefect_home, sh

pytestmark = pytest.mark.slow

VENV = Path(sys.executable).parents[1]


def small_search(root: Path) -> None:
    """A one-family search, so the test is quick."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["search"] = {"families": ["linear"], "n_trials": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def clone(root: Path) -> Path:
    """A fresh clone whose commit's dvc.lock records its (edited) params file, as a commit would."""
    copy_of_repo(root, small_search)  # mtimes kept: make finds the shared venv up to date
    sh("dvc", "commit", "--force", "--quiet", "params", cwd=root)
    sh("git", "commit", "-qam", "dvc.lock records the params file", cwd=root)
    return root


def make_run(root: Path, bentoml_home: Path, api_url: str | None) -> subprocess.CompletedProcess:
    # A new user's shell: one Prefect home for both clones (their ~/.prefect, not this test
    # worker's, where a Prefect server and a warm process run), nothing set that loopline
    # should set for itself.
    env = own_prefect_home({**os.environ, "BENTOML_HOME": str(bentoml_home)}, bentoml_home.parent / "prefect-home")
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED", "BENTOML_DO_NOT_TRACK", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        ["make", "--no-print-directory", "run", f"VENV={VENV}", "-o", f"{VENV}/.installed"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def champion_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"make run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    assert re.search(r"^-> \{\"prediction\": [0-9.]+", proc.stdout, re.M), proc.stdout[-3000:]
    return proc.stdout


def test_make_run_in_two_clones_and_after_the_store_is_removed(prefect_api, tmp_path):
    a, b = clone(tmp_path / "a"), clone(tmp_path / "b")
    bentoml_home = tmp_path / "bentoml"

    started = make_run(a, bentoml_home, api_url=None)  # the temporary API, as a new user has it
    first = champion_line(started)
    assert "bikeshare-demand v1: promoted to champion" in first
    assert "telemetry" not in started.stderr.lower(), started.stderr[-3000:]
    # The flow put its data version in the DVC cache, changed nothing git tracks, staged nothing,
    # and the first version rebuilds identical right away (the README's next step).
    assert sh("git", "status", "--porcelain", "--untracked-files=no", cwd=a) == ""
    rebuilt = subprocess.run(
        [str(VENV / "bin" / "loopline"), "reproduce", "1"], cwd=a, capture_output=True, text=True, timeout=600
    )
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr[-3000:]
    assert rebuilt.stdout.splitlines()[0].endswith(": identical"), rebuilt.stdout
    print(rebuilt.stdout)
    # (a second `make run` in the same clone skips training: the flow's skip is tested in
    # test_training_flow; the Bento built again in one BENTOML_HOME is the runs below)

    other = champion_line(make_run(b, bentoml_home, prefect_api))
    assert "bikeshare-demand v1: promoted to champion" in other, other[-3000:]
    assert (b / "data" / "cache").is_dir() and (a / "data" / "cache").is_dir()

    shutil.rmtree(b / "mlruns")
    (b / "mlflow.db").unlink()
    rebuilt = champion_line(make_run(b, bentoml_home, prefect_api))
    assert "bikeshare-demand v1: promoted to champion" in rebuilt, rebuilt[-3000:]


def test_smoke_step_without_a_champion_prints_one_line(tmp_path):
    """The end of `make run` when there is nothing to package: one line, exit 2."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"] = {
        **params["tracking"],
        "uri": f"sqlite:///{tmp_path}/mlflow.db",
        "artifact_root": str(tmp_path / "mlruns"),
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "serving.smoke", "--params", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: registry: tracking store {tmp_path / 'mlflow.db'} does not exist (tracking.uri); train a model "
        "first (`loopline train`) or point tracking.uri at the store"
    ]
    assert not (tmp_path / "mlflow.db").exists()
