"""The shard format: deterministic WebDataset tars of audio segments and teacher labels; their one writer,
their one reader (which merges sidecars), `index.json`, and their check (`verify`).

A shard set is a folder (or a URL):

    SHARDS/index.json                     per shard: split, samples, bytes, sha256, seconds; totals
    SHARDS/rejects.jsonl                  source files that could not be sharded, with the reason
    SHARDS/{train,valid}/shard-NNNNNN.tar            audio shards
    SHARDS/{train,valid}/shard-NNNNNN.TEACHER.tar    label-only sidecars of a teacher added later

A shard is a plain tar read by `webdataset.WebDataset`. Each sample is one segment of one track:

- `KEY.flac`: 24 kHz mono, the very integer samples the teachers encoded (same bit depth), lossless;
- `KEY.json`: `SegmentMeta`: id, split, segment index, offset and num_samples in samples, sample and label
  rate, and the teachers' config hashes;
- `KEY.<teacher>.npy`: int16 labels of shape (n_q, ceil(num_samples / 320)) per teacher.

A label-only sidecar `shard-NNNNNN.<teacher>.tar` holds `KEY.<teacher>.npy` for exactly the keys of
`shard-NNNNNN.tar`, in the same order, so a reader can zip the two streams (`read_samples`).

Tar headers carry no time, owner or mode of the writer (all fixed), so the same samples give the same
bytes on any machine, executor or run. `verify_shard` re-reads one shard (and its sidecars) against the
index. Everything that reads shards (the trainer, `verify`, `stats`, the sidecar stage, the tests' shard
generator) goes through this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from mert_pipeline import storage
from mert_pipeline.fs import to_json
from mert_pipeline.grid import num_frames
from mert_pipeline.storage import Location, join
from mert_pipeline.teachers import test_weights_warning

INDEX = "index.json"
REJECTS = "rejects.jsonl"
FORMAT = "mert-pipeline-shards/1"
SPLITS = ("train", "valid")
SHARD_NAME = re.compile(r"^shard-(\d{6})\.tar$")
SIDECAR_NAME = re.compile(r"^shard-(\d{6})\.([A-Za-z0-9_-]+)\.tar$")
_ENTRY_NAME = re.compile(r"^(train|valid)/shard-\d{6}(\.[A-Za-z0-9_-]+)?\.tar$")  # a name in index.json
_ID = re.compile(r"^[0-9a-f]{16}$")
FLAC_SUBTYPES = ("PCM_16", "PCM_24")  # what FLAC holds; the shard keeps the source's bit depth
_READ_DTYPE = {"PCM_16": "int16", "PCM_24": "int32"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ShardError(RuntimeError):
    """Inputs that must not become a shard (labels that do not align, audio that changed); names the file."""


def parse_size(text: str) -> int:
    """`256MB`, `1.5GB`, `512MiB`, `100000` (bytes) -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 256MB, 1GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).lower()
    prefix = unit[:1] if unit[:1] in "kmgt" and unit else ""
    scale = _UNITS[prefix] if "i" not in unit else 1024 ** " kmgt".index(prefix)
    size = int(number * scale)
    if size < 1:
        raise ValueError(f"size {text!r} is below one byte")
    return size


def segment_bounds(num_samples: int, max_units: int, unit: int) -> list[tuple[int, int]]:
    """(offset, num_samples) of each segment: as few segments as fit `max_units` units of `unit` samples
    each, of equal length to a unit, cut on multiples of `unit`. The shard stage's unit is a multiple of
    the label hop (labels slice exactly) and of the FLAC block size (the segment is a run of whole FLAC
    frames, copied without decoding). Equal lengths mean no track ends in a useless sliver: the shortest
    segment of a long track is about half a full one. (`segment_columns` of one file: one rule.)"""
    columns = segment_columns(np.array([num_samples], dtype=np.int64), max_units, unit)
    return list(zip(columns["offset"].tolist(), columns["n"].tolist(), strict=True))


def segment_columns(num_samples: np.ndarray, max_units: int, unit: int) -> dict[str, np.ndarray]:
    """`segment_bounds` of many files at once, as int64 columns over all their segments: `file` (the
    file's position in `num_samples`), `index` (the segment's number in its file), `offset` and `n`."""
    total = np.asarray(num_samples, dtype=np.int64)
    units = -(-total // unit)
    count = -(-units // max_units)
    file = np.repeat(np.arange(len(total), dtype=np.int64), count)
    index = np.arange(len(file), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    per_file_units, per_file_count = units[file], count[file]
    start = index * per_file_units // per_file_count * unit
    last = index == per_file_count - 1
    end = np.where(last, total[file], (index + 1) * per_file_units // per_file_count * unit)
    return {"file": file, "index": index, "offset": start, "n": end - start}


def segment_key(file_id: str, index: int) -> str:
    """WebDataset keys end at the first dot, so a key holds none."""
    return f"{file_id}_{index:04d}"


def shard_name(split: str, number: int) -> str:
    """`train/shard-000000.tar`: shard `number` of `split`, relative to SHARDS."""
    return f"{split}/shard-{number:06d}.tar"


def sidecar_name(base: str, teacher: str) -> str:
    """`train/shard-000000.tar` -> `train/shard-000000.TEACHER.tar`."""
    return re.sub(r"\.tar$", f".{teacher}.tar", base)


def check_entry_name(name: str) -> str:
    """A shard's name read from index.json, refused unless it is `SPLIT/shard-NNNNNN[.TEACHER].tar`: no
    index can make a reader open a file outside SHARDS."""
    if not isinstance(name, str) or not _ENTRY_NAME.match(name):
        raise ShardError(f"index.json names a shard {name!r}, not SPLIT/shard-NNNNNN[.TEACHER].tar")
    return name


@dataclass(frozen=True)
class SegmentMeta:
    """`KEY.json` of a sample: which segment of which track it is, on which grid, labelled by whom."""

    key: str
    id: str  # the track's manifest id
    relpath: str  # the track's audio file, relative to its audio directory
    split: str
    segment: int  # index of the segment within its track
    offset: int  # first sample of the segment in the track (a multiple of hop)
    num_samples: int
    source_num_samples: int  # the whole track's
    sample_rate: int
    label_rate: float
    hop: int
    frames: int  # ceil(num_samples / hop)
    teachers: dict[str, str]  # label set -> config hash

    def to_bytes(self) -> bytes:
        return json_bytes(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> SegmentMeta:
        """Parse and check a `KEY.json`; ShardError naming what is wrong."""
        try:
            raw = json.loads(data)
            meta = cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError) as exc:
            raise ShardError(f"unreadable json ({type(exc).__name__}: {exc})") from exc
        meta.validate()
        return meta

    def validate(self) -> None:
        ints = (self.segment, self.offset, self.num_samples, self.source_num_samples, self.sample_rate)
        if not all(type(v) is int for v in (*ints, self.hop, self.frames)):
            raise ShardError(f"json fields must be integers: {asdict(self)}")
        if not _ID.match(str(self.id)) or self.key != segment_key(self.id, self.segment):
            raise ShardError(f"json key {self.key!r} is not id_segment for id {self.id!r}")
        if self.split not in SPLITS or self.hop < 1 or self.sample_rate < 1:
            raise ShardError(f"json split/hop/sample_rate invalid: {self.split!r}, {self.hop}")
        if self.offset < 0 or self.offset % self.hop or self.num_samples < 1:
            raise ShardError(f"json offset {self.offset} / num_samples {self.num_samples} off the grid")
        if self.offset + self.num_samples > self.source_num_samples:
            raise ShardError(f"json segment ends past its track ({self.source_num_samples} samples)")
        if self.frames != num_frames(self.num_samples, self.hop):
            raise ShardError(f"json frames {self.frames} != ceil({self.num_samples} / {self.hop})")
        if abs(self.label_rate * self.hop - self.sample_rate) > 1e-6:
            raise ShardError(
                f"json label_rate {self.label_rate} does not match {self.sample_rate} / {self.hop}"
            )
        if not isinstance(self.teachers, dict):
            raise ShardError(f"json teachers {self.teachers!r} is not a table of config hashes")


def read_segment(path: str, subtype: str, offset: int, num_samples: int, source_samples: int) -> np.ndarray:
    """The segment's integer samples as stored (int16, or int32 holding 24-bit values)."""
    try:
        with sf.SoundFile(path) as handle:
            if handle.channels != 1 or handle.frames != source_samples or handle.subtype != subtype:
                raise ShardError(
                    f"{path}: now {handle.channels} ch, {handle.frames} samples, {handle.subtype}; the audio "
                    f"manifest says 1 ch, {source_samples} samples, {subtype}: rerun resample and tokenize"
                )
            handle.seek(offset)
            data = handle.read(num_samples, dtype=_READ_DTYPE[subtype])
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile's errors: name the file
        raise ShardError(f"{path}: cannot read samples {offset}..{offset + num_samples}: {exc}") from exc
    if len(data) != num_samples:
        raise ShardError(f"{path}: decoding stopped at sample {offset + len(data)}, expected {num_samples}")
    return data


def encode_flac(samples: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    """Lossless FLAC of integer samples at the given bit depth: decodes to the same integers."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="FLAC", subtype=subtype)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class HashingWriter:
    """A write-only file that hashes and counts what passes through (the tar is hashed as written). The
    hashing runs in a second thread, a batch of about 1 MB behind the writes: hashlib releases the GIL on
    large buffers, so hashing a member overlaps making the next one (sha256 alone is about as slow as
    copying the bytes)."""

    BATCH = 1 << 20  # bytes handed to the hashing thread at once
    AHEAD = 4  # batches in flight at most (memory stays bounded when hashing is the slower side)

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._jobs: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")  # ends with the writer (weakref)

    def write(self, data: bytes) -> int:
        data = bytes(data)  # the thread hashes it later: a buffer the caller reuses must not change
        self.handle.write(data)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.size += len(data)
        if self._pending_bytes >= self.BATCH:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        if len(self._jobs) >= self.AHEAD:
            self._jobs.popleft().result()
        self._jobs.append(self._pool.submit(_update_all, self.sha256, self._pending))
        self._pending, self._pending_bytes = [], 0

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        """The sha256 of everything written (waits for the hashing thread, then stops it)."""
        self._flush()
        while self._jobs:
            self._jobs.popleft().result()
        self._pool.shutdown()
        return self.sha256.hexdigest()


def _update_all(sha256: Any, pieces: list[bytes]) -> None:
    for piece in pieces:
        sha256.update(piece)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


_HEADER = _tarfile_header("", 0)  # tarfile's header of a member: name and size patched in below


def member_header(name: str, size: int) -> bytes:
    """tarfile's header of a member (mode 0444, owner 0, time 0), the same bytes, a tenth of the time:
    for an ASCII name of at most 100 bytes (every shard member's) only the name, size and checksum
    fields differ between members; any other name goes through tarfile (PAX extended header)."""
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or not name.isascii() or size >= 8**11:
        return _tarfile_header(name, size)
    header = bytearray(_HEADER)
    header[: len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class DeterministicTar:
    """A tar whose bytes depend only on member names and contents (fixed mtime, owner and mode). The
    bytes are tarfile's (its own PAX-format member headers, zero padding and end blocks), but each member
    is written whole instead of through tarfile's 16 KiB copy loop."""

    def __init__(self, handle: BinaryIO) -> None:
        self.out = HashingWriter(handle)

    def add(self, name: str, data: bytes) -> None:
        self.out.write(member_header(name, len(data)))
        self.out.write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self.out.write(bytes(tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, then zeros to a whole record); return its size and sha256."""
        self.out.write(bytes(2 * tarfile.BLOCKSIZE))
        if self.out.size % tarfile.RECORDSIZE:
            self.out.write(bytes(tarfile.RECORDSIZE - self.out.size % tarfile.RECORDSIZE))
        return self.out.size, self.out.hexdigest()


class HashingReader:
    """Reads a file through, hashing every byte, so a shard is checked in one pass."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


JSON_LIMIT = 1 << 16  # a KEY.json is a few hundred bytes
_DEFAULT_SEGMENT_SECONDS = 600.0  # an index.json written before it recorded segment_seconds
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class MemberLimits:
    """The most bytes each member of a sample may declare, from what index.json says the samples are: the
    audio by the longest segment (24-bit PCM stored verbatim plus headers, above any FLAC), the labels by its
    frames x codebooks. A member above its limit is refused before a byte of it is read."""

    flac: int
    labels: dict[str, int]  # teacher -> bytes of its .npy

    def of(self, name: str) -> int:
        ext = split_name(name)[1]
        if ext == "flac":
            return self.flac
        if ext.endswith(".npy") and ext[: -len(".npy")] in self.labels:
            return self.labels[ext[: -len(".npy")]]
        return JSON_LIMIT  # json, and anything unexpected (verify reports its name)


def member_limits(index: dict[str, Any]) -> MemberLimits:
    """The limits of a shard set's members (index.json as read)."""
    try:
        rate, hop = int(index["sample_rate"]), int(index["hop"])
        samples = int(float(index.get("segment_seconds") or _DEFAULT_SEGMENT_SECONDS) * rate) + hop
        frames = num_frames(samples, hop)
        labels = {
            str(name): 256 + 2 * int(facts["n_q"]) * frames
            for group in ("teachers", "sidecars")
            for name, facts in (index.get(group) or {}).items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardError(f"index.json: malformed ({type(exc).__name__}: {exc})") from exc
    return MemberLimits(flac=4 * samples + (1 << 16), labels=labels)


class _Prefixed:
    """A stream whose first bytes were read to look at them, read again from the start."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if len(data) < size else b"")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "link"
    if member.isdev():
        return "device or FIFO"
    return "directory" if member.isdir() else f"member of type {member.type!r}"


def iter_members(stream: Any, limits: MemberLimits | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member of a plain tar read as a stream. A shard holds only regular files of
    bounded size: a compressed tar, a sparse member, a link or device, or a member above its `limits` is a
    ShardError naming it, raised before anything of it is read, so no tar can make a reader hold more than
    its limits."""
    head = stream.read(6)
    for magic, name in _COMPRESSED.items():
        if head.startswith(magic):
            raise ShardError(f"a {name}-compressed tar: shards are plain tars")
    with tarfile.open(fileobj=_Prefixed(head, stream), mode="r|") as tar:
        for member in tar:
            if member.issparse():
                raise ShardError(f"member {member.name}: a sparse member ({member.size} bytes declared)")
            if not member.isreg():
                raise ShardError(f"member {member.name}: a {_kind(member)}, not a regular file")
            limit = limits.of(member.name) if limits is not None else None
            if limit is not None and member.size > limit:
                raise ShardError(
                    f"member {member.name}: {member.size} bytes, more than the {limit} such a member can hold"
                )
            handle = tar.extractfile(member)
            yield member.name, handle.read() if handle is not None else b""


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the basename."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def iter_samples(stream: Any, limits: MemberLimits | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key, as webdataset does: (key, {extension: bytes})."""
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in iter_members(stream, limits):
        member_key, ext = split_name(name)
        if key is not None and member_key != key:
            yield key, sample
            sample = {}
        if ext in sample:
            sample[f"{ext}#dup"] = data
        key = member_key
        sample[ext] = data
    if key is not None:
        yield key, sample


def read_index(shards: Location) -> dict[str, Any]:
    """SHARDS/index.json as written (`write_index`), every shard name in it checked."""
    path = join(shards, INDEX)
    try:
        index = json.loads(storage.read_bytes(path))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path} not found: run `mert-pipe shard WORKDIR --out {shards}` first"
        ) from exc
    except ValueError as exc:
        raise ShardError(f"{path} is not JSON ({exc})") from exc
    if not isinstance(index, dict) or not isinstance(index.get("shards"), dict):
        raise ShardError(f"{path} has no 'shards' table: not a shard set's index")
    for name, entry in index["shards"].items():
        check_entry_name(name)
        if "base" in entry:
            check_entry_name(entry["base"])
    return index


def add_totals(index: dict[str, Any]) -> None:
    """Per split and overall: audio shards' samples, seconds and bytes (sidecar bytes apart)."""
    totals: dict[str, Any] = {}
    for split in SPLITS:
        audio = {k: v for k, v in index["shards"].items() if v["split"] == split and "teacher" not in v}
        side = [v for v in index["shards"].values() if v["split"] == split and "teacher" in v]
        totals[split] = {
            "shards": len(audio),
            "samples": sum(v["samples"] for v in audio.values()),
            "seconds": sum(v["seconds"] for v in audio.values()),
            "bytes": sum(v["bytes"] for v in audio.values()),
            "sidecar_bytes": sum(v["bytes"] for v in side),
        }
    totals["all"] = {key: sum(totals[s][key] for s in SPLITS) for key in totals["train"]}
    index["totals"] = totals


def write_index(shards: Location, index: dict[str, Any]) -> None:
    """SHARDS/index.json with its totals, whole or not at all (renamed locally, one PUT remotely). The
    shard stages write it last, after every tar it lists."""
    add_totals(index)
    storage.write_bytes(join(shards, INDEX), to_json(index).encode())


@dataclass
class ShardIndex:
    """What a reader needs of index.json: where each split's shards are, their sample counts, the
    teachers (in the shards or in sidecars) and which sidecars go with which shard."""

    root: Location  # a folder or a URL (s3://bucket/shards)
    sample_rate: int
    hop: int
    shards: dict[str, list[tuple[str, int]]]  # split -> [(name relative to root, samples)]
    teachers: dict[str, tuple[int, int]]  # name -> (n_q, num_classes), in shards or sidecars
    sidecars: dict[str, dict[str, str]]  # audio shard -> {teacher: sidecar shard}
    warnings: tuple[str, ...] = ()  # label sets made with test weights (teachers.test_weights_warning)
    limits: MemberLimits | None = None  # the most bytes each member may declare

    def samples(self, split: str) -> int:
        return sum(count for _, count in self.shards.get(split, []))


def index_warnings(index: dict[str, Any]) -> tuple[str, ...]:
    """What index.json says a user must know before training on the shards: test-weight label sets."""
    found = []
    for group in ("teachers", "sidecars"):
        for name, facts in sorted((index.get(group) or {}).items()):
            warning = test_weights_warning(name, facts) if isinstance(facts, dict) else None
            if warning:
                found.append(warning)
    return tuple(found)


def load_index(root: Path | str | Location) -> ShardIndex:
    """Read and check `root/index.json` into a `ShardIndex`."""
    root = storage.as_location(root)
    index = read_index(root)
    shards: dict[str, list[tuple[str, int]]] = {}
    sidecars: dict[str, dict[str, str]] = {}
    try:
        for name, entry in sorted(index["shards"].items()):
            split = entry.get("split") or name.split("/", 1)[0]
            if "teacher" in entry:
                sidecars.setdefault(entry["base"], {})[entry["teacher"]] = name
            else:
                shards.setdefault(split, []).append((name, int(entry["samples"])))
        teachers = {
            name: (int(facts["n_q"]), int(facts["num_classes"]))
            for group in ("teachers", "sidecars")
            for name, facts in index.get(group, {}).items()
        }
        warnings, limits = index_warnings(index), member_limits(index)
        rate, hop = int(index["sample_rate"]), int(index["hop"])
        return ShardIndex(root, rate, hop, shards, teachers, sidecars, warnings, limits)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardError(f"{join(root, INDEX)}: malformed ({type(exc).__name__}: {exc})") from exc


def read_samples(
    index: ShardIndex, shard: str, teachers: tuple[str, ...] | list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one audio shard, in order, as webdataset gives them ({"__key__": KEY, "flac": bytes,
    "json": bytes, "TEACHER.npy": bytes, ...}), with the labels of its sidecars for `teachers` (None: every
    sidecar) merged in; a sidecar whose keys fall out of step is a ShardError."""
    sides = index.sidecars.get(shard, {})
    names = [t for t in (sorted(sides) if teachers is None else teachers) if t in sides]
    with contextlib.ExitStack() as stack:
        streams = [
            iter_samples(stack.enter_context(storage.open_read(join(index.root, shard))), index.limits)
        ]
        for teacher in names:
            handle = stack.enter_context(storage.open_read(join(index.root, sides[teacher])))
            streams.append(iter_samples(handle, index.limits))
        for parts in zip(*streams, strict=True):
            key, members = parts[0]
            sample = {"__key__": key, **members}
            for teacher, (side_key, side) in zip(names, parts[1:], strict=True):
                if side_key != key:
                    raise ShardError(f"{sides[teacher]}: key {side_key} where {shard} has {key}")
                sample[f"{teacher}.npy"] = side.get(f"{teacher}.npy", b"")
            yield sample


def write_sample(
    tar: DeterministicTar, meta: SegmentMeta, flac: bytes, labels: dict[str, np.ndarray]
) -> None:
    """One sample of an audio shard, members in the format's order: flac, json, then labels by teacher."""
    tar.add(f"{meta.key}.flac", flac)
    tar.add(f"{meta.key}.json", meta.to_bytes())
    for name in sorted(labels):
        tar.add(f"{meta.key}.{name}.npy", npy_bytes(labels[name]))


@dataclass
class ShardCheck:
    """What verifying one shard (and its sidecars) found."""

    shard: str
    samples: int = 0
    seconds: float = 0.0
    bytes: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "NAME[: KEY]: what is wrong"


def _check_file(root: Location, name: str, entry: dict[str, Any], check: ShardCheck) -> HashingReader | None:
    path = join(root, name)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        check.problems.append(f"{name}: missing (listed in index.json)")
        return None
    if size != entry["bytes"]:
        check.problems.append(f"{name}: {size} bytes, index.json says {entry['bytes']}")
    return HashingReader(storage.open_read(path))


def _finish_file(name: str, entry: dict[str, Any], reader: HashingReader, check: ShardCheck) -> None:
    reader.drain()
    reader.handle.close()
    if reader.sha256.hexdigest() != entry["sha256"]:
        check.problems.append(f"{name}: sha256 {reader.sha256.hexdigest()[:16]}… differs from index.json")
    check.bytes += reader.size


def _check_labels(
    data: bytes | None, facts: dict[str, Any], frames: int, where: str, problems: list[str]
) -> None:
    if data is None:
        problems.append(f"{where}: missing")
        return
    try:
        labels = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any corruption of the member
        problems.append(f"{where}: not a readable .npy ({' '.join(str(exc).split())})")
        return
    expected = (facts["n_q"], frames)
    if labels.dtype != np.int16 or labels.shape != expected:
        problems.append(f"{where}: {labels.dtype}{labels.shape}, expected int16{expected}")
    elif labels.size and (labels.min() < 0 or labels.max() >= facts["num_classes"]):
        problems.append(f"{where}: values outside [0, {facts['num_classes']})")


def _check_sample(
    shard: str, key: str, sample: dict[str, bytes], index: dict[str, Any], check: ShardCheck
) -> int | None:
    """Check one sample of an audio shard; return its num_samples (None when unreadable)."""
    teachers = index["teachers"]
    rate, hop = index["sample_rate"], index["hop"]
    where = f"{shard}: {key}"
    expected = {"flac", "json"} | {f"{name}.npy" for name in teachers}
    if set(sample) != expected:
        missing, extra = sorted(expected - set(sample)), sorted(set(sample) - expected)
        check.problems.append(f"{where}: members {sorted(sample)}; missing {missing}, unexpected {extra}")
    try:
        meta = SegmentMeta.from_bytes(sample.get("json", b""))
    except ShardError as exc:  # missing, corrupt or inconsistent metadata
        check.problems.append(f"{where}: {exc}")
        return None
    num_samples = meta.num_samples
    if meta.key != key or meta.hop != hop or meta.sample_rate != rate:
        check.problems.append(f"{where}: json key/hop/sample_rate inconsistent ({asdict(meta)})")
    if meta.teachers != {name: facts["config_hash"] for name, facts in teachers.items()}:
        check.problems.append(f"{where}: teachers {meta.teachers} differ from index.json's")
    try:
        audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="int32", always_2d=True)
        if sr != rate or audio.shape != (num_samples, 1):
            check.problems.append(
                f"{where}: flac is {sr} Hz {audio.shape}, json says {rate} Hz ({num_samples}, 1)"
            )
    except Exception as exc:  # noqa: BLE001 - a member that does not decode
        check.problems.append(f"{where}: flac does not decode ({' '.join(str(exc).split())})")
    frames = num_frames(num_samples, hop)
    for name, facts in teachers.items():
        _check_labels(sample.get(f"{name}.npy"), facts, frames, f"{where}.{name}.npy", check.problems)
    check.seconds += num_samples / rate
    return num_samples


def verify_shard(root: Location, shard: str, index: dict[str, Any]) -> ShardCheck:
    """Re-read one audio shard and its sidecars: checksums, every audio member decoded, label shapes,
    frame alignment and key sets; each problem names the shard and the key."""
    entry = index["shards"][shard]
    check = ShardCheck(shard)
    lengths: dict[str, int | None] = {}
    reader = _check_file(root, shard, entry, check)
    if reader is None:
        return check
    try:
        for key, sample in iter_samples(reader, member_limits(index)):
            if key in lengths:
                check.problems.append(f"{shard}: {key}: key appears twice")
            lengths[key] = _check_sample(shard, key, sample, index, check)
    except (tarfile.TarError, OSError, EOFError, ShardError) as exc:
        check.problems.append(f"{shard}: tar unreadable after {len(lengths)} samples ({exc})")
    _finish_file(shard, entry, reader, check)
    check.keys = list(lengths)
    check.samples = len(lengths)
    if check.samples != entry["samples"]:
        check.problems.append(f"{shard}: {check.samples} samples, index.json says {entry['samples']}")
    if abs(check.seconds - entry["seconds"]) > 1e-6 * max(1.0, entry["seconds"]):
        check.problems.append(f"{shard}: {check.seconds:.3f} s of audio, index.json says {entry['seconds']}")
    for name, side in sorted(index["shards"].items()):
        if side.get("base") == shard:
            _verify_sidecar(root, name, side, index, lengths, check)
    return check


def _verify_sidecar(
    root: Location,
    name: str,
    entry: dict[str, Any],
    index: dict[str, Any],
    lengths: dict[str, int | None],
    check: ShardCheck,
) -> None:
    teacher = entry["teacher"]
    facts = index.get("sidecars", {}).get(teacher)
    if facts is None:
        check.problems.append(f"{name}: teacher {teacher!r} is not among index.json's sidecars")
        return
    if entry.get("base_sha256") != index["shards"][entry["base"]]["sha256"]:
        check.problems.append(f"{name}: made for another version of {entry['base']} (base sha256 differs)")
    reader = _check_file(root, name, entry, check)
    if reader is None:
        return
    keys: list[str] = []
    try:
        for key, sample in iter_samples(reader, member_limits(index)):
            keys.append(key)
            where = f"{name}: {key}"
            if set(sample) != {f"{teacher}.npy"}:
                check.problems.append(f"{where}: members {sorted(sample)}, expected ['{teacher}.npy']")
            num_samples = lengths.get(key)
            if num_samples is not None:
                frames = num_frames(num_samples, index["hop"])
                _check_labels(
                    sample.get(f"{teacher}.npy"), facts, frames, f"{where}.{teacher}.npy", check.problems
                )
    except (tarfile.TarError, OSError, EOFError, ShardError) as exc:
        check.problems.append(f"{name}: tar unreadable after {len(keys)} samples ({exc})")
    _finish_file(name, entry, reader, check)
    if keys != list(lengths):
        missing = [k for k in lengths if k not in set(keys)]
        extra = [k for k in keys if k not in lengths]
        check.problems.append(
            f"{name}: keys differ from {entry['base']} ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}; or out of order)"
        )


def unlisted_tars(root: Location, index: dict[str, Any]) -> list[str]:
    """Visible tars in the split folders that index.json does not list (stale or foreign)."""
    found = []
    for split in SPLITS:
        for base in storage.list_names(join(root, split)):
            name = f"{split}/{base}"
            if base.endswith(".tar") and not base.startswith(".") and name not in index["shards"]:
                found.append(name)
    return found


@dataclass
class VerifyReport:
    checks: list[ShardCheck]
    problems: list[str]  # every problem, shard by shard, then the ones across shards
    warnings: tuple[str, ...] = ()  # not problems, but a user must know them (index_warnings)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_all(root: Location, workers: int = 1, on_shard: Any = None) -> VerifyReport:
    """Verify every audio shard (with its sidecars) listed in `root/index.json`, `workers` processes at a
    time; then what spans shards: keys in two shards, tars the index does not list, totals."""
    index = read_index(root)
    bases = sorted(name for name, entry in index["shards"].items() if "teacher" not in entry)
    problems: list[str] = []
    for name, entry in sorted(index["shards"].items()):
        if "teacher" in entry and entry.get("base") not in index["shards"]:
            problems.append(f"{name}: sidecar of {entry.get('base')}, which index.json does not list")
    checks: list[ShardCheck] = []
    if workers <= 1:
        results: Any = (verify_shard(root, name, index) for name in bases)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from mert_pipeline.executor import MainHidden

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with MainHidden():  # the workers start without re-running the caller's script
            results = pool.map(verify_shard, [root] * len(bases), bases, [index] * len(bases))
    try:
        for check in results:
            checks.append(check)
            problems.extend(check.problems)
            if on_shard is not None:
                on_shard(check)
    finally:
        if workers > 1:
            pool.shutdown()
    owner: dict[str, str] = {}
    for check in checks:
        for key in check.keys:
            if key in owner:
                problems.append(f"{check.shard}: {key}: also in {owner[key]}")
            owner[key] = check.shard
    problems.extend(f"{name}: a tar that index.json does not list" for name in unlisted_tars(root, index))
    totals = index.get("totals", {}).get("all", {})
    samples = sum(c.samples for c in checks)
    if totals.get("samples") != samples:
        problems.append(f"index.json: totals say {totals.get('samples')} samples, the shards hold {samples}")
    return VerifyReport(checks, problems, index_warnings(index))
