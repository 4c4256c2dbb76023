"""Tests of the demo-corpus synthesizer: determinism, shapes, music-likeness, files on disk, bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mert_pipeline.demo.synth import (
    TrackSpec,
    plan_corpus,
    render_track,
    synthesize_demo_corpus,
    write_bad_files,
    write_corpus,
)

SR = 22050


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# render_track
# --------------------------------------------------------------------------------------------------


def test_render_is_bit_identical_for_same_arguments() -> None:
    a = render_track(7, 3.0, SR, 2)
    b = render_track(7, 3.0, SR, 2)
    assert a.tobytes() == b.tobytes()


def test_render_differs_between_seeds() -> None:
    a = render_track(7, 3.0, SR)
    b = render_track(8, 3.0, SR)
    assert a.shape == b.shape
    assert not np.array_equal(a, b)
    assert np.abs(a - b).max() > 0.1


@pytest.mark.parametrize(
    ("channels", "sample_rate", "seconds"),
    [(1, 22050, 2.0), (2, 44100, 1.5), (6, 48000, 1.0), (1, 24000, 1.2345), (2, 32000, 0.7777)],
)
def test_render_shape_dtype_and_peak(channels: int, sample_rate: int, seconds: float) -> None:
    x = render_track(3, seconds, sample_rate, channels)
    frames = round(seconds * sample_rate)
    assert x.dtype == np.float32
    assert x.shape == ((frames,) if channels == 1 else (frames, channels))
    assert x.flags.c_contiguous
    assert np.isfinite(x).all()
    peak = float(np.abs(x).max())
    assert 0.5 <= peak <= 0.9
    assert peak < 0.99


@pytest.mark.parametrize("seed", range(5))
def test_peak_bounds_across_seeds(seed: int) -> None:
    peak = float(np.abs(render_track(seed, 2.0, SR, 2)).max())
    assert 0.5 <= peak <= 0.9


def test_zero_length_and_tiny_tracks() -> None:
    assert render_track(0, 0.0, SR).shape == (0,)
    assert render_track(0, 0.0, SR, 2).shape == (0, 2)
    tiny = render_track(0, 0.01, 24000)
    assert tiny.shape == (240,)
    assert np.abs(tiny).max() > 0.1


@pytest.mark.parametrize("channels", [2, 6])
def test_channels_are_not_copies(channels: int) -> None:
    x = render_track(11, 3.0, SR, channels).astype(np.float64)
    for i, j in itertools.combinations(range(channels), 2):
        a, b = x[:, i], x[:, j]
        assert np.linalg.norm(a - b) > 0.05 * max(np.linalg.norm(a), np.linalg.norm(b)), (i, j)
    # Panned, not unrelated: every channel carries the music.
    rms = np.sqrt((x**2).mean(axis=0))
    assert rms.min() > 0.2 * rms.max()


def test_mono_is_not_a_channel_of_the_stereo_render() -> None:
    mono = render_track(5, 2.0, SR, 1)
    stereo = render_track(5, 2.0, SR, 2)
    assert not any(np.array_equal(mono, stereo[:, c]) for c in range(2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seconds": -1.0, "sample_rate": SR},
        {"seconds": float("nan"), "sample_rate": SR},
        {"seconds": 1.0, "sample_rate": 0},
        {"seconds": 1.0, "sample_rate": SR, "channels": 0},
    ],
)
def test_render_rejects_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        render_track(0, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Music-likeness: checks that pass for the synth and fail for white noise / a steady tone
# --------------------------------------------------------------------------------------------------


def _music_features(x: np.ndarray, sr: int) -> dict[str, float]:
    """Cheap descriptors of 'music': rhythm in the energy envelope, pitches on a 12-TET scale."""
    x = x.astype(np.float64)
    hop = 512
    n = len(x) // hop
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    # Onset strength = rises of log-energy; its autocorrelation peaks at the beat period.
    onset = np.maximum(np.diff(np.log(rms + 1e-6)), 0.0)
    onset -= onset.mean()
    ac = np.correlate(onset, onset, "full")[len(onset) - 1 :]
    ac /= ac[0]
    lags = np.arange(len(ac)) * hop / sr
    beat_range = (lags >= 0.35) & (lags <= 0.8)  # beat periods of 75..170 bpm
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1.0 / sr)
    band = (freqs > 60.0) & (freqs < 2000.0)
    midi = 12.0 * np.log2(freqs[band] / 440.0) + 69.0
    p = power[band]
    chroma = np.bincount(np.round(midi).astype(int) % 12, weights=p, minlength=12)
    chroma /= chroma.sum()
    strongest = p >= np.quantile(p, 0.995)
    cents_off = np.abs(midi[strongest] - np.round(midi[strongest])) * 100.0
    mag = np.sqrt(p)
    return {
        "envelope_cv": float(rms.std() / rms.mean()),
        "beat_autocorr": float(ac[beat_range].max()),
        "scale_energy": float(np.sort(chroma)[::-1][:7].sum()),  # 7 = notes of a diatonic scale
        "peak_over_median_db": float(20.0 * np.log10(mag.max() / np.median(mag))),
        "cents_off": float(np.average(cents_off, weights=p[strongest])),
    }


def _looks_like_music(f: dict[str, float]) -> bool:
    return (
        f["envelope_cv"] > 0.25
        and f["beat_autocorr"] > 0.3
        and f["scale_energy"] > 0.74
        and f["peak_over_median_db"] > 25.0
        and f["cents_off"] < 18.0
    )


def test_music_features_reject_noise_and_steady_tone() -> None:
    rng = np.random.default_rng(0)
    noise = 0.3 * rng.standard_normal(4 * SR)
    t = np.arange(4 * SR) / SR
    steady_detuned = 0.5 * np.sin(2 * np.pi * 452.0 * t)  # ~half a semitone sharp of A4, no rhythm
    assert not _looks_like_music(_music_features(noise, SR))
    assert not _looks_like_music(_music_features(steady_detuned, SR))


@pytest.mark.parametrize("seed", range(6))
def test_tracks_are_music_like(seed: int) -> None:
    features = _music_features(render_track(seed, 5.0, SR), SR)
    assert _looks_like_music(features), features


def test_tracks_are_in_tune_on_average() -> None:
    offs = [_music_features(render_track(seed, 4.0, SR), SR)["cents_off"] for seed in range(6, 12)]
    assert float(np.mean(offs)) < 12.0, offs


# --------------------------------------------------------------------------------------------------
# plan_corpus
# --------------------------------------------------------------------------------------------------


def test_plan_corpus_default_variety() -> None:
    specs = plan_corpus()
    assert len(specs) == 24
    assert all(isinstance(s, TrackSpec) for s in specs)
    assert {s.sample_rate for s in specs} >= {22050, 24000, 32000, 44100, 48000}
    assert {s.channels for s in specs} >= {1, 2, 6}
    for fmt in ("FLAC", "WAV", "OGG"):
        assert {s.channels for s in specs if s.format == fmt} >= {1, 2}, fmt
    assert {(s.format, s.subtype) for s in specs} >= {
        ("FLAC", "PCM_16"),
        ("FLAC", "PCM_24"),
        ("WAV", "PCM_16"),
        ("WAV", "FLOAT"),
        ("OGG", "VORBIS"),
    }
    relpaths = [s.relpath for s in specs]
    assert len(set(relpaths)) == len(relpaths)
    assert len({s.seed for s in specs}) == len(specs)
    ext = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg"}
    for s in specs:
        assert Path(s.relpath).suffix == ext[s.format]
        assert not Path(s.relpath).is_absolute() and ".." not in Path(s.relpath).parts
        assert "/" in s.relpath  # every track sits in a folder
        assert 6.0 <= s.seconds <= 20.0
        assert s.frames == round(s.seconds * s.sample_rate)
    assert max(len(Path(r).parts) for r in relpaths) >= 3  # artist/album/track
    assert any(" " in r for r in relpaths)
    assert any(not r.isascii() for r in relpaths)


def test_plan_corpus_is_deterministic_and_seeded() -> None:
    assert plan_corpus(12, seed=3) == plan_corpus(12, seed=3)
    assert [s.seed for s in plan_corpus(12, seed=3)] != [s.seed for s in plan_corpus(12, seed=4)]


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8, 11, 12, 40])
def test_plan_corpus_sizes(n: int) -> None:
    specs = plan_corpus(n, min_seconds=1.0, max_seconds=2.0)
    assert len(specs) == n
    assert len({s.relpath for s in specs}) == n
    assert all(1.0 <= s.seconds <= 2.0 for s in specs)
    if n >= 8:
        assert any(" " in s.relpath for s in specs)
        assert any(not s.relpath.isascii() for s in specs)
    if n >= 12:
        assert any(s.channels == 6 for s in specs)


def test_plan_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        plan_corpus(-1)
    with pytest.raises(ValueError):
        plan_corpus(4, min_seconds=5.0, max_seconds=2.0)


def test_trackspec_is_frozen() -> None:
    spec = plan_corpus(1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# write_corpus
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_plan() -> list[TrackSpec]:
    return plan_corpus(12, seed=1, min_seconds=0.5, max_seconds=1.5)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, small_plan: list[TrackSpec]) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus_a"), small_plan)


def test_write_corpus_round_trips(small_plan: list[TrackSpec], written: list[Path]) -> None:
    assert len(written) == len(small_plan)
    for spec, path in zip(small_plan, written, strict=True):
        assert path.is_file()
        assert path.as_posix().endswith(spec.relpath)
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (spec.sample_rate, spec.channels, spec.frames)
        assert (info.format, info.subtype) == (spec.format, spec.subtype)
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)
        assert sr == spec.sample_rate
        assert data.shape == (spec.frames, spec.channels)
        expected = render_track(spec.seed, spec.seconds, spec.sample_rate, spec.channels).reshape(data.shape)
        if spec.subtype == "FLOAT":
            assert np.array_equal(data, expected.astype(np.float64))
        elif spec.subtype in ("PCM_16", "PCM_24"):
            assert np.abs(data - expected).max() <= 1.0 / 32768 + 1e-9
        else:  # lossy Vorbis: same music, not the same samples
            corr = np.corrcoef(data.ravel(), expected.ravel())[0, 1]
            assert corr > 0.9


def test_bytes_are_reproducible_for_every_format(
    tmp_path: Path, small_plan: list[TrackSpec], written: list[Path]
) -> None:
    """OGG included: libsndfile's random stream serial is replaced by one from the seed."""
    again = write_corpus(tmp_path, small_plan)
    formats = set()
    for spec, first, second in zip(small_plan, written, again, strict=True):
        assert _sha(first) == _sha(second), spec.relpath
        formats.add(spec.format)
    assert formats == {"FLAC", "WAV", "OGG"}


def test_float_wav_peak_chunk_has_no_timestamp(small_plan: list[TrackSpec], written: list[Path]) -> None:
    """libsndfile puts time(NULL) in the PEAK chunk; a write one second later would differ otherwise."""
    floats = [p for s, p in zip(small_plan, written, strict=True) if s.subtype == "FLOAT"]
    assert floats
    for path in floats:
        data = path.read_bytes()
        pos = data.find(b"PEAK")
        assert pos > 0
        assert data[pos + 12 : pos + 16] == b"\x00\x00\x00\x00"


def test_unicode_and_space_paths_are_written(tmp_path: Path) -> None:
    specs = plan_corpus(8, min_seconds=0.3, max_seconds=0.5)
    odd = [s for s in specs if " " in s.relpath or not s.relpath.isascii()]
    paths = write_corpus(tmp_path, odd)
    for spec, path in zip(odd, paths, strict=True):
        assert path == tmp_path / spec.relpath
        assert sf.info(str(path)).frames == spec.frames


# --------------------------------------------------------------------------------------------------
# Bad files and the one-call entry point
# --------------------------------------------------------------------------------------------------


def test_bad_files_are_what_they_claim(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    assert sorted(expected.values()) == sorted(
        ["empty", "not_audio", "not_audio", "decode_error", "too_short", "extension"]
    )
    for rel in expected:
        path = tmp_path / rel
        assert rel.startswith("bad/")
        assert path.is_file() and not path.is_symlink()
    by_reason: dict[str, list[Path]] = {}
    for rel, reason in expected.items():
        by_reason.setdefault(reason, []).append(tmp_path / rel)

    (empty,) = by_reason["empty"]
    assert empty.suffix == ".wav" and empty.stat().st_size == 0

    suffixes = sorted(p.suffix for p in by_reason["not_audio"])
    assert suffixes == [".ogg", ".wav"]
    for path in by_reason["not_audio"]:
        assert path.stat().st_size > 0
        with pytest.raises(sf.LibsndfileError):
            sf.info(str(path))
    text_wav = next(p for p in by_reason["not_audio"] if p.suffix == ".wav")
    assert text_wav.read_text(encoding="utf-8").strip()

    (truncated,) = by_reason["decode_error"]
    assert truncated.suffix == ".flac"
    info = sf.info(str(truncated))  # the header survives and still claims every frame ...
    assert info.format == "FLAC" and info.frames > 0
    with pytest.raises(sf.LibsndfileError):  # ... but the data cannot be decoded to the end
        sf.read(str(truncated))

    (short,) = by_reason["too_short"]
    short_info = sf.info(str(short))
    assert short.suffix == ".wav"
    assert short_info.duration == pytest.approx(0.01)
    assert np.abs(sf.read(str(short))[0]).max() > 0.0

    (notes,) = by_reason["extension"]
    assert notes.name == "notes.txt"


def test_bad_files_are_reproducible(tmp_path: Path) -> None:
    a = write_bad_files(tmp_path / "a")
    b = write_bad_files(tmp_path / "b")
    assert a == b
    for rel in a:
        assert _sha(tmp_path / "a" / rel) == _sha(tmp_path / "b" / rel)


def test_synthesize_demo_corpus(tmp_path: Path) -> None:
    paths, bad = synthesize_demo_corpus(tmp_path / "with", n_tracks=2, seed=5)
    assert [p.relative_to(tmp_path / "with").as_posix() for p in paths] == [
        s.relpath for s in plan_corpus(2, seed=5)
    ]
    assert all(p.is_file() for p in paths)
    assert bad and all((tmp_path / "with" / rel).exists() for rel in bad)

    paths2, bad2 = synthesize_demo_corpus(tmp_path / "without", n_tracks=2, seed=5, with_bad_files=False)
    assert bad2 == {}
    assert not (tmp_path / "without" / "bad").exists()
    assert [_sha(p) for p in paths2] == [_sha(p) for p in paths]
