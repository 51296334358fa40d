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

from conftest import REPO, free_port, raw_params, run_cli, venv_bin

MALFORMED = {
    "not_yaml": ("data: [unclosed\n", "is not valid YAML"),
    "unknown_key": (None, "train.modle: unknown key"),
}

COMMANDS = [
    ["stage", "ingest"],
    ["run"],
    ["train"],
    ["monitor"],
    ["replay", "--workdir", "{tmp}/replay"],
    ["deploy"],
    ["promote", "1"],
    ["rollback"],
    ["mlflow-ui"],
    ["dashboard"],
    ["prefect-server"],
    ["backtest", "--workdir", "{tmp}/backtest"],
    ["card", "1"],
    ["reproduce", "1"],
    ["serve"],
    ["package"],
    ["score", "{tmp}/in.csv", "{tmp}/out.parquet"],
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
        results = list(
            pool.map(
                lambda case: run([c.format(tmp=tmp_path) for c in case[1]] + ["--params", str(files[case[0]])]), cases
            )
        )
    for (name, command), (proc, seconds) in zip(cases, results, strict=True):
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


def test_a_mistyped_command_or_option_is_a_usage_error_not_a_traceback():
    """Click's usage errors (typer carries its own click): the message and exit 2, as
    `--help` describes, with no traceback; a command that succeeds still exits 0."""
    for args, expected in (
        (["trian"], "No such command 'trian'"),
        (["train", "--forse"], "No such option: --forse"),
        (["card"], "Missing argument"),
    ):
        proc, _ = run(args)
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc, _ = run(["check-params", "--params", "params.yaml"])
    assert proc.returncode == 0 and proc.stdout.startswith("params.yaml: valid"), proc.stderr[-2000:]


@pytest.mark.slow
def test_expected_errors_inside_flows_print_one_line(prefect_api, tmp_path):
    """Bad data met inside a flow (a validation failure in training, a missing column in
    batch scoring): the error line and exit 2, no Prefect traceback or ERROR records."""
    import os

    import pandas as pd

    from conftest import bikeshare_sample, tracking_section, write_params

    source = bikeshare_sample(tmp_path, 600)
    frame = pd.read_csv(source)
    frame.loc[7, "hum"] = 5.5
    frame.to_csv(source, index=False)
    params = write_params(
        tmp_path, source, tracking=tracking_section(tmp_path), search={"families": ["linear"], "n_trials": 0}
    )
    frame.drop(columns=["hum"]).to_csv(tmp_path / "no_hum.csv", index=False)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cases = {
        ("train",): "error: validate: 1 of ",
        ("score", str(tmp_path / "no_hum.csv"), str(tmp_path / "out.parquet")): "error: score: "
        + f"{tmp_path / 'no_hum.csv'}: missing column(s) ['hum']",
    }
    for args, expected in cases.items():
        proc = subprocess.run(
            [venv_bin("loopline"), *args, "--params", str(params)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "| ERROR" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), proc.stderr[-2000:]
    assert not (tmp_path / "out.parquet").exists()


def test_team_servers_refuse_a_store_they_cannot_use_naming_it(tmp_path, capsys):
    """`loopline tracking-server` and `loopline prefect-server --database` check their
    database before starting anything."""
    code, _, err = run_cli(
        "tracking-server", "--store", "mysql://db/mlflow", "--artifacts", str(tmp_path), capsys=capsys
    )
    assert code == 2 and "tracking-server --store" in err and "mysql://db/mlflow" in err
    port = free_port()  # nothing listens there
    code, _, err = run_cli(
        "tracking-server",
        "--store",
        f"postgresql://127.0.0.1:{port}/mlflow",
        "--artifacts",
        str(tmp_path),
        capsys=capsys,
    )
    assert code == 2 and f"port={port}" in err and "cannot reach PostgreSQL" in err
    from prefect.settings import PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect-home"}):  # not this worker's: its server runs
        code, _, err = run_cli("prefect-server", "--database", f"postgresql://127.0.0.1:{port}/prefect", capsys=capsys)
    assert code == 2 and "prefect-server --database" in err and f"port={port}" in err
