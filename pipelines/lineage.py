"""Content fingerprints and lineage: what a result was made from.

`dvc.yaml` is the one declaration of each stage's inputs (deps and params). The training
flow keys its task cache on the same declaration, so "unchanged" means the same thing to
`dvc repro` and to `loopline train`: same input bytes, same params, same stage code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import Params
from pipelines.errors import LooplineError
from pipelines.storage import file_md5

_VAR = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class StageSpec:
    deps: list[Path]
    params: list[str]
    outs: list[Path]


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _params_tree(params: Params) -> dict[str, Any]:
    return params.model_dump(mode="json", by_alias=True)


def _entries(items: list) -> list[str]:
    """dvc.yaml lists entries as strings or as one-key mappings (a path with options)."""
    names: list[str] = []
    for item in items or []:
        names.extend(item if isinstance(item, dict) else [item])
    return names


def dvc_stage(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> StageSpec:
    """A stage of dvc.yaml with its ${...} references filled in from `params`."""
    path = Path(dvc_yaml)
    if not path.is_file():
        raise LooplineError("lineage", f"{path} not found; run loopline from the repository root")
    entry = yaml.safe_load(path.read_text())["stages"][stage]
    tree = _params_tree(params)

    def fill(text: str) -> str:
        return _VAR.sub(lambda m: str(_lookup(tree, m.group(1))), text)

    outs = [Path(fill(o)) for key in ("outs", "metrics", "plots") for o in _entries(entry.get(key))]
    return StageSpec(
        deps=[Path(fill(d)) for d in entry.get("deps", [])], params=list(entry.get("params", [])), outs=outs
    )


def path_md5(path: Path) -> str:
    """md5 of a file, or of a directory's file names and contents ('missing' if neither)."""
    if path.is_file():
        return file_md5(path)
    if path.is_dir():
        digest = hashlib.md5()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}:{file_md5(f)}\n".encode())
        return digest.hexdigest()
    return "missing"


def fingerprint(deps: list[Path], param_keys: list[str], params: Params, salt: str = "") -> str:
    """A hash of the input files' bytes (directories: every file below) and the named params values."""
    tree = _params_tree(params)
    digest = hashlib.sha256(salt.encode())
    for dep in deps:
        digest.update(f"{dep}:{path_md5(dep)}\n".encode())
    for key in param_keys:
        digest.update(f"{key}={json.dumps(_lookup(tree, key), sort_keys=True)}\n".encode())
    return digest.hexdigest()


def code_files(module: str) -> list[Path]:
    """The source files of a `pipelines` module and of every `pipelines` module it imports,
    at the top or inside a function, directly or through others: the code its results
    depend on, found from the module itself, never from a list kept by hand. Paths are
    relative to the repository root, as dvc.yaml's are."""
    import ast

    package = Path(__file__).resolve().parent
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or not (package.parent / f"{name.replace('.', '/')}.py").is_file():
            continue
        found[name] = Path(f"{name.replace('.', '/')}.py")
        tree = ast.parse((package.parent / found[name]).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] == package.name]
    return sorted(found.values())


def stage_fingerprint(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """Fingerprint of a dvc.yaml stage's inputs."""
    spec = dvc_stage(stage, params, dvc_yaml)
    return fingerprint(spec.deps, spec.params, params, salt=stage)


def stage_outputs_exist(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> bool:
    """False when an output was deleted: a cached result must not stand in for it then."""
    return all(out.exists() for out in dvc_stage(stage, params, dvc_yaml).outs)


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
    dvc = Path(sys.executable).with_name("dvc")
    proc = subprocess.run(
        [str(dvc) if dvc.is_file() else "dvc", "commit", "--force", "--quiet", *stage_names],
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
