"""The WORKDIR layout: every path a stage reads or writes, named once.

    WORKDIR/
      manifest.parquet  rejects.jsonl  train.tsv  valid.tsv     `manifest`
      audio_24k/  ab/<id>.flac  manifest.parquet  rejects.jsonl  train.tsv  valid.tsv    `resample`
      features/NAME/  ab/<id>.npy  features.parquet  rejects.jsonl  features.json  stats.npz  sample.npy
      kmeans/NAME/  centroids.npy  fit.json;  kmeans/last.json                       `kmeans fit`
      bestrq/<hash>.npz                                                              BEST-RQ quantizers
      dedup/  fingerprints/ab/<hash>.npy  files.parquet  groups.jsonl  dropped.parquet  dedup.json   `dedup`
      labels/NAME/  ab/<id>.npy  labels.parquet  rejects.jsonl  teacher.json  report.json   `tokenize`
      shards/                                          `shard`'s default SHARDS (format: `shards.py`)
      remote_shards/<hash>/                            bookkeeping of a SHARDS that is a URL
      stats/  STAGE.json  run.json  report/                      merged counters, `run`, `stats`
      .work/STAGE/  listing/ parts/ rejects/ journal/ completions/ stats/ errors/    task bookkeeping
      .work/gpu-locks/  .lock

Per-file outputs live in folders named by the id's first two hex digits (`ab/<id>.npy`), so no folder
holds more than 1/256 of the corpus. Stages take a WORKDIR path in their configs and ask this module for
everything under it; the shard set's own layout (index.json, train/, valid/) belongs to the shard format
(`mert_pipeline.shards`). An id from a file is checked before it becomes a path (`id_relpath`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mert_pipeline.grid import SAMPLE_RATE

MANIFEST = "manifest.parquet"
REJECTS = "rejects.jsonl"
TRAIN_TSV = "train.tsv"
VALID_TSV = "valid.tsv"
WORK = ".work"
STATS = "stats"
LOCK = ".lock"
_ID = re.compile(r"^[0-9a-f]{16}$")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def is_id(value: Any) -> bool:
    """Whether `value` is a file id: 16 lowercase hex digits, what the manifest makes."""
    return isinstance(value, str) and _ID.match(value) is not None


def id_relpath(file_id: str, suffix: str) -> str:
    """`ab/<id><suffix>`: where a per-file output of `file_id` lives in its folder. The id must be 16
    lowercase hex digits (what the manifest makes), so no id read from a file can name another place."""
    if not is_id(file_id):
        raise ValueError(f"id {file_id!r} is not 16 lowercase hex digits")
    return f"{file_id[:2]}/{file_id}{suffix}"


def id_numbers(ids: Any) -> tuple[Any, Any]:
    """Ids (a pyarrow string array) as uint64 numbers, which sort as the ids do, and a mask of the valid
    ones (16 lowercase hex digits; an invalid id's number is 0): a manifest's ids compared, joined and
    sorted as 8 bytes each instead of a Python string per row."""
    import numpy as np
    import pyarrow.compute as pc

    valid = pc.fill_null(pc.match_substring_regex(ids, _ID.pattern), False)  # id_relpath's own rule
    mask = np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)
    good = pc.filter(ids, valid)
    parts = []
    for start in range(0, len(good), 1 << 20):  # a million Python strings at a time
        text = "".join(good.slice(start, 1 << 20).to_pylist())
        parts.append(np.frombuffer(bytes.fromhex(text), dtype=">u8"))
    numbers = np.zeros(len(mask), np.uint64)
    numbers[mask] = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    return numbers, mask


def check_name(name: str, what: str = "--name") -> str:
    """A user-chosen folder name (label set, features, k-means fit): letters, digits, '-' and '_'."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what} must be letters, digits, '-' and '_' only, not {name!r}")
    return name


def check_stem(name: str) -> str:
    """A file name without its suffix read from an input (embed's ids: a manifest's id, a file's relative
    path with '/' as '__'): one path component, not hidden, so OUT/<name>.npy stays in OUT."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(f"id {name!r} cannot name a file in the output folder (one name, not hidden)")
    return name


def audio_dir_name(sample_rate: int) -> str:
    """`audio_24k` for 24000 Hz, `audio_22050hz` where the rate is not a whole number of kHz."""
    return f"audio_{sample_rate // 1000}k" if sample_rate % 1000 == 0 else f"audio_{sample_rate}hz"


def bookkeeping_dir(root: Path, stage: str) -> Path:
    """ROOT/.work/STAGE: a stage's task bookkeeping, under whatever folder it treats as its root (WORKDIR,
    a local SHARDS folder, embed's OUT)."""
    return root / WORK / stage


def stage_stats(root: Path, stage: str) -> Path:
    """ROOT/stats/STAGE.json: a stage's merged counters and summary."""
    return root / STATS / f"{stage}.json"


@dataclass(frozen=True)
class AudioDir:
    """`resample`'s output: a self-contained dataset directory of mono audio at one rate."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    @property
    def rejects(self) -> Path:
        return self.path / REJECTS

    @property
    def train_tsv(self) -> Path:
        return self.path / TRAIN_TSV

    @property
    def valid_tsv(self) -> Path:
        return self.path / VALID_TSV


@dataclass(frozen=True)
class _PerFileOutputs:
    """A folder of one `.npy` per file (`ab/<id>.npy`) with the manifest and rejects that list them."""

    path: Path
    MANIFEST_NAME: ClassVar[str] = MANIFEST

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST_NAME

    @property
    def rejects(self) -> Path:
        return self.path / REJECTS

    @staticmethod
    def relpath(file_id: str) -> str:
        """Where a file's `.npy` goes, relative to the folder (the id checked)."""
        return id_relpath(file_id, ".npy")

    def file(self, file_id: str) -> Path:
        return self.path / self.relpath(file_id)

    def npy(self, relpath: str) -> Path:
        """A `.npy` named by a relpath read from the manifest, checked to stay inside the folder."""
        return _inside(self.path, relpath)


@dataclass(frozen=True)
class LabelSet(_PerFileOutputs):
    """`tokenize`'s output for one label set: labels/NAME."""

    MANIFEST_NAME: ClassVar[str] = "labels.parquet"

    @property
    def teacher(self) -> Path:
        return self.path / "teacher.json"

    @property
    def report(self) -> Path:
        return self.path / "report.json"


@dataclass(frozen=True)
class FeatureSet(_PerFileOutputs):
    """`features`' output for one extractor: features/NAME."""

    MANIFEST_NAME: ClassVar[str] = "features.parquet"

    @property
    def description(self) -> Path:
        return self.path / "features.json"

    @property
    def stats(self) -> Path:
        return self.path / "stats.npz"

    @property
    def sample(self) -> Path:
        return self.path / "sample.npy"


@dataclass(frozen=True)
class KMeansFit:
    """`kmeans fit`'s output: kmeans/NAME."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def centroids(self) -> Path:
        return self.path / "centroids.npy"

    @property
    def fit(self) -> Path:
        return self.path / "fit.json"

    @property
    def iteration(self) -> Path:
        """`mert-pipe iterate`'s record: the checkpoint, the layer (and how it was chosen) and k."""
        return self.path / "iteration.json"


@dataclass(frozen=True)
class DedupDir:
    """`dedup`'s output: Chromaprint fingerprints (named by the resampled file's content hash, so a rerun
    fingerprints only new audio), the files' keep-rule facts, the duplicate groups and the dropped records."""

    path: Path

    @property
    def fingerprints(self) -> Path:
        return self.path / "fingerprints"

    def fingerprint(self, content_hash: str) -> Path:
        """fingerprints/ab/<first 16 hex digits of the content hash>.npy (checked like an id)."""
        return self.fingerprints / id_relpath(content_hash[:16], ".npy")

    @property
    def files(self) -> Path:
        return self.path / "files.parquet"

    @property
    def groups(self) -> Path:
        return self.path / "groups.jsonl"

    @property
    def dropped(self) -> Path:
        """The audio manifest's records of the dropped files: with the kept ones, `dedup`'s whole input."""
        return self.path / "dropped.parquet"

    @property
    def summary(self) -> Path:
        return self.path / "dedup.json"


@dataclass(frozen=True)
class Workdir:
    """One WORKDIR: the paths of every stage's outputs (module docstring)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def rejects(self) -> Path:
        return self.root / REJECTS

    @property
    def train_tsv(self) -> Path:
        return self.root / TRAIN_TSV

    @property
    def valid_tsv(self) -> Path:
        return self.root / VALID_TSV

    def audio(self, sample_rate: int = SAMPLE_RATE) -> AudioDir:
        return AudioDir(self.root / audio_dir_name(sample_rate))

    @property
    def labels_root(self) -> Path:
        return self.root / "labels"

    def labels(self, name: str) -> LabelSet:
        return LabelSet(self.labels_root / check_name(name))

    def label_sets(self) -> list[LabelSet]:
        """Every folder under labels/ with a teacher.json, by name."""
        root = self.labels_root
        found = sorted(p.parent.name for p in root.glob("*/teacher.json")) if root.is_dir() else []
        return [LabelSet(root / name) for name in found if _NAME.match(name)]

    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def features(self, name: str) -> FeatureSet:
        return FeatureSet(self.features_root / check_name(name))

    @property
    def kmeans_root(self) -> Path:
        return self.root / "kmeans"

    def kmeans(self, name: str) -> KMeansFit:
        return KMeansFit(self.kmeans_root / check_name(name))

    @property
    def kmeans_last(self) -> Path:
        """Which fit was last: the centroids `tokenize --teacher kmeans` uses by default."""
        return self.kmeans_root / "last.json"

    @property
    def bestrq(self) -> Path:
        return self.root / "bestrq"

    @property
    def dedup(self) -> DedupDir:
        return DedupDir(self.root / "dedup")

    @property
    def default_shards(self) -> Path:
        return self.root / "shards"

    def remote_shards(self, url: str) -> Path:
        """Bookkeeping (and tars while they upload) of a shard set at a URL, named by the URL so two shard
        sets never mix."""
        return self.root / "remote_shards" / hashlib.sha256(url.encode()).hexdigest()[:16]

    @property
    def stats_dir(self) -> Path:
        return self.root / STATS

    def stage_stats(self, stage: str) -> Path:
        return stage_stats(self.root, stage)

    @property
    def run_stats(self) -> Path:
        return self.stats_dir / "run.json"

    @property
    def report_dir(self) -> Path:
        return self.stats_dir / "report"

    def bookkeeping(self, stage: str) -> Path:
        return bookkeeping_dir(self.root, stage)

    @property
    def gpu_locks(self) -> Path:
        """Lock files by which the workers of one run each claim their own GPU."""
        return self.root / WORK / "gpu-locks"

    @property
    def lock(self) -> Path:
        return self.root / LOCK


def _inside(folder: Path, relpath: str) -> Path:
    """folder/relpath, refused (ValueError) when relpath is absolute or climbs out of folder."""
    parts = Path(relpath).parts
    if not relpath or Path(relpath).is_absolute() or ".." in parts:
        raise ValueError(f"{relpath!r} is not a path inside {folder}")
    return folder / relpath
