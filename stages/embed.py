"""`embed` stage: per-file embeddings (`OUT/<id>.npy`, float32) of a trained model, on either executor.

Plan (driver): resolve the model once (a missing or broken checkpoint, or `--layers` out of range, fails
before any worker starts) and hash its weights; list the inputs (`mert_pipeline.embed.list_inputs`: a file,
a folder, a manifest.parquet or a list of paths) in their deterministic order, with each file's size and
mtime, into task listings of `files_per_task` files. A task's fingerprint covers its listing (paths, sizes,
mtimes) and the config (weights sha256, layers, pooling, chunking), so an edited file, another checkpoint
or another `--layers` re-runs exactly the tasks it touches. A complete task whose `.npy` was deleted loses
its completion marker here and runs again.

Run (worker): the `Embedder`, loaded once per process and cached (a pool worker or Ray actor loads it
once for the whole run; on a GPU each local worker claims its own), embeds the task's files with
`mert_pipeline.embed.embed_files`, which writes each `.npy` atomically. A journal makes a killed task
resume file by file. The task's accepted files and rejects go to its part files, in listing order.

Finalize (driver): merge the parts into `OUT/rejects.jsonl` and describe the run in `OUT/embed.json`.
OUT plays the role of WORKDIR: bookkeeping lives in `OUT/.work/embed/`, merged counters in
`OUT/stats/embed.json`. Outputs do not depend on the executor or `--files-per-task`: chunks of one file
are batched together, never with another file's. On CPU they depend, by float rounding only, on torch's
intra-op thread count (`threads`, which the CLI derives from `--workers`): sums split over other threads
round differently (1e-6 at most on the tiny test model).

Ids: two inputs with the same id (two `01.wav` in different folders of a path list) would write the same
`.npy`; the first in listing order keeps it and the others are rejected as `duplicate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline import layout, storage
from mert_pipeline.devices import (
    check_device,
    resolve_device,
    set_threads,
    uses_cuda,
    with_gpu,
    worker_device,
)
from mert_pipeline.embed import Embedder
from mert_pipeline.executor import Resources, Task, is_complete, marker_path, rank_path
from mert_pipeline.fs import atomic_path, atomic_write_json, remove_stale_tmp
from mert_pipeline.layout import Workdir
from mert_pipeline.listing import Journal, drop_journals, read_listing, write_listings
from mert_pipeline.manifests.io import RejectsWriter, iter_rejects
from mert_pipeline.manifests.records import Reject
from mert_pipeline.storage import Location, as_location, is_url

SUMMARY = "embed.json"
REJECTS = layout.REJECTS
SUBDIRS = ("listing", "parts", "rejects", "journal", "completions", "stats", "errors")
POOLS = ("mean", "none")
_VERSION = 1
_EMBEDDERS: dict[tuple[str, str, str], Embedder] = {}  # this process's model: (path, sha256, device)


@dataclass(frozen=True)
class EmbedConfig:
    """The user's options; `resolve()` (driver) adds the model's identity and shape."""

    inputs: Location  # an audio file, a folder, a manifest.parquet, a tsv/txt list of paths, or a URL
    out: Path
    checkpoint: Path  # a trainer checkpoint, a run folder (its newest) or an `export hf` directory
    layers: str = "all"  # all, L or L1,L2,...
    pool: str = "mean"  # mean: (layers, D); none: (layers, T, D)
    chunk_seconds: float = 30.0
    batch_size: int = 8  # equal-length chunks of one file per forward pass
    device: str = "auto"
    files_per_task: int = 8
    threads: int = 0  # torch intra-op threads per worker (0: torch's default); not part of the outputs
    # filled in by resolve():
    checkpoint_sha256: str = ""
    num_layers: int = 0
    dim: int = 0
    layer_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"--pool must be mean or none, not {self.pool!r}")
        if self.files_per_task < 1 or self.batch_size < 1:
            raise ValueError("files_per_task and batch_size must be at least 1")
        if not self.chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be positive, not {self.chunk_seconds}")
        check_device(self.device)

    def resolve(self) -> EmbedConfig:
        """Load the model once here, on the CPU (errors surface before workers start), hash its weights
        and check `layers` against it. On a CPU run the loaded model is kept for this process's worker."""
        from mert_pipeline.embed import load_embedder, model_identity, parse_layers

        path, sha = model_identity(self.checkpoint)
        embedder = load_embedder(path, "cpu")
        picked = parse_layers(self.layers, embedder.num_layers)
        if resolve_device(self.device).type == "cpu":
            _EMBEDDERS.clear()
            _EMBEDDERS[(str(path), sha, self.device)] = embedder
        return dataclasses.replace(
            self,
            checkpoint=path,
            checkpoint_sha256=sha,
            num_layers=embedder.num_layers,
            dim=embedder.dim,
            layer_indices=tuple(picked if picked is not None else range(embedder.num_layers + 1)),
        )

    def fingerprint(self) -> str:
        """What decides the bytes of every `.npy` (not the device, the paths of the outputs or threads)."""
        facts = {
            "checkpoint_sha256": self.checkpoint_sha256,
            "layers": list(self.layer_indices),
            "pool": self.pool,
            "chunk_seconds": self.chunk_seconds,
            "batch_size": self.batch_size,
            "version": _VERSION,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


@dataclass
class EmbedStage:
    """The embed stage over one `EmbedConfig`; picklable, so it travels to pool workers and Ray actors."""

    config: EmbedConfig
    name: str = "embed"
    resources: Resources = field(default_factory=lambda: Resources(model=True))  # Ray: an actor pool

    def __post_init__(self) -> None:
        if not self.config.checkpoint_sha256:
            self.config = self.config.resolve()
        self.resources = with_gpu(self.resources, self.config.device)  # as tokenize: a GPU per Ray actor

    @property
    def workdir(self) -> Path:
        return self.config.out

    def plan(self) -> list[Task]:
        from mert_pipeline.embed import list_inputs

        remove_stale_tmp(self.config.out)  # .npy temporaries of a killed run (flat in OUT)
        owner: dict[str, str] = {}

        def rows() -> Iterator[dict[str, Any]]:
            for file_id, path in list_inputs(self.config.inputs):
                if is_url(path):  # an object in a bucket: its size stands for its identity
                    row: dict[str, Any] = {"id": file_id, "path": str(path)}
                    with contextlib.suppress(OSError):
                        row.update(size=storage.size(path))
                else:
                    row = {"id": file_id, "path": str(Path(path).absolute())}
                    with contextlib.suppress(
                        OSError
                    ):  # a missing file is rejected by its task, with a reason
                        st = os.stat(path)
                        row.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
                if file_id in owner:
                    row["duplicate_of"] = owner[file_id]
                else:
                    owner[file_id] = row["path"]
                yield row

        tasks = write_listings(self, rows(), self.config.files_per_task, self.config.fingerprint(), SUBDIRS)
        for task in tasks:  # a deleted output: its task runs again
            if is_complete(self, task) and not all(
                (self.config.out / f"{item['id']}.npy").exists() for item in self._part(task.rank)
            ):
                marker_path(self, task.rank).unlink()
        return tasks

    def _part(self, rank: int) -> list[dict[str, Any]]:
        """A task's accepted files: id, path, seconds, shape (a missing part reads as empty)."""
        try:
            text = rank_path(self, "parts", rank, ".jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    def embedder(self) -> Embedder:
        """This process's model, loaded on first use (on the GPU this worker claimed, if any)."""
        from mert_pipeline.embed import load_embedder, model_identity

        cfg = self.config
        key = (str(cfg.checkpoint), cfg.checkpoint_sha256, cfg.device)
        set_threads(cfg.threads)  # every time: the driver's cached model came without it
        if key not in _EMBEDDERS:
            if model_identity(cfg.checkpoint)[1] != cfg.checkpoint_sha256:
                raise RuntimeError(f"{cfg.checkpoint} changed during the run (sha256 differs); rerun")
            device = worker_device(cfg.device, Workdir(cfg.out).gpu_locks)
            _EMBEDDERS.clear()
            _EMBEDDERS[key] = load_embedder(cfg.checkpoint, device)
        return _EMBEDDERS[key]

    def run(self, task: Task, stats: Counter) -> None:
        from mert_pipeline.embed import embed_files

        cfg = self.config
        rows = read_listing(self, task.rank)
        results: dict[str, dict[str, Any]] = {}
        with Journal(self, task) as journal:
            todo: list[tuple[str, Path]] = []
            for row in rows:
                if "duplicate_of" in row:  # rejected below, never embedded
                    continue
                done = journal.done.get(row["id"])
                if done is not None and ("reject" in done or _npy_intact(cfg.out, row["id"], done["shape"])):
                    results[row["id"]] = done
                    stats["resumed"] += 1
                else:
                    todo.append((row["id"], as_location(row["path"])))
            if todo:
                embedder = self.embedder()
                every = cfg.layer_indices == tuple(range(cfg.num_layers + 1))
                layers = None if every else list(cfg.layer_indices)  # None: no copy of the states
                start = time.perf_counter()
                for file_id, result in embed_files(
                    embedder, todo, cfg.out, layers, cfg.pool, cfg.chunk_seconds, cfg.batch_size
                ):
                    item = {"id": file_id, **result}
                    journal.add(item)
                    results[file_id] = item
                    if "reject" not in result:
                        stats["embedded_audio_seconds"] += result["seconds"]
                        stats[f"device.{embedder.device.type}"] += 1
                stats["compute_seconds"] += time.perf_counter() - start
        parts: list[str] = []
        with RejectsWriter(rank_path(self, "rejects", task.rank, ".jsonl")) as rejects:
            for row in rows:  # listing order, whatever happened in which run
                stats["files_seen"] += 1
                if "duplicate_of" in row:
                    taken = f"id {row['id']} already taken by {row['duplicate_of']}"
                    item = {"reject": "duplicate", "detail": taken}
                else:
                    item = results[row["id"]]
                if "reject" in item:
                    reject = Reject(row["path"], item["reject"], item["detail"])
                    rejects.write(reject)
                    stats[f"rejected.{reject.reason}"] += 1
                    continue
                record = {"id": row["id"], "path": row["path"], "seconds": item["seconds"]}
                parts.append(json.dumps({**record, "shape": item["shape"]}, sort_keys=True) + "\n")
                stats["accepted"] += 1
                stats["audio_seconds"] += item["seconds"]
        with atomic_path(rank_path(self, "parts", task.rank, ".jsonl")) as tmp:
            tmp.write_text("".join(parts))

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        cfg = self.config
        counts: Counter = Counter()
        with RejectsWriter(cfg.out / REJECTS) as rejects:
            for task in tasks:
                for reject in iter_rejects(rank_path(self, "rejects", task.rank, ".jsonl")):
                    rejects.write(reject)
                    counts[f"rejected.{reject.reason}"] += 1
                for item in self._part(task.rank):
                    counts["accepted"] += 1
                    counts["audio_seconds"] += item["seconds"]
        drop_journals(self, tasks)
        counts["files_seen"] = stats.get("files_seen", 0)
        counts["rejected"] = sum(v for k, v in counts.items() if k.startswith("rejected."))
        counts["resumed"] = stats.get("resumed", 0)
        compute = stats.get("compute_seconds", 0.0)
        devices = sorted(k.split(".", 1)[1] for k in stats if k.startswith("device."))
        summary = {
            "counts": {key: counts[key] for key in sorted(counts)},
            "checkpoint": str(cfg.checkpoint),
            "checkpoint_sha256": cfg.checkpoint_sha256,
            "layers": cfg.layers,
            "layer_indices": list(cfg.layer_indices),
            "pool": cfg.pool,
            "chunk_seconds": cfg.chunk_seconds,
            "batch_size": cfg.batch_size,
            "device": ",".join(devices) or ("cuda" if uses_cuda(cfg.device) else "cpu"),
            "shape": ["layers", "D"] if cfg.pool == "mean" else ["layers", "T", "D"],
            "throughput": {  # summed over tasks, so per worker; the run's wall time is in stats/embed.json
                "compute_seconds": round(compute, 3),
                "embedded_audio_seconds": round(stats.get("embedded_audio_seconds", 0.0), 3),
                "x_real_time": round(stats.get("embedded_audio_seconds", 0.0) / compute, 2) if compute else 0,
            },
            "outputs": {"embeddings": str(cfg.out / "<id>.npy"), "rejects": str(cfg.out / REJECTS)},
        }
        atomic_write_json(cfg.out / SUMMARY, summary)
        return summary


def _npy_intact(out: Path, file_id: str, shape: list[int]) -> bool:
    try:
        return list(np.load(out / f"{file_id}.npy", mmap_mode="r").shape) == shape
    except (OSError, ValueError):
        return False
