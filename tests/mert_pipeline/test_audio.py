"""Probing: header facts, truncation caught by the edge decode, NaN caught by deep decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import xxhash

from mert_pipeline.audio import ProbeFailure, hash_file, probe_audio

SR = 44100


def sine(seconds: float, sr: int = SR) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def truncate(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix"),
    [
        ("FLAC", "PCM_16", "flac"),
        ("WAV", "PCM_24", "wav"),
        ("OGG", "VORBIS", "ogg"),
        ("OGG", "OPUS", "opus"),
        ("MP3", "MPEG_LAYER_III", "mp3"),
    ],
)
def test_probe_reports_header_facts(tmp_path: Path, fmt: str, subtype: str, suffix: str) -> None:
    sr = 48000 if subtype == "OPUS" else SR  # Opus only runs at 48 kHz and its divisors
    path = tmp_path / f"a.{suffix}"
    sf.write(path, np.stack([sine(3.0, sr), sine(3.0, sr) * 0.5], axis=1), sr, format=fmt, subtype=subtype)
    info = probe_audio(path)
    assert (info.format, info.subtype, info.sampling_rate, info.channels) == (fmt, subtype, sr, 2)
    assert info.num_samples == sf.info(path).frames and info.duration == pytest.approx(3.0, abs=0.05)
    assert probe_audio(path, deep=True) == info


@pytest.mark.parametrize(
    ("fmt", "subtype", "suffix"), [("FLAC", "PCM_16", "flac"), ("MP3", "MPEG_LAYER_III", "mp3")]
)
def test_truncation_is_caught_without_decoding_everything(
    tmp_path: Path, fmt: str, subtype: str, suffix: str
) -> None:
    path = tmp_path / f"cut.{suffix}"
    sf.write(path, sine(20.0), SR, format=fmt, subtype=subtype)
    truncate(path, 0.4)
    for deep in (False, True):
        with pytest.raises(ProbeFailure) as failure:
            probe_audio(path, deep=deep)
        assert failure.value.reason == "decode_error"
        assert "truncated" in failure.value.detail and "\n" not in failure.value.detail


def test_truncated_wav_is_accepted_with_the_frames_it_really_has(tmp_path: Path) -> None:
    """libsndfile sizes PCM WAV by the data actually present, so a cut WAV is a shorter, valid file."""
    path = tmp_path / "cut.wav"
    sf.write(path, sine(5.0), SR, subtype="PCM_16")
    truncate(path, 0.5)
    info = probe_audio(path, deep=True)
    assert info.num_samples == (path.stat().st_size - 44) // 2 < 5 * SR


def test_nan_near_the_start_is_seen_by_a_quick_probe_and_anywhere_by_a_deep_one(tmp_path: Path) -> None:
    head, middle = sine(10.0), sine(10.0)
    head[100] = np.nan
    middle[5 * SR] = np.inf
    sf.write(tmp_path / "head.wav", head, SR, subtype="FLOAT")
    sf.write(tmp_path / "middle.wav", middle, SR, subtype="FLOAT")
    with pytest.raises(ProbeFailure, match="near the start"):
        probe_audio(tmp_path / "head.wav")
    assert probe_audio(tmp_path / "middle.wav").num_samples == 10 * SR  # quick probe cannot see it
    with pytest.raises(ProbeFailure) as failure:
        probe_audio(tmp_path / "middle.wav", deep=True)
    assert failure.value.reason == "non_finite" and failure.value.detail == "NaN or Inf samples at 4.46s"


def test_not_audio_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "text.flac").write_text("hello")
    with pytest.raises(ProbeFailure) as failure:
        probe_audio(tmp_path / "text.flac")
    assert (
        failure.value.reason == "not_audio" and failure.value.detail == "libsndfile: Format not recognised."
    )
    with pytest.raises(ProbeFailure) as failure:
        hash_file(tmp_path / "missing.wav")
    assert failure.value.reason == "unreadable"


def test_hash_is_xxh3_128_of_the_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)  # spans several read chunks
    (tmp_path / "x.bin").write_bytes(data)
    assert hash_file(tmp_path / "x.bin") == (xxhash.xxh3_128(data).hexdigest(), len(data))
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty") == (xxhash.xxh3_128(b"").hexdigest(), 0)


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile writes no MP3")
def test_an_mp3_a_little_shorter_than_its_header_is_whole_and_a_cut_one_is_not(tmp_path: Path) -> None:
    """An MP3's header length is an estimate that misses the encoder's padding (Debian's asc-music tracks
    fall 0.1% short of it): within 1% the file is accepted at its decoded length; cut in half, rejected."""
    from mert_pipeline.resample import OutputSpec, resample_file

    sf.write(tmp_path / "full.mp3", sine(20.0), SR, format="MP3")
    claimed = sf.info(str(tmp_path / "full.mp3")).frames
    short = truncate(tmp_path / "full.mp3", 0.996)
    for deep in (False, True):
        info = probe_audio(short, deep=deep)
        assert claimed * 0.99 <= info.num_samples < claimed
    assert resample_file(str(short), tmp_path / "out.flac", OutputSpec()).num_samples > 0
    cut = truncate(tmp_path / "full.mp3", 0.5)
    for deep in (False, True):
        with pytest.raises(ProbeFailure, match="truncated"):
            probe_audio(cut, deep=deep)
    with pytest.raises(ProbeFailure, match="truncated"):
        resample_file(str(cut), tmp_path / "cut.flac", OutputSpec())
