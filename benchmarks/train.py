"""Trainer throughput: the loader alone vs what a training step consumes, and the step time / MFU.

    python benchmarks/train.py                                   # tiny on CPU, synthetic shards
    python benchmarks/train.py --device cuda --config trainer/configs/mert_95m.yaml batch_size=16
    python benchmarks/train.py --shards SHARDS --workers 8        # a real shard set

The loader figure is batches/s of `trainer.data.Loader` with `--workers` DataLoader workers, decoding
FLAC and slicing labels exactly as in training, converted to clips/s; the training figure is clips/s of
forward + backward + AdamW step on batches already on the device (one process, no DDP), bf16 autocast
and SDPA on CUDA. The loader must outrun training (ratio > 1). MFU = model FLOPs per clip (see
`trainer.model.flops_per_clip`; the CQT target is not counted) x clips/s / the GPU's dense bf16 peak.
Without `--shards`, a synthetic shard set (tests/trainer/shardgen.py) of clips long enough for the
config's crops is written to a temporary folder, so no pipeline run is needed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mert_pipeline.trainer.data import CropSpec, Loader, load_shard_index  # noqa: E402
from mert_pipeline.trainer.model import MERT, flops_per_clip  # noqa: E402
from mert_pipeline.trainer.pretrain import load_config, peak_flops  # noqa: E402
from tests.trainer.shardgen import write_shards  # noqa: E402


def loader_rate(index, spec: CropSpec, workers: int, batches: int) -> float:
    """Clips/s of the loader alone (after its first batch, which pays for starting the workers)."""
    stream = iter(Loader(index, spec, rank=0, world=1, workers=workers))
    next(stream)
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    return batches * spec.batch_size / (time.perf_counter() - start)


def train_rate(model: MERT, batches: list[dict], device: torch.device, steps: int, bf16: bool) -> float:
    """Clips/s of forward + backward + optimizer step, cycling over `batches` already on the device."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    clips = 0
    for step in range(steps + 3):
        if step == 3:  # warmup done (cuDNN autotune, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, clips = time.perf_counter(), 0
        batch = batches[step % len(batches)]
        with autocast:
            loss = model(batch["audio"], batch["labels"])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clips += batch["audio"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clips / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="trainer/configs/tiny.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shards", help="a shard set; default: a synthetic one in a temporary folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps; 0: the loader only")
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (torchrun's default is 1)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    os.chdir(REPO)
    torch.set_num_threads(args.threads)
    mcfg, tcfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            root = Path(args.shards)
        else:
            seconds = tcfg.crop_samples / 24000
            root = write_shards(
                Path(tmp), train_shards=4, per_shard=16, seconds=(seconds * 1.1, seconds * 1.6)
            )
            tcfg.teachers = ("rvq",)
        index = load_shard_index(root)
        mcfg.codebooks = [(t, *index.teachers[t]) for t in tcfg.teachers]
        spec = CropSpec(tuple(tcfg.teachers), tcfg.batch_size, tcfg.crop_samples, tcfg.min_samples, 64, 0)
        load = loader_rate(index, spec, args.workers, args.loader_batches)
        batches = list(itertools.islice(iter(Loader(index, spec, rank=0, world=1, workers=0)), 4))
        batches = [
            {"audio": b["audio"].to(device), "labels": {k: v.to(device) for k, v in b["labels"].items()}}
            for b in batches
        ]
    samples = batches[0]["audio"].shape[1]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"device {name} | config {args.config} | batch {tcfg.batch_size} x {samples} samples")
    print(
        f"loader alone ({args.workers} workers): {load:.1f} clips/s ({load * samples / 24000:.0f} audio-s/s)"
    )
    if args.steps == 0:  # the loader figure only
        return
    torch.manual_seed(0)
    model = MERT(mcfg).to(device).train()
    bf16 = device.type == "cuda"
    if bf16:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rate = train_rate(model, batches, device, args.steps, bf16)
    flops = flops_per_clip(mcfg, samples)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"params {params:.2f}M | torch threads {torch.get_num_threads()} | {'bf16' if bf16 else 'fp32'}")
    print(f"training consumes: {rate:.1f} clips/s, step {tcfg.batch_size / rate * 1000:.0f} ms")
    print(f"loader / training: {load / rate:.1f}x")
    print(f"model GFLOP/s: {flops * rate / 1e9:.2f}")
    peak = peak_flops(tcfg, device)
    if peak:
        print(f"MFU: {flops * rate / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16")
    if bf16:
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
