"""`loopline reproduce` on versions trained here, in a real git + DVC repository: a version
trained from a clean tree whose data version is committed is rebuilt identical; one whose
data is in neither the DVC cache nor the remote, or whose tree was dirty, says so."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import copy_of_repo, git_env, loopline_process, sh

pytestmark = pytest.mark.slow


def small_search(root: Path) -> None:
    """A random forest that predicts on two threads: its trees' sum comes in the order the
    threads finish, so only a one-thread comparison gives the same bits every time."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["search"] = {"families": ["random_forest"], "n_trials": 0}
    raw["train"]["hyperparams"]["random_forest"] = {"n_estimators": 40, "min_samples_leaf": 2, "n_jobs": 2}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def repo(prefect_api, tmp_path_factory):
    """A clone whose commit holds its dvc.lock data version, and v1 trained from it (clean)."""
    root = copy_of_repo(tmp_path_factory.mktemp("reproduce") / "loopline", edit=small_search)
    sh("dvc", "repro", "split", cwd=root)
    sh("git", "commit", "-qam", "the data version of the splits", cwd=root)
    env = {**git_env(), "PREFECT_API_URL": prefect_api}
    env.pop("MLFLOW_TRACKING_URI", None)
    trained = loopline_process("train", env=env, cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "v1: promoted to champion" in trained.stdout
    return root, env


def test_a_clean_tree_version_is_rebuilt_identical(repo):
    root, env = repo
    done = loopline_process("reproduce", "1", env=env, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    head = sh("git", "rev-parse", "HEAD", cwd=root).strip()
    lines = done.stdout.splitlines()
    assert lines[0] == f"bikeshare-demand v1 from commit {head}: identical"
    assert f"  same: code: commit {head}" in lines
    assert any(line.startswith("  same: data: clean rows md5 ") for line in lines)
    assert any(line.startswith("  same: predictions: all ") and "bit for bit" in line for line in lines), lines
    assert not any("differs" in line for line in lines)
    again = loopline_process("reproduce", "1", env=env, cwd=root)  # the same verdict every time
    assert again.returncode == 0 and again.stdout == done.stdout
    assert sh("git", "worktree", "list", cwd=root).count("\n") == 1  # the temporary worktree is gone


def test_data_in_neither_the_cache_nor_the_remote_is_named(repo, tmp_path):
    root, env = repo
    shutil.move(root / ".dvc" / "cache", tmp_path / "cache")
    try:
        done = loopline_process("reproduce", "1", env=env, cwd=root)
    finally:
        shutil.move(tmp_path / "cache", root / ".dvc" / "cache")
    assert done.returncode == 1
    assert ": not rebuilt" in done.stdout.splitlines()[0]
    assert "the data is neither in the DVC cache nor in the remote" in done.stdout, done.stdout
    # which files, and what brings them
    assert "data/interim/clean.parquet (md5 " in done.stdout and "`dvc push`" in done.stdout, done.stdout


def test_a_version_trained_from_a_dirty_tree_says_so(repo):
    root, env = repo
    params = root / "params.yaml"
    clean = params.read_text()
    params.write_text(clean.replace("n_estimators: 40", "n_estimators: 30"))  # uncommitted: v2 is trained from it
    try:
        trained = loopline_process("train", env=env, cwd=root)
        assert trained.returncode == 0 and "v2:" in trained.stdout, trained.stderr[-3000:]
        done = loopline_process("reproduce", "2", env=env, cwd=root)
    finally:
        params.write_text(clean)
    assert done.returncode == 1 and done.stdout.splitlines()[0].endswith(": same predictions, lineage incomplete")
    assert "differs: the tree had uncommitted changes when v2 was trained" in done.stdout, done.stdout
    assert f"commit {sh('git', 'rev-parse', 'HEAD', cwd=root).strip()}" in done.stdout
    assert os.path.isdir(root / ".dvc" / "cache")


def test_a_commit_whose_params_write_outside_the_tree_is_not_rebuilt_and_touches_nothing(repo, tmp_path):
    """A commit whose paths.data is absolute would have DVC check the old data out over the
    live files: refused before any checkout."""
    from conftest import client_of
    from pipelines.core.storage import file_md5

    root, env = repo
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["paths"] = {"data": str(root / "data"), "models": str(root / "models")}
    (tmp_path / "absolute.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    head = sh("git", "rev-parse", "HEAD", cwd=root).strip()
    sh("git", "checkout", "-q", "-b", "absolute", cwd=root)
    shutil.copy2(tmp_path / "absolute.yaml", root / "params.yaml")
    sh("git", "commit", "-qam", "absolute paths", cwd=root)
    absolute = sh("git", "rev-parse", "HEAD", cwd=root).strip()
    sh("git", "checkout", "-q", head, cwd=root)
    live = {p: file_md5(p) for p in (root / "data" / "processed").glob("*.parquet")}
    client = client_of(root)
    run_id = client.get_model_version("bikeshare-demand", "1").run_id
    client.set_tag(run_id, "git_commit", absolute)  # as if v1 had been trained from that commit
    try:
        done = loopline_process("reproduce", "1", env=env, cwd=root)
    finally:
        client.set_tag(run_id, "git_commit", head)
    assert done.returncode == 1 and ": not rebuilt" in done.stdout.splitlines()[0]
    assert f"paths.data {root / 'data'}" in done.stdout and "would write over the live files" in done.stdout
    assert {p: file_md5(p) for p in live} == live
