"""`features` stage: frame features of every resampled file, plus the sample and statistics k-means needs.

Plan (driver): stream `AUDIO_DIR/manifest.parquet` (rows of the selected splits) into task listings and
give each task its share of the frame sample (below). Run (worker): stream each file's audio through the
extractor (`teachers.stream_features`, the path the feature teachers use too), write its features to
`FEATURES/ab/<id>.npy`, and feed them to the task's `RunningStats` and `ReservoirSampler`. Finalize
(driver): merge the task parts into `FEATURES/features.parquet` and `rejects.jsonl`, the statistics into
`stats.npz`, the samples into `sample.npy`, and describe it all in `features.json`.

**Storage: float32, shape (frames, dim), frames = ceil(num_samples / 320).** float16 would halve the
store (156 -> 78 bytes per MFCC frame), but its 3 significant digits move frames across k-means
boundaries, and the tokenize teachers compute MFCC in float32: with float32 the stored features are
bit for bit what `tokenize --teacher kmeans` assigns, so `assign(stored, centroids)` equals its labels.

**Sample for `kmeans fit`: proportionally stratified.** The driver knows every task's frame count from
the manifest (ceil(num_samples / 320) per file), so it splits `sample_frames` over tasks in proportion
(largest remainders, exact total), and each task keeps a uniform reservoir sample of its quota. Every
frame is then sampled with the same probability (sample_frames / total frames, up to rounding), the
sample on disk never exceeds `sample_frames` frames (no copy of the feature store, however small the
tasks), and `kmeans fit` reads only `sample.npy`. Each task's sampler is seeded by (seed, rank), so the
sample depends on the seed and on `files_per_task`, never on the executor or the worker count.

A quota is part of its task's fingerprint, so when the corpus grows the quotas change and tasks rerun;
their files' features are then read back from the stored `.npy` files instead of being recomputed.
`store=False` computes statistics (and the sample) only: the BEST-RQ teacher's mean/std pass over the
train files is this stage with log-mel features and nothing stored.

`kind="cqt"` stores the music k-means teacher's log-CQT (168 dims, `teachers.features.LogCQT`) under
`features/cqt`, as MFCC under `features/mfcc`.

`kind="model"` stores layer `layer` of a trainer checkpoint (`mert_pipeline.teachers.model_features`: layer
convention, padding to ceil(n / 320) frames, per-window context) under `features/model_l{layer}`; the
checkpoint's sha256 and the layer are part of the extractor config, hence of its hash and the fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline.devices import set_threads, with_gpu
from mert_pipeline.executor import Resources, Task, rank_path, stage_dir
from mert_pipeline.fs import atomic_path, atomic_save_npy, atomic_write_json, remove_stale_tmp
from mert_pipeline.grid import FRAME_RATE, HOP, SAMPLE_RATE, num_frames
from mert_pipeline.layout import FeatureSet, Workdir, check_name
from mert_pipeline.listing import merge_task_parts, prune_unlisted, read_listing, write_listings
from mert_pipeline.manifests.io import ManifestWriter, RejectsWriter, iter_batches
from mert_pipeline.manifests.records import DEFAULT_SEED, SPLITS, FeatureRecord, Reject
from mert_pipeline.teachers import FileToLabel, stream_features
from mert_pipeline.teachers.features import MFCC, SIGNAL_KINDS, LogCQT, LogMel, RunningStats, make_extractor
from mert_pipeline.teachers.kmeans import ReservoirSampler
from mert_pipeline.teachers.model_features import ModelFeatures

KINDS = (*SIGNAL_KINDS, "model")
SUBDIRS = ("listing", "parts", "rejects", "samples", "completions", "stats", "errors")
LISTING_COLUMNS = ["id", "path", "num_samples", "sampling_rate", "split"]
_NPY_NAME = re.compile(r"^[0-9a-f]{16}\.npy$")
_VERSION = 1


Extractor = MFCC | LogMel | LogCQT | ModelFeatures


def extractor_hash(extractor: Extractor) -> str:
    text = json.dumps(extractor.config(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_quota(total: int, weights: list[int]) -> list[int]:
    """`total` split over `weights` in proportion, as integers summing to min(total, sum(weights)), none
    above its weight: floors first, then one more to the largest remainders (ties to the lower index)."""
    whole = sum(weights)
    if total >= whole:
        return list(weights)
    quotas = [total * w // whole for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


@dataclass(frozen=True)
class FeaturesConfig:
    workdir: Path
    kind: str = "mfcc"
    name: str | None = None  # WORKDIR/features/NAME; default: the kind
    store: bool = True  # write per-file features (False: statistics and sample only)
    splits: tuple[str, ...] = SPLITS
    sample_frames: int = 1_000_000  # frames kept for `kmeans fit`, over the whole corpus; 0: none
    seed: int = DEFAULT_SEED
    files_per_task: int = 16
    threads: int = 1  # torch intra-op threads of each worker
    sample_rate: int = SAMPLE_RATE
    checkpoint: str | None = None  # kind "model": any MERT weights source (trainer.weights)
    layer: int | None = None  # kind "model": 0 = transformer input, 1..N = layer outputs
    model: ModelFeatures | None = None  # kind "model": resolved from checkpoint/layer on construction

    def __post_init__(self) -> None:
        if self.kind == "model":
            if self.model is None:
                if self.checkpoint is None or self.layer is None:
                    raise ValueError("--kind model needs --checkpoint and --layer")
                object.__setattr__(self, "model", ModelFeatures.from_checkpoint(self.checkpoint, self.layer))
        elif self.checkpoint is not None or self.layer is not None:
            raise ValueError("--checkpoint and --layer go with --kind model only")
        elif self.kind not in KINDS:
            raise ValueError(f"feature kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        check_name(self.feature_name)
        if not self.splits or any(s not in SPLITS for s in self.splits):
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, not {self.splits}")
        if self.sample_frames < 0 or self.files_per_task < 1:
            raise ValueError("sample_frames must be >= 0 and files_per_task >= 1")
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError("features are defined at 24 kHz (hop 320, 75 Hz)")

    @property
    def feature_name(self) -> str:
        """WORKDIR/features/NAME: --name, else model_l{layer} for model features, else the kind."""
        if self.name:
            return self.name
        return f"model_l{self.model.layer}" if self.model is not None else self.kind

    def extractor(self) -> Extractor:
        return self.model if self.model is not None else make_extractor(self.kind)

    @property
    def features(self) -> FeatureSet:
        return Workdir(self.workdir).features(self.feature_name)

    @property
    def features_dir(self) -> Path:
        return self.features.path

    @property
    def audio_manifest(self) -> Path:
        return Workdir(self.workdir).audio(self.sample_rate).manifest

    def facts(self) -> dict[str, Any]:
        """What decides the outputs' bytes (not the workdir, the task size's effect on the sample aside)."""
        extractor = self.extractor()
        return {
            "kind": self.kind,
            "config": extractor.config(),
            "config_hash": extractor_hash(extractor),
            "dim": extractor.dim,
            "dtype": "float32",
            "frame_rate": FRAME_RATE,
            "hop": HOP,
            "store": self.store,
            "splits": list(self.splits),
            "sample_frames": self.sample_frames,
            "seed": self.seed,
            "files_per_task": self.files_per_task,
            "version": _VERSION,
        } | ({"checkpoint": self.model.checkpoint} if self.model is not None else {})


@dataclass
class FeaturesStage:
    """The features stage over one `FeaturesConfig`; picklable for pool and Ray workers."""

    config: FeaturesConfig
    name: str = "features"
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        self.name = f"features_{self.config.feature_name}"
        if self.config.model is not None:  # a network's features: on Ray, actors that load it once
            self.resources = with_gpu(
                dataclasses.replace(self.resources, model=True), self.config.model.device
            )

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    def _claim(self) -> None:
        """Features of another extractor configuration are derived data: clear them rather than mix."""
        directory = self.config.features_dir
        try:
            existing = json.loads(self.config.features.description.read_text())
        except FileNotFoundError:
            return
        if existing.get("config_hash") != extractor_hash(self.config.extractor()):
            shutil.rmtree(directory)

    def plan(self) -> list[Task]:
        if not self.config.audio_manifest.exists():
            raise FileNotFoundError(
                f"{self.config.audio_manifest} not found: run `mert-pipe resample {self.workdir}` first"
            )
        self._claim()
        remove_stale_tmp(self.config.features_dir)
        facts = self.config.facts()
        config_fp = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
        frames: list[int] = []  # per task

        def rows() -> Iterator[dict[str, Any]]:
            count = 0
            for batch in iter_batches(self.config.audio_manifest, columns=LISTING_COLUMNS):
                for row in batch.to_pylist():
                    if row["split"] not in self.config.splits:
                        continue
                    if row["sampling_rate"] != self.config.sample_rate:
                        raise ValueError(f"{row['path']} is at {row['sampling_rate']} Hz, not 24000 Hz")
                    if count % self.config.files_per_task == 0:
                        frames.append(0)
                    frames[-1] += num_frames(row["num_samples"])
                    count += 1
                    yield row

        tasks = write_listings(self, rows(), self.config.files_per_task, config_fp, SUBDIRS)
        quotas = split_quota(self.config.sample_frames, frames)
        atomic_write_json(stage_dir(self) / "quotas.json", quotas)
        return [
            Task(t.rank, hashlib.sha256(f"{t.fingerprint}:{quota}".encode()).hexdigest(), t.size)
            for t, quota in zip(tasks, quotas, strict=True)
        ]

    def run(self, task: Task, stats: Counter) -> None:
        rows = read_listing(self, task.rank)
        quota = json.loads((stage_dir(self) / "quotas.json").read_text())[task.rank]
        set_threads(self.config.threads)
        extractor = self.config.extractor()
        facts = self.config.facts()
        running = RunningStats(extractor.dim)
        sampler = (
            ReservoirSampler(quota, extractor.dim, seed=(self.config.seed, task.rank)) if quota else None
        )
        with (
            ManifestWriter(
                rank_path(self, "parts", task.rank, ".parquet"),
                str(self.config.features_dir),
                record_type=FeatureRecord,
            ) as parts,
            RejectsWriter(rank_path(self, "rejects", task.rank, ".jsonl")) as rejects,
        ):
            for row in rows:
                stats["files_seen"] += 1
                feats = self._features(row, extractor, stats)
                if isinstance(feats, Reject):
                    rejects.write(feats)
                    stats[f"rejected.{feats.reason}"] += 1
                    continue
                running.update(feats)
                if sampler is not None:
                    sampler.add(feats)
                if self.config.store:
                    parts.write(self._record(row, facts))
                stats["accepted"] += 1
                stats["frames"] += len(feats)
                stats["audio_seconds"] += row["num_samples"] / row["sampling_rate"]
        with atomic_path(rank_path(self, "samples", task.rank, ".npz")) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    frames=sampler.frames
                    if sampler is not None
                    else np.zeros((0, extractor.dim), np.float32),
                    seen=np.int64(sampler.seen if sampler is not None else running.count),
                    count=np.int64(running.count),
                    mean=running._mean,
                    m2=running._m2,
                )

    def _features(self, row: dict[str, Any], extractor: Extractor, stats: Counter) -> np.ndarray | Reject:
        """A file's features: read back if this configuration stored them already, else computed (and
        stored, atomically)."""
        expected = (num_frames(row["num_samples"]), extractor.dim)
        path = self.config.features.file(row["id"])
        if self.config.store:
            try:
                stored = np.load(path, allow_pickle=False)
                if stored.shape == expected and stored.dtype == np.float32:
                    stats["reused"] += 1
                    return stored
            except (OSError, ValueError):
                pass
        failures: dict[str, Reject] = {}
        item = FileToLabel(row["id"], row["path"], row["num_samples"])
        blocks = list(stream_features(extractor, item, failures))
        if row["id"] in failures:
            return failures[row["id"]]
        feats = np.concatenate(blocks) if blocks else np.zeros((0, extractor.dim), np.float32)
        if feats.shape != expected or not np.isfinite(feats).all():
            return Reject(row["path"], "label_mismatch", f"features {feats.shape}, expected {expected}")
        if self.config.store:
            atomic_save_npy(path, feats)
        return feats

    def _record(self, row: dict[str, Any], facts: dict[str, Any]) -> FeatureRecord:
        return FeatureRecord(
            id=row["id"],
            kind=facts["kind"],
            config_hash=facts["config_hash"],
            relpath=FeatureSet.relpath(row["id"]),
            frames=num_frames(row["num_samples"]),
            dim=facts["dim"],
            dtype=facts["dtype"],
            frame_rate=facts["frame_rate"],
            num_samples=row["num_samples"],
            sampling_rate=row["sampling_rate"],
            split=row["split"],
        )

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        directory = self.config.features_dir
        layout = self.config.features
        facts = self.config.facts()
        summary: Counter = Counter()
        kept: set[str] = set()
        with (
            ManifestWriter(layout.manifest, str(directory), record_type=FeatureRecord) as manifest,
            RejectsWriter(layout.rejects) as rejects,
        ):
            for record in merge_task_parts(self, tasks, manifest, rejects, FeatureRecord, summary):
                kept.add(record.relpath)
        if directory.exists():
            summary["removed_stale"] = prune_unlisted(directory, kept, _NPY_NAME)
        running = RunningStats(facts["dim"])
        sizes: list[int] = []
        seen = 0
        for task in tasks:
            path = rank_path(self, "samples", task.rank, ".npz")
            running.merge(RunningStats.load(path))  # the part holds RunningStats.save's fields
            with np.load(path) as part:
                sizes.append(len(part["frames"]))
                seen += int(part["seen"])
        with atomic_path(layout.stats) as tmp:
            running.save(tmp)
        with atomic_path(layout.sample) as tmp:
            sample = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(sum(sizes), facts["dim"])
            )
            offset = 0
            for task, size in zip(tasks, sizes, strict=True):
                with np.load(rank_path(self, "samples", task.rank, ".npz")) as part:
                    sample[offset : offset + size] = part["frames"]
                offset += size
            sample.flush()
            del sample
        for key in ("files_seen", "accepted", "frames", "audio_seconds", "reused"):
            summary[key] = stats.get(key, 0)
        summary["rejected"] = sum(v for k, v in summary.items() if k.startswith("rejected."))
        summary["sample_frames"] = sum(sizes)
        description = {
            **facts,
            "name": self.config.feature_name,
            "sample": {"frames": sum(sizes), "from_frames": seen, "requested": self.config.sample_frames},
            "stats": {
                "frames": running.count,
                "mean": running.mean.tolist() if running.count else None,
                "std": running.std.tolist() if running.count else None,
            },
        }
        atomic_write_json(layout.description, description)
        return {
            "counts": {key: summary[key] for key in sorted(summary)},
            "features": {k: description[k] for k in ("kind", "config_hash", "dim", "dtype", "sample")},
            "outputs": {
                "features_dir": str(directory),
                "features_manifest": str(layout.manifest),
                "features_stats": str(layout.stats),
                "features_sample": str(layout.sample),
            },
        }


def log_mel_stats_config(workdir: Path, threads: int = 1) -> FeaturesConfig:
    """BEST-RQ's normalisation pass: log-mel mean/std over the train files, no features stored."""
    return FeaturesConfig(
        workdir=workdir,
        kind="log_mel",
        name="log_mel_train_stats",
        store=False,
        splits=("train",),
        sample_frames=0,
        threads=threads,
    )
