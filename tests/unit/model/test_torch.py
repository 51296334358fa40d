"""The PyTorch MLP: learning, early stopping, resume after a kill, classification, DDP on
the CPU with gloo, and (where CUDA exists) the GPU path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, WINE, bikeshare_sample, venv_bin, write_params
from pipelines.core import stages as core_stages
from pipelines.core.layout import Layout
from pipelines.core.stages import run_stage
from pipelines.model import stages as model_stages
from pipelines.model.io import dumps_model, load_model, loads_model
from pipelines.model.torch_model import TorchMLPRegressor

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _data(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    y = 3 * X[:, 0] - 2 * X[:, 1] ** 2 + np.sin(3 * X[:, 2]) + rng.normal(0, 0.1, n)
    return X, y


@pytest.fixture(scope="module")
def bike(tmp_path_factory):
    from pipelines.core.config import load_params

    tmp = tmp_path_factory.mktemp("torch")
    hp = {"torch_mlp": {"epochs": 40, "hidden_sizes": [64, 32], "lr": 0.005, "patience": 8, "device": "cpu"}}
    params = load_params(write_params(tmp, bikeshare_sample(tmp), train={"model": "torch_mlp", "hyperparams": hp}))
    for stage in ("ingest", "clean", "validate", "split"):
        run_stage(stage, params)
    return params


def test_learns_bikeshare_better_than_naive_baseline_and_reloads(bike):
    model_stages.train(bike)
    metrics = model_stages.evaluate(bike)["test"]
    assert metrics["rmse"] < 0.75 * metrics["baseline_rmse"]
    model, meta = load_model(bike.paths.models)
    mlp = model[-1]
    assert isinstance(mlp, TorchMLPRegressor) and mlp.device_ == "cpu"
    history = mlp.history_
    assert {"train_loss", "early_stopping_rmse", "lr", "epoch_seconds", "samples_per_s"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    test = pd.read_parquet(Layout.of(bike).split_file("test"))
    again = loads_model(dumps_model(model))
    np.testing.assert_array_equal(again.predict(test[meta["features"]]), model.predict(test[meta["features"]]))


def test_state_dict_round_trips_with_weights_only(tmp_path):
    X, y = _data(800)
    mlp = TorchMLPRegressor(hidden_sizes=[16], epochs=3, device="cpu").fit(X, y)
    torch.save(mlp.state_dict(), tmp_path / "weights.pt")
    loaded = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(loaded) == set(mlp.weights_)
    for key, tensor in loaded.items():
        np.testing.assert_array_equal(tensor.numpy(), mlp.weights_[key])


def test_early_stopping_keeps_the_best_weights():
    X, y = _data(1500)
    mlp = TorchMLPRegressor(
        hidden_sizes=[256, 256], epochs=300, patience=3, lr=0.05, dropout=0.0, batch_size=64, device="cpu"
    ).fit(X, y)
    val = [h["early_stopping_rmse"] for h in mlp.history_]
    assert mlp.stopped_early_ and len(val) < 300
    assert mlp.best_epoch_ == int(np.argmin(val)) and mlp.best_epoch_ == len(val) - 1 - 3
    n_val = int(round(len(X) * 0.1))
    rmse = float(np.sqrt(np.mean((mlp.predict(X[-n_val:]) - y[-n_val:]) ** 2)))
    assert rmse == pytest.approx(min(val), rel=1e-3)  # the best epoch's weights, not the last


RESUME_SCRIPT = """
import sys, numpy as np
sys.path[:0] = [{repo!r}, {repo!r} + "/tests", {repo!r} + "/tests/unit/model"]
from test_torch import _data
from pipelines.model.torch_model import TorchMLPRegressor
X, y = _data(8000)
TorchMLPRegressor(hidden_sizes=[64, 64], epochs=12, patience=100, batch_size=64, device="cpu",
                  checkpoint_dir={ckpt!r}).fit(X, y)
"""


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    script = RESUME_SCRIPT.format(repo=str(REPO), ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline, writes = time.monotonic() + 120, set()
    while len(writes) < 3:  # three epochs checkpointed (the file is replaced once per epoch), then kill mid-epoch
        assert proc.poll() is None, "training ended before three epochs were checkpointed"
        assert time.monotonic() < deadline, "no three checkpoints within 120 s"
        writes |= {f.stat().st_mtime_ns for f in ckpt.glob("*.pt")}
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(ckpt.glob("*.pt")), "no checkpoint survived the kill"

    X, y = _data(8000)
    kwargs = dict(hidden_sizes=[64, 64], epochs=12, patience=100, batch_size=64, device="cpu")
    resumed = TorchMLPRegressor(checkpoint_dir=str(ckpt), **kwargs).fit(X, y)
    assert resumed.resumed_from_epoch_ >= 2  # the third checkpoint (epoch 2) or a later one
    assert not list(ckpt.glob("*.pt")), "the checkpoint should be removed after a completed fit"
    straight = TorchMLPRegressor(**kwargs).fit(X, y)
    assert len(resumed.history_) == len(straight.history_) == 12
    for key in straight.weights_:
        np.testing.assert_array_equal(resumed.weights_[key], straight.weights_[key])


def test_classification_on_wine(tmp_path):
    from pipelines.core.config import load_params

    hp = {"torch_mlp": {"epochs": 80, "batch_size": 32, "hidden_sizes": [32], "device": "cpu"}}
    params = load_params(
        write_params(tmp_path, WINE, base="params.wine.yaml", train={"model": "torch_mlp", "hyperparams": hp})
    )
    metrics = core_stages.run_all(params, echo=lambda s: None)["evaluate"]["test"]
    assert metrics["accuracy"] > 0.9 and metrics["roc_auc"] > 0.95


def test_ddp_two_cpu_processes_agree(tmp_path, bike):
    params = write_params(
        tmp_path,
        bike.data.source,
        train={
            "model": "torch_mlp",
            "hyperparams": {"torch_mlp": {"epochs": 6, "hidden_sizes": [32], "device": "cpu"}},
        },
    )
    from pipelines.core.config import load_params

    for stage in ("ingest", "clean", "validate", "split"):  # the data, here: torchrun is what is tested
        run_stage(stage, load_params(params))
    report = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            venv_bin("torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "pipelines.training.ddp",
            "--params",
            str(params),
            "--report",
            str(report),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(report / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    meta = json.loads((tmp_path / "models" / "model.json").read_text())
    assert meta["ddp_world_size"] == 2 and meta["family"] == "torch_mlp"


@pytest.mark.gpu
@cuda
def test_trains_on_gpu_with_bf16():
    X, y = _data(50000)
    mlp = TorchMLPRegressor(hidden_sizes=[256, 128], epochs=5, device="auto").fit(X, y)
    assert mlp.device_.startswith("cuda") and mlp.gpu_name_
    cpu = TorchMLPRegressor(hidden_sizes=[256, 128], epochs=5, device="cpu").fit(X, y)
    gpu_rmse = np.sqrt(np.mean((mlp.predict(X) - y) ** 2))
    cpu_rmse = np.sqrt(np.mean((cpu.predict(X) - y) ** 2))
    assert gpu_rmse < 1.5 * cpu_rmse


DETERMINISM = """
import sys, hashlib, numpy as np, torch
sys.path[:0] = [{repo!r}, {repo!r} + "/tests", {repo!r} + "/tests/unit/model"]
torch.set_num_threads({threads})
from test_torch import _data
from pipelines.model.torch_model import TorchMLPRegressor
X, y = _data(4000)
m = TorchMLPRegressor(hidden_sizes=[64, 32], epochs=3, batch_size=128, device="cpu", checkpoint_dir={ckpt!r}).fit(X, y)
print(hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in m.weights_.values())).hexdigest())
"""


def test_cpu_training_is_the_same_in_every_process_and_thread_count(tmp_path):
    """Same data, params and seed give the same weights: in separate processes, with one or
    two threads, and for two fits of the same model running at once on one checkpoint folder
    (the second trains without a checkpoint rather than resume from the first's)."""

    def launch(threads: int) -> subprocess.Popen:
        script = DETERMINISM.format(repo=str(REPO), threads=threads, ckpt=str(tmp_path / "ckpt"))
        return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)

    together = [launch(1), launch(2)]  # at once, sharing the checkpoint folder
    digests = [p.communicate(timeout=300)[0].strip() for p in together]
    digests.append(launch(2).communicate(timeout=300)[0].strip())
    assert len(set(digests)) == 1 and len(digests[0]) == 64, digests
