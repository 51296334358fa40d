"""The broken-input corpus: each file fails at the right stage with a clear one-paragraph
error and exit code 2 (or has its bad rows quarantined), and good outputs stay as they were."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from corpus import FAILING

from conftest import REPO, bikeshare_sample, run_cli, write_params
from pipelines.core.storage import file_md5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A workspace with good outputs from a full run, which every bad run must leave alone."""
    tmp = tmp_path_factory.mktemp("bad")
    good = bikeshare_sample(tmp, rows=600)
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all

    params = load_params(write_params(tmp, good, train={"hyperparams": {"hist_gradient_boosting": {"max_iter": 20}}}))
    run_all(params, echo=lambda s: None)
    return tmp, good


def _fingerprint(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_md5(p) for p in sorted(root.rglob("*")) if p.is_file()}


STAGE_OUTPUTS = {
    "ingest": ["data/interim/ingested.parquet", "data/quarantine/ingest.csv"],
    "clean": ["data/interim/clean.parquet", "data/quarantine/clean.csv", "data/interim/clean_report.json"],
    "validate": ["data/validation/summary.json"],
}


@pytest.mark.parametrize("case", sorted(FAILING))
def test_bad_input_fails_clearly_and_keeps_good_outputs(case, workspace, capsys):
    tmp, good = workspace
    make, stage, words = FAILING[case]
    bad = tmp / f"{case}.csv"
    make(good, bad)
    params = write_params(tmp, bad, train={"hyperparams": {"hist_gradient_boosting": {"max_iter": 20}}})
    before = _fingerprint(tmp)

    code, _, err = run_cli("run", "--params", str(params), capsys=capsys)

    assert code == 2
    assert err.startswith(f"error: {stage}: "), err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error:") and len(message) < 1500
    after = _fingerprint(tmp)
    # the failing stage and everything after it keep their previous good outputs
    order = list(STAGE_OUTPUTS)
    protected = [p for s in order[order.index(stage) :] for p in STAGE_OUTPUTS[s]]
    protected += ["models/model.skops", "models/model.json", "models/metrics.json", "data/processed/train.parquet"]
    for rel in protected:
        assert after[rel] == before[rel], f"{rel} changed after a failed {stage}"


def test_some_bad_rows_are_quarantined_not_fatal(tmp_path, capsys):
    good = bikeshare_sample(tmp_path, rows=600)
    df = pd.read_csv(good, dtype=str, keep_default_na=False)
    df.loc[[10, 20], "temp"] = ["warm", "0,31"]
    df.loc[30, "bikers"] = ""
    text = df.to_csv(index=False)
    text += "1,Jan,30,5,0,0,0,clear,0.2"  # a truncated last row, no newline
    bad = tmp_path / "dirty.csv"
    bad.write_text(text)
    params = write_params(tmp_path, bad, train={"hyperparams": {"hist_gradient_boosting": {"max_iter": 20}}})

    code, out, err = run_cli("run", "--params", str(params), capsys=capsys)

    assert code == 0, err
    ingest_q = pd.read_csv(tmp_path / "data" / "quarantine" / "ingest.csv")
    assert len(ingest_q) == 1 and "truncated" in ingest_q["reason"][0]
    clean_q = pd.read_csv(tmp_path / "data" / "quarantine" / "clean.csv")
    assert sorted(clean_q["reason"]) == ["bikers: missing value", "temp: not a number", "temp: not a number"]
    assert "'rows_quarantined': 3" in out


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The installed console script, as a user or DVC runs it."""
    bad = tmp_path / "empty.csv"
    bad.write_bytes(b"")
    params = write_params(tmp_path, bad)
    loopline = Path(sys.executable).with_name("loopline")
    proc = subprocess.run(
        [str(loopline), "stage", "ingest", "--params", str(params)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: ingest:" in proc.stderr and "empty (0 bytes)" in proc.stderr
    assert "Traceback" not in proc.stderr
