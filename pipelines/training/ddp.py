"""Train the `torch_mlp` model on several processes with PyTorch DDP, launched by torchrun:

    torchrun --standalone --nproc_per_node=2 -m pipelines.training.ddp --params params.yaml

Uses NCCL with one GPU per process when CUDA is there, else gloo on the CPU. Every rank fits
the same deterministic feature transform, trains on its shard of each epoch's permutation
(gradients are averaged by DDP, so all ranks hold the same weights), and rank 0 writes the
model where the `train` stage would (then `dvc repro evaluate` or `loopline stage evaluate`).
`--report DIR` makes every rank write a digest of its final weights.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path


def main() -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from pipelines.core.config import load_params
    from pipelines.core.layout import Layout
    from pipelines.model.io import save_model
    from pipelines.model.stages import fit_configured_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--report", type=Path, help="write each rank's weight digest here")
    args = parser.parse_args()

    params = load_params(args.params)
    if params.train.model != "torch_mlp":
        raise SystemExit(f"train.model is {params.train.model!r}; DDP training is for torch_mlp")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank = dist.get_rank()
        model, meta = fit_configured_model(params)
        weights = model[-1].weights_
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(weights[k]).tobytes() for k in sorted(weights)))
        if args.report:
            args.report.mkdir(parents=True, exist_ok=True)
            (args.report / f"rank{rank}.txt").write_text(digest.hexdigest())
        if rank == 0:
            meta["ddp_world_size"] = dist.get_world_size()
            save_model(model, meta, Layout.of(params).models)
            print(f"rank 0 of {dist.get_world_size()}: model written to {Layout.of(params).models}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
