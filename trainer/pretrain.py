"""Pretrain MERT on a shard set with DDP: one file, run by torchrun.

From the repository root (after `pip install -e .`), or from anywhere with the installed package as
`torchrun ... -m mert_pipeline.trainer.pretrain ...` (the `mert-pretrain` command runs one process):

    # one GPU (or CPU: gloo, fp32)
    torchrun --standalone --nproc_per_node 1 trainer/pretrain.py --config trainer/configs/mert_95m.yaml \\
        --shards SHARDS --out runs/mert95m
    # 8 GPUs on one machine; key=value overrides any config key
    torchrun --standalone --nproc_per_node 8 trainer/pretrain.py --config trainer/configs/mert_95m.yaml \\
        --shards SHARDS --out runs/mert95m batch_size=15 max_steps=400000
    # 2 machines x 8 GPUs: run on each machine, NODE_RANK 0 and 1, MASTER_ADDR = machine 0's address
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $MASTER_ADDR \\
        --master_port 29500 trainer/pretrain.py --config trainer/configs/mert_330m.yaml \\
        --shards SHARDS --out runs/mert330m
    # continue from the newest checkpoint in --out (starts fresh when there is none)
    torchrun ... trainer/pretrain.py ... --resume
    # a new run from MERT-v1's weights (HF directory or fairseq .pt; the shape comes from them)
    torchrun ... trainer/pretrain.py ... --init-from MERT-v1-95M lr=1e-4 warmup_steps=2000

RUN_DIR gets `ckpt-STEP.pt` (the last `keep_last`), `log.jsonl`, `config.json` and, when tensorboard is
installed, `tb/`. Only rank 0 logs and writes. A checkpoint is one dict of tensors and plain values
(model, optimizer, scheduler, step, config, rng, data position), loadable with
`torch.load(path, weights_only=True)`. Every step reseeds torch from (seed, step, rank) and the loader
restarts at its saved (epoch, batch), so a resumed run repeats the uninterrupted run's losses; resume
with the same world size and `num_workers`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

try:  # run by path (torchrun trainer/pretrain.py): the installed package provides the rest
    from mert_pipeline.fs import WorkdirBusy, atomic_path, atomic_write_json, workdir_lock
    from mert_pipeline.layout import LOCK
    from mert_pipeline.model_path import run_checkpoints
    from mert_pipeline.shards import ShardError
    from mert_pipeline.trainer.data import CropSpec, Loader, ShardIndex, load_shard_index, valid_batches
    from mert_pipeline.trainer.model import MERT, ModelConfig, flops_per_clip
    from mert_pipeline.trainer.weights import apply_shape, initialise, read_source
except ModuleNotFoundError as exc:  # pragma: no cover - a checkout without `pip install -e .`
    if not exc.name or not exc.name.startswith("mert_pipeline"):
        raise
    sys.exit("error: the mert_pipeline package is not installed here: run `pip install -e .` in the checkout")

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass
class TrainConfig:
    teachers: tuple[str, ...] = ("rvq",)  # any teachers the shards hold, e.g. [rvq, kmeans500]
    batch_size: int = 8  # clips per rank per micro-step
    grad_accum: int = 1
    crop_samples: int = 120000  # 5 s at 24 kHz
    min_samples: int = 72000  # clips under 3 s are dropped
    shuffle_buffer: int = 1000
    num_workers: int = 4
    epoch_batches: int = 0  # batches per rank per epoch; 0: train samples / (world x batch_size)
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 32000
    max_steps: int = 400000  # linear decay to 0 at max_steps
    grad_clip: float = 10.0  # 0: no clipping
    log_interval: int = 100
    eval_interval: int = 2000  # 0: never
    eval_batches: int = 20  # per rank
    ckpt_interval: int = 2000
    keep_last: int = 3
    stop_after: int = 0  # stop (and checkpoint) after this step without changing the schedule
    seed: int = 1
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; fp32: always fp32
    peak_flops: float = 0.0  # per device, for MFU; 0: looked up from the GPU's name
    init_from: str = ""  # weights to start a new run from: HF dir, export hf dir, our checkpoint, fairseq .pt


def load_config(path: str | Path, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """A flat yaml of ModelConfig and TrainConfig keys, then `key=value` overrides (values read as yaml)."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        values[key.strip()] = yaml.safe_load(text)
    model_keys = {f.name: f for f in fields(ModelConfig)}
    train_keys = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(model_keys) - set(train_keys) - {"codebooks"})
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    tuples = {k for k, f in {**model_keys, **train_keys}.items() if str(f.type).startswith("tuple")}
    values = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}
    for key, value in values.items():  # yaml reads 2e-3 (no dot) as a string: numbers by the field's type
        kind = str({**model_keys, **train_keys}[key].type) if key != "codebooks" else ""
        if kind in ("float", "int") and isinstance(value, str | int | float) and not isinstance(value, bool):
            try:
                number = float(value)
                if kind == "int" and not number.is_integer():
                    raise ValueError
                values[key] = number if kind == "float" else int(number)
            except ValueError:
                what = "a whole number" if kind == "int" else "a number"
                raise ValueError(f"config key {key} is {what}, not {value!r}") from None
    model = ModelConfig(**{k: v for k, v in values.items() if k in model_keys and k != "codebooks"})
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_keys})
    return model, train


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then linear decay to 0 at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))


def reseed(seed: int, step: int, rank: int) -> None:
    """All of a step's randomness (noise mixture, masks, layerdrop, dropout) from (seed, step, rank)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def checkpoints(out: Path) -> list[Path]:
    """The run folder's checkpoints, oldest step first (`model_path` owns what a run folder holds)."""
    return run_checkpoints(out)


def save_checkpoint(out: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write to a hidden temporary name, rename, then delete all but the newest `keep_last`."""
    path = out / f"ckpt-{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


class Logger:
    """Rank 0's metrics: one line to stdout, one JSON line to RUN_DIR/log.jsonl, TensorBoard if installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, out / "log.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # without tensorboard: stdout and log.jsonl only
                pass

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "kind"
        )
        print(f"[{record['kind']}] {shown}", flush=True)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tb.flush()


def mean_over_ranks(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Per-masked-frame means of the model's metric sums over all ranks (one all_reduce): fairseq's sums
    over all GPUs divided by their summed sample_size, so the numbers do not depend on the world size."""
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], device=device).double() for k in keys])
    if dist.is_initialized():
        dist.all_reduce(packed)
    return MERT.per_frame(dict(zip(keys, packed.tolist(), strict=True)))


def scale_gradients(params: Iterator[torch.nn.Parameter], sample_size: torch.Tensor, world: int) -> None:
    """Turn the gradients of summed losses into fairseq's: x world / (sample_size of all ranks and
    micro-steps: the masked frames, plus the unmasked ones when they are predicted too). DDP averaged them
    over the ranks, so the result is all ranks' summed gradients over all their frames counted: what one
    process gets on the whole batch, however it is split (multiply_grads)."""
    total = sample_size.detach().double().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, (world / total.clamp(min=1.0)).to(grads[0].dtype))


@torch.no_grad()
def evaluate(
    model: MERT, index: ShardIndex, spec: CropSpec, tcfg: TrainConfig, rank: int, world: int, autocast: Any
) -> dict[str, float]:
    """Masked loss and accuracy on the valid shards (no noise mixture, fixed masks): sums over all batches
    and ranks divided by all their masked frames, as in training."""
    model.eval()
    torch.manual_seed(tcfg.seed)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    for batch in valid_batches(index, spec, rank, world, tcfg.eval_batches):
        audio = batch["audio"].to(device)
        with autocast:
            out = model(audio, {k: v.to(device) for k, v in batch["labels"].items()})
            if "collapse" not in sums:
                sums["collapse"] = cross_clip_cosine(model.encode(audio, None)[0]).double()
                sums["collapse_batches"] = torch.ones((), dtype=torch.float64, device=device)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double()
    model.train()
    if not sums:  # this rank had no valid batch: still join the all_reduce with zeros
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in metric_names(model)}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = torch.stack([sums.pop("collapse", zero), sums.pop("collapse_batches", zero)])
    if dist.is_initialized():
        dist.all_reduce(packed)
    means = mean_over_ranks(sums, device)
    if means and packed[1] > 0:
        means["collapse"] = float(packed[0] / packed[1])
    return means


COLLAPSE_WARN = 0.9  # cross-clip cosine of the last layer above which the trainer warns


def cross_clip_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between frames of *different* clips of a (B, T, D) batch of the last layer's
    states: about 0.3 at random init, 1.0 when every frame of every clip maps to one vector (a collapsed
    model, whose layers a probe finds worse than its random init). 0 for a batch of one clip."""
    if hidden.shape[0] < 2:
        return torch.zeros((), device=hidden.device)
    x = torch.nn.functional.normalize(hidden.float(), dim=-1)
    total = x.sum(dim=1)  # (B, D): cos summed over a clip's frames
    same = (total * total).sum()  # pairs within a clip (and of a frame with itself)
    every = total.sum(0).pow(2).sum()  # all pairs
    frames = hidden.shape[1]
    pairs = (hidden.shape[0] * frames) ** 2 - hidden.shape[0] * frames**2
    return (every - same) / pairs


def metric_names(model: MERT) -> list[str]:
    """The keys of the model's sums (each rank must all_reduce the same ones)."""
    names = ["loss", "feature_pen", "masked", "frames", "sample_size"]
    names += [f"loss_{t}" for t, _, _ in model.cfg.codebooks]
    if model.cfg.pred_nomask_weight > 0:
        names += [f"loss_{t}_u" for t, _, _ in model.cfg.codebooks]
    names += [f"acc_{t}_{q}" for t, q in model.heads]
    return names + (["cqt_mse"] if model.cqt is not None else [])


def peak_flops(tcfg: TrainConfig, device: torch.device) -> float:
    if tcfg.peak_flops or device.type != "cuda":
        return tcfg.peak_flops
    name = torch.cuda.get_device_name(device)
    return next(
        (peak for key, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])) if key in name), 0.0
    )


CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped configs, in a checkout and a wheel


def config_path(text: str | Path) -> Path:
    """--config: a yaml file, or the name of a shipped config (tiny, small, mert_95m, mert_330m)."""
    path = Path(text)
    if path.is_file():
        return path
    shipped = CONFIGS / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ValueError(f"--config {text}: no such file; give a yaml file or a shipped config name ({names})")


def check_inputs(
    config: str | Path, shards: str, overrides: list[str]
) -> tuple[ModelConfig, TrainConfig, ShardIndex]:
    """Everything the run needs, checked before any process group starts, each failure in one line that
    says what to do: the config and its overrides, the shard set, its teachers, its sample grid."""
    try:
        mcfg, tcfg = load_config(config_path(config), overrides)
    except (OSError, TypeError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {config}: {exc}") from exc
    if mcfg.mask_prob <= 0 and mcfg.pred_nomask_weight <= 0:
        raise ValueError(
            "mask_prob 0 masks no frame (as in HuBERT) and pred_nomask_weight 0 predicts none: nothing to "
            "learn; set mask_prob > 0 (MERT: 0.8) or pred_nomask_weight > 0"
        )
    try:
        index = load_shard_index(shards)
    except FileNotFoundError as exc:
        raise ValueError(
            f"--shards {shards}: no index.json there; --shards is the folder (or URL) that "
            "`mert-pipe shard` or `mert-pipe run` wrote (default WORKDIR/shards)"
        ) from exc
    except (OSError, ShardError) as exc:
        raise ValueError(f"--shards {shards}: {exc}") from exc
    missing = [t for t in tcfg.teachers if t not in index.teachers]
    if missing:
        raise ValueError(
            f"teachers {missing} are not in {shards}/index.json, which has {sorted(index.teachers)}: "
            f"pass teachers=[{','.join(sorted(index.teachers))}] or shard those label sets"
        )
    if index.hop != mcfg.hop or index.sample_rate != mcfg.sample_rate:
        raise ValueError(
            f"shards are {index.sample_rate} Hz / hop {index.hop}, the model expects "
            f"{mcfg.sample_rate} Hz / hop {mcfg.hop}"
        )
    if not index.samples("train"):
        raise ValueError(f"--shards {shards}: index.json lists no train samples")
    mcfg.codebooks = [(t, *index.teachers[t]) for t in tcfg.teachers]
    if tcfg.init_from:  # the source fixes the model's shape; it is read in full only in train()
        overridden = {item.partition("=")[0].strip() for item in overrides}
        mcfg, changed = apply_shape(mcfg, read_source(tcfg.init_from, with_state=False), overridden)
        if changed and int(os.environ.get("RANK", 0)) == 0:
            print(f"init from {tcfg.init_from}: model shape {', '.join(changed)}", file=sys.stderr)
    return mcfg, tcfg, index


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """--out: a new run needs an empty (or new) folder, so that it never mixes with, or prunes, another
    run's checkpoints; --resume continues the run that is there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder")
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if held and not resume:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ValueError(
            f"--out {out} already holds {shown}: pass --resume to continue that run, or give an empty --out "
            "for a new one"
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", required=True, help="a yaml file, or a shipped config: tiny, small, mert_95m, mert_330m"
    )
    parser.add_argument("--shards", required=True, help="folder with index.json and {train,valid}/ shards")
    parser.add_argument("--out", required=True, help="run folder: checkpoints and logs")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument(
        "--init-from",
        help="start a new run from these weights: a MERT-v1 HF directory, an `export hf` directory, one of "
        "our checkpoints or run folders, or MERT-v1-*_fairseq.pt (same as init_from=PATH)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.init_from:
        args.overrides.append(f"init_from={args.init_from}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mcfg, tcfg, index = check_inputs(args.config, args.shards, args.overrides)
        if int(os.environ.get("RANK", 0)) == 0:  # rank 0 alone writes the run folder
            check_run_dir(args.out, args.resume)
    except ValueError as exc:  # one line, exit 2, before any process group (torchrun adds its own report)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        for warning in index.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    out = Path(args.out)
    try:  # rank 0 holds the run folder's lock for the whole run: a second run into it is refused
        with workdir_lock(out) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext():
            train(mcfg, tcfg, index, out, args.resume)
    except WorkdirBusy as exc:
        print(f"error: {exc}; wait for it, or give another --out", file=sys.stderr)
        return 2
    return 0


def train(mcfg: ModelConfig, tcfg: TrainConfig, index: ShardIndex, out: Path, resume: bool) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = cuda and tcfg.precision == "auto"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    out.mkdir(parents=True, exist_ok=True)

    found = checkpoints(out) if resume else []
    state = torch.load(found[-1], map_location="cpu", weights_only=True) if found else None
    if state is not None:  # the run's own head layout: a run begun before label_specials has no special rows
        saved = int(state["config"]["model"].get("label_specials", 0))
        if saved != mcfg.label_specials:
            if master:
                print(
                    f"[resume] {found[-1].name} has {saved} special label rows a head, this config "
                    f"{mcfg.label_specials}: the run continues with {saved} (its own objective); start a new "
                    "run with --init-from this checkpoint for fairseq's",
                    flush=True,
                )
            mcfg = replace(mcfg, label_specials=saved)

    torch.manual_seed(tcfg.seed)
    raw = MERT(mcfg).to(device)
    decay = [p for p in raw.parameters() if p.dim() >= 2]  # no decay on biases and norms
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr,
        betas=tcfg.betas,
        eps=tcfg.eps,
        fused=cuda,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tcfg))
    step, position = 0, None
    init: dict[str, Any] = {}  # where the weights came from, kept in every checkpoint (export hf reads it)
    if not found and tcfg.init_from:
        source = read_source(tcfg.init_from)
        init_report = initialise(raw, source)
        del source
        init = {
            k: init_report[k] for k in ("kind", "path", "sha256", "loaded", "loaded_heads", "reinitialised")
        }
        init["unused"] = sorted(init_report["unused"])
        if master:
            reinit = ", ".join(init_report["reinitialised"]) or "nothing"
            print(
                f"[init] {init_report['kind']} {init_report['path']} (sha256 {init_report['sha256'][:12]}): "
                f"{init_report['loaded']} tensors loaded; re-initialised: {reinit}; "
                f"{len(init_report['unused'])} source tensors unused",
                flush=True,
            )
    elif found and tcfg.init_from and master:
        print(f"[init] --resume continues {found[-1]}; init_from is not read again", flush=True)
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, position = int(state["step"]), state["data"]
        init = dict(state["config"].get("init") or {})
        torch.set_rng_state(state["rng"]["cpu"])
        if cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    model: Any = raw
    if world > 1:
        model = DistributedDataParallel(
            raw,
            device_ids=[local_rank] if cuda else None,
            forward_sync_buffers=False,  # no running stats; the CQT kernels are constant
            find_unused_parameters=mcfg.layerdrop > 0,  # dropped layers get no gradient
        )
    spec = CropSpec(
        tuple(tcfg.teachers),
        tcfg.batch_size,
        tcfg.crop_samples,
        tcfg.min_samples,
        tcfg.shuffle_buffer,
        tcfg.seed,
    )
    loader = Loader(
        index,
        spec,
        rank=rank,
        world=world,
        workers=tcfg.num_workers,
        epoch_batches=tcfg.epoch_batches,
        position=position,
        pin_memory=cuda,
    )
    log = Logger(out, master)
    if master:
        run_config = {"model": asdict(mcfg), "train": asdict(tcfg), "world": world, "init": init}
        atomic_write_json(out / "config.json", run_config)
        params = sum(p.numel() for p in raw.parameters())
        print(
            f"[start] step {step} | world {world} | device {device} | params {params / 1e6:.1f}M | "
            f"{'bf16' if bf16 else 'fp32'} | epoch {loader.epoch_batches} batches/rank",
            flush=True,
        )
    peak = peak_flops(tcfg, device)
    batches: Iterator[dict[str, Any]] = iter(loader)
    window: dict[str, torch.Tensor] = {}
    window_steps, window_clips, window_audio, window_flops = 0, 0, 0.0, 0.0
    window_grad_norm = torch.zeros((), device=device)
    window_start = time.perf_counter()
    warned_no_valid = False
    last = min(tcfg.max_steps, tcfg.stop_after or tcfg.max_steps)
    while step < last:
        reseed(tcfg.seed, step, rank)
        sample_size = torch.zeros((), dtype=torch.float64, device=device)  # this rank's, over the micro-steps
        for micro in range(tcfg.grad_accum):
            batch = next(batches)
            audio = batch["audio"].to(device, non_blocking=True)
            labels = {k: v.to(device, non_blocking=True) for k, v in batch["labels"].items()}
            sync = world == 1 or micro == tcfg.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync(), autocast:
                result = model(audio, labels)
                result["loss"].backward()  # a sum over masked frames; scale_gradients divides below
            for key, value in result.items():
                window[key] = window.get(key, 0.0) + value.detach().double()
            sample_size += result["sample_size"]  # fairseq's: the masked frames (+ unmasked ones)
            window_clips += audio.shape[0]
            window_audio += audio.numel() / mcfg.sample_rate
            window_flops += audio.shape[0] * flops_per_clip(mcfg, audio.shape[1])
        scale_gradients(raw.parameters(), sample_size, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tcfg.grad_clip or math.inf)
        window_grad_norm = window_grad_norm + grad_norm.detach().float()  # the same on every rank
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1

        if step % tcfg.log_interval == 0 or step == last:
            metrics = mean_over_ranks(window, device)
            seconds = time.perf_counter() - window_start
            record = {"kind": "train", "step": step, **metrics, "lr": lr}
            record["grad_norm"] = float(window_grad_norm) / window_steps
            record["samples_per_s"] = window_clips * world / seconds
            record["audio_s_per_s"] = window_audio * world / seconds
            if peak:
                record["mfu"] = window_flops / seconds / peak
            log(record)
            window, window_steps, window_clips, window_audio, window_flops = {}, 0, 0, 0.0, 0.0
            window_grad_norm = torch.zeros((), device=device)
            window_start = time.perf_counter()
        if tcfg.eval_interval and (step % tcfg.eval_interval == 0 or step == last):
            metrics = evaluate(raw, index, spec, tcfg, rank, world, autocast)
            if metrics:
                log({"kind": "valid", "step": step, **metrics})
                if master and metrics.get("collapse", 0.0) > COLLAPSE_WARN:
                    print(
                        f"[warn] step {step}: the model is collapsing (frames of different clips have "
                        f"cosine {metrics['collapse']:.2f} at the last layer, about 0.3 at init): its layers "
                        "are losing what tells clips apart; see 'Collapse' in docs/training.md",
                        flush=True,
                    )
            elif master and not warned_no_valid:
                warned_no_valid = True
                print(
                    "[valid] no full validation batch: the valid shards hold too few clips of at least "
                    "min_samples for batch_size; no validation is logged",
                    flush=True,
                )
            window_start = time.perf_counter()
        if master and (step % tcfg.ckpt_interval == 0 or step == last):
            rng = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if cuda else {})
            state = {
                "model": raw.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "config": {"model": asdict(mcfg), "train": asdict(tcfg), "init": init},
                "rng": rng,
                "data": loader.position,
            }
            save_checkpoint(out, state, tcfg.keep_last)
            window_start = time.perf_counter()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
