"""The real DVC pipeline in a fresh copy of the repository: reproducibility, no-op re-runs,
experiments, metrics and plots, and a push/pull round trip through a local remote."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, copy_of_repo, git_env, sh
from pipelines.core.storage import file_md5

pytestmark = pytest.mark.slow

OUTPUTS = ["data/interim/clean.parquet", "data/processed/train.parquet", "models/model.skops", "models/model.json"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files (as a fresh clone has them) in a new git repo, after `dvc repro`."""
    root = copy_of_repo(tmp_path_factory.mktemp("clone") / "loopline")
    sh("dvc", "repro", cwd=root)
    return root


def test_repro_matches_committed_lock_and_metrics(clone):
    assert (clone / "dvc.lock").read_text() == (REPO / "dvc.lock").read_text()
    assert json.loads((clone / "models/metrics.json").read_text()) == json.loads(
        (REPO / "models/metrics.json").read_text()
    )
    assert sh("git", "status", "--porcelain", cwd=clone).strip() == ""


def test_second_repro_is_a_no_op(clone):
    out = sh("dvc", "repro", cwd=clone)
    assert "Data and pipelines are up to date" in out
    assert "Running stage" not in out


def test_metrics_and_plots(clone):
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=clone))
    shown = json.dumps(metrics)
    assert "rmse" in shown and "baseline_rmse" in shown
    sh("dvc", "plots", "show", "-o", "plots_html", cwd=clone)
    page = (clone / "plots_html" / "index.html").read_text()
    assert "Predicted vs actual" in page and "Residuals" in page


def test_push_pull_round_trip(clone, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "modify", "--local", "local", "url", str(remote), cwd=clone)
    before = {p: file_md5(clone / p) for p in OUTPUTS}
    sh("dvc", "push", cwd=clone)
    assert any(remote.rglob("*")), "nothing was pushed"
    shutil.rmtree(clone / ".dvc" / "cache")
    for p in OUTPUTS:
        (clone / p).unlink()
    sh("dvc", "pull", cwd=clone)
    assert {p: file_md5(clone / p) for p in OUTPUTS} == before
    assert "up to date" in sh("dvc", "status", cwd=clone)


def test_experiment_variant_and_params_diff(clone):
    sh("dvc", "exp", "run", "-S", "train.model=linear", cwd=clone)
    diff = sh("dvc", "params", "diff", "--json", cwd=clone)
    assert "linear" in diff and "hist_gradient_boosting" in diff
    metrics = json.loads((clone / "models/metrics.json").read_text())
    committed = json.loads((REPO / "models/metrics.json").read_text())
    assert metrics["test"]["rmse"] != committed["test"]["rmse"]
    assert metrics["test"]["rmse"] < metrics["test"]["baseline_rmse"]
    exps = sh("dvc", "exp", "show", "--json", cwd=clone)
    assert "linear" in exps
    # The manual's invocation, as docs/guides/pipeline.md writes it: metrics and what varies, no hashes.
    documented = next(
        line.split("#")[0].strip()
        for line in (REPO / "docs" / "guides" / "pipeline.md").read_text().splitlines()
        if line.startswith("dvc exp show --only-changed")
    )
    header = sh(*shlex.split(documented), "--csv", cwd=clone).splitlines()[0].split(",")
    shown = [c for c in header if c not in ("Experiment", "rev", "typ", "parent", "State", "Executor")]
    assert shown[0] == "test.mae" and "test.rmse" in shown and "train.model" in shown, shown
    assert not [c for c in shown if "/" in c or c in ("params.yaml", "Created")], shown


def test_torch_experiment_runs_through_the_same_stages(clone):
    sh(
        "dvc",
        "exp",
        "run",
        "-S",
        "train.model=torch_mlp",
        "-S",
        "train.hyperparams.torch_mlp.epochs=8",
        "-S",
        "train.hyperparams.torch_mlp.device=cpu",
        cwd=clone,
    )
    meta = json.loads((clone / "models/model.json").read_text())
    metrics = json.loads((clone / "models/metrics.json").read_text())
    assert meta["family"] == "torch_mlp"
    assert metrics["test"]["rmse"] < metrics["test"]["baseline_rmse"]


def test_malformed_params_fail_before_any_output_is_removed(clone):
    """DVC removes a stage's outputs before running it: a params file that only the split
    stage would refuse used to leave data/processed/ deleted."""
    kept = OUTPUTS + ["data/processed/val.parquet", "data/processed/test.parquet", "models/metrics.json"]
    before = {p: file_md5(clone / p) for p in kept}
    original = (clone / "params.yaml").read_text()
    assert "val_fraction: 0.15" in original
    (clone / "params.yaml").write_text(original.replace("val_fraction: 0.15", "val_fraction: 2"))
    proc = subprocess.run(["dvc", "repro"], cwd=clone, env=git_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "split.val_fraction" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    assert {p: file_md5(clone / p) for p in kept} == before
    (clone / "params.yaml").write_text(original)
    sh("dvc", "repro", cwd=clone)
    assert {p: file_md5(clone / p) for p in kept} == before


def test_code_edits_rerun_exactly_the_stages_whose_code_changed_and_those_downstream(clone):
    """dvc.yaml lists each stage's code as its function imports it: an edit to alert text
    touches no stage; an edit that changes what clean writes re-runs clean and what reads it,
    never params or ingest. The stages run the clone's own code (PYTHONPATH)."""

    def dvc(*args: str) -> str:
        env = {**git_env(), "PYTHONPATH": str(clone)}
        proc = subprocess.run(["dvc", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    dvc("repro")  # whatever the tests before left, up to date
    before = (clone / "dvc.lock").read_text()
    alerts = clone / "pipelines" / "core" / "alerts.py"
    alerts.write_text(alerts.read_text().replace('"""', '"""Edited text. ', 1))
    assert "Data and pipelines are up to date" in dvc("status")

    clean = clone / "pipelines" / "data" / "clean.py"
    original = clean.read_text()
    # Clean now drops the first row: its output changes, and so does everything after it.
    clean.write_text(
        original
        + "\n\n_clean_rows = clean_rows\n\n\ndef clean_rows(rows, *args, **kwargs):\n"
        + "    return _clean_rows(rows.slice(1), *args, **kwargs)\n"
    )
    status = dvc("status", "--json")
    assert set(json.loads(status)) == {"clean"}, status  # only clean's own deps changed
    out = dvc("repro")
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["clean", "validate", "split", "train", "evaluate"], out
    clean.write_text(original)
    sh("git", "checkout", "--", "pipelines/core/alerts.py", cwd=clone)
    dvc("repro")
    assert (clone / "dvc.lock").read_text() == before
