"""A PyTorch MLP for tabular data as a scikit-learn estimator.

It sits behind the same fitted ColumnTransformer as the sklearn models (inside the model
Pipeline), so the DVC stage, the training flow, the registry and serving treat it like any
other family. Importable with torch, numpy, pandas and scikit-learn alone; torch itself is
imported only when a model is fitted or used.

Training is built for speed on tabular data: the whole training set lives on the device as
tensors and is shuffled by index there (no DataLoader); bf16 autocast on CUDA; AdamW with a
one-cycle (warmup + cosine) schedule; gradient clipping; early stopping on the validation
metric keeps the best weights. With `checkpoint_dir`, every epoch is checkpointed atomically
(model, optimiser, scheduler, epoch, RNG states), and a fit killed mid-way resumes from the
last checkpoint when run again on the same data with the same parameters. Under
`torch.distributed` (launched by torchrun) the model is wrapped in DDP and each rank trains
on its shard of every epoch's permutation.

The fitted weights are kept as numpy arrays (`weights_`), so the estimator is saved by
skops like the rest of the pipeline; `state_dict()` gives them back as tensors for
`torch.save`, loadable with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin


def pick_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    if requested == "cuda":  # the current device: torchrun ranks set their own
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(requested)


def build_module(n_in: int, hidden_sizes: list[int], dropout: float, n_out: int):
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = n_in
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _TorchMLP(BaseEstimator):
    _task = "regression"

    def __init__(
        self,
        hidden_sizes: list[int] | tuple[int, ...] = (128, 64),
        dropout: float = 0.1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 512,
        epochs: int = 60,
        patience: int = 8,
        warmup_fraction: float = 0.1,
        grad_clip: float = 1.0,
        early_stopping_fraction: float = 0.1,
        device: str = "auto",
        compile: bool = False,
        seed: int = 42,
        checkpoint_dir: str | None = None,
    ):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.warmup_fraction = warmup_fraction
        self.grad_clip = grad_clip
        self.early_stopping_fraction = early_stopping_fraction
        self.device = device
        self.compile = compile
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir

    # --- targets: subclasses say how labels become tensors and outputs become predictions
    def _encode_targets(self, y: np.ndarray) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def _loss(self, out, target):
        raise NotImplementedError

    def _val_metric(self, out, target) -> float:
        raise NotImplementedError

    # --- persistence: the cached torch module is rebuilt from weights_, never saved
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_module", None)
        return state

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in self.weights_.items()}

    def _fingerprint(self, X: np.ndarray, y: np.ndarray) -> str:
        params = {k: v for k, v in self.get_params().items() if k not in ("checkpoint_dir", "device")}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        digest.update(np.ascontiguousarray(X).view(np.uint8).data)
        digest.update(np.ascontiguousarray(y).view(np.uint8).data)
        digest.update(str(_distributed()[1]).encode())
        return digest.hexdigest()[:20]

    def fit(self, X, y):
        """On the CPU, with PyTorch's deterministic algorithms: the same data, parameters and
        seed give the same weights in any process and at any thread count (tested)."""
        import torch

        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(before or pick_device(self.device).type == "cpu")
        try:
            return self._fit(X, y)
        finally:
            torch.use_deterministic_algorithms(before)

    def _fit(self, X, y):
        import torch
        from torch.nn.parallel import DistributedDataParallel

        X = np.asarray(X, dtype=np.float32)
        targets, n_out = self._encode_targets(np.asarray(y))
        n_val = max(1, int(round(len(X) * self.early_stopping_fraction)))
        if len(X) - n_val < 1:
            raise ValueError(f"{len(X)} rows are too few to train and early-stop on")
        rank, world = _distributed()
        device = pick_device(self.device)
        torch.manual_seed(self.seed)
        generator = torch.Generator(device=device).manual_seed(self.seed)

        # The last rows validate: the training split is in time order when the data has one.
        X_all = torch.from_numpy(X).to(device)
        y_all = torch.from_numpy(targets).to(device)
        X_train, y_train, X_val, y_val = X_all[:-n_val], y_all[:-n_val], X_all[-n_val:], y_all[-n_val:]
        n_train = len(X_train)

        module = build_module(X.shape[1], list(self.hidden_sizes), self.dropout, n_out).to(device)
        net = module
        if world > 1:
            net = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        if self.compile:
            net = torch.compile(net)
        optimizer = torch.optim.AdamW(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        per_rank = n_train // world if world > 1 else n_train
        steps = max(1, math.ceil(per_rank / self.batch_size))
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.lr,
            total_steps=self.epochs * steps,
            pct_start=self.warmup_fraction,
            anneal_strategy="cos",
        )
        amp = device.type == "cuda" and torch.cuda.is_bf16_supported()

        start_epoch, best_metric, best_weights, bad_epochs, history = 0, math.inf, None, 0, []
        checkpoint = None
        if self.checkpoint_dir:
            checkpoint = Path(self.checkpoint_dir) / f"torch-{self._fingerprint(X, targets)}.pt"
            if checkpoint.is_file():
                saved = torch.load(checkpoint, map_location=device, weights_only=True)
                module.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                torch.set_rng_state(saved["cpu_rng"])
                if device.type == "cuda":
                    torch.cuda.set_rng_state(saved["cuda_rng"], device)
                generator.set_state(saved["shuffle_rng"].to(generator.get_state().device))
                start_epoch, best_metric, bad_epochs = saved["epoch"] + 1, saved["best_metric"], saved["bad_epochs"]
                best_weights, history = saved["best_weights"], saved["history"]
                self.resumed_from_epoch_ = saved["epoch"]

        for epoch in range(start_epoch, self.epochs):
            if bad_epochs >= self.patience:
                break
            started = time.perf_counter()
            net.train()
            order = torch.randperm(n_train, generator=generator, device=device)
            if world > 1:  # equal shards: every rank takes the same number of steps
                order = order[: per_rank * world][rank::world]
            loss_sum = torch.zeros((), device=device)
            for step in range(steps):
                idx = order[step * self.batch_size : (step + 1) * self.batch_size]
                if len(idx) == 0:
                    break
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = net(X_train[idx])
                loss = self._loss(out.float(), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.grad_clip)
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(idx)
            net.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                val_out = module(X_val).float()
            val_metric = self._val_metric(val_out, y_val)
            seconds = time.perf_counter() - started
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": float(loss_sum) / len(order),
                    self._metric_name: val_metric,
                    "lr": optimizer.param_groups[0]["lr"],
                    "epoch_seconds": seconds,
                    "samples_per_s": len(order) / seconds,
                }
            )
            if val_metric < best_metric:
                best_metric, bad_epochs = val_metric, 0
                best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                bad_epochs += 1
            if checkpoint is not None and rank == 0:
                self._save_checkpoint(
                    checkpoint,
                    {
                        "model": module.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "best_metric": best_metric,
                        "bad_epochs": bad_epochs,
                        "best_weights": best_weights,
                        "history": history,
                        "cpu_rng": torch.get_rng_state(),
                        "shuffle_rng": generator.get_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0),
                    },
                )
        stopped_early = bad_epochs >= self.patience
        module.load_state_dict(best_weights)
        self.weights_ = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        self.n_features_in_ = X.shape[1]
        self.n_outputs_ = n_out
        self.history_ = history
        self.best_epoch_ = int(np.argmin([h[self._metric_name] for h in history]))
        self.stopped_early_ = stopped_early
        self.device_ = str(device)
        self.gpu_name_ = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.__dict__.pop("_module", None)
        if checkpoint is not None and rank == 0:
            checkpoint.unlink(missing_ok=True)
        return self

    @staticmethod
    def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _forward(self, X) -> np.ndarray:
        import torch

        module = self.__dict__.get("_module")
        if module is None:
            module = build_module(self.n_features_in_, list(self.hidden_sizes), self.dropout, self.n_outputs_)
            module.load_state_dict(self.state_dict())
            module.eval()
            self._module = module
        X = torch.from_numpy(np.asarray(X, dtype=np.float32))
        with torch.no_grad():
            return (
                torch.cat([module(chunk) for chunk in X.split(65536)]).numpy()
                if len(X)
                else np.zeros((0, self.n_outputs_), dtype=np.float32)
            )


class TorchMLPRegressor(RegressorMixin, _TorchMLP):
    _metric_name = "early_stopping_rmse"

    def _encode_targets(self, y: np.ndarray) -> tuple[np.ndarray, int]:
        y = y.astype(np.float64)
        self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std() or 1.0)
        return ((y - self.y_mean_) / self.y_scale_).astype(np.float32).reshape(-1, 1), 1

    def _loss(self, out, target):
        import torch.nn.functional as F

        return F.mse_loss(out, target)

    def _val_metric(self, out, target) -> float:
        return float(((out - target) ** 2).mean().sqrt()) * self.y_scale_

    def predict(self, X) -> np.ndarray:
        return self._forward(X)[:, 0].astype(np.float64) * self.y_scale_ + self.y_mean_


class TorchMLPClassifier(ClassifierMixin, _TorchMLP):
    _metric_name = "early_stopping_log_loss"

    def _encode_targets(self, y: np.ndarray) -> tuple[np.ndarray, int]:
        labels = y.astype(str)
        self.classes_ = np.unique(labels)
        return np.searchsorted(self.classes_, labels).astype(np.int64), len(self.classes_)

    def _loss(self, out, target):
        import torch.nn.functional as F

        return F.cross_entropy(out, target)

    def _val_metric(self, out, target) -> float:
        import torch.nn.functional as F

        return float(F.cross_entropy(out, target))

    def predict_proba(self, X) -> np.ndarray:
        logits = self._forward(X).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
