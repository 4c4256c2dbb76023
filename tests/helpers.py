"""Stages used by the tests: a toy stage with failure switches, and a wrapper that kills a worker once.

They are real stages run by the real executors; the only thing they add is a way to fail on purpose.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mert_pipeline.executor import Resources, Task, stage_dir
from mert_pipeline.fs import atomic_path, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def kill_once(workdir: Path, rank: int, kill_rank: int | None) -> None:
    """SIGKILL the process running `kill_rank` the first time only (a flag file remembers)."""
    if rank != kill_rank:
        return
    flag = workdir / f".killed-{rank}"
    if not flag.exists():
        flag.touch()
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ToyStage:
    """Task r writes out/r.txt; finalize concatenates them into WORKDIR/result.txt."""

    workdir: Path
    n_tasks: int = 8
    crash_ranks: tuple[int, ...] = ()  # raise while WORKDIR/crash exists
    kill_rank: int | None = None  # SIGKILL mid-write, once
    delay: float = 0.0  # seconds each task takes (so a cluster spreads tasks, a driver can be killed)
    name: str = "toy"
    resources: Resources = field(default_factory=Resources)

    def plan(self) -> list[Task]:
        return [Task(rank=r, fingerprint=f"toy-v1-{r}", size=1) for r in range(self.n_tasks)]

    def run(self, task: Task, stats: Counter) -> None:
        if task.rank in self.crash_ranks and (self.workdir / "crash").exists():
            raise ValueError(f"boom in task {task.rank}")
        time.sleep(self.delay)
        payload = hashlib.sha256(f"payload {task.rank}".encode()).hexdigest() * 100
        with atomic_path(stage_dir(self) / "out" / f"{task.rank:05d}.txt") as tmp:
            with tmp.open("w") as handle:
                handle.write(payload[: len(payload) // 2])
                handle.flush()
                kill_once(self.workdir, task.rank, self.kill_rank)  # dies with half a file written
                handle.write(payload[len(payload) // 2 :])
        stats["items"] += 1
        stats["chars"] += len(payload)
        ray = sys.modules.get("ray")
        in_ray_worker = ray is not None and ray.is_initialized()
        if in_ray_worker and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            stats["ray_cpus"] += ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        text = "".join((stage_dir(self) / "out" / f"{t.rank:05d}.txt").read_text() + "\n" for t in tasks)
        atomic_write_text(self.workdir / "result.txt", text)
        return {"counts": {"items": stats.get("items", 0)}}


@dataclass
class KillOnce:
    """Wrap any stage; the process that runs `kill_rank` is SIGKILLed before the task starts, once."""

    inner: Any
    kill_rank: int

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def workdir(self) -> Path:
        return self.inner.workdir

    @property
    def resources(self) -> Resources:
        return self.inner.resources

    def plan(self) -> list[Task]:
        return self.inner.plan()

    def run(self, task: Task, stats: Counter) -> None:
        kill_once(self.inner.workdir, task.rank, self.kill_rank)
        self.inner.run(task, stats)

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        return self.inner.finalize(tasks, stats)


def visible_files(root: Path) -> dict[str, bytes]:
    """Files under root (relative path -> bytes) except hidden ones (temporaries, the lock) and timing
    stats: what must be byte-identical between runs, executors and resumed runs."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not path.name.startswith(".") and "stats/" not in rel:
            out[rel] = path.read_bytes()
    return out


def hidden_tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


ODD_LENGTHS = (1, 319, 320, 321, 599, 2047, 72017)  # samples at 24 kHz: shorter than a window, around a hop


def resampled_workdir(root: Path, n_tracks: int = 3, seed: int = 21) -> Path:
    """A WORKDIR after `manifest` and `resample` (through the Python API): a few synthesized tracks plus one
    file of each of `ODD_LENGTHS` samples (min_seconds 0 keeps them), with a train/valid split."""
    import soundfile as sf

    from mert_pipeline import pipeline
    from mert_pipeline.demo.synth import render_track, synthesize_demo_corpus
    from mert_pipeline.executor import ExecutorConfig

    corpus, workdir = root / "corpus", root / "work"
    synthesize_demo_corpus(corpus, n_tracks=n_tracks, seed=seed, with_bad_files=False)
    for n in ODD_LENGTHS:
        wav = render_track(n, n / 24000 + 0.01, 24000, 1)[:n]
        sf.write(corpus / f"len_{n}.wav", wav, 24000, subtype="PCM_16")
    local = ExecutorConfig(kind="local", workers=1)
    pipeline.manifest([str(corpus)], workdir, valid_percent=0.3, min_seconds=0.0, executor=local)
    pipeline.resample(workdir, executor=local)
    return workdir


def add_label_set(workdir: Path, name: str, source: str = "rvq", skip: int = 0) -> None:
    import numpy as np

    from mert_pipeline.fs import atomic_write_json
    from mert_pipeline.manifests import LabelRecord, iter_records
    from mert_pipeline.manifests.io import ManifestWriter

    """A single-codebook label set in the tokenize layout (what the k-means teacher writes): codebook 0 of
    `source` mod 500, leaving out the first `skip` files so that `no_labels` shows up."""
    records = list(iter_records(workdir / f"labels/{source}/labels.parquet", record_type=LabelRecord))
    root = workdir / "labels" / name
    facts = {
        "name": name,
        "kind": "kmeans",
        "config_hash": f"km-{name}",
        "config": {"k": 500},
        "n_q": 1,
        "num_classes": 500,
        "label_rate": 75.0,
        "hop": 320,
        "sampling_rate": 24000,
    }
    with ManifestWriter(root / "labels.parquet", str(root), record_type=LabelRecord) as writer:
        for record in records[skip:]:
            codes = np.load(workdir / f"labels/{source}" / record.relpath)[:1] % 500
            (root / record.relpath).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / record.relpath, codes.astype(np.int16))
            fields = {**record.__dict__, "teacher": name, "kind": "kmeans", "config_hash": f"km-{name}"}
            writer.write(LabelRecord(**{**fields, "n_q": 1, "num_classes": 500}))
    atomic_write_json(root / "teacher.json", facts)
