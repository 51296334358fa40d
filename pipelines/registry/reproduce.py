"""`loopline reproduce VERSION`: rebuild a registered model from its own lineage and say
whether it came out the same.

- the code: the git commit tagged on its run, checked out in a temporary worktree;
- the data: what dvc.lock at that commit records, checked out from the DVC cache or pulled
  from the remote, and compared with the clean-data md5 the run recorded;
- the params and seeds: the params file at that commit, and the family and
  hyperparameters the registered model's metadata records;
- the fit: the commit's own code, in a child process run in the worktree
  (`python -m pipelines.registry.reproduce refit ...`, or `pipelines.reproduce` at a commit
  of the flat layout), on the checked-out training rows;
- the verdict: `identical` when the rebuilt model's predictions on the test rows equal the
  registered model's, bit for bit; otherwise what differs, and the reasons found (a dirty
  tree at training time, other data, other library versions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipelines.core import names
from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

STAGE = "reproduce"
# Predictions within this of the registered ones (relative, and absolute near 0) are the same
# model computed another way: a float summed in another order. Both models predict on one
# thread here, so a rebuild on this machine is compared bit for bit first.
TOLERANCE = 1e-9
REBUILT = ("identical", "identical within tolerance")  # the verdicts `loopline reproduce` exits 0 on


@dataclass(frozen=True)
class Reproduction:
    name: str
    version: str
    # identical: the same predictions, bit for bit, from the recorded commit, data and params;
    # identical within tolerance: every prediction within TOLERANCE of the registered one, not
    # bit for bit (the matched line says how many rows differ and by how much); same
    # predictions, lineage incomplete: the same model, but the commit or data version does not
    # hold all of it
    verdict: Literal[
        "identical", "identical within tolerance", "same predictions, lineage incomplete", "different", "not rebuilt"
    ]
    commit: str
    matched: list[str] = field(default_factory=list)  # what was checked and is the same
    differences: list[str] = field(default_factory=list)  # what differs, and why where known
    rows: int = 0
    max_abs_diff: float | None = None

    def render(self) -> str:
        lines = [f"{self.name} v{self.version} from commit {self.commit}: {self.verdict}"]
        lines += [f"  same: {m}" for m in self.matched]
        lines += [f"  differs: {d}" for d in self.differences]
        return "\n".join(lines)


def _run(args: list[str], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _dvc() -> str:
    from pipelines.core.processes import venv_bin

    return venv_bin("dvc")


def _remote_url(repo: Path) -> str | None:
    """The default DVC remote's URL as the repository resolves it (a relative path is
    relative to .dvc/), for the worktree to pull from."""
    name = _run([_dvc(), "config", "core.remote"], repo).stdout.strip()
    if not name:
        return None
    url = _run([_dvc(), "config", f"remote.{name}.url"], repo).stdout.strip()
    if url and "://" not in url and not Path(url).is_absolute():
        url = str((repo / ".dvc" / url).resolve())
    return url or None


def _checkout_data(repo: Path, tree: Path, stages: list[str]) -> str | None:
    """The stages' outputs as dvc.lock at the commit records them: from the repository's
    DVC cache, else pulled from its remote. None when they are there, else why not."""
    dvc = _dvc()
    _run([dvc, "config", "--local", "cache.dir", str((repo / ".dvc" / "cache").resolve())], tree)
    if _run([dvc, "checkout", "--quiet", *stages], tree).returncode == 0:
        return None
    url = _remote_url(repo)
    if url is None:
        return "the data is not in the DVC cache and no DVC remote is configured"
    name = _run([dvc, "config", "core.remote"], repo).stdout.strip()
    _run([dvc, "remote", "modify", "--local", name, "url", url], tree)
    pulled = _run([dvc, "pull", "--quiet", *stages], tree)
    if pulled.returncode != 0:
        said = (pulled.stderr or pulled.stdout).strip()[-500:]
        return (
            f"the data is neither in the DVC cache nor in the remote {url}: {_missing(tree, stages)}"
            + (f" ({said})" if said else "")
            + "; on the machine that trained it, `dvc commit "
            + " ".join(stages)
            + "` then `dvc push` keeps them"
        )
    return None


def _missing(tree: Path, stages: list[str]) -> str:
    """The stages' outputs dvc.lock at the commit records and this checkout lacks."""
    import yaml

    lock = yaml.safe_load((tree / "dvc.lock").read_text()) if (tree / "dvc.lock").is_file() else {}
    outs = [o for stage in stages for o in (lock or {}).get("stages", {}).get(stage, {}).get("outs", [])]
    gone = [f"{o['path']} (md5 {o.get('md5', '?')})" for o in outs if not (tree / o["path"]).exists()]
    return ", ".join(gone) or "the stages' outputs"


def _library_differences(recorded: str | None) -> list[str]:
    from pipelines.registry.lineage import libraries

    if not recorded:
        return ["the version recorded no library versions (trained before loopline tagged them)"]
    then, now = json.loads(recorded), json.loads(libraries())
    return [
        f"{lib} {then.get(lib, 'absent')} at training, {now.get(lib, 'absent')} now"
        for lib in sorted(then.keys() | now.keys())
        if then.get(lib) != now.get(lib)
    ]


def reproduce(params: Params, version: str, repo: Path | None = None) -> Reproduction:
    """Rebuild `version` of the params' model in a worktree of its commit and compare."""
    from pipelines.registry.champion import require_version
    from pipelines.registry.tracking import load_model_version, registry_client

    repo = (repo or Path.cwd()).resolve()
    client = registry_client(params)
    name = params.tracking.model_name
    mv = require_version(client, name, version, STAGE, params.tracking.uri)
    tags = client.get_run(mv.run_id).data.tags
    recorded = tags.get(names.GIT_COMMIT, "unknown")
    commit = recorded.removesuffix("-dirty")
    differences: list[str] = []
    if recorded.endswith("-dirty"):
        differences.append(
            f"the tree had uncommitted changes when v{version} was trained: commit {commit} is not all of its code"
        )
    if commit == "unknown":
        return Reproduction(name, version, "not rebuilt", recorded, differences=["its run recorded no git commit"])
    if _run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], repo).returncode != 0:
        return Reproduction(
            name, version, "not rebuilt", commit, differences=[f"commit {commit} is not in the repository at {repo}"]
        )
    model, meta = load_model_version(client, name, version)
    with tempfile.TemporaryDirectory(prefix="loopline-reproduce-") as tmp:
        tree = Path(tmp) / "tree"
        added = _run(["git", "worktree", "add", "--detach", "--quiet", str(tree), commit], repo)
        if added.returncode != 0:
            raise LooplineError(STAGE, f"git worktree add {commit} failed: {added.stderr.strip()}")
        try:
            return _rebuild(
                Reproduction(name, version, "not rebuilt", commit), tags, mv.tags, model, meta, repo, tree, differences
            )
        finally:
            _run(["git", "worktree", "remove", "--force", str(tree)], repo)


def _rebuild(
    base: Reproduction,
    tags: dict[str, str],
    version_tags: dict[str, str],
    model: Any,
    meta: dict[str, Any],
    repo: Path,
    tree: Path,
    differences: list[str],
) -> Reproduction:
    from dataclasses import replace

    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.core.storage import path_md5

    name, version, commit = base.name, base.version, base.commit

    def not_rebuilt(why: str) -> Reproduction:
        return replace(base, matched=matched, differences=[*differences, why])

    matched: list[str] = [f"code: commit {commit}"] if not differences else []
    params_file = Path(tags.get(names.PARAMS_FILE, "params.yaml"))
    if params_file.is_absolute():
        try:
            params_file = params_file.relative_to(repo)
        except ValueError:
            return not_rebuilt(f"its params file {params_file} is outside the repository, so no commit holds it")
    if not (tree / params_file).is_file():
        return not_rebuilt(f"commit {commit} has no {params_file}")
    then = load_params(tree / params_file)
    outside = [
        f"paths.{k} {v}" for k, v in (("data", then.paths.data), ("models", then.paths.models)) if v.is_absolute()
    ]
    if outside:  # DVC would check the old data out there, over the live files
        return not_rebuilt(f"{', '.join(outside)} is absolute: a rebuild in a worktree would write over the live files")
    missing = _checkout_data(repo, tree, ["clean", "split"])
    if missing is not None:
        return not_rebuilt(missing)
    layout = Layout.of(then)
    clean = tree / layout.clean
    if path_md5(clean) == tags.get(names.CLEAN_MD5):
        matched.append(f"data: clean rows md5 {tags[names.CLEAN_MD5]} (dvc.lock at the commit)")
    else:
        differences.append(
            f"data: dvc.lock at commit {commit} gives clean rows md5 {path_md5(clean)}, but v{version} was trained on "
            f"{tags.get(names.CLEAN_MD5)} (its data version was not committed with its code)"
        )
    out = tree / "reproduced.parquet"
    fitted = _run(
        [
            sys.executable,
            "-m",
            refit_module(tree),
            "refit",
            str(params_file),
            meta["family"],
            json.dumps(meta["hyperparams"]),
            str(out),
        ],
        tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    if fitted.returncode != 0:
        why = (fitted.stderr or fitted.stdout).strip()[-800:]
        if "No module named pipelines" in why and "reproduce" in why:
            why = f"commit {commit} predates `loopline reproduce` (no pipelines/reproduce.py)"
        return not_rebuilt(f"the refit failed: {why}")
    matched.append(f"params: {params_file} at the commit; {meta['family']} with the recorded hyperparameters")
    test = pd.read_parquet(tree / layout.split_file("test"))
    registered = np.asarray(predict_on_one_thread(model, test[meta["features"]]))
    rebuilt = pd.read_parquet(out)["prediction"].to_numpy()
    libraries = _library_differences(version_tags.get(names.LIBRARIES))
    same_shape = registered.shape == rebuilt.shape
    if same_shape and np.array_equal(registered, rebuilt):
        matched.append(f"predictions: all {len(test)} test rows, bit for bit")
        return Reproduction(
            name,
            version,
            "same predictions, lineage incomplete" if differences else "identical",
            commit,
            matched,
            differences + [f"(no effect) {d}" for d in libraries],
            len(test),
            0.0,
        )
    numeric = registered.dtype.kind in "fiu" and rebuilt.dtype.kind in "fiu"
    gap = float(np.max(np.abs(registered.astype(float) - rebuilt.astype(float)))) if numeric and same_shape else None
    unequal = int((registered != rebuilt).sum()) if same_shape else len(test)
    bitwise = f"{unequal} of {len(test)} test rows differ" + (f" (largest gap {gap:.3g})" if gap is not None else "")
    if numeric and same_shape and np.allclose(rebuilt, registered, rtol=TOLERANCE, atol=TOLERANCE) and not differences:
        matched.append(f"predictions: all {len(test)} test rows within {TOLERANCE:g}; bit for bit, {bitwise}")
        return Reproduction(
            name,
            version,
            "identical within tolerance",
            commit,
            matched,
            [f"(no effect) {d}" for d in libraries],
            len(test),
            gap,
        )
    differences.append(f"predictions: {bitwise}")
    differences += libraries or [
        "library versions: the same as at training (numpy, pandas, scikit-learn, torch, skops)"
    ]
    return Reproduction(name, version, "different", commit, matched, differences, len(test), gap)


def predict_on_one_thread(model: Any, rows: pd.DataFrame) -> Any:
    """Predictions that do not depend on how threads are scheduled: a forest's trees are
    summed in the order its threads finish, so with n_jobs > 1 two runs differ in the last
    bits; on one thread (and one native thread) the sum has one order."""
    from threadpoolctl import threadpool_limits

    estimator = model[-1] if hasattr(model, "steps") else model
    jobs = estimator.get_params().get("n_jobs") if hasattr(estimator, "get_params") else None
    if jobs not in (None, 1):
        estimator.set_params(n_jobs=1)
    try:
        with threadpool_limits(limits=1):
            return model.predict(rows)
    finally:
        if jobs not in (None, 1):
            estimator.set_params(n_jobs=jobs)


def refit_module(tree: Path) -> str:
    """The module that refits at a commit, by that commit's layout: commits before
    pipelines/ had its parts ran `python -m pipelines.reproduce`, and still can."""
    return "pipelines.reproduce" if (tree / "pipelines" / "reproduce.py").is_file() else "pipelines.registry.reproduce"


def refit(params_path: str, family: str, hyperparams: dict[str, Any], out: str) -> None:
    """In the worktree, with its code: fit the family on the training rows and write its
    predictions on the test rows."""
    from pipelines.core.config import load_params
    from pipelines.data.split import read_split
    from pipelines.model.estimators import build_model, fit_model

    params = load_params(params_path)
    train, test = (read_split(params, split, STAGE) for split in ("train", "test"))
    model = fit_model(build_model(params, family, hyperparams), train, params)
    predictions = predict_on_one_thread(model, test[params.features.columns])
    pd.DataFrame({"prediction": predictions}).to_parquet(out)


if __name__ == "__main__":  # python -m pipelines.registry.reproduce refit PARAMS FAMILY HYPERPARAMS_JSON OUT
    _, command, params_path, family, hyperparams, out = sys.argv
    assert command == "refit", command
    refit(params_path, family, json.loads(hyperparams), out)
