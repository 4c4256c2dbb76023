"""`dedup` stages: near-duplicate recordings found and dropped before any teacher labels them.

Two stages on the executor (local pool or Ray), then the verdict (the decisions are `mert_pipeline.dedup`'s):

1. `dedup_fingerprint` (file by file, like resample): each resampled file's Chromaprint fingerprint, saved
   under `dedup/fingerprints/ab/<content hash>.npy` (a rerun after adding files fingerprints only the new
   audio), and the file's index keys as postings `(key, file)` in `.work/dedup_fingerprint/postings/RANK.npy`,
   sorted by the key's hash bucket with an index of where each bucket starts.
2. `dedup` (partitioned by hash): task i takes a range of buckets, reads just those slices of every task's
   postings (memory-mapped), and counts the pairs of files that share keys; keys held by more than
   `max_df` files are skipped. Its pairs go to `.work/dedup/pairs/RANK.npy`, sorted by a hash of the pair.
   No process holds every posting: a task holds its partition, finalize one pair bucket at a time.
3. Finalize (driver): per pair bucket, the pairs' counts summed over partitions; those sharing at least
   `min_shared` keys are verified by alignment; verified pairs join into groups, each resolved to one kept
   file (the keep rule, or the user's keep list). The dropped files leave the audio manifest (and its
   train/valid tsv) for the audio rejects, reason `near_duplicate`, naming the kept file, the overlap and
   the score; `dedup/groups.jsonl` lists every group, `dedup/dedup.json` the counts and a few examples.

The audio manifest `resample` wrote is the input. Once deduplicated it carries `mert_pipeline.dedup` in its
metadata, and the dropped records are in `dedup/dropped.parquet`, so a rerun sees the whole input again and
gives the same bytes. A rerun of `resample` writes the whole manifest again, and `dedup` then reapplies.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mert_pipeline import chromaprint
from mert_pipeline.dedup import (
    BUCKETS,
    DedupSettings,
    Match,
    UnionFind,
    bucket_of,
    candidate_pairs,
    choose_kept,
    compare,
    count_pairs,
    fingerprint_file,
    index_keys,
    is_lossless,
    mix32,
)
from mert_pipeline.executor import Resources, Task, marker_path, rank_path, stage_dir
from mert_pipeline.fs import (
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_tmp,
)
from mert_pipeline.grid import SAMPLE_RATE
from mert_pipeline.layout import AudioDir, DedupDir, Workdir, is_id
from mert_pipeline.listing import drop_ranks_from, prune_unlisted, read_listing, write_listings
from mert_pipeline.manifests.io import (
    FairseqTsvWriter,
    ManifestWriter,
    RejectsWriter,
    iter_batches,
    iter_rejects,
)
from mert_pipeline.manifests.records import SCHEMA_VERSION, Reject, ResampledRecord

META_DEDUP = "mert_pipeline.dedup"
POSTING = np.dtype([("key", "<u4"), ("file", "<u8")])
PAIR = np.dtype([("a", "<u8"), ("b", "<u8"), ("n", "<u4")])
PAIR_BUCKETS = 64
FINGERPRINT_SUBDIRS = ("listing", "parts", "postings", "completions", "stats", "errors")
EXAMPLES = 5


@dataclass(frozen=True)
class DedupConfig:
    workdir: Path
    settings: DedupSettings = field(default_factory=DedupSettings)
    keep: tuple[str, ...] = ()  # ids or source paths never dropped
    sample_rate: int = SAMPLE_RATE
    files_per_task: int = 64
    postings_per_task: int = 12_000_000  # a search task's partition: 144 MB of postings, about 2 GB at peak

    def __post_init__(self) -> None:
        if self.files_per_task < 1 or self.postings_per_task < 1:
            raise ValueError("files_per_task and postings_per_task must be at least 1")

    @property
    def audio(self) -> AudioDir:
        return Workdir(self.workdir).audio(self.sample_rate)

    @property
    def out(self) -> DedupDir:
        return Workdir(self.workdir).dedup

    def fingerprint_config(self) -> str:
        """What changes a file's fingerprint or keys (not the verdict's thresholds, not the keep list)."""
        keys = {
            "sample_mod": self.settings.sample_mod,
            "chromaprint": chromaprint.ALGORITHM,
            "schema": SCHEMA_VERSION,
        }
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The input: the audio manifest, with what an earlier dedup dropped from it
# --------------------------------------------------------------------------------------------------

INPUT_COLUMNS = ["id", "path", "content_hash", "duration", "source_path", "source_sampling_rate", "split"]


def deduplicated_by(manifest: Path) -> str | None:
    """The dedup run that last rewrote this audio manifest, or None (a fresh one from `resample`)."""
    metadata = pq.read_schema(manifest).metadata or {}
    value = metadata.get(META_DEDUP.encode())
    return value.decode() if value else None


def input_records(config: DedupConfig) -> Iterator[dict[str, Any]]:
    """Every resampled file `dedup` decides on, in the source manifest's order (which `resample` keeps):
    the audio manifest's rows and, when an earlier dedup rewrote that manifest, the rows it dropped, merged
    back into place, so a rerun sees the same input in the same order. Streams all three files."""
    manifest = config.audio.manifest
    rows = _rows(manifest)
    if not (deduplicated_by(manifest) and config.out.dropped.exists()):
        yield from rows
        return
    dropped = _rows(config.out.dropped)
    heads = [next(rows, None), next(dropped, None)]
    streams = [rows, dropped]
    for batch in iter_batches(Workdir(config.workdir).manifest, columns=["id"]):
        for file_id in batch.column(0).to_pylist():
            for k in (0, 1):
                if heads[k] is not None and heads[k]["id"] == file_id:
                    yield heads[k]
                    heads[k] = next(streams[k], None)
    for k in (0, 1):  # rows the source manifest no longer orders (it was rewritten): last, as they come
        while heads[k] is not None:
            yield heads[k]
            heads[k] = next(streams[k], None)


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    for batch in iter_batches(path):
        yield from batch.to_pylist()


def _rows_of(path: Path, columns: list[str], ids: set[str]) -> Iterator[dict[str, Any]]:
    """The rows of a manifest whose id is in `ids`, read a batch at a time (one batch in memory)."""
    wanted = pa.array(sorted(ids), pa.string())
    for batch in iter_batches(path, columns=columns):
        table = pa.Table.from_batches([batch])
        yield from table.filter(pc.is_in(table["id"], value_set=wanted)).to_pylist()


def _lossless_of(config: DedupConfig, ids: set[str]) -> dict[str, bool]:
    """Whether each id's source is lossless, from the source manifest's subtype."""
    rows = _rows_of(Workdir(config.workdir).manifest, ["id", "subtype"], ids)
    return {row["id"]: is_lossless(row["subtype"]) for row in rows}


# --------------------------------------------------------------------------------------------------
# Stage 1: fingerprints and postings
# --------------------------------------------------------------------------------------------------


def _load_fingerprint(path: Path) -> np.ndarray | None:
    """A saved fingerprint, or None when it is missing or not what this stage writes (then redo it)."""
    try:
        fp = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return fp if fp.dtype == np.uint32 and fp.ndim == 1 else None


@dataclass
class FingerprintStage:
    """Chromaprint fingerprints and index postings of every resampled file; picklable."""

    config: DedupConfig
    name: str = "dedup_fingerprint"
    resources: Resources = field(default_factory=Resources)

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    def plan(self) -> list[Task]:
        if not self.config.audio.manifest.exists():
            raise FileNotFoundError(
                f"{self.config.audio.manifest} not found: run `mert-pipe resample {self.workdir}` first"
            )
        chromaprint.library()  # missing: one line saying how to install it, before any task
        remove_stale_tmp(self.config.out.fingerprints)
        rows = ({k: row[k] for k in INPUT_COLUMNS} for row in input_records(self.config))
        return write_listings(
            self, rows, self.config.files_per_task, self.config.fingerprint_config(), FINGERPRINT_SUBDIRS
        )

    def run(self, task: Task, stats: Counter) -> None:
        out = self.config.out
        keys_of: list[np.ndarray] = []
        files_of: list[np.ndarray] = []
        parts: list[dict[str, Any]] = []
        for row in read_listing(self, task.rank):  # a fingerprint on disk is the resume record
            digest = row["content_hash"]
            if not is_id(row["id"]) or not isinstance(digest, str) or not is_id(digest[:16]):
                stats["bad_record"] += 1
                continue
            path = out.fingerprint(digest)
            fp = _load_fingerprint(path)
            if fp is None:
                try:
                    fp, seconds = fingerprint_file(row["path"])
                except Exception as exc:  # noqa: BLE001 - an unreadable file stays, unfingerprinted
                    stats["fingerprint_failed"] += 1
                    parts.append({**row, "items": 0, "error": " ".join(str(exc).split())[:300]})
                    continue
                atomic_save_npy(path, fp)
                stats["fingerprinted"] += 1
                stats["fingerprinted_seconds"] += seconds
            else:
                stats["reused"] += 1
            keys = index_keys(fp, self.config.settings.sample_mod)
            number = np.uint64(int(row["id"], 16))
            keys_of.append(keys)
            files_of.append(np.full(len(keys), number, np.uint64))
            parts.append({**row, "items": int(len(fp)), "error": ""})
            stats["files"] += 1
            stats["audio_seconds"] += float(row["duration"])
            stats["items"] += len(fp)
            stats["postings"] += len(keys)
        keys = np.concatenate(keys_of) if keys_of else np.zeros(0, np.uint32)
        files = np.concatenate(files_of) if files_of else np.zeros(0, np.uint64)
        buckets = bucket_of(keys)
        order = np.argsort(buckets, kind="stable")
        postings = np.empty(len(keys), POSTING)
        postings["key"], postings["file"] = keys[order], files[order]
        index = np.searchsorted(buckets[order], np.arange(BUCKETS + 1)).astype(np.int64)
        atomic_save_npy(rank_path(self, "postings", task.rank, ".npy"), postings)
        atomic_save_npy(rank_path(self, "postings", task.rank, ".index.npy"), index)
        text = "".join(json.dumps(part, sort_keys=True) + "\n" for part in parts)
        atomic_write_bytes(rank_path(self, "parts", task.rank, ".jsonl"), text.encode())

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        """Every file's keep-rule facts into dedup/files.parquet; fingerprints no file uses any more go."""
        out = self.config.out
        kept: set[str] = set()
        schema = pa.schema(
            [(c, pa.string()) for c in ("id", "path", "content_hash", "source_path", "split", "error")]
            + [("duration", pa.float64()), ("source_sampling_rate", pa.int64()), ("items", pa.int64())]
        )
        with atomic_path(out.files) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for task in tasks:
                rows = [
                    json.loads(line)
                    for line in rank_path(self, "parts", task.rank, ".jsonl").read_text().splitlines()
                ]
                for row in rows:
                    if row["items"]:
                        kept.add(
                            out.fingerprint(row["content_hash"]).relative_to(out.fingerprints).as_posix()
                        )
                if rows:
                    writer.write_table(
                        pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema)
                    )
        removed = prune_unlisted(out.fingerprints, kept, _FP_NAME) if out.fingerprints.is_dir() else 0
        names = ("fingerprinted", "reused", "fingerprint_failed", "items", "postings", "audio_seconds")
        counts = {"files_seen": stats.get("files", 0), **{k: stats.get(k, 0) for k in names}}
        return {"counts": {**counts, "removed_stale": removed}, "outputs": {"files": str(out.files)}}


_FP_NAME = re.compile(r"^[0-9a-f]{16}\.npy$")


# --------------------------------------------------------------------------------------------------
# Stage 2: candidate pairs by hash partition, then the verdict
# --------------------------------------------------------------------------------------------------


def _postings_index(fingerprints: FingerprintStage, ranks: int) -> np.ndarray:
    """(ranks, BUCKETS + 1) offsets of each fingerprint task's buckets in its postings file."""
    return (
        np.stack([np.load(rank_path(fingerprints, "postings", r, ".index.npy")) for r in range(ranks)])
        if ranks
        else np.zeros((0, BUCKETS + 1), np.int64)
    )


def _pair_bucket(pairs: np.ndarray) -> np.ndarray:
    return (
        mix32((pairs[:, 0] ^ (pairs[:, 1] >> np.uint64(7))) & np.uint64(0xFFFFFFFF)) % np.uint64(PAIR_BUCKETS)
    ).astype(np.int64)


@dataclass
class DedupStage:
    """Candidate search partitioned by hash bucket, then (finalize) verification, groups and the verdict."""

    config: DedupConfig
    name: str = "dedup"
    resources: Resources = field(default_factory=Resources)

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    @property
    def fingerprints(self) -> FingerprintStage:
        return FingerprintStage(self.config)

    def _fingerprint_ranks(self) -> int:
        return len(list((stage_dir(self.fingerprints) / "listing").glob("[0-9]*.jsonl")))

    def plan(self) -> list[Task]:
        """Buckets cut into partitions of about `postings_per_task` postings; a task's fingerprint is its
        bucket range and every fingerprint task's own (so new postings redo the search)."""
        ranks = self._fingerprint_ranks()
        index = _postings_index(self.fingerprints, ranks)
        sizes = (index[:, 1:] - index[:, :-1]).sum(axis=0) if ranks else np.zeros(BUCKETS, np.int64)
        inputs = hashlib.sha256()
        inputs.update(json.dumps(asdict(self.config.settings), sort_keys=True).encode())
        for rank in range(ranks):
            inputs.update(marker_path(self.fingerprints, rank).read_bytes())
        ranges: list[tuple[int, int]] = []
        start, total = 0, 0
        for bucket in range(BUCKETS):
            total += int(sizes[bucket])
            if total >= self.config.postings_per_task and bucket + 1 < BUCKETS:
                ranges.append((start, bucket + 1))
                start, total = bucket + 1, 0
        ranges.append((start, BUCKETS))
        tasks = []
        for rank, (lo, hi) in enumerate(ranges):
            atomic_write_bytes(
                rank_path(self, "listing", rank, ".json"), json.dumps([lo, hi, ranks]).encode()
            )
            fingerprint = hashlib.sha256(inputs.digest() + f"{lo}:{hi}".encode()).hexdigest()
            tasks.append(Task(rank=rank, fingerprint=fingerprint, size=int(sizes[lo:hi].sum())))
        drop_ranks_from(self, len(tasks), ("listing", "pairs", "completions", "stats", "errors"))
        return tasks

    def run(self, task: Task, stats: Counter) -> None:
        lo, hi, ranks = json.loads(rank_path(self, "listing", task.rank, ".json").read_text())
        index = _postings_index(self.fingerprints, ranks)
        keys, files = [], []
        for rank in range(ranks):
            start, stop = int(index[rank, lo]), int(index[rank, hi])
            if stop > start:
                postings = np.load(rank_path(self.fingerprints, "postings", rank, ".npy"), mmap_mode="r")
                part = np.asarray(postings[start:stop])
                keys.append(part["key"])
                files.append(part["file"])
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint32)
        files_all = np.concatenate(files) if files else np.zeros(0, np.uint64)
        stats["postings"] += len(keys_all)
        raw = candidate_pairs(keys_all, files_all, self.config.settings.max_df)
        stats["key_pairs"] += len(raw)
        unique, counts = count_pairs([raw])
        buckets = _pair_bucket(unique) if len(unique) else np.zeros(0, np.int64)
        order = np.argsort(buckets, kind="stable")
        pairs = np.empty(len(unique), PAIR)
        pairs["a"], pairs["b"], pairs["n"] = unique[order, 0], unique[order, 1], counts[order]
        atomic_save_npy(rank_path(self, "pairs", task.rank, ".npy"), pairs)
        atomic_save_npy(
            rank_path(self, "pairs", task.rank, ".index.npy"),
            np.searchsorted(buckets[order], np.arange(PAIR_BUCKETS + 1)),
        )
        stats["pairs"] += len(pairs)

    def _candidates(self, tasks: list[Task]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per pair bucket: the distinct pairs (a, b) and the keys they share over every partition."""
        indexes = [np.load(rank_path(self, "pairs", t.rank, ".index.npy")) for t in tasks]
        for bucket in range(PAIR_BUCKETS):
            parts = []
            for task, index in zip(tasks, indexes, strict=True):
                if index[bucket + 1] > index[bucket]:
                    pairs = np.load(rank_path(self, "pairs", task.rank, ".npy"), mmap_mode="r")
                    parts.append(np.asarray(pairs[index[bucket] : index[bucket + 1]]))
            if not parts:
                continue
            merged = np.concatenate(parts)
            ab = np.stack([merged["a"], merged["b"]], axis=1)
            unique, inverse = np.unique(ab, axis=0, return_inverse=True)
            shared = np.bincount(inverse.ravel(), weights=merged["n"], minlength=len(unique))
            yield unique, shared

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        settings = self.config.settings
        out = self.config.out
        zero = ("candidate_pairs", "compared", "verified", "groups", "dropped", "dropped_seconds")
        summary: Counter = Counter(dict.fromkeys(zero, 0))
        # pass 1: which files are in a candidate pair at all (few: mostly the true duplicates)
        wanted: set[int] = set()
        for unique, shared in self._candidates(tasks):
            summary["candidate_pairs"] += len(unique)
            chosen = unique[shared >= settings.min_shared]
            wanted.update(int(v) for v in np.unique(chosen))
        facts = _file_facts(out.files, {f"{v:016x}" for v in wanted})
        fingerprints: dict[str, np.ndarray] = {}

        def load(file_id: str) -> np.ndarray:
            if file_id not in fingerprints:
                fp = _load_fingerprint(out.fingerprint(facts[file_id]["content_hash"]))
                fingerprints[file_id] = fp if fp is not None else np.zeros(0, np.uint32)
            return fingerprints[file_id]

        # pass 2: verify each candidate by alignment, one pair bucket (and its fingerprints) at a time
        groups = UnionFind()
        edges: dict[tuple[str, str], Match] = {}
        for unique, shared in self._candidates(tasks):
            for (a, b), n in zip(unique, shared, strict=True):
                x, y = f"{int(a):016x}", f"{int(b):016x}"
                if n < settings.min_shared or x not in facts or y not in facts:
                    continue
                summary["compared"] += 1
                result = compare(load(x), load(y), settings)
                if result.is_duplicate(settings):
                    summary["verified"] += 1
                    groups.union(x, y)
                    edges[(x, y)] = result
            fingerprints.clear()
        members_all = groups.groups()
        lossless = _lossless_of(self.config, {i for members in members_all for i in members})
        keep = set(self.config.keep)
        dropped: dict[str, dict[str, Any]] = {}
        found: list[dict[str, Any]] = []
        for members in members_all:
            rows = [{**facts[i], "lossless": lossless.get(i, False)} for i in members]
            listed = {r["id"] for r in rows if r["id"] in keep or r["source_path"] in keep}
            kept, drop = choose_kept(rows, listed)
            entry: dict[str, Any] = {
                "kept": _brief(kept),
                "kept_by": "keep list" if kept["id"] in listed else "rule",
            }
            entry["dropped"] = []
            for row in drop:
                result = edges.get((min(kept["id"], row["id"]), max(kept["id"], row["id"])))
                if result is None:  # joined through another member: measured against the kept file itself
                    result = compare(load(kept["id"]), load(row["id"]), settings)
                verdict = {
                    "overlap_seconds": round(result.overlap_seconds, 1),
                    "score": round(result.score, 4),
                    "coverage": round(result.coverage, 4),
                }
                entry["dropped"].append({**_brief(row), **verdict})
                dropped[row["id"]] = {"kept": kept, **verdict}
            entry["also_kept"] = [_brief(r) for r in rows if r["id"] != kept["id"] and r["id"] in listed]
            fingerprints.clear()
            found.append(entry)
            summary["groups"] += 1
            summary["dropped"] += len(entry["dropped"])
            summary["dropped_seconds"] += sum(d["duration"] for d in entry["dropped"])
            summary["kept_by_keep_list"] += len(entry["also_kept"])
        _write_groups(out.groups, found)
        counts = self._apply(dropped)
        result = {
            "settings": asdict(settings),
            "chromaprint": chromaprint.version(),
            "keep_list": len(keep),
            "counts": {
                **counts,
                **{k: summary[k] for k in sorted(summary)},
                "postings": stats.get("postings", 0),
                "dropped_hours": round(summary["dropped_seconds"] / 3600, 4),
            },
            "examples": sorted(found, key=lambda g: (-len(g["dropped"]), g["kept"]["id"]))[:EXAMPLES],
            "outputs": {
                "groups": str(out.groups),
                "summary": str(out.summary),
                "rejects": str(self.config.audio.rejects),
            },
        }
        atomic_write_json(out.summary, result)
        return result

    def _apply(self, dropped: dict[str, dict[str, Any]]) -> dict[str, int]:
        """Rewrite the audio manifest, its tsv files and rejects without the dropped files, and keep the
        dropped records in dedup/dropped.parquet (with the kept ones, the whole input of a rerun). Every
        file is written under a temporary name and renamed when whole; the inputs are read before that."""
        audio, out = self.config.audio, self.config.out
        root = str(audio.path)
        tag = hashlib.sha256(json.dumps(sorted(dropped)).encode()).hexdigest()[:16]
        counts: Counter = Counter()
        with (
            ManifestWriter(
                audio.manifest, root, record_type=ResampledRecord, metadata={META_DEDUP: tag}
            ) as manifest,
            ManifestWriter(out.dropped, root, record_type=ResampledRecord) as gone,
            RejectsWriter(audio.rejects) as rejects,
            FairseqTsvWriter(audio.train_tsv, root) as train,
            FairseqTsvWriter(audio.valid_tsv, root) as valid,
        ):
            if audio.rejects.exists():
                for reject in iter_rejects(audio.rejects):  # resample's, less an earlier dedup's
                    if reject.reason != "near_duplicate":
                        rejects.write(reject)
            for row in input_records(self.config):
                record = ResampledRecord(**row)
                verdict = dropped.get(record.id)
                counts["files_seen"] += 1
                counts["audio_seconds"] += record.duration
                if verdict is None:
                    manifest.write(record)
                    (train if record.split == "train" else valid).write(record.relpath, record.num_samples)
                    counts["accepted"] += 1
                    continue
                gone.write(record)
                kept = verdict["kept"]
                detail = (
                    f"the same recording as {kept['source_path']} (id {kept['id']}): "
                    f"{verdict['overlap_seconds']:.1f} s overlap, score {verdict['score']:.3f}"
                )
                rejects.write(Reject(record.source_path, "near_duplicate", detail))
                counts["rejected.near_duplicate"] += 1
        return dict(counts)


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "path": row["source_path"],
        "duration": round(float(row["duration"]), 3),
        "lossless": bool(row.get("lossless", False)),
        "source_sampling_rate": int(row["source_sampling_rate"]),
    }


def _write_groups(path: Path, groups: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(group, sort_keys=True) + "\n" for group in groups)
    atomic_write_bytes(path, text.encode())


def _file_facts(path: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    """id -> the keep rule's facts of the fingerprinted files among `ids` (from dedup/files.parquet)."""
    columns = ["id", "content_hash", "duration", "source_path", "source_sampling_rate", "items"]
    return {row["id"]: row for row in _rows_of(path, columns, ids) if row["items"]}
