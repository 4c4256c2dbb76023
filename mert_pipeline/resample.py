"""Streamed resampling of one file to mono at the target rate: decode, downmix, resample, quantize, encode.

Everything runs block by block with bounded memory: libsndfile decodes `BLOCK_FRAMES` frames at a
time into a reused buffer, channels are averaged into a reused mono buffer, soxr's streaming
resampler carries its filter state from block to block (its output is bit-identical to resampling
the whole signal at once), and libsndfile encodes each block as it comes. A two-hour file therefore
needs the same memory as a two-minute one.

Rules, stated once:

- **Downmix**: the plain average of all channels, `(c0 + c1 + ... + cN-1) / N`, summed in channel
  order in float32 (so the result does not depend on the machine's BLAS).
- **Length**: `output_length(n, src, dst) = floor(n * dst / src + 1/2)` (round half up, exact integer
  arithmetic). The resampler's tail is trimmed or zero-padded to exactly that, so every later stage can
  compute frame counts from `num_samples` alone.
- **Quantization**: to PCM_16/PCM_24 by rounding to nearest at scale 2^15 / 2^23, the scale libsndfile
  reads with, so a 16-bit source read and written again keeps its exact sample values; no dither (it
  would make outputs depend on a random stream and buys nothing at these levels).
- **Full scale**: a sample is counted as clipped when |x| >= (2^15 - 1) / 2^15, the largest 16-bit
  value, whatever the output format; resampling a hard-clipped source overshoots past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from mert_pipeline.audio import ProbeFailure, length_ok, open_audio, os_failure, sndfile_message
from mert_pipeline.storage import copy_to

BLOCK_FRAMES = 1 << 17  # decode block: 1 MB of stereo float32; measured faster than 2^14..2^16
QUALITIES = ("HQ", "VHQ")  # soxr recipes worth offering; see benchmarks/RESULTS.md for the choice
FORMATS = ("FLAC", "WAV")
FULL_SCALE = (2**15 - 1) / 2**15
SILENCE_PEAK = 10 ** (-90 / 20)  # peak below -90 dBFS: under one 16-bit step, nothing audible
_SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile command: no PEAK chunk (it holds a timestamp)


def output_length(num_samples: int, source_rate: int, target_rate: int) -> int:
    """Samples after resampling: floor(n * target / source + 1/2), computed exactly on integers."""
    return (2 * num_samples * target_rate + source_rate) // (2 * source_rate)


class StreamResampler:
    """soxr's streaming resampler with an exact total length (see `output_length`).

    Feed blocks in order with `process`; pass `last=True` with the final block (which may be empty).
    Equal rates pass samples through untouched.
    """

    def __init__(self, source_rate: int, target_rate: int, quality: str = "HQ") -> None:
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, not {quality!r}")
        self.source_rate = source_rate
        self.target_rate = target_rate
        self.consumed = 0
        self.emitted = 0
        self._stream = (
            None
            if source_rate == target_rate
            else soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality=quality)
        )

    def process(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        self.consumed += len(block)
        if self._stream is None:
            out = block
        else:
            out = self._stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32), last=last)
        if last:
            need = output_length(self.consumed, self.source_rate, self.target_rate) - self.emitted
            if need < 0:
                raise RuntimeError(f"resampler emitted {-need} samples too many before the last block")
            if len(out) > need:
                out = out[:need]
            elif len(out) < need:
                out = np.concatenate([out, np.zeros(need - len(out), dtype=np.float32)])
        self.emitted += len(out)
        return out


def downmix(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) block into `out[:frames]`, which is returned."""
    frames, channels = block.shape
    mono = out[:frames]
    np.copyto(mono, block[:, 0])
    for channel in range(1, channels):
        np.add(mono, block[:, channel], out=mono)
    if channels > 1:
        np.divide(mono, np.float32(channels), out=mono)
    return mono


def quantize(block: np.ndarray, bits: int) -> np.ndarray:
    """float32 in [-1, 1) to the integers libsndfile stores for PCM_16 (int16) or PCM_24 (int32 << 8)."""
    if bits == 16:
        scaled = block * np.float32(32768.0)  # exact in float32: a power of two
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        return scaled.astype(np.int16)
    if bits == 24:
        wide = block.astype(np.float64) * 2.0**23
        np.rint(wide, out=wide)
        np.clip(wide, -(2**23), 2**23 - 1, out=wide)
        return wide.astype(np.int32) << 8
    raise ValueError(f"bits must be 16 or 24, not {bits}")


@dataclass(frozen=True)
class OutputSpec:
    """What the resampled files look like."""

    sample_rate: int = 24000
    format: str = "FLAC"  # FLAC | WAV
    bits: int = 16  # integer formats: 16 or 24
    quality: str = "HQ"  # soxr recipe

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.format!r}")
        if self.bits not in (16, 24):
            raise ValueError(f"bits must be 16 or 24, not {self.bits}")
        if self.quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, not {self.quality!r}")
        if not 1000 <= self.sample_rate <= 384000:
            raise ValueError(f"sample rate {self.sample_rate} is outside 1000..384000 Hz")

    @property
    def suffix(self) -> str:
        return "." + self.format.lower()

    def subtype_for(self, source_subtype: str) -> str:
        """Float sources stay float where the container can hold it (WAV); otherwise PCM at `bits`."""
        if self.format == "WAV" and source_subtype in ("FLOAT", "DOUBLE"):
            return "FLOAT"
        return f"PCM_{self.bits}"


@dataclass(frozen=True)
class ResampleResult:
    """What was written and measured; the caller turns it into a record or a reject."""

    num_samples: int
    subtype: str
    peak: float
    clipped_samples: int
    source_rate: int
    source_channels: int
    source_frames: int
    copied: bool  # bytes copied unchanged: the source already was the output


class _Meter:
    """Peak, clipped-sample count and finiteness of the output, in one pass over each block."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.peak = 0.0
        self.clipped = 0
        self.samples = 0

    def update(self, block: np.ndarray) -> None:
        if not len(block):
            return
        magnitude = np.abs(block)
        peak = float(magnitude.max())  # NaN propagates through max, Inf is not finite: one check
        if not np.isfinite(peak):
            first = self.samples + int(np.flatnonzero(~np.isfinite(block))[0])
            raise ProbeFailure("non_finite", f"NaN or Inf samples at {first / self.rate:.2f}s")
        self.peak = max(self.peak, peak)
        self.clipped += int(np.count_nonzero(magnitude >= FULL_SCALE))
        self.samples += len(block)


def resample_file(src: str, dst: Path, spec: OutputSpec, block_frames: int = BLOCK_FRAMES) -> ResampleResult:
    """Write `src` as mono at `spec.sample_rate` to `dst` (not atomic: callers pass a temporary path).

    Raises `ProbeFailure` for unusable input (decode failure mid-file, NaN/Inf, a header that
    promises more frames than the data holds); `dst` may then hold a partial file for the caller to
    delete. Files that already are the requested output are decoded to validate and measure them,
    then copied byte for byte.
    """
    with open_audio(src) as handle:
        rate, channels, frames, subtype = handle.samplerate, handle.channels, handle.frames, handle.subtype
        if frames <= 0:
            raise ProbeFailure("empty", "header reports 0 audio frames")
        out_subtype = spec.subtype_for(subtype)
        copy = (
            channels == 1
            and rate == spec.sample_rate
            and handle.format == spec.format
            and subtype == out_subtype
        )
        resampler = StreamResampler(rate, spec.sample_rate, spec.quality)
        meter = _Meter(spec.sample_rate)
        decoded_buffer = np.empty((block_frames, channels), dtype=np.float32)
        mono_buffer = np.empty(block_frames, dtype=np.float32)
        writer = None
        if not copy:
            writer = sf.SoundFile(dst, "w", spec.sample_rate, 1, out_subtype, format=spec.format)
            if out_subtype == "FLOAT":
                sf._snd.sf_command(writer._file, _SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, 0)
        try:
            decoded = 0
            while True:
                try:
                    block = handle.read(block_frames, dtype="float32", always_2d=True, out=decoded_buffer)
                except Exception as exc:  # noqa: BLE001 - libsndfile's decode errors
                    raise ProbeFailure(
                        "decode_error",
                        f"decoding stopped at {decoded / rate:.2f}s of {frames / rate:.2f}s "
                        f"(libsndfile: {sndfile_message(exc)})",
                    ) from exc
                decoded += len(block)
                last = len(block) < block_frames or decoded >= frames
                out = resampler.process(downmix(block, mono_buffer), last=last)
                meter.update(out)
                if writer is not None and len(out):
                    writer.write(out if out_subtype == "FLOAT" else quantize(out, spec.bits))
                if last:
                    break
            if not length_ok(handle.format, frames, decoded):
                raise ProbeFailure(
                    "decode_error",
                    f"truncated: header claims {frames} frames ({frames / rate:.2f}s), decoded {decoded}",
                )
        finally:
            if writer is not None:
                writer.close()
    if copy:
        try:
            copy_to(src, dst)  # a local path or a URL
        except OSError as exc:
            raise os_failure(exc) from exc
    return ResampleResult(
        num_samples=resampler.emitted,
        subtype=out_subtype,
        peak=meter.peak,
        clipped_samples=meter.clipped,
        source_rate=rate,
        source_channels=channels,
        source_frames=frames,
        copied=copy,
    )
