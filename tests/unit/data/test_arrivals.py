"""The landing folder under faults: a file still being written, temporary names, a crash
between storing a batch and removing it from landing, a SIGKILL mid-acceptance; and the
modes of what is stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import BIKESHARE, REPO, bikeshare_sample, write_params


@pytest.fixture
def landing_params(tmp_path):
    from pipelines.core.config import load_params

    def make(**monitor):
        return load_params(write_params(tmp_path, bikeshare_sample(tmp_path, 300), monitor=monitor))

    return make


def stored_rows(params) -> int:
    from pipelines.core.layout import Layout
    from pipelines.data.ingest import arrival_files

    return sum(pq.ParquetFile(f).metadata.num_rows for f in arrival_files(Layout.of(params).arrivals))


WRITER = """
import sys, time
import pandas as pd
rows = pd.read_csv({source!r}).iloc[1000:1400]
with open({target!r}, "w") as out:
    for start in range(0, len(rows), 50):
        rows.iloc[start:start + 50].to_csv(out, header=start == 0, index=False)
        out.flush()
        time.sleep(0.25)
"""


def test_a_batch_still_being_written_waits_until_it_settles(landing_params):
    """A writer appends 50 rows every 0.25 s; monitoring runs meanwhile. Nothing may be
    accepted from the unfinished file, and all 400 rows must arrive once it is done."""
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed

    params = landing_params(settle_seconds=2.0)  # well above the writer's 0.25 s pauses, even on a busy machine
    landing = Layout.of(params).landing
    landing.mkdir(parents=True)
    target = landing / "live.csv"
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(source=str(BIKESHARE), target=str(target))])
    try:
        while not target.exists() or target.stat().st_size == 0:
            assert writer.poll() is None, "the writer ended before writing"
            time.sleep(0.02)
        outcomes = accept_landed(params)
        assert [o.status for o in outcomes] == ["waiting"], outcomes
        assert "still being written" in outcomes[0].reason
        assert stored_rows(params) == 0 and target.exists()
    finally:
        writer.wait(timeout=30)
    [outcome] = accept_landed(params)
    assert outcome.status == "accepted" and outcome.rows == 400, outcome
    assert stored_rows(params) == 400 and not target.exists()


def test_temporary_and_hidden_names_are_left_alone(landing_params):
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed

    params = landing_params(settle_seconds=0)
    landing = Layout.of(params).landing
    landing.mkdir(parents=True)
    batch = pd.read_csv(BIKESHARE).iloc[1000:1100]
    names = [".in-progress.csv", "batch.csv.tmp", "batch.csv.part", "~batch.csv"]
    for name in names:
        batch.to_csv(landing / name, index=False)
    assert accept_landed(params) == []
    assert sorted(p.name for p in landing.iterdir() if not p.name.endswith(".lock")) == sorted(names)


def test_a_batch_left_in_landing_after_it_was_stored_is_not_stored_twice(landing_params):
    """The state a crash between storing the batch and deleting the landed file leaves."""
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed
    from pipelines.data.ingest import arrival_files

    params = landing_params(settle_seconds=0)
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    batch = pd.read_csv(BIKESHARE).iloc[1000:1200]
    batch.to_csv(layout.landing / "batchD.csv", index=False)
    kept = (layout.landing / "batchD.csv").read_bytes()
    [first] = accept_landed(params)
    assert first.status == "accepted"
    (layout.landing / "batchD.csv").write_bytes(kept)  # as if the process died before the unlink
    [again] = accept_landed(params)
    assert again.status == "already accepted" and again.stored == first.stored, again
    assert [f.name for f in arrival_files(layout.arrivals)] == [first.stored]
    assert not (layout.landing / "batchD.csv").exists()


KILLABLE = """
import sys
sys.path.insert(0, {repo!r})
from pipelines.data.arrivals import accept_landed
from pipelines.core.config import load_params
accept_landed(load_params({params!r}))
"""


def test_sigkill_mid_acceptance_loses_and_duplicates_nothing(tmp_path):
    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed

    path = write_params(tmp_path, bikeshare_sample(tmp_path, 300), monitor={"settle_seconds": 0})
    params = load_params(path)
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    full = pd.read_csv(BIKESHARE)
    for i in range(12):
        full.iloc[1000 + 40 * i : 1040 + 40 * i].to_csv(layout.landing / f"b{i:02d}.csv", index=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE.format(repo=str(REPO), params=str(path))], start_new_session=True
    )
    deadline = time.monotonic() + 120
    while len(list(layout.arrivals.glob("*.parquet"))) < 4:  # a third of the way: kill with 8 batches to go
        assert proc.poll() is None and time.monotonic() < deadline, "acceptance ended before the kill"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= len(list(layout.arrivals.glob("*.parquet"))) < 12, "the kill came after the last batch"
    accept_landed(params)  # the next monitoring run finishes the job
    stored = pd.concat([pd.read_parquet(f) for f in sorted(layout.arrivals.glob("*.parquet"))])
    assert len(stored) == 12 * 40 and not stored.duplicated().any()
    assert not list(layout.landing.glob("*.csv"))
    assert not [p for p in layout.arrivals.iterdir() if p.name.startswith(".")], "a temporary file was left"


def test_stored_batches_follow_the_umask(landing_params):
    from pipelines.core.layout import Layout
    from pipelines.data.arrivals import accept_landed
    from pipelines.data.ingest import arrival_files

    params = landing_params(settle_seconds=0)
    layout = Layout.of(params)
    layout.landing.mkdir(parents=True)
    pd.read_csv(BIKESHARE).iloc[1000:1100].to_csv(layout.landing / "b.csv", index=False)
    old = os.umask(0o022)
    try:
        accept_landed(params)
    finally:
        os.umask(old)
    [stored] = arrival_files(layout.arrivals)
    assert stored.stat().st_mode & 0o777 == 0o644
