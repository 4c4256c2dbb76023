"""One training step's gradients of the tiny MERT on a fixed batch, run by test_recipe under torchrun (gloo).

Rank r of W takes its share of the batch's rows and the matching rows of the given masks, runs the model
under DDP, backpropagates the summed loss and calls the trainer's `scale_gradients`; rank 0 saves the
gradients. Everything else random is off (no dropout, layerdrop or noise), so only the split differs.

    python -m torch.distributed.run --standalone --nproc_per_node W tests/trainer/grad_worker.py IN OUT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mert_pipeline.trainer.model import MERT
from mert_pipeline.trainer.pretrain import load_config, scale_gradients


def main(inputs: str, out: str) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    batch = torch.load(inputs, weights_only=True)
    cfg, _ = load_config("trainer/configs/tiny.yaml", batch["overrides"])
    cfg.codebooks = [("rvq", 2, 8), ("kmeans", 1, 4)]
    torch.manual_seed(0)
    model = MERT(cfg)
    rows = torch.arange(batch["audio"].shape[0]).chunk(world)[rank]
    ddp = DistributedDataParallel(model) if world > 1 else model
    result = ddp(
        batch["audio"][rows], {k: v[rows] for k, v in batch["labels"].items()}, mask=batch["mask"][rows]
    )
    result["loss"].backward()
    scale_gradients(model.parameters(), result["sample_size"], world)
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
