"""Caches that follow the code: dvc.yaml's code dependencies are what each stage's function
imports, and the training fingerprint covers the code that fits a model, nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, copy_of_repo, write_params
from pipelines.core.fingerprint import PARAMS_MODULE, code_files, stage_code
from pipelines.core.stages import STAGES


def test_dvc_yaml_lists_each_stage_with_exactly_the_code_its_function_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES), "dvc.yaml's stages and pipelines/core/stages.py's table differ"
    for name, stage in stages.items():
        listed = sorted(d for d in stage["deps"] if isinstance(d, str) and d.startswith("pipelines/"))
        found = [str(p) for p in stage_code(name)]
        assert listed == found, (
            f"dvc.yaml stage {name}: add {sorted(set(found) - set(listed))}, remove {sorted(set(listed) - set(found))}"
        )
        assert stage["cmd"] == f"loopline stage {name}"


def test_a_stage_is_its_function_not_its_whole_module():
    clean = {str(p) for p in stage_code("clean")}
    assert "pipelines/data/stages.py" in clean and "pipelines/data/clean.py" in clean
    assert "pipelines/data/validate.py" not in clean and "pipelines/data/ingest.py" not in clean
    assert "pipelines/core/config.py" not in clean  # params enter by value (dvc.yaml's params:)
    assert "pipelines/core/config.py" in {str(p) for p in stage_code("params")}  # the stage that checks them
    train = {str(p) for p in stage_code("train")}
    assert {"pipelines/model/estimators.py", "pipelines/model/features.py", "pipelines/model/io.py"} <= train
    assert "pipelines/model/evaluation.py" not in train


def test_the_search_code_holds_what_fits_and_scores_and_nothing_that_logs_or_tells():
    searched = {str(p) for p in code_files("pipelines.training.search", skip=(PARAMS_MODULE,))}
    assert {
        "pipelines/model/estimators.py",
        "pipelines/model/torch_model.py",
        "pipelines/training/runners.py",
    } <= searched
    for outside in ("alerts", "progress", "names"):
        assert f"pipelines/core/{outside}.py" not in searched
    assert not any(p.startswith(("pipelines/registry/", "pipelines/monitoring/")) for p in searched), searched


FINGERPRINT = """
import sys
sys.path.insert(0, {root!r})
from pipelines.core.config import load_params
from pipelines.training.run import training_fingerprint
print(training_fingerprint(load_params({params!r})))
"""


def _fingerprint(root: Path, params: Path) -> str:
    """The training fingerprint as the code in `root` computes it (the search's cache key)."""
    proc = subprocess.run(
        [sys.executable, "-c", FINGERPRINT.format(root=str(root), params=str(params))],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_edits_to_alert_or_card_text_keep_the_search_cached_and_an_estimator_edit_does_not(tmp_path, sample_csv):
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_stage

    params = write_params(tmp_path, sample_csv)
    for stage in ("params", "ingest", "clean", "validate", "split"):
        run_stage(stage, load_params(params))

    def edited(name: str, path: str, old: str, new: str) -> str:
        def edit(root: Path) -> None:
            text = (root / path).read_text()
            assert old in text, (path, old)
            (root / path).write_text(text.replace(old, new, 1))

        return _fingerprint(copy_of_repo(tmp_path / name, edit), params)

    today = _fingerprint(copy_of_repo(tmp_path / "as-is"), params)
    assert edited("alert", "pipelines/core/alerts.py", '"""', '"""A new word. ') == today
    assert edited("card", "pipelines/registry/card.py", "## ", "## New heading text: ") == today
    assert edited("setting", "pipelines/core/config.py", '"""The port."""', '"""The port, reworded."""') == today
    assert (
        edited(
            "seed",
            "pipelines/model/estimators.py",
            "set_params(random_state=seed)",
            "set_params(random_state=seed + 1)",
        )
        != today
    )
