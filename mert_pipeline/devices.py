"""Where models run: device names, one GPU per local worker, torch threads per worker, worker counts.

Every stage that loads a model (the RVQ teacher, model features, embed) asks here, so `--device auto`
means the same thing everywhere, a local pool puts one model on each GPU, and workers x threads fits the
cores on a CPU machine.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mert_pipeline.executor import Resources

DEVICES = ("auto", "cpu", "cuda")
_GPU_LOCKS: list[int] = []  # this process's claimed GPU lock files, held until it exits


def cpu_count() -> int:
    return max(1, os.cpu_count() or 1)


def check_device(device: str) -> str:
    """`device` if it is auto, cpu or cuda; a ValueError naming the choices otherwise."""
    if device not in DEVICES:
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None): CUDA when available, else the CPU; 'cuda:N' (a worker's claimed GPU) as is; a
    ValueError when CUDA is asked for and absent."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def uses_cuda(device: str) -> bool:
    return resolve_device(device).type == "cuda"


def claim_gpu(lock_dir: Path) -> str:
    """`cuda:N` for this process: the first GPU no other worker of this run holds (a lock file per GPU,
    held until the process exits), so a local pool puts one model on each GPU. Ray pins GPUs itself
    (CUDA_VISIBLE_DEVICES), so there only one device is visible and this returns cuda:0."""
    import torch

    count = torch.cuda.device_count()
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        fd = os.open(lock_dir / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _GPU_LOCKS.append(fd)
        return f"cuda:{index}"
    return f"cuda:{os.getpid() % max(count, 1)}"  # more workers than GPUs: share


def worker_device(device: str, lock_dir: Path | str) -> str:
    """The device a worker process runs its model on: its own GPU of a local pool (`claim_gpu`) when
    `device` resolves to CUDA without an index, else `device` resolved."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        return claim_gpu(Path(lock_dir or "/tmp"))
    return str(resolved)


def set_threads(threads: int) -> None:
    """Give this worker process `threads` torch intra-op threads (workers x threads should fit the cores);
    0 leaves torch's default."""
    import torch

    if threads < 0:
        raise ValueError(f"thread count must be >= 0, got {threads}")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))


def threads_per_worker(workers: int) -> int:
    """torch threads for each of `workers` processes on this machine: the cores shared out."""
    return max(1, cpu_count() // max(1, workers))


def model_workers(device: str) -> int:
    """Workers of a stage that holds a model: one per GPU; on a CPU one, whose torch threads use every
    core. EnCodec's intra-op threads scale almost linearly here (2 threads ran 1.9x one), and a single
    worker cannot be left with the one long task while the others idle, which is what several 1-thread
    workers did on a small corpus (benchmarks/RESULTS.md)."""
    import torch

    return max(1, torch.cuda.device_count()) if uses_cuda(device) else 1


def with_gpu(resources: Resources, device: str) -> Resources:
    """A model stage's resources with one GPU per task when its device is CUDA (Ray then places each task
    or actor on a GPU; the local pool spreads workers over GPUs with `claim_gpu`)."""
    return dataclasses.replace(resources, gpus=1.0) if uses_cuda(device) else resources
