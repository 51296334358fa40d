"""Commands that return a result print it as JSON with --json, and nothing else on stdout."""

from __future__ import annotations

import json

from conftest import run_cli, write_params


def test_stage_and_run_print_their_results_as_json(tmp_path, sample_csv, capsys):
    params = str(write_params(tmp_path, sample_csv, train={"model": "linear"}))
    code, out, _ = run_cli("stage", "params", "--params", params, "--json", capsys=capsys)
    assert code == 0 and json.loads(out) == {"valid": True}
    code, out, err = run_cli("run", "--params", params, "--json", capsys=capsys)
    summary = json.loads(out)  # the stages' lines went to stderr
    assert code == 0 and list(summary) == ["params", "ingest", "clean", "validate", "split", "train", "evaluate"]
    assert summary["evaluate"]["test"]["rmse"] < summary["evaluate"]["test"]["baseline_rmse"]
    assert "split: " in err
