"""Training throughput of loopline's PyTorch trainer against a bare PyTorch loop.

Same device-resident tensors, same MLP, optimiser, schedule, clipping and (on CUDA) bf16
autocast; the bare loop has no validation, early stopping, history or checkpoints. Prints
samples/s of both and their ratio, per device; with CUDA also GPU vs CPU on the same rows.
Importable with torch, numpy, pandas and scikit-learn alone (runs on a bare GPU machine).

    python bench/torch_throughput.py --rows 1000000 --epochs 3
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.model.torch_model import TorchMLPRegressor, build_module  # noqa: E402

HIDDEN = [256, 128]


def synthetic(rows: int, features: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = X[:, :4] @ np.array([3.0, -2.0, 1.0, 0.5]) + np.sin(X[:, 4]) + rng.normal(0, 0.1, rows)
    return X, y.astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(X: np.ndarray, y: np.ndarray, device: torch.device, epochs: int, batch: int) -> float:
    """samples/s of the textbook loop over the same rows the trainer trains on."""
    torch.manual_seed(0)
    n_train = len(X) - int(round(len(X) * 0.1))
    Xt = torch.from_numpy(X[:n_train]).to(device)
    yt = torch.from_numpy(((y - y.mean()) / y.std())[:n_train, None]).to(device)
    module = build_module(X.shape[1], HIDDEN, 0.1, 1).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = math.ceil(n_train / batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps, pct_start=0.1)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    generator = torch.Generator(device=device).manual_seed(0)
    sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        module.train()
        order = torch.randperm(n_train, generator=generator, device=device)
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = module(Xt[idx])
            loss = torch.nn.functional.mse_loss(out.float(), yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    sync(device)
    return n_train * epochs / (time.perf_counter() - started)


def project(X: np.ndarray, y: np.ndarray, device: torch.device, epochs: int, batch: int) -> float:
    """samples/s of TorchMLPRegressor.fit, measured over training epochs (validation included)."""
    mlp = TorchMLPRegressor(
        hidden_sizes=HIDDEN, lr=3e-3, batch_size=batch, epochs=epochs, patience=epochs + 1, device=str(device)
    )
    mlp.fit(X, y)
    seconds = sum(h["epoch_seconds"] for h in mlp.history_)
    return sum(h["samples_per_s"] * h["epoch_seconds"] for h in mlp.history_) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    X, y = synthetic(args.rows)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda", 0))
    print(
        f"torch {torch.__version__}, {args.rows:,} rows x {X.shape[1]} features, MLP {HIDDEN}, "
        f"batch {args.batch_size}, {args.epochs} epochs"
    )
    results = {}
    for device in devices:
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        )
        bare_loop(X[:50_000], y[:50_000], device, 1, args.batch_size)  # warm-up: kernels, allocator
        ours = project(X, y, device, args.epochs, args.batch_size)
        bare = bare_loop(X, y, device, args.epochs, args.batch_size)
        results[device.type] = ours
        print(
            f"{name:<40} trainer {ours:>12,.0f} samples/s   bare loop {bare:>12,.0f} samples/s   "
            f"ratio {ours / bare:.2f}"
        )
    if "cuda" in results:
        print(f"GPU / CPU (trainer): {results['cuda'] / results['cpu']:.1f}x")
    else:
        print("no CUDA device here: GPU figures need a machine with one")


if __name__ == "__main__":
    main()
