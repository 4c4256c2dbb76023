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
import xxhash

from mert_pipeline import storage
from mert_pipeline.executor import Resources, Task, marker_path, rank_path, stage_dir
from mert_pipeline.flac_frames import FLAC_BLOCK, NotCopyable, cut_segment
from mert_pipeline.fs import atomic_write_json, remove_stale_tmp
from mert_pipeline.grid import SAMPLE_RATE, frame_span, num_frames
from mert_pipeline.labels import label_columns, load_labels, teacher_facts
from mert_pipeline.layout import AudioDir, Workdir
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
    npy_bytes,
    read_index,
    read_segment,
    segment_bounds,
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
LABEL_COLUMNS = ["id", "relpath", "config_hash", "num_samples", "n_q", "frames"]
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
        layout = Workdir(config.workdir)
        labels = {name: load_labels(layout.labels(name)) for name in self.facts}
        for split in SPLITS:
            _remove_stale_tmp(config.out, split)
        files: list[dict[str, Any]] = []
        segments: dict[str, list[tuple[str, int, int, int, int]]] = {split: [] for split in SPLITS}
        counts: Counter = Counter()
        with RejectsWriter(stage_dir(self) / REJECTS) as rejects:
            for batch in iter_batches(manifest, columns=AUDIO_COLUMNS):
                for row in batch.to_pylist():
                    counts["files_seen"] += 1
                    reject = self._admit(row, labels, rate)
                    if reject is not None:
                        rejects.write(reject)
                        counts[f"rejected.{reject.reason}"] += 1
                        continue
                    file_index = len(files)
                    files.append(row)
                    counts["files"] += 1
                    for index, (offset, n) in enumerate(segment_bounds(row["num_samples"], max_units, unit)):
                        est = row["size_bytes"] * n // row["num_samples"] + self._label_bytes(n, hop)
                        segments[row["split"]].append(
                            (segment_key(row["id"], index), file_index, offset, n, est)
                        )
        shards: dict[str, list[tuple[str, int, int, int, int]]] = {}
        for split_index, split in enumerate(SPLITS):
            made = 0
            ordered = sorted(segments[split])  # by key: independent of the manifest's row order
            order = np.random.default_rng([config.seed, split_index]).permutation(len(ordered))
            current: list[tuple[str, int, int, int, int]] = []
            size = 0
            for position in order:
                segment = ordered[position]
                full = config.shard_samples is not None and len(current) >= config.shard_samples
                if current and (full or size + segment[4] > config.shard_bytes):
                    shards[shard_name(split, made)], made = current, made + 1
                    current, size = [], 0
                current.append(segment)
                size += segment[4]
            if current:
                shards[shard_name(split, made)] = current
        counts["segments"] = sum(len(v) for v in shards.values())
        atomic_write_json(stage_dir(self) / "plan.json", {"counts": dict(counts), "shards": sorted(shards)})
        self._claim(config.take_over, sorted(shards))

        def rows() -> Any:
            for shard, members in shards.items():
                for key, file_index, offset, n, _ in members:
                    row = files[file_index]
                    yield {
                        "shard": shard,
                        "key": key,
                        "id": row["id"],
                        "path": row["path"],
                        "relpath": row["relpath"],
                        "content_hash": row["content_hash"],
                        "subtype": row["subtype"],
                        "format": row["format"],
                        "split": row["split"],
                        "segment": int(key.rsplit("_", 1)[1]),
                        "offset": offset,
                        "num_samples": n,
                        "source_num_samples": row["num_samples"],
                        "size_bytes": row["size_bytes"],
                        "labels": {name: labels[name][row["id"]][0] for name in self.facts},
                    }

        fingerprint = json.dumps(
            {"teachers": self.facts, "rate": rate, "hop": hop, "version": 2}, sort_keys=True, default=str
        )
        tasks = write_listings(self, rows(), sys.maxsize, fingerprint, SUBDIRS, task_key=lambda r: r["shard"])
        _redo_missing(self, tasks, list(shards))
        return tasks

    def _label_bytes(self, num_samples: int, hop: int) -> int:
        frames = num_frames(num_samples, hop)
        per_teacher = sum(128 + 2 * facts["n_q"] * frames for facts in self.facts.values())
        return per_teacher + 300 + TAR_OVERHEAD * (2 + len(self.facts))

    def _admit(self, row: dict[str, Any], labels: dict[str, dict], rate: int) -> Reject | None:
        """Why a file of the audio manifest cannot be sharded, or None."""
        if row["subtype"] not in FLAC_SUBTYPES or row["sampling_rate"] != rate:
            return Reject(
                row["path"],
                "unshardable",
                f"{row['subtype']} at {row['sampling_rate']} Hz; shards hold "
                f"{' or '.join(FLAC_SUBTYPES)} at {rate} Hz (resample with --format flac)",
            )
        for name, facts in self.facts.items():
            found = labels[name].get(row["id"])
            if found is None:
                return Reject(row["path"], "no_labels", f"teacher {name!r} has no labels for this file")
            relpath, config_hash, num_samples = found
            npy = Workdir(self.config.workdir).labels(name).npy(relpath)
            if config_hash != facts["config_hash"] or num_samples != row["num_samples"]:
                return Reject(
                    row["path"],
                    "label_mismatch",
                    f"{npy} was made for {num_samples} samples with config {config_hash}; the audio "
                    f"has {row['num_samples']} and the teacher is {facts['config_hash']}",
                )
        return None

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


_LABEL_CACHE: dict[tuple[str, float], dict[str, tuple[str, str, int]]] = {}


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

    def _labels(self) -> dict[str, tuple[str, str, int]]:
        """The teacher's label table, read once per worker process."""
        label_set = Workdir(self.config.workdir).labels(self.config.teacher)
        key = (str(label_set.manifest), label_set.manifest.stat().st_mtime)
        if key not in _LABEL_CACHE:
            _LABEL_CACHE.clear()
            _LABEL_CACHE[key] = load_labels(label_set)
        return _LABEL_CACHE[key]

    def run(self, task: Task, stats: Counter) -> None:
        (row,) = read_listing(self, task.rank)
        base, teacher = row["shard"], self.config.teacher
        facts = self.facts or teacher_facts(self.config.workdir, [teacher])[teacher]
        hop = facts["hop"]
        table = self._labels()
        label_set = Workdir(self.config.workdir).labels(teacher)
        seconds, samples = 0.0, 0
        with storage.open_read(join(self.config.out, base)) as source:
            metas = [SegmentMeta.from_bytes(sample.get("json", b"")) for _, sample in iter_samples(source)]
        missing = [m.id for m in metas if m.id not in table]
        if missing:
            raise ShardError(
                f"teacher {teacher!r} has no labels for {len(missing)} tracks of {base} (e.g. {missing[0]}); "
                f"label them, or reshard with --teachers including {teacher}"
            )
        with self._output(sidecar_name(base, teacher)) as tmp, open(tmp, "wb") as handle:
            tar = DeterministicTar(handle)
            for meta in metas:
                relpath, config_hash, num_samples = table[meta.id]
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
