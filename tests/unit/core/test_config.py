from __future__ import annotations

import json
import re

import pytest
import yaml
from pydantic import BaseModel

from conftest import raw_params
from pipelines.core.config import Params, load_params, parse_params
from pipelines.core.errors import LooplineError


def test_shipped_params_files_load():
    assert load_params("params.yaml").data.target == "bikers"
    assert load_params("params.wine.yaml").data.task == "classification"


def _error(raw: dict) -> str:
    with pytest.raises(LooplineError) as info:
        parse_params(raw, "params.yaml")
    return str(info.value)


def test_unknown_key_is_named():
    raw = raw_params()
    raw["train"]["modle"] = "linear"
    msg = _error(raw)
    assert "train.modle" in msg and "unknown key" in msg


def test_wrong_type_is_named():
    raw = raw_params()
    raw["split"]["val_fraction"] = "a lot"
    msg = _error(raw)
    assert "split.val_fraction" in msg and "'a lot'" in msg


def test_nested_schema_error_names_column():
    raw = raw_params()
    raw["schema"]["columns"]["temp"]["type"] = "decimal"
    assert "schema.columns.temp.type" in _error(raw)


def test_target_as_feature_is_refused():
    raw = raw_params()
    raw["features"]["numeric"].append("bikers")
    assert "leaks" in _error(raw)


def test_dropped_leakage_column_cannot_be_declared():
    raw = raw_params()
    raw["schema"]["columns"]["casual"] = {"type": "int"}
    assert "casual" in _error(raw)


def test_unknown_model_family():
    raw = raw_params()
    raw["train"]["model"] = "catboost"
    assert "catboost" in _error(raw)


def test_a_reference_profile_evidently_would_test_differently_is_refused():
    raw = raw_params()
    raw.setdefault("monitor", {})["reference_profile_rows"] = 500
    msg = _error(raw)
    assert "monitor" in msg and "reference_profile_rows 500" in msg and "above 1000" in msg
    raw["monitor"]["reference_profile_rows"] = 0  # every reference row
    assert parse_params(raw, "params.yaml").monitor.reference_profile_rows == 0


def test_team_settings_name_what_is_wrong():
    raw = raw_params()
    raw["locks"] = {"dsn": "mysql://db/locks"}
    msg = _error(raw)
    assert "locks.dsn" in msg and "mysql://db/locks" in msg and "PostgreSQL" in msg
    raw["locks"] = {"dsn": "postgresql+psycopg://db:5432/mlflow"}
    raw["execution"] = {"runner": "ray"}
    msg = _error(raw)
    assert "execution.runner" in msg and "ray" in msg
    raw["execution"] = {"runner": "dask", "dask": {"n_workers": 0}}
    assert "execution.dask.n_workers" in _error(raw)
    raw["execution"] = {"runner": "dask", "dask": {"address": "tcp://10.0.0.5:8786"}}
    raw["search"]["trials_per_round"] = 4
    params = parse_params(raw, "params.yaml")
    assert params.execution.dask.address == "tcp://10.0.0.5:8786" and params.search.trials_per_round == 4


def test_invalid_yaml_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(LooplineError, match="not valid YAML"):
        load_params(bad)


def test_cli_reports_bad_params_without_traceback(tmp_path, capsys):
    from conftest import run_cli

    raw = raw_params()
    raw["train"]["hyperparms"] = {}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli("stage", "train", "--params", str(path), capsys=capsys)
    assert code == 2
    assert "train.hyperparms: unknown key" in err
    assert "Traceback" not in err


def test_check_params_says_valid_in_one_line_and_shows_the_file_with_defaults_on_request(capsys):
    from conftest import run_cli

    code, out, _ = run_cli("check-params", "--params", "params.yaml", capsys=capsys)
    assert code == 0
    assert out.splitlines() == ["params.yaml: valid (18 sections, defaults filled in for the keys it leaves out)"]
    code, out, _ = run_cli("check-params", "--params", "params.yaml", "--show", capsys=capsys)
    first, rest = out.split("\n", 1)
    assert first.endswith(": valid (18 sections, defaults filled in for the keys it leaves out)")
    printed = yaml.safe_load(rest)
    assert printed["train"]["model"] == "hist_gradient_boosting" and printed["serve"]["port"] == 3000  # a default
    assert load_params("params.yaml").model_dump(mode="json", by_alias=True) == printed
    code, out, _ = run_cli("check-params", "--params", "params.yaml", "--json", capsys=capsys)
    assert json.loads(out) == printed


def test_the_committed_configuration_reference_is_the_one_the_models_write(capsys):
    """docs/reference/configuration.md is `loopline check-params --reference`: a key added to a
    params model without regenerating the page fails here."""
    from conftest import REPO, run_cli

    code, out, _ = run_cli("check-params", "--reference", capsys=capsys)
    assert code == 0
    committed = (REPO / "docs" / "reference" / "configuration.md").read_text()
    assert out == committed, "docs/reference/configuration.md is stale: run `make reference`"
    for section in Params.model_fields:  # every section and key, with its meaning
        assert f"## `{Params.model_fields[section].alias or section}" in out
    assert "| `drift_share` | number (> 0.0, ≤ 1.0) | `0.5` | Trigger: retrain when the drifted features" in out


def test_params_yaml_shows_every_section_and_key(capsys):
    """Every section of the params models, and every key of each, is in params.yaml: set, or
    commented out with its default (the operational sections)."""
    from conftest import REPO

    blocks: dict[str, str] = {}  # section -> its lines, set or commented out
    section = None
    for line in (REPO / "params.yaml").read_text().splitlines():
        header = re.fullmatch(r"(?:# )?([a-z_]+):\s*", line)
        if header:
            section = header.group(1)
        elif section is not None and line.startswith(("  ", "#  ")):
            blocks[section] = blocks.get(section, "") + line + "\n"
    missing = []
    for name, field in Params.model_fields.items():
        key = field.alias or name
        if key not in blocks:
            missing.append(key)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            missing += [f"{key}.{k}" for k in field.annotation.model_fields if f"{k}:" not in blocks[key]]
    assert not missing, f"params.yaml does not show {missing}"


def test_passwords_in_urls_are_never_shown_logged_or_packaged(tmp_path, capsys):
    """check-params (--show, --json) and every other dump of the params (MLflow's params,
    the Bento's params.json) show a URL's password as ***; other URLs are untouched."""
    import json

    from conftest import run_cli, write_params
    from pipelines.core.config import load_params, shown, without_passwords

    secret = "pw-Xq81zT5"
    params = write_params(
        tmp_path,
        "unused.csv",
        serve={"prediction_log": f"postgresql://svc:{secret}@db:5432/predictions"},
        locks={"dsn": f"postgresql+psycopg://lock:{secret}@db/mlflow"},
    )
    for args in (["--show"], ["--json"]):
        code, out, err = run_cli("check-params", "--params", str(params), *args, capsys=capsys)
        assert code == 0 and secret not in out + err and "svc:***@db:5432/predictions" in out, out
    dumped = json.dumps(shown(load_params(params)))
    assert secret not in dumped and "lock:***@db/mlflow" in dumped
    assert without_passwords(["http://host:5000", "sqlite:///a.db", "tls://10.0.0.1:8786"]) == [
        "http://host:5000",
        "sqlite:///a.db",
        "tls://10.0.0.1:8786",
    ]
