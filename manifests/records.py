"""Manifest records: explicit, validated descriptions of accepted audio files and of rejected ones.

Like lhotse's recordings, every accepted file is one `AudioRecord` with the facts later stages need
(path, sampling rate, sample count, duration, channels) plus what makes runs reproducible (content hash,
a stable id derived from it, the train/valid split). Records are validated when written, so a bad
record fails at the writer, not three stages later.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

from mert_pipeline.grid import hop_of, num_frames

SCHEMA_VERSION = "1"
SPLITS = ("train", "valid")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]")  # an fsspec URL: the corpus in object storage

# Reason codes of rejected inputs: stable, machine-readable keys with a human description.
REJECT_REASONS: dict[str, str] = {
    "extension": "file extension is not one of --extensions",
    "bad_path": "path cannot be stored in the manifest or a fairseq tsv (tab, newline or invalid UTF-8)",
    "empty": "file has no bytes or no audio frames",
    "permission_denied": "the file or directory cannot be read (permission denied)",
    "unreadable": "an I/O error occurred while reading the file",
    "not_audio": "libsndfile does not recognise the file as audio",
    "decode_error": "the audio header is readable but decoding fails (truncated or corrupt data)",
    "too_short": "shorter than --min-seconds",
    "non_finite": "decoded samples contain NaN or Inf",
    "symlink_out_of_tree": "symbolic link that points outside the roots (not followed)",
    "symlink_in_tree": "symbolic link to a place inside the roots, which is scanned where it lives",
    "broken_symlink": "symbolic link whose target does not exist",
    "not_regular_file": "not a regular file (FIFO, socket or device)",
    "duplicate": "same content as a file accepted earlier in sorted order",
    # resample stage
    "missing": "the file listed in the manifest no longer exists",
    "changed": "the file's size differs from the manifest's: it changed after `mert-pipe manifest` ran",
    "silent": "all samples are (near) zero and --on-silence is reject",
    "clipped": "too many samples at full scale and --on-clipping is reject",
    # dedup
    "near_duplicate": "the same recording as a kept file (other codec, rate, gain, length, or a part of it)",
    # teachers
    "label_mismatch": "teacher labels are not int16 of shape (n_q, ceil(num_samples / hop))",
    # shard and export
    "bad_record": "a manifest row no writer makes (an id not of 16 lowercase hex digits, an unknown split)",
    "no_labels": "a selected teacher has no labels for the file (it rejected the file or did not run on it)",
    "unshardable": "the audio's sample format cannot go into a FLAC shard sample for sample (float WAV)",
}

_ID = re.compile(r"^[0-9a-f]{16}$")
_HASH = re.compile(r"^[0-9a-f]{32}$")


class RecordError(ValueError):
    """A record that must not be written."""


@dataclass(frozen=True)
class AudioRecord:
    """One accepted audio file."""

    id: str  # first 16 hex digits of content_hash: stable across moves and renames
    path: str  # absolute path as walked (inside a root), or a URL (s3://bucket/key)
    relpath: str  # path relative to the manifest root (the first line of train.tsv)
    format: str  # libsndfile major format, e.g. FLAC
    subtype: str  # libsndfile subtype, e.g. PCM_16
    sampling_rate: int
    num_samples: int  # frames per channel
    duration: float  # seconds, num_samples / sampling_rate
    channels: int
    size_bytes: int
    content_hash: str  # xxh3-128 of the file's bytes
    split: str  # train | valid

    def validate(self) -> None:
        def bad(why: str) -> RecordError:
            return RecordError(f"invalid record for {self.path!r}: {why}")

        if not _ID.match(self.id):
            raise bad(f"id {self.id!r} is not 16 lowercase hex digits")
        if not _HASH.match(self.content_hash) or not self.content_hash.startswith(self.id):
            raise bad("content_hash must be 32 hex digits starting with the id")
        if not (self.path.startswith("/") or _URL.match(self.path)):
            raise bad("path must be absolute (or an fsspec URL such as s3://bucket/key)")
        if not self.relpath or self.relpath.startswith("/") or any(c in self.relpath for c in "\t\n\r"):
            raise bad("relpath must be relative and hold no tab or newline")
        if not self.path.endswith(self.relpath):
            raise bad("path must end with relpath")
        if self.sampling_rate <= 0 or self.num_samples <= 0 or self.channels <= 0 or self.size_bytes <= 0:
            raise bad("sampling_rate, num_samples, channels and size_bytes must be positive")
        if abs(self.duration - self.num_samples / self.sampling_rate) > 1e-6:
            raise bad("duration must equal num_samples / sampling_rate")
        if self.split not in SPLITS:
            raise bad(f"split must be one of {SPLITS}")


@dataclass(frozen=True)
class Reject:
    """One input that did not make it into the manifest, and the one-line reason why."""

    path: str
    reason: str  # a key of REJECT_REASONS
    detail: str  # one line, specific to this file

    def validate(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise RecordError(f"unknown reject reason {self.reason!r} for {self.path!r}")
        if "\n" in self.detail:
            raise RecordError(f"reject detail must be one line for {self.path!r}")


AUDIO_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("relpath", pa.string()),
        ("format", pa.string()),
        ("subtype", pa.string()),
        ("sampling_rate", pa.int32()),
        ("num_samples", pa.int64()),
        ("duration", pa.float64()),
        ("channels", pa.int16()),
        ("size_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("split", pa.string()),
    ]
)
assert [f.name for f in fields(AudioRecord)] == AUDIO_SCHEMA.names


@dataclass(frozen=True)
class ResampledRecord:
    """One file as the resample stage wrote it: mono, at the target rate, plus what was measured on the way.

    The id is the source's id (one output per source), so labels and shards keyed by id trace back to
    the original file. `peak` and `clipped_samples` are measured before quantization; `silent` and
    `clipped` are the stage's flags (kept files may carry them, see --on-silence / --on-clipping).
    """

    id: str
    path: str  # absolute path of the written file
    relpath: str  # relative to the audio directory (the first line of its train.tsv)
    format: str  # FLAC | WAV
    subtype: str  # PCM_16 | PCM_24 | FLOAT
    sampling_rate: int
    num_samples: int
    duration: float
    channels: int  # always 1
    size_bytes: int
    content_hash: str  # xxh3-128 of the written file
    source_path: str
    source_hash: str  # the source's content_hash from the input manifest
    source_sampling_rate: int
    source_channels: int
    source_num_samples: int
    peak: float  # max |sample| before quantization, full scale = 1.0 (may exceed 1 for overshoot)
    clipped_samples: int  # samples at or beyond full scale (before any clamp)
    silent: bool
    clipped: bool
    split: str

    def validate(self) -> None:
        def bad(why: str) -> RecordError:
            return RecordError(f"invalid resampled record for {self.source_path!r}: {why}")

        if not _ID.match(self.id):
            raise bad(f"id {self.id!r} is not 16 lowercase hex digits")
        if not _HASH.match(self.content_hash) or not _HASH.match(self.source_hash):
            raise bad("content_hash and source_hash must be 32 hex digits")
        if not self.source_hash.startswith(self.id):
            raise bad("source_hash must start with the id")
        if not self.path.startswith("/") or not self.path.endswith("/" + self.relpath):
            raise bad("path must be absolute and end with relpath")
        if self.channels != 1:
            raise bad("resampled audio is mono")
        if self.sampling_rate <= 0 or self.num_samples <= 0 or self.size_bytes <= 0:
            raise bad("sampling_rate, num_samples and size_bytes must be positive")
        if abs(self.duration - self.num_samples / self.sampling_rate) > 1e-6:
            raise bad("duration must equal num_samples / sampling_rate")
        if not (self.peak >= 0.0) or self.clipped_samples < 0:
            raise bad("peak and clipped_samples must be non-negative")
        if self.split not in SPLITS:
            raise bad(f"split must be one of {SPLITS}")


RESAMPLED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("relpath", pa.string()),
        ("format", pa.string()),
        ("subtype", pa.string()),
        ("sampling_rate", pa.int32()),
        ("num_samples", pa.int64()),
        ("duration", pa.float64()),
        ("channels", pa.int16()),
        ("size_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("source_path", pa.string()),
        ("source_hash", pa.string()),
        ("source_sampling_rate", pa.int32()),
        ("source_channels", pa.int16()),
        ("source_num_samples", pa.int64()),
        ("peak", pa.float32()),
        ("clipped_samples", pa.int64()),
        ("silent", pa.bool_()),
        ("clipped", pa.bool_()),
        ("split", pa.string()),
    ]
)
assert [f.name for f in fields(ResampledRecord)] == RESAMPLED_SCHEMA.names


@dataclass(frozen=True)
class LabelRecord:
    """One file's teacher labels: an int16 `.npy` of shape (n_q, frames) under the teacher's directory.

    Every teacher emits exactly `ceil(num_samples / hop)` frames (75 Hz at 24 kHz, hop 320), so labels of
    different teachers align frame for frame. `config_hash` names the teacher's exact configuration
    (weights, bandwidth, centroids, ...): labels with different hashes are never mixed.
    """

    id: str
    teacher: str  # the label set's name, e.g. rvq, kmeans500
    kind: str  # what computed it, e.g. encodec_24khz, kmeans, bestrq
    config_hash: str
    relpath: str  # of the .npy, relative to the teacher's directory
    n_q: int  # codebooks (rows); 1 for single-codebook teachers
    frames: int
    num_classes: int  # labels are in [0, num_classes)
    label_rate: float  # frames per second
    num_samples: int  # of the audio the labels were computed from
    sampling_rate: int
    split: str

    def validate(self) -> None:
        def bad(why: str) -> RecordError:
            return RecordError(f"invalid label record for {self.id!r}: {why}")

        if not _ID.match(self.id):
            raise bad("id is not 16 lowercase hex digits")
        if not self.teacher or not self.config_hash or self.relpath.startswith("/"):
            raise bad("teacher and config_hash must be set and relpath relative")
        if self.n_q < 1 or self.frames < 1 or not 1 <= self.num_classes <= 32768:
            raise bad("n_q and frames must be positive and num_classes in 1..32768 (int16 labels)")
        _check_frames(bad, self.sampling_rate, self.label_rate, self.frames, self.num_samples)
        if self.split not in SPLITS:
            raise bad(f"split must be one of {SPLITS}")


LABEL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("teacher", pa.string()),
        ("kind", pa.string()),
        ("config_hash", pa.string()),
        ("relpath", pa.string()),
        ("n_q", pa.int16()),
        ("frames", pa.int64()),
        ("num_classes", pa.int32()),
        ("label_rate", pa.float64()),
        ("num_samples", pa.int64()),
        ("sampling_rate", pa.int32()),
        ("split", pa.string()),
    ]
)
assert [f.name for f in fields(LabelRecord)] == LABEL_SCHEMA.names


@dataclass(frozen=True)
class FeatureRecord:
    """One file's frame features (`mert-pipe features`): a float32 `.npy` of shape (frames, dim).

    Frames follow the teachers' rule, `ceil(num_samples / hop)` at `frame_rate`, so feature row i is the
    frame that label column i describes.
    """

    id: str
    kind: str  # the extractor, e.g. mfcc
    config_hash: str  # of the extractor's settings
    relpath: str  # of the .npy, relative to the features directory
    frames: int
    dim: int
    dtype: str  # numpy dtype name of the stored array
    frame_rate: float
    num_samples: int
    sampling_rate: int
    split: str

    def validate(self) -> None:
        def bad(why: str) -> RecordError:
            return RecordError(f"invalid feature record for {self.id!r}: {why}")

        if not _ID.match(self.id):
            raise bad("id is not 16 lowercase hex digits")
        if not self.kind or not self.config_hash or self.relpath.startswith("/"):
            raise bad("kind and config_hash must be set and relpath relative")
        if self.dim < 1 or self.frames < 1:
            raise bad("dim and frames must be positive")
        _check_frames(bad, self.sampling_rate, self.frame_rate, self.frames, self.num_samples)
        if self.split not in SPLITS:
            raise bad(f"split must be one of {SPLITS}")


FEATURE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("config_hash", pa.string()),
        ("relpath", pa.string()),
        ("frames", pa.int64()),
        ("dim", pa.int32()),
        ("dtype", pa.string()),
        ("frame_rate", pa.float64()),
        ("num_samples", pa.int64()),
        ("sampling_rate", pa.int32()),
        ("split", pa.string()),
    ]
)
assert [f.name for f in fields(FeatureRecord)] == FEATURE_SCHEMA.names

Record = AudioRecord | ResampledRecord | LabelRecord | FeatureRecord
SCHEMAS: dict[type, pa.Schema] = {
    AudioRecord: AUDIO_SCHEMA,
    ResampledRecord: RESAMPLED_SCHEMA,
    LabelRecord: LABEL_SCHEMA,
    FeatureRecord: FEATURE_SCHEMA,
}


def _check_frames(
    bad: Callable[[str], RecordError], rate: int, frame_rate: float, frames: int, n: int
) -> None:
    """Frames on the grid: a whole hop, and ceil(num_samples / hop) of them."""
    try:
        hop = hop_of(rate, frame_rate)
    except ValueError as exc:
        raise bad(str(exc)) from exc
    if frames != num_frames(n, hop):
        raise bad(f"frames must be ceil(num_samples / hop) = ceil({n} / {hop})")


def record_to_row(record: Record) -> dict:
    return asdict(record)


DEFAULT_SEED = 0
"""Every command's and step's `--seed` default: one value, so `run` and the single commands split, sample
and shuffle the same corpus alike."""


def assign_split(record_id: str, seed: int, valid_fraction: float) -> str:
    """Deterministic split from the id alone: the same file lands in the same split on every run."""
    digest = hashlib.blake2b(f"{seed}:{record_id}".encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2**64
    return "valid" if draw < valid_fraction else "train"
