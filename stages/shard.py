"""`shard` stage: WebDataset tars of audio segments and every selected teacher's labels (see
`mert_pipeline.shards` for the format), plus label-only sidecar shards for a teacher added later.

Plan (driver): read `WORKDIR/audio_24k/manifest.parquet` and each teacher's `labels.parquet`. A file
goes to `SHARDS/rejects.jsonl` when a teacher lacks its labels (`no_labels`), its labels were computed
from another length (`label_mismatch`) or its samples are float (`unshardable`). Every other file is cut
into segments of at most `--segment-seconds` on multiples of 20480 samples (`segment_unit`: whole
320-sample label frames and whole 4096-sample FLAC frames); the segments of each split are
shuffled with `--seed` across the whole split and dealt in order into shards that close at about
`--shard-size` bytes (estimated from the source files) or `--shard-samples` samples. Shard k of a split
is task `SPLIT/shard-k`, so a rerun overwrites exactly its own shards.

Run (worker): one shard per task. Each segment's audio is the resampled file's own FLAC frames, copied
and renumbered (`mert_pipeline.flac_frames`; a whole track: the file itself), or, where that does not
apply, its integer samples decoded and FLAC-encoded at the same bit depth: either way the teachers'
exact input, never requantised (`stats`: audio_copied_whole / audio_copied_frames / audio_reencoded.WHY).
Its labels are sliced frame-exactly after checking frames == ceil(num_samples / 320) for the whole
file (a mismatch fails the task naming the .npy); the tar is written to a hidden temporary name, hashed
as it is written, and renamed when complete.

Finalize (driver): `SHARDS/index.json` (per shard: split, samples, bytes, sha256, seconds; per split
and overall totals; the teachers and their configs) and `SHARDS/rejects.jsonl`; shards of an earlier
plan that no longer exist in this one are deleted, and so are sidecars whose audio shard changed.

Bookkeeping lives in `SHARDS/.work/` (the stage's workdir is SHARDS), so several shard sets can be
made from one WORKDIR.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from mert_pipeline import storage
from mert_pipeline.executor import Resources, Task, marker_path, rank_path, stage_dir
from mert_pipeline.flac_frames import FLAC_BLOCK, NotCopyable, cut_segment
from mert_pipeline.fs import atomic_write_json, remove_stale_tmp
from mert_pipeline.grid import SAMPLE_RATE, frame_span, num_frames
from mert_pipeline.labels import LabelIndex, label_columns, label_index, teacher_facts
from mert_pipeline.layout import AudioDir, Workdir, id_numbers, id_relpath
from mert_pipeline.listing import read_listing, write_listings
from mert_pipeline.manifests.io import RejectsWriter, iter_batches, iter_rejects
from mert_pipeline.manifests.records import DEFAULT_SEED, Reject
from mert_pipeline.shards import (
    FLAC_SUBTYPES,
    FORMAT,
    INDEX,
    REJECTS,
    SHARD_NAME,
    SIDECAR_NAME,
    SPLITS,
    DeterministicTar,
    SegmentMeta,
    ShardError,
    encode_flac,
    iter_samples,
    member_limits,
    npy_bytes,
    read_index,
    read_segment,
    segment_columns,
    segment_key,
    shard_name,
    sidecar_name,
    write_index,
    write_sample,
)
from mert_pipeline.storage import Location, is_url, join

SUBDIRS = ("listing", "parts", "completions", "stats", "errors")
AUDIO_COLUMNS = ["id", "path", "relpath", "subtype", "sampling_rate", "num_samples", "size_bytes"]
AUDIO_COLUMNS += ["content_hash", "split", "format"]
_OK, _BAD_RECORD, _UNSHARDABLE, _NO_LABELS, _LABEL_MISMATCH = range(5)  # the shard plan's verdicts on a file
TAR_OVERHEAD = 1024  # bytes per member: its 512-byte header and, on average, half a block of padding
_BITS = {"PCM_16": 16, "PCM_24": 24}


@dataclass(frozen=True)
class ShardConfig:
    workdir: Path  # WORKDIR with audio_24k/ and labels/
    out: Location  # SHARDS: a folder, or an fsspec URL (s3://bucket/shards)
    teachers: tuple[str, ...] | None = None  # None: every label set under WORKDIR/labels
    segment_seconds: float = 30.0
    shard_bytes: int = 256 * 10**6
    shard_samples: int | None = None  # also close a shard at this many samples
    seed: int = DEFAULT_SEED
    sample_rate: int = SAMPLE_RATE
    take_over: bool = False  # --force: write into a SHARDS whose index.json another WORKDIR wrote

    def __post_init__(self) -> None:
        if self.segment_seconds <= 0:
            raise ValueError("--segment-seconds must be positive")
        if self.shard_bytes < 1 or (self.shard_samples is not None and self.shard_samples < 1):
            raise ValueError("--shard-size and --shard-samples must be positive")
        if not is_url(self.out) and Path(self.out).resolve() == self.workdir.resolve():
            raise ValueError("--out must be a folder of its own, not WORKDIR")

    @property
    def audio(self) -> AudioDir:
        return Workdir(self.workdir).audio(self.sample_rate)


class _WritesShards:
    """Both shard stages keep their bookkeeping in SHARDS/.work (the stage's workdir is SHARDS; for a
    remote SHARDS, a folder under WORKDIR named by the URL) and one small JSON part per task (the shard's
    size, hash and counts) for finalize to merge into index.json."""

    config: Any

    @property
    def workdir(self) -> Path:
        return bookkeeping_dir(self.config.workdir, self.config.out)

    def _part(self, rank: int) -> Path:
        return rank_path(self, "parts", rank, ".json")  # type: ignore[arg-type]

    def _write_index(self, index: dict[str, Any]) -> None:
        # the claim goes beside index.json, whose bytes depend only on the shards (not on where WORKDIR is)
        storage.write_bytes(join(self.config.out, OWNER), _identity(self.config.workdir).encode() + b"\n")
        write_index(self.config.out, index)

    def _claim(self, take_over: bool, planned: list[str]) -> None:
        """Make sure SHARDS is this shard set's before anything is written: refused when another WORKDIR's
        index.json claims it (unless `take_over`), or when it holds shard tars that no earlier index or
        plan of this set lists (a user's own files are never overwritten or pruned). Then record the new
        plan's names as this set's (OWNED), before any task writes them."""
        out, mine = self.config.out, _identity(self.config.workdir)
        owner = _owner(out)
        if owner not in (None, mine) and not take_over:
            raise ValueError(
                f"{out} holds the shards of WORKDIR {owner} ({OWNER}); give another --out, or pass --force "
                f"to take it over for {mine}"
            )
        owned = self._owned(owner)
        found = {
            f"{split}/{name}"
            for split in SPLITS
            for name in storage.list_names(join(out, split))
            if SHARD_NAME.match(name) or SIDECAR_NAME.match(name)
        }
        foreign = sorted(found - owned)
        if foreign and not take_over:
            raise ValueError(
                f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which this shard "
                "set did not write: give an empty --out, or move them away (--force overwrites them)"
            )
        atomic_write_json(stage_dir(self) / OWNED, sorted(owned | set(planned)))  # type: ignore[arg-type]

    def _owned(self, owner: str | None) -> set[str]:
        """Every tar name this shard set has listed: every plan it made (OWNED), and its index.json when
        `owner` (what SHARDS/.owner says) is this WORKDIR or nobody."""
        mine = owner in (None, _identity(self.config.workdir))
        names = set(_old_index(self.config.out).get("shards", {})) if mine else set()
        journal = stage_dir(self) / OWNED  # type: ignore[arg-type]
        return names | (set(json.loads(journal.read_text())) if journal.exists() else set())

    def _output(self, name: str) -> Any:
        """A local temporary file that becomes SHARDS/NAME when complete (renamed, or uploaded whole)."""
        return storage.atomic_output(join(self.config.out, name), stage_dir(self) / "upload")  # type: ignore[arg-type]


@dataclass
class ShardStage(_WritesShards):
    """Audio + labels shards. Picklable: plan on the driver, one shard per task on any worker."""

    config: ShardConfig
    name: str = "shard"
    resources: Resources = field(default_factory=Resources)
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # filled by plan()

    def plan(self) -> list[Task]:
        config = self.config
        manifest = config.audio.manifest
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} not found: run `mert-pipe resample {config.workdir}` first")
        self.facts = teacher_facts(config.workdir, list(config.teachers) if config.teachers else None)
        hop = next(iter(self.facts.values()))["hop"]
        rate = next(iter(self.facts.values()))["sampling_rate"]
        if rate != config.sample_rate:
            raise ValueError(f"the teachers' labels are for {rate} Hz audio, not {config.sample_rate} Hz")
        unit = segment_unit(int(config.segment_seconds * rate), hop)
        max_units = int(config.segment_seconds * rate) // unit
        if max_units < 1:
            raise ValueError(f"--segment-seconds {config.segment_seconds} is shorter than one frame")
        if max_units * unit >= 2**31:
            raise ValueError(
                f"--segment-seconds {config.segment_seconds} is longer than a shard sample can be"
            )
        layout = Workdir(config.workdir)
        labels = {name: label_index(layout.labels(name)) for name in self.facts}
        for split in SPLITS:
            _remove_stale_tmp(config.out, split)
        # Columns, never a Python object per file or segment: the admitted files as an Arrow table and
        # numpy columns (id number, split, segment count), the segments as numpy columns (file, index in
        # the file, offset, length, estimated bytes): 28 bytes a segment.
        files: list[pa.Table] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("file", "index", "offset", "n", "est")}
        per_file: dict[str, list[np.ndarray]] = {"id": [], "split": [], "segments": []}
        label_rows: dict[str, list[np.ndarray]] = {name: [] for name in self.facts}  # per admitted file
        counts: Counter = Counter()
        admitted = 0
        with RejectsWriter(stage_dir(self) / REJECTS) as rejects:
            for batch in iter_batches(manifest, columns=AUDIO_COLUMNS):
                counts["files_seen"] += batch.num_rows
                keep, ids, found = self._admit(batch, labels, rate, rejects, counts)
                kept = pa.Table.from_batches([batch]).filter(pa.array(keep))
                if kept.num_rows == 0:
                    continue
                files.append(kept)
                for name in self.facts:
                    label_rows[name].append(found[name][keep])
                num_samples = kept.column("num_samples").to_numpy()
                segments = segment_columns(num_samples, max_units, unit)
                file = segments["file"]
                n = segments["n"]
                size = kept.column("size_bytes").to_numpy()[file]
                is_valid = pc.equal(kept.column("split"), "valid").to_numpy(zero_copy_only=False)
                # int32 where a value is bounded: files < 2**31, a segment's samples (checked above)
                per_file["id"].append(ids[keep])
                per_file["split"].append(np.asarray(is_valid, dtype=np.int8))  # SPLITS.index
                per_file["segments"].append(np.bincount(file, minlength=kept.num_rows))
                parts["file"].append((file + admitted).astype(np.int32))
                parts["index"].append(segments["index"].astype(np.int32))
                parts["offset"].append(segments["offset"])
                parts["n"].append(n.astype(np.int32))
                est = size * n // num_samples[file] + self._label_bytes(n, hop)
                parts["est"].append(est.astype(np.int64))
                admitted += kept.num_rows
        counts["files"] = admitted
        table = pa.concat_tables(files).combine_chunks() if files else None  # one chunk: `take` is fast
        column = {k: _concatenate(parts.pop(k)) for k in list(parts)}
        label_at = {k: _concatenate(label_rows.pop(k)) for k in list(label_rows)}
        file_of = {k: _concatenate(per_file.pop(k)) for k in list(per_file)}
        first = np.cumsum(file_of["segments"]) - file_of["segments"]  # each file's first segment
        del files
        shards: list[tuple[str, np.ndarray]] = []  # (name, its segments in order)
        for split_index, split in enumerate(SPLITS):
            mine = np.flatnonzero(file_of["split"] == split_index)
            by_id = mine[np.argsort(file_of["id"][mine], kind="stable")]  # segment keys sort as (id, index)
            ordered = _expand(first[by_id], file_of["segments"][by_id])
            order = ordered[np.random.default_rng([config.seed, split_index]).permutation(len(ordered))]
            del ordered
            bounds = deal(column["est"][order], config.shard_bytes, config.shard_samples)
            shards += [(shard_name(split, k), order[a:b]) for k, (a, b) in enumerate(bounds)]
        counts["segments"] = sum(len(members) for _, members in shards)
        names = [name for name, _ in shards]
        atomic_write_json(stage_dir(self) / "plan.json", {"counts": dict(counts), "shards": sorted(names)})
        self._claim(config.take_over, sorted(names))

        def rows() -> Any:
            assert table is not None or not shards
            for shard, members in shards:
                file = column["file"][members]
                npys = {name: labels[name].relpath.take(label_at[name][file]).to_pylist() for name in labels}
                indexes, offsets = column["index"][members].tolist(), column["offset"][members].tolist()
                lengths = column["n"][members].tolist()
                for j, row in enumerate(table.take(file).to_pylist()):
                    index = indexes[j]
                    yield {
                        "shard": shard,
                        "key": segment_key(row["id"], index),
                        "id": row["id"],
                        "path": row["path"],
                        "relpath": row["relpath"],
                        "content_hash": row["content_hash"],
                        "subtype": row["subtype"],
                        "format": row["format"],
                        "split": row["split"],
                        "segment": index,
                        "offset": offsets[j],
                        "num_samples": lengths[j],
                        "source_num_samples": row["num_samples"],
                        "size_bytes": row["size_bytes"],
                        "labels": {name: npys[name][j] for name in labels},
                    }

        fingerprint = json.dumps(
            {"teachers": self.facts, "rate": rate, "hop": hop, "version": 2}, sort_keys=True, default=str
        )
        tasks = write_listings(self, rows(), sys.maxsize, fingerprint, SUBDIRS, task_key=lambda r: r["shard"])
        _redo_missing(self, tasks, names)
        return tasks

    def _label_bytes(self, num_samples: np.ndarray, hop: int) -> np.ndarray:
        frames = num_frames(num_samples, hop)
        per_teacher = sum(128 + 2 * facts["n_q"] * frames for facts in self.facts.values())
        return per_teacher + 300 + TAR_OVERHEAD * (2 + len(self.facts))

    def _admit(
        self, batch: pa.RecordBatch, labels: dict[str, LabelIndex], rate: int, rejects: Any, counts: Counter
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Which rows of a manifest batch can be sharded, their ids as numbers, and each teacher's row of
        their labels (`LabelIndex.find`). Every other row goes to `rejects`, in manifest order, for its
        first failing check: a row no writer makes (`bad_record`: an id that is not 16 hex digits, an
        unknown split), a sample format FLAC cannot hold (`unshardable`), then per teacher: no labels
        (`no_labels`), labels of another length or configuration, or at a path outside their folder
        (`label_mismatch`)."""
        ids, valid = id_numbers(batch.column("id"))
        split = pc.fill_null(pc.is_in(batch.column("split"), pa.array(SPLITS)), False)
        valid &= np.asarray(split.to_numpy(zero_copy_only=False), dtype=bool)
        subtype = pc.fill_null(pc.is_in(batch.column("subtype"), pa.array(FLAC_SUBTYPES)), False)
        flac = np.asarray(subtype.to_numpy(zero_copy_only=False), dtype=bool)
        flac &= batch.column("sampling_rate").to_numpy(zero_copy_only=False) == rate
        num_samples = batch.column("num_samples").to_numpy(zero_copy_only=False)
        reason = np.where(valid, np.where(flac, _OK, _UNSHARDABLE), _BAD_RECORD)
        found = {}
        for name, facts in self.facts.items():
            found[name] = at = labels[name].find(ids)
            same = labels[name].matches(at, num_samples, facts["config_hash"])
            verdict = np.where(at < 0, _NO_LABELS, np.where(same, _OK, _LABEL_MISMATCH))
            reason = np.where(reason != _OK, reason, verdict)
        for i in np.flatnonzero(reason != _OK).tolist():
            row = {
                key: batch.column(key)[i].as_py()
                for key in ("id", "path", "subtype", "sampling_rate", "split")
            }
            reject = self._reject(
                int(reason[i]), row, int(num_samples[i]), labels, {k: int(v[i]) for k, v in found.items()}
            )
            rejects.write(reject)
            counts[f"rejected.{reject.reason}"] += 1
        return reason == _OK, ids, found

    def _reject(
        self,
        code: int,
        row: dict[str, Any],
        num_samples: int,
        labels: dict[str, LabelIndex],
        found: dict[str, int],
    ) -> Reject:
        """The reject of one row for its first failing check (`code`, as `_admit` found it)."""
        path = str(row["path"])
        if code == _BAD_RECORD:
            try:
                id_relpath(row["id"], "")  # the layout's own check of an id, and its message
                why = f"split {row['split']!r} is not one of {', '.join(SPLITS)}"
            except ValueError as exc:
                why = str(exc)
            return Reject(path, "bad_record", why)
        if code == _UNSHARDABLE:
            return Reject(
                path,
                "unshardable",
                f"{row['subtype']} at {row['sampling_rate']} Hz; shards hold "
                f"{' or '.join(FLAC_SUBTYPES)} at {self.config.sample_rate} Hz (resample with --format flac)",
            )
        for name, facts in self.facts.items():  # the first teacher that fails, as `_admit` ordered them
            at, index = found[name], labels[name]
            if at < 0:
                return Reject(path, "no_labels", f"teacher {name!r} has no labels for this file")
            relpath, config_hash = index.relpath[at].as_py(), index.config_hash[at].as_py()
            folder = Workdir(self.config.workdir).labels(name)
            if not index.relpath_ok[at]:
                return Reject(
                    path,
                    "label_mismatch",
                    f"teacher {name!r}'s labels.parquet names {relpath!r} for this file: outside "
                    f"{folder.path}",
                )
            if config_hash != facts["config_hash"] or int(index.num_samples[at]) != num_samples:
                return Reject(
                    path,
                    "label_mismatch",
                    f"{folder.npy(relpath)} was made for {int(index.num_samples[at])} samples with config "
                    f"{config_hash}; the audio has {num_samples} and the teacher is {facts['config_hash']}",
                )
        raise AssertionError(f"{path}: reject code {code}, but it passes every check")

    def run(self, task: Task, stats: Counter) -> None:
        rows = read_listing(self, task.rank)
        if not self.facts:
            self.facts = teacher_facts(self.config.workdir, sorted(rows[0]["labels"]))
        hop = next(iter(self.facts.values()))["hop"]
        rate = self.config.sample_rate
        shard = rows[0]["shard"]
        hashes = {name: facts["config_hash"] for name, facts in self.facts.items()}
        layout = Workdir(self.config.workdir)
        seconds = 0.0
        with self._output(shard) as tmp, open(tmp, "wb") as handle:
            tar = DeterministicTar(handle)
            for row in rows:
                n, offset = row["num_samples"], row["offset"]
                first, frames = frame_span(offset, n, hop)
                slices = {}
                for name, facts in self.facts.items():  # check every teacher before writing the sample
                    path = layout.labels(name).npy(row["labels"][name])
                    slices[name] = label_columns(
                        path, facts["n_q"], row["source_num_samples"], hop, first, frames
                    )
                flac = segment_flac(row, rate, stats)
                meta = SegmentMeta(
                    key=row["key"],
                    id=row["id"],
                    relpath=row["relpath"],
                    split=row["split"],
                    segment=row["segment"],
                    offset=offset,
                    num_samples=n,
                    source_num_samples=row["source_num_samples"],
                    sample_rate=rate,
                    label_rate=rate / hop,
                    hop=hop,
                    frames=frames,
                    teachers=hashes,
                )
                write_sample(tar, meta, flac, slices)
                seconds += n / rate
                stats["samples"] += 1
                stats["frames"] += frames
                stats["audio_seconds"] += n / rate
            size, sha256 = tar.close()
        stats["bytes"] += size
        stats["shards"] += 1
        split = rows[0]["split"]
        part = {"shard": shard, "split": split, "samples": len(rows), "bytes": size, "sha256": sha256}
        atomic_write_json(self._part(task.rank), {**part, "seconds": seconds})

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        config = self.config
        plan = json.loads((stage_dir(self) / "plan.json").read_text())
        entries = {}
        for task in tasks:
            part = json.loads(self._part(task.rank).read_text())
            shard = part.pop("shard")
            entries[shard] = part
        with self._output(REJECTS) as tmp, RejectsWriter(tmp) as rejects:
            for reject in iter_rejects(stage_dir(self) / REJECTS):
                rejects.write(reject)
        old = _old_index(config.out)
        sidecars = {}
        for name, entry in old.get("shards", {}).items():  # sidecars of unchanged audio shards stay
            base = entries.get(entry.get("base", ""))
            if "teacher" in entry and base is not None and base["sha256"] == entry.get("base_sha256"):
                if entry["teacher"] not in self.facts:
                    sidecars[name] = entry
        removed = _prune(config.out, set(entries) | set(sidecars), self._owned(_owner(self.config.out)))
        teachers_of_sidecars = {e["teacher"] for e in sidecars.values()}
        sidecar_facts = {k: v for k, v in old.get("sidecars", {}).items() if k in teachers_of_sidecars}
        facts = next(iter(self.facts.values()))
        index = {
            "format": FORMAT,
            "sample_rate": config.sample_rate,
            "hop": facts["hop"],
            "label_rate": config.sample_rate / facts["hop"],
            "segment_seconds": config.segment_seconds,
            "seed": config.seed,
            "teachers": self.facts,
            "sidecars": sidecar_facts,
            "shards": {**entries, **sidecars},
        }
        self._write_index(index)
        counts = dict(plan["counts"])
        counts["rejected"] = sum(v for k, v in counts.items() if k.startswith("rejected."))
        counts["accepted"] = counts.pop("files", 0)
        for key in ("samples", "bytes", "shards", "audio_seconds"):
            counts[key] = stats.get(key, 0)
        counts |= {key: value for key, value in stats.items() if key.startswith("audio_")}
        counts["removed_stale"] = removed
        return {
            "counts": {key: counts[key] for key in sorted(counts)},
            "totals": index["totals"],
            "outputs": {"shards": str(config.out), "index": str(join(config.out, INDEX))},
        }


def _concatenate(pieces: list[np.ndarray]) -> np.ndarray:
    """One array of the pieces (int64 when there are none), which are released as they are copied."""
    if not pieces:
        return np.zeros(0, np.int64)
    out = np.empty(sum(len(p) for p in pieces), dtype=pieces[0].dtype)
    at = 0
    while pieces:
        piece = pieces.pop(0)
        out[at : at + len(piece)] = piece
        at += len(piece)
    return out


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The runs [start, start + count) one after another: the segments of files taken in a given order."""
    ends = np.cumsum(counts)
    return np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)


def deal(est: np.ndarray, shard_bytes: int, shard_samples: int | None) -> list[tuple[int, int]]:
    """Cut segments (their estimated bytes, in dealing order) into consecutive shards, each closing before
    the segment that would take it past `shard_bytes`, or at `shard_samples` segments: (start, end) of
    each. Read a million at a time, so no Python list of every segment is made."""
    starts, size, count = [0], 0, 0
    block = 1 << 20
    for first in range(0, len(est), block):
        for i, bytes_ in enumerate(est[first : first + block].tolist(), first):
            full = shard_samples is not None and count >= shard_samples
            if count and (full or size + bytes_ > shard_bytes):
                starts.append(i)
                size = count = 0
            size += bytes_
            count += 1
    return list(zip(starts, [*starts[1:], len(est)], strict=True)) if len(est) else []


def segment_unit(max_samples: int, hop: int) -> int:
    """Segments are cut on multiples of this many samples: whole label frames (`hop`) and whole FLAC
    frames, so that `segment_flac` copies frames instead of decoding and encoding; just `hop` when
    --segment-seconds is shorter than that (such segments are re-encoded)."""
    unit = math.lcm(hop, FLAC_BLOCK)
    return unit if unit <= max_samples else hop


def segment_flac(row: dict[str, Any], rate: int, stats: Counter) -> bytes:
    """The segment as FLAC, by the cheapest exact way (counted in `stats`): a whole track that already
    is FLAC goes in as its own bytes (the file the teachers read, hash-checked); a segment of a FLAC file
    that is a run of whole frames is cut out of it by copying the frames (`cut_segment`); anything else
    (other formats, block sizes or bounds, a file that does not pass cut_segment's checks) is decoded
    to integers and re-encoded losslessly at the same bit depth."""
    whole = row["offset"] == 0 and row["num_samples"] == row["source_num_samples"]
    if whole and row["format"] == "FLAC":
        data = Path(row["path"]).read_bytes()
        if xxhash.xxh3_128(data).hexdigest() != row["content_hash"]:  # the very file the teachers read
            raise ShardError(f"{row['path']} changed after resample: rerun resample and tokenize")
        stats["audio_copied_whole"] += 1
        return data
    reason = "not_flac"
    if row["format"] == "FLAC":
        try:
            data = cut_segment(
                row["path"],
                row["offset"],
                row["num_samples"],
                sample_rate=rate,
                bits=_BITS[row["subtype"]],
                total_samples=row["source_num_samples"],
                size_bytes=row.get("size_bytes"),
            )
            stats["audio_copied_frames"] += 1
            return data
        except NotCopyable as why:
            reason = why.reason
    stats["audio_reencoded"] += 1
    stats[f"audio_reencoded.{reason}"] += 1
    samples = read_segment(
        row["path"], row["subtype"], row["offset"], row["num_samples"], row["source_num_samples"]
    )
    return encode_flac(samples, rate, row["subtype"])


def _old_index(out: Location) -> dict[str, Any]:
    try:
        return read_index(out)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


OWNED = "owned.json"  # bookkeeping: every tar name this shard set has planned


OWNER = ".owner"  # SHARDS/.owner: the WORKDIR whose shard set this is


def _identity(workdir: Path) -> str:
    """The WORKDIR a shard set belongs to, as SHARDS/.owner records it."""
    return str(Path(workdir).resolve())


def _owner(out: Location) -> str | None:
    """The WORKDIR that last wrote this SHARDS's index.json (None: none yet, or written before claims)."""
    try:
        return storage.read_bytes(join(out, OWNER)).decode().strip() or None
    except FileNotFoundError:
        return None


def _prune(out: Location, kept: set[str], owned: set[str]) -> int:
    """Delete tars of this shard set's earlier plans that the new index does not list; only names in
    `owned` (its own earlier index and plans), never a file it did not write."""
    removed = 0
    for split in SPLITS:
        for name in storage.list_names(join(out, split)):
            named = SHARD_NAME.match(name) or SIDECAR_NAME.match(name)
            if named and f"{split}/{name}" not in kept and f"{split}/{name}" in owned:
                storage.remove(join(out, split, name))
                removed += 1
    return removed


def bookkeeping_dir(workdir: Path, out: Location) -> Path:
    """A shard set's bookkeeping (and, for a remote set, its tars while they upload): SHARDS itself when
    it is a folder; for a URL, a folder under WORKDIR named by the URL, so two shard sets never mix."""
    if not is_url(out):
        return Path(out)
    return Workdir(workdir).remote_shards(str(out))


def _remove_stale_tmp(out: Location, split: str) -> None:
    """Temporaries of killed writers (local only: a remote object appears only when whole)."""
    if not is_url(out):
        remove_stale_tmp(Path(out) / split)


def _redo_missing(stage: Any, tasks: list[Task], names: list[str]) -> None:
    """A task whose tar was deleted by hand is run again: its completion marker goes."""
    present = {
        f"{split}/{name}" for split in SPLITS for name in storage.list_names(join(stage.config.out, split))
    }
    for task, name in zip(tasks, names, strict=True):
        if name not in present:
            with contextlib.suppress(FileNotFoundError):
                marker_path(stage, task.rank).unlink()


@dataclass(frozen=True)
class SidecarConfig:
    workdir: Path
    out: Location
    teacher: str


_LABEL_CACHE: dict[tuple[str, float], LabelIndex] = {}


@dataclass
class SidecarStage(_WritesShards):
    """`shard --labels-only --teacher NAME`: one label-only tar per audio shard, same keys, same order."""

    config: SidecarConfig
    name: str = "shard_labels"
    resources: Resources = field(default_factory=Resources)
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = f"shard_labels_{self.config.teacher}"

    def plan(self) -> list[Task]:
        index = read_index(self.config.out)
        teacher = self.config.teacher
        if teacher in index["teachers"]:
            raise ValueError(
                f"the audio shards already hold {teacher!r} labels; sidecars are for new teachers"
            )
        self.facts = teacher_facts(self.config.workdir, [teacher])[teacher]
        if (self.facts["sampling_rate"], self.facts["hop"]) != (index["sample_rate"], index["hop"]):
            raise ValueError(
                f"teacher {teacher!r} labels {self.facts['sampling_rate']} Hz audio with hop "
                f"{self.facts['hop']}; the shards are {index['sample_rate']} Hz with hop {index['hop']}"
            )
        for split in SPLITS:
            _remove_stale_tmp(self.config.out, split)
        bases = sorted(name for name, entry in index["shards"].items() if "teacher" not in entry)
        rows = [{"shard": name, "sha256": index["shards"][name]["sha256"]} for name in bases]
        fingerprint = json.dumps({"teacher": self.facts, "version": 1}, sort_keys=True, default=str)
        self._claim(False, [sidecar_name(base, teacher) for base in bases])
        tasks = write_listings(self, rows, 1, fingerprint, SUBDIRS)
        _redo_missing(self, tasks, [sidecar_name(base, teacher) for base in bases])
        return tasks

    def _labels(self) -> LabelIndex:
        """The teacher's label table, read once per worker process."""
        label_set = Workdir(self.config.workdir).labels(self.config.teacher)
        key = (str(label_set.manifest), label_set.manifest.stat().st_mtime)
        if key not in _LABEL_CACHE:
            _LABEL_CACHE.clear()
            _LABEL_CACHE[key] = label_index(label_set)
        return _LABEL_CACHE[key]

    def run(self, task: Task, stats: Counter) -> None:
        (row,) = read_listing(self, task.rank)
        base, teacher = row["shard"], self.config.teacher
        facts = self.facts or teacher_facts(self.config.workdir, [teacher])[teacher]
        hop = facts["hop"]
        table = self._labels()
        label_set = Workdir(self.config.workdir).labels(teacher)
        seconds, samples = 0.0, 0
        limits = member_limits(read_index(self.config.out))  # no member is read past what it may hold
        with storage.open_read(join(self.config.out, base)) as source:
            samples_read = iter_samples(source, limits)
            metas = [SegmentMeta.from_bytes(sample.get("json", b"")) for _, sample in samples_read]
        found = [table.get(m.id) for m in metas]
        missing = [m.id for m, entry in zip(metas, found, strict=True) if entry is None]
        if missing:
            raise ShardError(
                f"teacher {teacher!r} has no labels for {len(missing)} tracks of {base} (e.g. {missing[0]}); "
                f"label them, or reshard with --teachers including {teacher}"
            )
        with self._output(sidecar_name(base, teacher)) as tmp, open(tmp, "wb") as handle:
            tar = DeterministicTar(handle)
            for meta, entry in zip(metas, found, strict=True):
                assert entry is not None  # every id was checked above
                relpath, config_hash, num_samples = entry
                path = label_set.npy(relpath)
                if config_hash != facts["config_hash"] or num_samples != meta.source_num_samples:
                    raise ShardError(
                        f"{path}: made for {num_samples} samples with config {config_hash}; the shard's "
                        f"audio has {meta.source_num_samples} and the teacher is {facts['config_hash']}"
                    )
                first, frames = frame_span(meta.offset, meta.num_samples, hop)
                labels = label_columns(path, facts["n_q"], num_samples, hop, first, frames)
                tar.add(f"{meta.key}.{teacher}.npy", npy_bytes(labels))
                seconds += meta.num_samples / meta.sample_rate
                samples += 1
                stats["samples"] += 1
                stats["audio_seconds"] += meta.num_samples / meta.sample_rate
            size, sha256 = tar.close()
        stats["bytes"] += size
        stats["shards"] += 1
        part = {"base": base, "base_sha256": row["sha256"], "samples": samples, "bytes": size}
        atomic_write_json(self._part(task.rank), {**part, "sha256": sha256, "seconds": seconds})

    def finalize(self, tasks: list[Task], stats: dict[str, float]) -> dict[str, Any]:
        teacher = self.config.teacher
        index = read_index(self.config.out)
        shards = {k: v for k, v in index["shards"].items() if v.get("teacher") != teacher}
        for task in tasks:
            part = json.loads(self._part(task.rank).read_text())
            base = part["base"]
            shards[sidecar_name(base, teacher)] = {
                **part,
                "split": index["shards"][base]["split"],
                "teacher": teacher,
            }
        index["shards"] = shards
        index.setdefault("sidecars", {})[teacher] = (
            self.facts or teacher_facts(self.config.workdir, [teacher])[teacher]
        )
        removed = _prune(self.config.out, set(shards), self._owned(_owner(self.config.out)))
        self._write_index(index)
        counts = {key: stats.get(key, 0) for key in ("samples", "bytes", "shards", "audio_seconds")}
        counts["removed_stale"] = removed
        return {
            "counts": counts,
            "totals": index["totals"],
            "outputs": {"shards": str(self.config.out), "index": str(join(self.config.out, INDEX))},
        }
