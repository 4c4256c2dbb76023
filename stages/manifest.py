"""`manifest` stage: walk the roots, probe every candidate file, write the manifest and its rejects.

Plan (driver): walk the roots in sorted order, without following symlinks, and cut the listing into
chunks of `files_per_task` entries; chunk i is task i. Run (worker): probe the chunk's files and write
`parts/RANK.parquet` (accepted) and `rejects/RANK.jsonl`. Finalize (driver): merge the parts in rank
order, reject duplicate content, and write

- `manifest.parquet`: one `AudioRecord` per accepted file,
- `rejects.jsonl`: one line per input that was not accepted, with its reason,
- `train.tsv` / `valid.tsv`: the fairseq/HuBERT manifests (root, then `relpath<TAB>num_samples`).

Final outputs do not depend on the task partition or the executor: the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mert_pipeline.audio import ProbeFailure, hash_file, os_failure, probe_audio
from mert_pipeline.executor import Resources, Task, rank_path
from mert_pipeline.layout import Workdir
from mert_pipeline.listing import read_listing, write_listings
from mert_pipeline.manifests.io import FairseqTsvWriter, ManifestWriter, RejectsWriter, iter_rejects
from mert_pipeline.manifests.records import DEFAULT_SEED, SCHEMA_VERSION, AudioRecord, Reject, assign_split
from mert_pipeline.storage import is_url, local_copy, relative, walk_files

DEFAULT_EXTENSIONS = (
    "wav",
    "wave",
    "flac",
    "ogg",
    "oga",
    "opus",
    "mp3",
    "aif",
    "aiff",
    "aifc",
    "au",
    "snd",
    "caf",
    "w64",
    "rf64",
)
SUBDIRS = ("listing", "parts", "rejects", "completions", "stats", "errors")


@dataclass(frozen=True)
class ManifestConfig:
    roots: tuple[str, ...]  # absolute, real paths, sorted
    workdir: Path
    valid_percent: float = 0.01  # a fraction in [0, 1], as in fairseq's flag of the same name
    seed: int = DEFAULT_SEED
    min_seconds: float = 3.0  # MERT's trainer drops clips under 3 s; keeping them wastes shard space
    deep: bool = False
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # lower case, no dot; ("*",) accepts every name
    files_per_task: int = 200

    def __post_init__(self) -> None:
        """Canonical extensions, so equal options give equal fingerprints however they were spelled."""
        canonical = tuple(sorted({e.strip().lower().lstrip(".") for e in self.extensions if e.strip()}))
        object.__setattr__(self, "extensions", canonical)
        if not 0.0 <= self.valid_percent <= 1.0:
            raise ValueError(f"valid_percent is a fraction in [0, 1], got {self.valid_percent}")
        if self.files_per_task < 1:
            raise ValueError("files_per_task must be at least 1")
        if inside_roots(os.path.realpath(os.path.abspath(self.workdir)), self.roots):
            raise ValueError(f"--out {self.workdir} is inside a root; its own files would be scanned")

    def fingerprint(self) -> str:
        """Everything that changes a task's output; the workdir and task size do not."""
        keys = {k: v for k, v in asdict(self).items() if k not in ("workdir", "files_per_task")}
        keys["schema"] = SCHEMA_VERSION
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def resolve_roots(roots: list[Path | str]) -> tuple[str, ...]:
    """Real, absolute, sorted, de-duplicated roots; nested roots are refused (files would count twice).
    fsspec URLs (`s3://bucket/prefix`) are roots too, as written; local and remote roots do not mix
    (train.tsv holds one root for every path)."""
    resolved = sorted({_resolve(r) for r in roots})
    if len({is_url(r) for r in resolved}) > 1:
        raise ValueError("roots are either all local folders or all URLs, not both")
    for outer in resolved:
        for inner in resolved:
            if inner != outer and inside_roots(inner, (outer,)):
                raise ValueError(f"root {inner} is inside root {outer}; pass only {outer}")
    return tuple(resolved)


def _resolve(root: Path | str) -> str:
    if is_url(root):
        return str(root).rstrip("/")
    return os.path.realpath(os.path.abspath(root))


def manifest_root_of(roots: tuple[str, ...]) -> str:
    """The directory every path is relative to in train.tsv: the roots' common ancestor."""
    if roots and is_url(roots[0]):
        scheme = roots[0].split("://", 1)[0]
        keys = [r.split("://", 1)[1] for r in roots]
        common = os.path.commonpath(keys)
        if len(keys) == 1 and os.path.splitext(common)[1]:  # one root naming a single object
            common = os.path.dirname(common)
        return f"{scheme}://{common}"
    common = os.path.commonpath(roots)
    return common if os.path.isdir(common) else os.path.dirname(common)


def relpath_of(path: str, tsv_root: str) -> str:
    """A file's path in train.tsv: relative to the manifest's root."""
    return relative(path, tsv_root) if is_url(path) else os.path.relpath(path, tsv_root)


def _printable(path: str) -> str:
    """A path as valid UTF-8 text, with undecodable bytes shown as escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _path_problem(path: str) -> str | None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(c in path for c in "\t\n\r"):
        return "name holds a tab or newline, which a fairseq tsv cannot store"
    return None


def inside_roots(path: str, roots: tuple[str, ...]) -> bool:
    """Whether `path` is one of the roots or below one (string test on real, absolute paths)."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def walk_roots(roots: tuple[str, ...], extensions: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Every entry under the roots in sorted order: candidates with size/mtime, or a reject with a reason."""
    accept_all = "*" in extensions

    def reject(path: str, reason: str, detail: str) -> dict[str, Any]:
        return {"path": _printable(path), "reject": reason, "detail": detail}

    def entry(path: str, st: os.stat_result | None) -> dict[str, Any]:
        problem = _path_problem(path)
        if problem:
            return reject(path, "bad_path", problem)
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        if not accept_all and ext not in extensions:
            return reject(
                path, "extension", f"extension {('.' + ext) if ext else '(none)'} not in --extensions"
            )
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns} if st else {"path": path}

    def visit(directory: str) -> Iterator[dict[str, Any]]:
        try:
            with os.scandir(directory) as scan:
                names = sorted((e.name, e.path) for e in scan)
        except PermissionError:
            yield reject(directory, "permission_denied", "cannot list directory: permission denied")
            return
        except OSError as exc:
            yield reject(directory, "unreadable", f"cannot list directory: {exc.strerror}")
            return
        for _, path in names:
            try:
                st = os.lstat(path)
            except OSError as exc:
                yield reject(path, "unreadable", f"cannot stat: {exc.strerror}")
                continue
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    yield reject(path, "broken_symlink", f"points to missing {_printable(target)}")
                elif not inside_roots(target, roots):
                    yield reject(
                        path, "symlink_out_of_tree", f"points outside the roots to {_printable(target)}"
                    )
                else:
                    yield reject(path, "symlink_in_tree", f"points to {_printable(target)}, scanned there")
            elif stat.S_ISDIR(st.st_mode):
                yield from visit(path)
            elif stat.S_ISREG(st.st_mode):
                yield entry(path, st)
            else:
                yield reject(path, "not_regular_file", "not a regular file (FIFO, socket or device)")

    for root in roots:
        if is_url(root):
            for item in walk_files(root):  # object stores hold only plain objects
                named = entry(item["path"], None)
                yield named if "reject" in named else item
        elif os.path.isdir(root):
            yield from visit(root)
        else:
            yield entry(root, os.stat(root))


def probe_file(path: str, config: ManifestConfig, tsv_root: str) -> AudioRecord | Reject:
    """One candidate file -> its record, or a reject with a one-line reason. Never raises for bad input."""
    try:
        with local_copy(path) as local:  # an object in a bucket is fetched once for the hash and the probe
            content_hash, size = hash_file(local)
            if size == 0:
                return Reject(path, "empty", "file has 0 bytes")
            info = probe_audio(local, deep=config.deep)
        if info.duration < config.min_seconds:
            return Reject(path, "too_short", f"{info.duration:.3f}s < --min-seconds {config.min_seconds:g}")
    except ProbeFailure as failure:  # hash_file and probe_audio turn every OSError into one
        return Reject(path, failure.reason, failure.detail)
    except OSError as exc:  # fetching a remote object failed
        failure = os_failure(exc)
        return Reject(path, failure.reason, failure.detail)
    record_id = content_hash[:16]
    return AudioRecord(
        id=record_id,
        path=path,
        relpath=relpath_of(path, tsv_root),
        format=info.format,
        subtype=info.subtype,
        sampling_rate=info.sampling_rate,
        num_samples=info.num_samples,
        duration=info.duration,
        channels=info.channels,
        size_bytes=size,
        content_hash=content_hash,
        split=assign_split(record_id, config.seed, config.valid_percent),
    )


@dataclass
class ManifestStage:
    """The manifest stage over one `ManifestConfig`; picklable, so it travels to pool and Ray workers."""

    config: ManifestConfig
    name: str = "manifest"
    resources: Resources = field(default_factory=Resources)

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    @property
    def tsv_root(self) -> str:
        return manifest_root_of(self.config.roots)

    def plan(self) -> list[Task]:
        """Walk the roots once, streaming the listing into task-sized chunks on disk."""
        walk = walk_roots(self.config.roots, self.config.extensions)
        return write_listings(self, walk, self.config.files_per_task, self.config.fingerprint(), SUBDIRS)

    def run(self, task: Task, stats: Counter) -> None:
        tsv_root = self.tsv_root
        with (
            ManifestWriter(rank_path(self, "parts", task.rank, ".parquet"), tsv_root) as accepted,
            RejectsWriter(rank_path(self, "rejects", task.rank, ".jsonl")) as rejects,
        ):
            for item in read_listing(self, task.rank):
                stats["files_seen"] += 1
                if "reject" in item:
                    result: AudioRecord | Reject = Reject(item["path"], item["reject"], item["detail"])
                else:
                    result = probe_file(item["path"], self.config, tsv_root)
                if isinstance(result, Reject):
                    rejects.write(result)
                    stats[f"rejected.{result.reason}"] += 1
                else:
                    accepted.write(result)
                    stats["probed.accepted"] += 1
                    stats["probed.bytes"] += result.size_bytes
                    stats["probed.audio_seconds"] += result.duration

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        """Merge parts in rank order into the final outputs; later copies of the same content are rejected."""
        parts = [rank_path(self, "parts", t.rank, ".parquet") for t in tasks]
        duplicates = _duplicate_first_index(parts)
        kept_path: dict[str, str] = {}
        layout = Workdir(self.config.workdir)
        summary: Counter = Counter()
        for key, value in stats.items():
            if key.startswith("rejected."):
                summary[key] += value
        with (
            ManifestWriter(layout.manifest, self.tsv_root) as manifest,
            RejectsWriter(layout.rejects) as rejects,
            FairseqTsvWriter(layout.train_tsv, self.tsv_root) as train,
            FairseqTsvWriter(layout.valid_tsv, self.tsv_root) as valid,
        ):
            for task in tasks:
                for reject in iter_rejects(rank_path(self, "rejects", task.rank, ".jsonl")):
                    rejects.write(reject)
            index = 0
            for part in parts:
                for row in pq.read_table(part).to_pylist():
                    record = AudioRecord(**row)
                    first = duplicates.get(record.content_hash)
                    if first is not None and first != index:
                        rejects.write(
                            Reject(
                                record.path, "duplicate", f"same content as {kept_path[record.content_hash]}"
                            )
                        )
                        summary["rejected.duplicate"] += 1
                    else:
                        if first is not None:
                            kept_path[record.content_hash] = record.path
                        manifest.write(record)
                        (train if record.split == "train" else valid).write(
                            record.relpath, record.num_samples
                        )
                        summary["accepted"] += 1
                        summary[f"split.{record.split}"] += 1
                        summary["audio_seconds"] += record.duration
                        summary["bytes"] += record.size_bytes
                    index += 1
        summary["files_seen"] = stats.get("files_seen", 0)
        summary["rejected"] = sum(v for k, v in summary.items() if k.startswith("rejected."))
        return {
            "counts": {key: summary[key] for key in sorted(summary)},
            "outputs": {
                "manifest": str(layout.manifest),
                "rejects": str(layout.rejects),
                "train_tsv": str(layout.train_tsv),
                "valid_tsv": str(layout.valid_tsv),
            },
            "root": self.tsv_root,
        }


def _duplicate_first_index(parts: list[Path]) -> dict[str, int]:
    """For content hashes that occur more than once: the global row index of the first occurrence.

    Hashes are held as fixed 32-byte strings in one numpy array (32 MB per million files), not as
    Python objects.
    """
    columns = [
        pq.read_table(p, columns=["content_hash"]).column(0).to_numpy(zero_copy_only=False) for p in parts
    ]
    if not columns:
        return {}
    hashes = np.concatenate([c.astype("S32") for c in columns])
    unique, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    repeated = counts > 1
    return {h.decode(): int(i) for h, i in zip(unique[repeated], first[repeated], strict=True)}
