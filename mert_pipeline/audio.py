"""Audio I/O: probe a file cheaply, hash its bytes, and say in one line why a file is unusable.

Probing reads the header and decodes only a short block at the start and at the end of the file.
That is enough to catch most truncations (a FLAC cut short fails to seek to its tail, an MP3 returns
a short tail) without decoding whole files; `deep=True` decodes every sample, checks for NaN/Inf and
compares the decoded length with the header's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import xxhash

from mert_pipeline.storage import is_url, open_read

HASH_CHUNK = 1 << 20
EDGE_FRAMES = 8192  # frames decoded at the head and the tail by a quick probe
DEEP_BLOCK = 1 << 16


class ProbeFailure(Exception):
    """A file that cannot be used, with a reason code (see manifests.records.REJECT_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = " ".join(detail.split())


@dataclass(frozen=True)
class AudioInfo:
    format: str
    subtype: str
    sampling_rate: int
    channels: int
    num_samples: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sampling_rate


def os_failure(exc: OSError) -> ProbeFailure:
    if isinstance(exc, PermissionError):
        return ProbeFailure("permission_denied", f"cannot open: {exc.strerror}")
    return ProbeFailure("unreadable", f"I/O error: {exc.strerror or exc}")


def hash_file(path: Path | str) -> tuple[str, int]:
    """xxh3-128 of the file's bytes (32 hex digits) and how many bytes were hashed.

    The size comes from the same read as the hash, so the two always describe the same content even
    if the file changes while it is probed. One reused buffer keeps this I/O bound.
    """
    digest = xxhash.xxh3_128()
    size = 0
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
                size += count
    except OSError as exc:
        raise os_failure(exc) from exc
    return digest.hexdigest(), size


def sndfile_message(exc: Exception) -> str:
    """libsndfile's own words without the 'Error opening <path>:' prefix that repeats the path."""
    message = getattr(exc, "error_string", None) or str(exc)
    return message.rsplit("': ", 1)[-1].strip()


class _RemoteSoundFile(sf.SoundFile):
    """A SoundFile over a remote object that also closes the object's file handle."""

    def __init__(self, url: str) -> None:
        self._handle = open_read(url)
        try:
            super().__init__(self._handle)
        except BaseException:
            self._handle.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._handle.close()


def open_audio(path: Path | str) -> sf.SoundFile:
    """Open a file (or an fsspec URL) for reading; failures become a `ProbeFailure` with a reason code."""
    try:
        return _RemoteSoundFile(str(path)) if is_url(path) else sf.SoundFile(path)
    except OSError as exc:
        raise os_failure(exc) from exc
    except Exception as exc:  # noqa: BLE001 - libsndfile reports every kind of bad input this way
        message = sndfile_message(exc)
        reason = "not_audio" if "not recognised" in message.lower() else "decode_error"
        raise ProbeFailure(reason, f"libsndfile: {message}") from exc


def _check_finite(block: np.ndarray, where: str) -> None:
    if not np.isfinite(block).all():
        raise ProbeFailure("non_finite", f"NaN or Inf samples {where}")


ESTIMATED_LENGTH = frozenset({"MP3", "MPEG"})  # formats whose header length is an estimate
LENGTH_SLACK = 0.01  # how far (a fraction) the decoded length of such a file may fall from its header's


def length_ok(fmt: str, claimed: int, decoded: int) -> bool:
    """Whether DECODED frames are what a header claiming CLAIMED promised. libsndfile sizes an MP3 from its
    Xing/Info header or its bitrate, which misses the encoder's padding by a few thousand frames; a file
    within LENGTH_SLACK of its claim is whole, anything else (and any shortfall in other formats) is not."""
    if decoded == claimed:
        return True
    return fmt in ESTIMATED_LENGTH and abs(decoded - claimed) <= LENGTH_SLACK * claimed


def probe_audio(path: Path | str, deep: bool = False) -> AudioInfo:
    """Header facts of an audio file, verified by decoding its edges (or everything, if `deep`); for an MP3
    the length is the decoded one, not the header's estimate."""
    with open_audio(path) as handle:
        info = AudioInfo(handle.format, handle.subtype, handle.samplerate, handle.channels, handle.frames)
        if info.num_samples <= 0:
            raise ProbeFailure("empty", "header reports 0 audio frames")
        try:
            decoded = _decode_all(handle, info) if deep else _decode_edges(handle, info)
        except ProbeFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ProbeFailure("decode_error", f"corrupt data: {sndfile_message(exc)}") from exc
    return info if decoded == info.num_samples else replace(info, num_samples=decoded)


def _decode_edges(handle: sf.SoundFile, info: AudioInfo) -> int:
    head = handle.read(min(EDGE_FRAMES, info.num_samples), dtype="float32", always_2d=True)
    _check_finite(head, "near the start")
    tail_start = max(0, info.num_samples - EDGE_FRAMES)
    try:
        handle.seek(tail_start)
    except Exception as exc:  # noqa: BLE001 - libsndfile cannot reach the end the header promises
        raise ProbeFailure(
            "decode_error",
            f"truncated or corrupt: cannot seek to frame {tail_start} of the {info.num_samples} the header "
            f"claims (libsndfile: {sndfile_message(exc)})",
        ) from exc
    tail = handle.read(info.num_samples - tail_start, dtype="float32", always_2d=True)
    end = tail_start + len(tail)
    if end < info.num_samples and info.format in ESTIMATED_LENGTH:  # where does it really end?
        end = _real_end(handle, info)
    if not length_ok(info.format, info.num_samples, end):
        raise ProbeFailure(
            "decode_error", f"truncated: header claims {info.num_samples} frames, data ends at {end}"
        )
    _check_finite(tail, "near the end")
    return end


def _real_end(handle: sf.SoundFile, info: AudioInfo) -> int:
    """Where a file whose length is an estimate really ends, by decoding the last LENGTH_SLACK of its claim
    (a bounded read); a file that ends before that is truncated."""
    start = max(0, int(info.num_samples * (1 - LENGTH_SLACK)))
    handle.seek(start)
    end = start
    while len(block := handle.read(DEEP_BLOCK, dtype="float32", always_2d=True)):
        _check_finite(block, "near the end")
        end += len(block)
    if end == start:
        raise ProbeFailure(
            "decode_error", f"truncated: header claims {info.num_samples} frames, data ends before {start}"
        )
    return end


def _decode_all(handle: sf.SoundFile, info: AudioInfo) -> int:
    decoded = 0
    while True:
        try:
            block = handle.read(DEEP_BLOCK, dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001
            raise ProbeFailure(
                "decode_error",
                f"truncated or corrupt: decoding stopped at {decoded / info.sampling_rate:.2f}s of "
                f"{info.duration:.2f}s (libsndfile: {sndfile_message(exc)})",
            ) from exc
        if not len(block):
            break
        _check_finite(block, f"at {(decoded / info.sampling_rate):.2f}s")
        decoded += len(block)
    if not length_ok(info.format, info.num_samples, decoded):
        raise ProbeFailure(
            "decode_error", f"truncated: header claims {info.num_samples} frames, decoded {decoded}"
        )
    return decoded
