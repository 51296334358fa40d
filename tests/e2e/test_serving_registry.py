"""What the service's registry source sees on real, damaged and replaced SQLite MLflow stores:
it never creates a store, names what is wrong (store missing or unreadable, no champion
alias, an artifact that fails to load), and notices a store file replaced under it."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from conftest import bikeshare_sample, register_family, tracking_section, write_params
from serving.runtime import ChampionHolder, RegistrySource

pytestmark = pytest.mark.slow


def params_with_store(base, store: Path):
    return base.model_copy(update={"tracking": base.tracking.model_copy(update=tracking_section(store))})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared splits, and a pristine store whose champion v1 is a linear model."""
    from pipelines.core.config import load_params
    from pipelines.core.stages import run_all
    from pipelines.registry.champion import promote
    from pipelines.registry.tracking import client_for

    tmp = tmp_path_factory.mktemp("registry")
    params = load_params(
        write_params(
            tmp,
            bikeshare_sample(tmp, 600),
            tracking=tracking_section(tmp / "pristine"),
            train={"hyperparams": {"hist_gradient_boosting": {"max_iter": 20}}},
        )
    )
    run_all(params, echo=lambda _: None)
    version = register_family(params, "linear")
    promote(client_for(params)[0], "bikes", version, params.tracking.uri, reason="test")
    return tmp, params


def copy_database(source: Path, target: Path, artifacts_from: Path, artifacts_to: Path) -> None:
    """A copy of an MLflow SQLite database whose artifact locations point at another folder."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
        for (table,) in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in dst.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    dst.execute(
                        f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?)',
                        (str(artifacts_from), str(artifacts_to)),
                    )


def store_copy(prepared, name: str):
    """A copy of the pristine store (database and artifacts) under `name`, with its params."""
    tmp, params = prepared
    pristine, store = tmp / "pristine", tmp / name
    store.mkdir()
    shutil.copytree(pristine / "mlruns", store / "mlruns")
    copy_database(pristine / "mlflow.db", store / "mlflow.db", pristine / "mlruns", store / "mlruns")
    return store, params_with_store(params, store)


def check(params) -> ChampionHolder:
    holder = ChampionHolder(params, RegistrySource(params), "registry")
    holder.refresh()
    return holder


def test_a_missing_store_is_an_error_and_is_not_created(prepared, tmp_path):
    _, base = prepared
    params = params_with_store(base, tmp_path)
    holder = check(params)
    assert holder.current is None
    message = holder.status()["last_error"]
    assert f"tracking store {tmp_path / 'mlflow.db'} does not exist" in message
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(Exception, match="does not exist"):
        holder.require()


def test_a_corrupt_store_is_unreadable_not_empty(prepared):
    store, params = store_copy(prepared, "corrupt-db")
    (store / "mlflow.db").write_bytes(b"not a database" * 1000)
    holder = check(params)
    assert holder.current is None
    assert "cannot be read: DatabaseError" in holder.status()["last_error"]
    assert "no version aliased" not in holder.status()["last_error"]


def test_no_alias_says_no_champion(prepared):
    from pipelines.registry.tracking import client_for

    store, params = store_copy(prepared, "no-alias")
    client_for(params)[0].delete_registered_model_alias("bikes", "champion")
    assert "has no version aliased 'champion' yet" in check(params).status()["last_error"]


@pytest.mark.parametrize("damage", ["corrupt", "deleted"])
def test_a_damaged_champion_artifact_names_version_and_cause(prepared, damage, alert_receiver):
    store, params = store_copy(prepared, f"artifact-{damage}")
    params = params.model_copy(update={"alerts": [alert_receiver.url]})
    [skops] = (store / "mlruns").rglob("model.skops")
    if damage == "corrupt":
        skops.write_bytes(b"garbage")
    else:
        shutil.rmtree(skops.parent)
    message = check(params).status()["last_error"]
    assert message.startswith("champion v1 of 'bikes' (run ") and "failed to load" in message, message
    if damage == "corrupt":
        assert "not a skops model file" in message
    [alert] = alert_receiver.wait_for(1)  # the alert says the same, once
    assert alert["title"] == "[loopline] the bikes service could not load the champion"
    assert message in alert["message"] and "serving nothing" in alert["message"]


def test_a_store_replaced_by_rename_is_seen_while_serving(prepared):
    """The service holds pooled connections to the old file; a store renamed over it (a
    restore from backup) must be read, not the deleted file."""
    from pipelines.registry.champion import promote
    from pipelines.registry.tracking import client_for

    tmp, _ = prepared
    live, params = store_copy(prepared, "live")
    holder = check(params)
    assert holder.current is not None and holder.current.version == "1"
    first_run = holder.current.run_id

    restored, restored_params = store_copy(prepared, "restored")  # the same history, then a new champion
    version = register_family(restored_params, "hist_gradient_boosting")
    promote(client_for(restored_params)[0], "bikes", version, restored_params.tracking.uri, reason="test")
    shutil.copytree(restored / "mlruns", live / "mlruns", dirs_exist_ok=True)
    copy_database(restored / "mlflow.db", tmp / "incoming.db", restored / "mlruns", live / "mlruns")
    os.replace(tmp / "incoming.db", live / "mlflow.db")

    assert holder.refresh(), holder.status()
    assert holder.current.version == version and holder.current.run_id != first_run
