"""`tokenize` stage: teacher labels for every resampled file, one int16 `.npy` per file id.

Plan (driver): check the teacher (load it once, so a missing checkpoint fails before any worker
starts, and take its config hash), stream `AUDIO_DIR/manifest.parquet` into task listings of
`files_per_task` files. Run (worker): the teacher, loaded once per worker process and cached, labels
the task's files; with the RVQ teacher, chunks of many files share each batch (exact streaming, see
`mert_pipeline.teachers.rvq`). Each file's labels go to `LABELS/ab/<id>.npy` (temporary name, then rename)
and a line in the task's journal, so a killed task resumes at file granularity. Finalize (driver):
merge the task parts into `LABELS/labels.parquet` and `LABELS/rejects.jsonl`.

Storage: one `.npy` per file, named by id. Shards and exports look labels up by id, the bytes do not
depend on how files were grouped into tasks, a file can be skipped or redone alone, and a million
small files is what every audio dataset already has. `LABELS/teacher.json` records the teacher (name,
kind, config and config hash); a directory made by another teacher configuration is never mixed
into: the run stops and says to pass another `--name` or `--force`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline.devices import with_gpu
from mert_pipeline.executor import Resources, Task, rank_path
from mert_pipeline.fs import atomic_save_npy, atomic_write_json, remove_stale_tmp
from mert_pipeline.grid import SAMPLE_RATE, num_frames
from mert_pipeline.labels import TEACHER_META
from mert_pipeline.layout import AudioDir, LabelSet, Workdir, check_name
from mert_pipeline.listing import (
    Journal,
    drop_journals,
    merge_task_parts,
    prune_unlisted,
    read_listing,
    write_listings,
)
from mert_pipeline.manifests.io import ManifestWriter, RejectsWriter, iter_batches
from mert_pipeline.manifests.records import LabelRecord, Reject
from mert_pipeline.teachers import FileToLabel, config_hash

SUBDIRS = ("listing", "parts", "rejects", "journal", "completions", "stats", "errors")
LISTING_COLUMNS = ["id", "path", "num_samples", "sampling_rate", "split"]
_NPY_NAME = re.compile(r"^[0-9a-f]{16}\.npy$")


class TeacherMismatch(ValueError):
    """The labels directory holds another teacher configuration's labels."""


@dataclass(frozen=True)
class TokenizeConfig:
    workdir: Path
    teacher: Any  # a Teacher; Any because dataclass fields cannot hold a Protocol check
    name: str = "rvq"  # the label set's name: LABELS = WORKDIR/labels/NAME
    sample_rate: int = SAMPLE_RATE  # which resampled directory to read: WORKDIR/audio_24k
    files_per_task: int = 64
    replace: bool = False  # labels of another teacher configuration in LABELS: replace them (else refuse)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.files_per_task < 1:
            raise ValueError("files_per_task must be at least 1")
        if self.teacher.sampling_rate != self.sample_rate:
            raise ValueError(
                f"the {self.teacher.kind} teacher takes {self.teacher.sampling_rate} Hz audio, "
                f"not {self.sample_rate} Hz"
            )

    @property
    def audio(self) -> AudioDir:
        return Workdir(self.workdir).audio(self.sample_rate)

    @property
    def labels(self) -> LabelSet:
        return Workdir(self.workdir).labels(self.name)

    @property
    def labels_dir(self) -> Path:
        return self.labels.path


@dataclass
class TokenizeStage:
    """The tokenize stage over one `TokenizeConfig`; picklable, so it travels to pool and Ray workers."""

    config: TokenizeConfig
    name: str = "tokenize"
    resources: Resources = field(default_factory=lambda: Resources(model=True))  # Ray: an actor pool

    def __post_init__(self) -> None:
        self.name = f"tokenize_{self.config.name}"  # one bookkeeping directory per label set
        device = self.config.teacher.model_device()
        if device is not None:  # a GPU per task on Ray; the local pool spreads workers over GPUs
            self.resources = with_gpu(self.resources, device)

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    @property
    def audio_manifest(self) -> Path:
        return self.config.audio.manifest

    def teacher_facts(self) -> dict[str, Any]:
        teacher = self.config.teacher
        return {
            "name": self.config.name,
            "kind": teacher.kind,
            "config_hash": config_hash(teacher),
            "config": teacher.describe(),
            "n_q": teacher.n_q,
            "num_classes": teacher.num_classes,
            "label_rate": teacher.sampling_rate / teacher.hop,
            "hop": teacher.hop,
            "sampling_rate": teacher.sampling_rate,
        }

    def claim_labels_dir(self) -> None:
        """Refuse (or, with `replace`, clear) a labels directory that another teacher config wrote, so
        labels of two configurations never mix; then record this teacher in its teacher.json."""
        labels = self.config.labels
        facts = self.teacher_facts()
        try:
            existing = json.loads(labels.teacher.read_text())
        except FileNotFoundError:
            existing = None
        if existing is not None and existing.get("config_hash") != facts["config_hash"]:
            if not self.config.replace:
                raise TeacherMismatch(
                    f"{labels.path} holds labels of another teacher configuration ({existing.get('kind')}, "
                    f"config {existing.get('config_hash')}, not {facts['config_hash']}); pass another "
                    f"--name to keep both, or --force to replace them"
                )
            shutil.rmtree(labels.path)
        if existing is None or existing.get("config_hash") != facts["config_hash"]:
            atomic_write_json(labels.teacher, facts)

    def plan(self) -> list[Task]:
        if not self.audio_manifest.exists():
            raise FileNotFoundError(
                f"{self.audio_manifest} not found: run `mert-pipe resample {self.workdir}` first"
            )
        self.claim_labels_dir()
        remove_stale_tmp(self.config.labels_dir)
        config_fp = hashlib.sha256(
            json.dumps({"teacher": self.teacher_facts(), "version": 1}, sort_keys=True).encode()
        ).hexdigest()
        rate = self.config.sample_rate

        def rows() -> Iterator[dict[str, Any]]:
            for batch in iter_batches(self.audio_manifest, columns=LISTING_COLUMNS):
                for row in batch.to_pylist():
                    if row["sampling_rate"] != rate:
                        raise ValueError(f"{row['path']} is at {row['sampling_rate']} Hz, not {rate} Hz")
                    yield row

        return write_listings(self, rows(), self.config.files_per_task, config_fp, SUBDIRS)

    def run(self, task: Task, stats: Counter) -> None:
        rows = read_listing(self, task.rank)
        facts = self.teacher_facts()
        labels_dir = self.config.labels_dir
        results: dict[str, dict[str, Any]] = {}
        with Journal(self, task) as journal:
            todo: list[FileToLabel] = []
            for row in rows:
                done = journal.done.get(row["id"])
                if done is not None and (
                    "reject" in done or _npy_intact(labels_dir / done["record"]["relpath"], done["record"])
                ):
                    results[row["id"]] = done
                    stats["resumed"] += 1
                else:
                    todo.append(FileToLabel(row["id"], row["path"], row["num_samples"]))
            by_id = {row["id"]: row for row in rows}
            for file_id, labels in self.config.teacher.label(todo, stats):
                item = self._store(by_id[file_id], labels, facts)
                journal.add(item)
                results[file_id] = item
        with (
            ManifestWriter(
                rank_path(self, "parts", task.rank, ".parquet"), str(labels_dir), record_type=LabelRecord
            ) as parts,
            RejectsWriter(rank_path(self, "rejects", task.rank, ".jsonl")) as rejects,
        ):
            for row in rows:  # manifest order, whatever order the teacher finished files in
                item = results[row["id"]]
                stats["files_seen"] += 1
                if "reject" in item:
                    reject = Reject(**item["reject"])
                    rejects.write(reject)
                    stats[f"rejected.{reject.reason}"] += 1
                else:
                    record = LabelRecord(**item["record"])
                    parts.write(record)
                    stats["labelled"] += 1
                    stats["frames"] += record.frames
                    stats["audio_seconds"] += record.num_samples / record.sampling_rate

    def _store(
        self, row: dict[str, Any], labels: np.ndarray | Reject, facts: dict[str, Any]
    ) -> dict[str, Any]:
        """Check a file's labels against the frame rule and write them; a mismatch is a reject, loudly."""
        if isinstance(labels, Reject):
            return {"id": row["id"], "reject": asdict(labels)}
        frames = num_frames(row["num_samples"], facts["hop"])
        expected = (facts["n_q"], frames)
        if labels.shape != expected or labels.dtype != np.int16:
            reject = Reject(
                row["path"],
                "label_mismatch",
                f"labels {labels.dtype}{labels.shape}, expected int16{expected}",
            )
            return {"id": row["id"], "reject": asdict(reject)}
        relpath = LabelSet.relpath(row["id"])
        atomic_save_npy(self.config.labels_dir / relpath, np.ascontiguousarray(labels))
        record = LabelRecord(
            id=row["id"],
            teacher=facts["name"],
            kind=facts["kind"],
            config_hash=facts["config_hash"],
            relpath=relpath,
            n_q=facts["n_q"],
            frames=frames,
            num_classes=facts["num_classes"],
            label_rate=facts["label_rate"],
            num_samples=row["num_samples"],
            sampling_rate=facts["sampling_rate"],
            split=row["split"],
        )
        record.validate()
        return {"id": row["id"], "record": asdict(record)}

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        labels_dir = self.config.labels_dir
        summary: Counter = Counter()
        kept: set[str] = set()
        facts = self.teacher_facts()
        teacher_meta = {TEACHER_META: json.dumps(facts, sort_keys=True, default=str)}
        with (
            ManifestWriter(
                self.config.labels.manifest, str(labels_dir), record_type=LabelRecord, metadata=teacher_meta
            ) as manifest,
            RejectsWriter(self.config.labels.rejects) as rejects,
        ):
            for record in merge_task_parts(self, tasks, manifest, rejects, LabelRecord, summary):
                kept.add(record.relpath)
                summary["accepted"] += 1
                summary["frames"] += record.frames
                summary["audio_seconds"] += record.num_samples / record.sampling_rate
        drop_journals(self, tasks)
        summary["removed_stale"] = prune_unlisted(labels_dir, kept, _NPY_NAME)
        summary["files_seen"] = stats.get("files_seen", 0)
        summary["rejected"] = sum(v for k, v in summary.items() if k.startswith("rejected."))
        for key in ("resumed", "chunks"):
            summary[key] = stats.get(key, 0)
        return {
            "counts": {key: summary[key] for key in sorted(summary)},
            "teacher": facts,
            "outputs": {
                "labels_dir": str(labels_dir),
                "labels_manifest": str(self.config.labels.manifest),
                "labels_rejects": str(self.config.labels.rejects),
            },
        }


def _npy_intact(path: Path, record: dict[str, Any]) -> bool:
    try:
        return np.load(path, mmap_mode="r").shape == (record["n_q"], record["frames"])
    except (OSError, ValueError):
        return False
