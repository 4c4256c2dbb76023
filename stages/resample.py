"""`resample` stage: every file of the manifest to mono at the target rate (24 kHz), one file per id.

Plan (driver): stream `WORKDIR/manifest.parquet` and cut it into chunks of `files_per_task` rows;
chunk i is task i. Run (worker): resample each file of the chunk (see `mert_pipeline.resample`) to
`AUDIO_DIR/ab/<id>.flac` (`ab` = the id's first two hex digits, so no directory holds more than 1/256
of the corpus; a FLAC written here gets a seek table of its frames, `flac_frames.add_seektable`, for
the shard stage), and write `parts/RANK.parquet` (records) and `rejects/RANK.jsonl`. Every finished file
is also appended to `journal/RANK.jsonl`, so a task killed halfway redoes only its unfinished files.
Finalize (driver): merge the parts in rank order into the dataset directory `AUDIO_DIR`
(`WORKDIR/audio_24k` at 24 kHz):

- `manifest.parquet`: one `ResampledRecord` per written file (new path, num_samples, duration, the
  source id/path/rate/channels, peak, clipped samples, silence/clipping flags),
- `rejects.jsonl`: every manifest row that was not written, with its reason,
- `train.tsv` / `valid.tsv`: fairseq manifests whose root is `AUDIO_DIR` itself (the official scripts
  keep naming the original root after resampling; here the header names where the files are).

Audio files that no longer belong to the manifest (rejected on this run, or left by an earlier run with
other options) are deleted, so the directory holds exactly what the manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mert_pipeline import storage
from mert_pipeline.audio import ProbeFailure, hash_file
from mert_pipeline.executor import Resources, Task, rank_path
from mert_pipeline.flac_frames import add_seektable
from mert_pipeline.fs import atomic_path, remove_stale_tmp
from mert_pipeline.layout import AudioDir, Workdir, id_relpath
from mert_pipeline.listing import (
    Journal,
    drop_journals,
    merge_task_parts,
    prune_unlisted,
    read_listing,
    write_listings,
)
from mert_pipeline.manifests.io import FairseqTsvWriter, ManifestWriter, RejectsWriter, iter_batches
from mert_pipeline.manifests.records import SCHEMA_VERSION, Reject, ResampledRecord
from mert_pipeline.resample import SILENCE_PEAK, OutputSpec, resample_file

POLICIES = ("keep", "reject")
SUBDIRS = ("listing", "parts", "rejects", "journal", "completions", "stats", "errors")
LISTING_COLUMNS = ["id", "path", "size_bytes", "content_hash", "split", "sampling_rate", "channels"]
_AUDIO_NAME = re.compile(r"^[0-9a-f]{16}\.(flac|wav)$")


@dataclass(frozen=True)
class ResampleConfig:
    workdir: Path
    output: OutputSpec = field(default_factory=OutputSpec)
    on_silence: str = "keep"  # keep (flagged `silent` in the manifest) | reject
    on_clipping: str = "keep"  # keep (flagged `clipped`) | reject
    clip_fraction: float = 1e-3  # flag a file when more than this fraction of samples hit full scale
    files_per_task: int = 32

    def __post_init__(self) -> None:
        for name in ("on_silence", "on_clipping"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name} must be one of {POLICIES}, not {getattr(self, name)!r}")
        if not 0.0 <= self.clip_fraction <= 1.0:
            raise ValueError(f"clip_fraction is a fraction in [0, 1], got {self.clip_fraction}")
        if self.files_per_task < 1:
            raise ValueError("files_per_task must be at least 1")

    @property
    def audio_dir(self) -> Path:
        return Workdir(self.workdir).audio(self.output.sample_rate).path

    def fingerprint(self) -> str:
        """Everything that changes a file's output or its verdict; the workdir and task size do not."""
        keys = {k: v for k, v in asdict(self).items() if k not in ("workdir", "files_per_task")}
        keys["schema"] = SCHEMA_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def output_relpath(record_id: str, spec: OutputSpec) -> str:
    return id_relpath(record_id, spec.suffix)


def resample_one(row: dict[str, Any], config: ResampleConfig) -> ResampledRecord | Reject:
    """One manifest row -> its written file's record, or a reject. Never raises for bad input.

    The file appears under its final name only once it is complete and accepted (temporary name,
    then rename); a rejected or failed file leaves nothing behind.
    """
    source = row["path"]
    spec = config.output
    relpath = output_relpath(row["id"], spec)
    final = config.audio_dir / relpath
    try:
        try:
            size = storage.size(source)  # a local path or a URL (the corpus in object storage)
        except FileNotFoundError:
            return Reject(source, "missing", "listed in the manifest but no longer exists")
        except OSError as exc:
            return Reject(source, "unreadable", f"cannot stat: {exc.strerror or exc}")
        if size != row["size_bytes"]:
            return Reject(
                source,
                "changed",
                f"size is {size} bytes, the manifest says {row['size_bytes']}; rerun manifest",
            )
        with atomic_path(final) as tmp:
            result = resample_file(source, tmp, spec)
            if (result.source_rate, result.source_channels) != (row["sampling_rate"], row["channels"]):
                raise ProbeFailure(
                    "changed",
                    f"now {result.source_rate} Hz x {result.source_channels} ch, the manifest says "
                    f"{row['sampling_rate']} Hz x {row['channels']} ch; rerun manifest",
                )
            silent = result.peak < SILENCE_PEAK
            clipped = result.clipped_samples > config.clip_fraction * result.num_samples
            if silent and config.on_silence == "reject":
                raise ProbeFailure("silent", f"peak {result.peak:.2e} is below -90 dBFS")
            if clipped and config.on_clipping == "reject":
                raise ProbeFailure(
                    "clipped",
                    f"{result.clipped_samples} of {result.num_samples} samples at full scale "
                    f"(> --clip-fraction {config.clip_fraction:g})",
                )
            if spec.format == "FLAC" and not result.copied:  # a copy stays the source's bytes
                add_seektable(tmp)  # shard then copies segments' frames without scanning for them
            content_hash, size_bytes = hash_file(tmp)
    except ProbeFailure as failure:
        return Reject(source, failure.reason, failure.detail)
    return ResampledRecord(
        id=row["id"],
        path=str(final),
        relpath=relpath,
        format=spec.format,
        subtype=result.subtype,
        sampling_rate=spec.sample_rate,
        num_samples=result.num_samples,
        duration=result.num_samples / spec.sample_rate,
        channels=1,
        size_bytes=size_bytes,
        content_hash=content_hash,
        source_path=source,
        source_hash=row["content_hash"],
        source_sampling_rate=result.source_rate,
        source_channels=result.source_channels,
        source_num_samples=result.source_frames,
        peak=result.peak,
        clipped_samples=result.clipped_samples,
        silent=silent,
        clipped=clipped,
        split=row["split"],
    )


def _from_journal(item: dict[str, Any] | None) -> ResampledRecord | Reject | None:
    """A journaled result, unless it is a record whose file has gone or changed since (then redo it)."""
    if item is None:
        return None
    if "reject" in item:
        return Reject(**item["reject"])
    record = ResampledRecord(**item["record"])
    return record if _still_there(record) else None


def _still_there(record: ResampledRecord) -> bool:
    try:
        return os.stat(record.path).st_size == record.size_bytes
    except OSError:
        return False


@dataclass
class ResampleStage:
    """The resample stage over one `ResampleConfig`; picklable, so it travels to pool and Ray workers."""

    config: ResampleConfig
    name: str = "resample"
    resources: Resources = field(default_factory=Resources)

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    @property
    def source_manifest(self) -> Path:
        return Workdir(self.config.workdir).manifest

    def plan(self) -> list[Task]:
        """Cut the manifest into task-sized listings on disk, streaming (one batch of rows in memory)."""
        if not self.source_manifest.exists():
            raise FileNotFoundError(f"{self.source_manifest} not found: run `mert-pipe manifest` first")
        remove_stale_tmp(self.config.audio_dir)
        rows = (
            row
            for batch in iter_batches(self.source_manifest, columns=LISTING_COLUMNS)
            for row in batch.to_pylist()
        )
        return write_listings(self, rows, self.config.files_per_task, self.config.fingerprint(), SUBDIRS)

    def run(self, task: Task, stats: Counter) -> None:
        with (
            Journal(self, task) as journal,
            ManifestWriter(
                rank_path(self, "parts", task.rank, ".parquet"),
                str(self.config.audio_dir),
                record_type=ResampledRecord,
            ) as accepted,
            RejectsWriter(rank_path(self, "rejects", task.rank, ".jsonl")) as rejects,
        ):
            for row in read_listing(self, task.rank):
                result = _from_journal(journal.done.get(row["id"]))
                if result is None:
                    result = resample_one(row, self.config)
                    key = "record" if isinstance(result, ResampledRecord) else "reject"
                    journal.add({"id": row["id"], key: asdict(result)})
                else:
                    stats["resumed"] += 1
                stats["files_seen"] += 1
                if isinstance(result, Reject):
                    rejects.write(result)
                    stats[f"rejected.{result.reason}"] += 1
                    continue
                accepted.write(result)
                stats["written"] += 1
                stats["copied" if _is_copy(result) else "resampled"] += 1
                stats["silent"] += result.silent
                stats["clipped"] += result.clipped
                stats["audio_seconds"] += result.duration
                stats["source_audio_seconds"] += result.source_num_samples / result.source_sampling_rate
                stats["bytes"] += result.size_bytes

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        """Merge the parts in rank order into AUDIO_DIR's manifest, rejects and tsv files; prune strays."""
        audio_dir = self.config.audio_dir
        layout = AudioDir(audio_dir)
        root = str(audio_dir)
        summary: Counter = Counter()
        kept: set[str] = set()
        with (
            ManifestWriter(layout.manifest, root, record_type=ResampledRecord) as manifest,
            RejectsWriter(layout.rejects) as rejects,
            FairseqTsvWriter(layout.train_tsv, root) as train,
            FairseqTsvWriter(layout.valid_tsv, root) as valid,
        ):
            for record in merge_task_parts(self, tasks, manifest, rejects, ResampledRecord, summary):
                (train if record.split == "train" else valid).write(record.relpath, record.num_samples)
                kept.add(record.relpath)
                summary["accepted"] += 1
                summary[f"split.{record.split}"] += 1
                summary["audio_seconds"] += record.duration
                summary["bytes"] += record.size_bytes
                summary["flag.silent"] += record.silent
                summary["flag.clipped"] += record.clipped
        drop_journals(self, tasks)
        summary["removed_stale"] = prune_unlisted(audio_dir, kept, _AUDIO_NAME)
        summary["files_seen"] = stats.get("files_seen", 0)
        summary["rejected"] = sum(v for k, v in summary.items() if k.startswith("rejected."))
        for key in ("copied", "resampled", "resumed", "source_audio_seconds"):
            summary[key] = stats.get(key, 0)
        return {
            "counts": {key: summary[key] for key in sorted(summary)},
            "outputs": {
                "audio_dir": root,
                "audio_manifest": str(layout.manifest),
                "audio_rejects": str(layout.rejects),
                "audio_train_tsv": str(layout.train_tsv),
                "audio_valid_tsv": str(layout.valid_tsv),
            },
            "root": root,
        }


def _is_copy(record: ResampledRecord) -> bool:
    return (
        record.source_sampling_rate == record.sampling_rate
        and record.source_channels == 1
        and record.source_hash == record.content_hash
    )
