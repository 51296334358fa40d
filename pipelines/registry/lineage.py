"""Lineage: where a model's code and data came from (the git commit, the versions of the
libraries that fitted it, the data version dvc.lock records) and the DVC commit that pins a
retrain's data version."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.core.errors import LooplineError


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return f"{commit}-dirty" if dirty and commit != "unknown" else commit


def libraries() -> str:
    """The versions of what fits and runs a model, as JSON (tagged on every registered version)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("numpy", "pandas", "scikit-learn", "torch", "skops"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return json.dumps(found, sort_keys=True)


def dvc_lock_md5(path: Path, dvc_lock: str | Path = "dvc.lock") -> str | None:
    """The md5 that dvc.lock records for `path` as a stage output, if any."""
    lock = Path(dvc_lock)
    if not lock.is_file():
        return None
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == path:
                return out.get("md5")
    return None


def commit_data_version(
    params_path: str | Path, stage_names: list[str], dataset: Path, root: Path | None = None
) -> str:
    """Record the named stages' current outputs in dvc.lock and the DVC cache, so the data
    version is pinned and `dvc push` keeps it; reports the md5 dvc.lock now has for `dataset`. Only in the DVC workspace whose dvc.yaml reads
    this params file (params.yaml at the root); elsewhere it says why it did nothing."""
    root = root or Path.cwd()
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return f"not recorded: {root} is not a DVC workspace"
    if Path(params_path).resolve() != (root / "params.yaml").resolve():
        return f"not recorded: dvc.yaml reads {root / 'params.yaml'}, not {params_path}"
    from pipelines.core.processes import venv_bin

    proc = subprocess.run(
        [venv_bin("dvc"), "commit", "--force", "--quiet", *stage_names],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise LooplineError(
            "lineage", f"dvc commit {' '.join(stage_names)} failed: {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return f"recorded in dvc.lock: {dataset} md5 {dvc_lock_md5(dataset, root / 'dvc.lock')}"
