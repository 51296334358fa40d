"""The `loopline` command as a user runs it: every command refuses a malformed params file
the same way (one line naming the problem, exit 2, before any Prefect, MLflow or BentoML
start-up), as a real process."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import REPO, raw_params, venv_bin

MALFORMED = {
    "not_yaml": ("data: [unclosed\n", "is not valid YAML"),
    "unknown_key": (None, "train.modle: unknown key"),
}

COMMANDS = [
    ["stage", "ingest"], ["run"], ["train"], ["monitor"], ["replay", "--workdir", "{tmp}/replay"], ["deploy"],
    ["promote", "1"], ["rollback"], ["ui"], ["serve"], ["package"], ["score", "{tmp}/in.csv", "{tmp}/out.parquet"],
    ["check-params"],
]


def malformed_files(tmp: Path) -> dict[str, Path]:
    files = {}
    for name, (text, _) in MALFORMED.items():
        raw = raw_params()
        if name == "unknown_key":
            raw["train"]["modle"] = "linear"
        path = tmp / f"{name}.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(raw))
        files[name] = path
    return files


def run(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([venv_bin("loopline"), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - started


def test_every_command_refuses_malformed_params_with_one_line(tmp_path):
    files = malformed_files(tmp_path)
    (tmp_path / "in.csv").write_text("hr\n1\n")
    cases = [(name, command) for name in files for command in COMMANDS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run([c.format(tmp=tmp_path) for c in case[1]]
                                                 + ["--params", str(files[case[0]])]), cases))
    for (name, command), (proc, seconds) in zip(cases, results):
        where = f"loopline {' '.join(command)} with {name}"
        assert proc.returncode == 2, f"{where}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: params: {files[name]}"), f"{where}:\n{proc.stderr}"
        assert MALFORMED[name][1] in lines[0], f"{where}: {lines[0]}"
        assert proc.stdout == "", f"{where} printed: {proc.stdout}"
        assert seconds < 10, f"{where} took {seconds:.1f}s"  # no Prefect server was started
    assert not (tmp_path / "replay").exists()


def test_help_is_quick_and_shows_no_type_placeholders():
    proc, seconds = run(["--help"])
    assert proc.returncode == 0 and "train" in proc.stdout and "<bool>" not in proc.stdout
    assert seconds < 5
