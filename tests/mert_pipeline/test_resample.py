"""Streamed resampling: exact lengths, faithful sines, block independence, bounded memory, bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from mert_pipeline.audio import ProbeFailure
from mert_pipeline.resample import (
    FULL_SCALE,
    OutputSpec,
    StreamResampler,
    downmix,
    output_length,
    quantize,
    resample_file,
)
from tests.helpers import REPO

RATES = st.integers(min_value=8000, max_value=96000)


def stream(x: np.ndarray, src: int, dst: int, block: int, quality: str = "HQ") -> np.ndarray:
    resampler = StreamResampler(src, dst, quality)
    pieces = [resampler.process(x[i : i + block], last=i + block >= len(x)) for i in range(0, len(x), block)]
    if not len(x):
        pieces.append(resampler.process(x, last=True))
    return np.concatenate(pieces)


def test_output_length_rule_is_round_half_up() -> None:
    assert output_length(44100, 44100, 24000) == 24000
    assert output_length(1, 96000, 24000) == 0  # 0.25 rounds down
    assert output_length(2, 96000, 24000) == 1  # 0.5 rounds up
    assert output_length(3, 48000, 24000) == 2  # 1.5 rounds up
    assert output_length(7, 44100, 24000) == 4  # 3.809...
    assert output_length(10**12, 44100, 24000) == 544217687075  # exact on integers, no float error


@settings(max_examples=60, deadline=None)
@given(src=RATES, dst=RATES, n=st.integers(min_value=0, max_value=30000), block=st.integers(1, 9000))
def test_streamed_length_is_exact_for_any_rates_and_blocks(src: int, dst: int, n: int, block: int) -> None:
    x = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
    y = stream(x, src, dst, block)
    assert len(y) == output_length(n, src, dst)
    assert y.dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(src=RATES, dst=RATES, data=st.data())
def test_a_sine_keeps_its_frequency_and_amplitude(src: int, dst: int, data: st.DataObject) -> None:
    """A tone well inside both passbands comes out at the same frequency and level."""
    nyquist = min(src, dst) / 2
    freq = data.draw(st.floats(min_value=50.0, max_value=0.8 * nyquist))
    amplitude = data.draw(st.floats(min_value=0.05, max_value=0.9))
    n = src // 2  # 0.5 s
    t = np.arange(n) / src
    x = (amplitude * np.sin(2 * np.pi * freq * t + 0.3)).astype(np.float32)
    y = stream(x, src, dst, block=4096).astype(np.float64)
    # Away from the edges (filter start-up), y must be the same sine sampled at dst: least-squares fit
    # of sin/cos at the expected frequency leaves only a tiny residual.
    ty = np.arange(len(y)) / dst
    keep = slice(len(y) // 8, len(y) - len(y) // 8)
    basis = np.stack([np.sin(2 * np.pi * freq * ty[keep]), np.cos(2 * np.pi * freq * ty[keep])], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y[keep], rcond=None)
    fitted_amplitude = float(np.hypot(*coef))
    residual = y[keep] - basis @ coef
    assert abs(fitted_amplitude - amplitude) < 2e-3 * amplitude + 1e-5
    assert np.sqrt(np.mean(residual**2)) < 1e-3 * amplitude + 1e-6
    phase = np.arctan2(coef[1], coef[0])  # both start at t = 0: the resampler adds no delay
    assert abs(np.angle(np.exp(1j * (phase - 0.3)))) < 1e-2


@pytest.mark.parametrize("src,dst", [(44100, 24000), (8000, 24000), (96000, 24000), (24000, 24000)])
def test_block_streaming_equals_whole_signal(src: int, dst: int) -> None:
    x = np.random.default_rng(1).uniform(-0.8, 0.8, src * 3 + 11).astype(np.float32)
    whole = soxr.resample(x, src, dst, "HQ").astype(np.float32)
    for block in (997, 4096, 65536, len(x)):
        y = stream(x, src, dst, block)
        assert len(y) == output_length(len(x), src, dst)
        n = min(len(whole), len(y))
        np.testing.assert_allclose(y[:n], whole[:n], atol=1e-6)


def test_downmix_is_the_channel_average_for_any_count() -> None:
    rng = np.random.default_rng(2)
    for channels in (1, 2, 3, 6, 8):
        block = rng.uniform(-1, 1, (1000, channels)).astype(np.float32)
        out = downmix(block, np.empty(4096, dtype=np.float32))
        np.testing.assert_allclose(out, block.astype(np.float64).mean(axis=1), atol=1e-6)


def test_quantize_matches_what_libsndfile_reads_back(tmp_path: Path) -> None:
    ints = np.arange(-32768, 32768, dtype=np.int16)
    sf.write(tmp_path / "all.flac", ints, 24000, subtype="PCM_16")
    floats, _ = sf.read(tmp_path / "all.flac", dtype="float32")
    assert np.array_equal(quantize(floats, 16), ints)  # a 16-bit source survives unchanged
    assert quantize(np.array([1.5, -1.5, FULL_SCALE], dtype=np.float32), 16).tolist() == [
        32767,
        -32768,
        32767,
    ]
    x = np.random.default_rng(3).uniform(-1, 1, 5000).astype(np.float32)
    with sf.SoundFile(tmp_path / "x24.flac", "w", 24000, 1, "PCM_24", format="FLAC") as handle:
        handle.write(quantize(x, 24))
    back, _ = sf.read(tmp_path / "x24.flac", dtype="float64")
    assert np.abs(back - x).max() <= 2.0**-24 + 1e-12


def write(path: Path, data: np.ndarray, sr: int, **kw: str) -> str:
    sf.write(path, data, sr, **kw)
    return str(path)


def test_resample_file_writes_mono_at_the_target_rate(tmp_path: Path) -> None:
    t = np.arange(44100 * 3 + 5) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 440 * t)], axis=1)
    src = write(tmp_path / "in.flac", stereo, 44100, subtype="PCM_24")
    result = resample_file(src, tmp_path / "out.flac", OutputSpec())
    y, sr = sf.read(tmp_path / "out.flac", dtype="float64")
    info = sf.info(tmp_path / "out.flac")
    assert (sr, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "FLAC")
    assert len(y) == result.num_samples == output_length(len(t), 44100, 24000)
    assert abs(result.peak - 0.375) < 1e-3 and abs(np.abs(y).max() - 0.375) < 1e-3
    assert (result.source_rate, result.source_channels, result.source_frames) == (44100, 2, len(t))
    assert not result.copied and result.clipped_samples == 0


def test_block_size_does_not_change_the_bytes(tmp_path: Path) -> None:
    x = np.random.default_rng(4).uniform(-0.5, 0.5, (48000 * 2 + 3, 2))
    src = write(tmp_path / "in.wav", x, 48000, subtype="PCM_16")
    outputs = []
    for block in (1000, 4096, 1 << 16):
        resample_file(src, tmp_path / f"out{block}.flac", OutputSpec(), block_frames=block)
        outputs.append((tmp_path / f"out{block}.flac").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_float_sources_keep_float_in_wav_and_bytes_are_reproducible(tmp_path: Path) -> None:
    x = np.random.default_rng(5).uniform(-1.5, 1.5, 32000 * 2).astype(np.float32)
    src = write(tmp_path / "f.wav", x, 32000, subtype="FLOAT")
    spec = OutputSpec(format="WAV")
    first = resample_file(src, tmp_path / "a.wav", spec)
    resample_file(src, tmp_path / "b.wav", spec)
    assert first.subtype == "FLOAT" and sf.info(tmp_path / "a.wav").subtype == "FLOAT"
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()  # no PEAK timestamp
    y, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    assert np.abs(y).max() > 1.0  # float keeps what 16 bits would clip
    assert first.clipped_samples > 0
    assert resample_file(src, tmp_path / "c.flac", OutputSpec()).subtype == "PCM_16"  # FLAC has no float


def test_a_file_already_in_the_output_format_is_validated_then_copied(tmp_path: Path) -> None:
    x = (np.random.default_rng(6).uniform(-0.5, 0.5, 24000 * 2) * 32767).astype(np.int16)
    src = write(tmp_path / "in.flac", x, 24000, subtype="PCM_16")
    result = resample_file(src, tmp_path / "out.flac", OutputSpec())
    assert result.copied
    assert (tmp_path / "out.flac").read_bytes() == Path(src).read_bytes()
    assert not resample_file(src, tmp_path / "out24.flac", OutputSpec(bits=24)).copied


def test_truncated_flac_whose_header_claims_20s_is_a_decode_error(tmp_path: Path) -> None:
    t = np.arange(44100 * 20) / 44100
    src = write(tmp_path / "t.flac", 0.3 * np.sin(2 * np.pi * 300 * t), 44100, subtype="PCM_16")
    data = Path(src).read_bytes()
    Path(src).write_bytes(data[: len(data) // 2])
    with pytest.raises(ProbeFailure) as failure:
        resample_file(src, tmp_path / "out.flac", OutputSpec())
    assert failure.value.reason == "decode_error"
    assert "of 20.00s" in failure.value.detail and "\n" not in failure.value.detail


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_anywhere_are_rejected(tmp_path: Path, bad: float) -> None:
    x = np.full(48000 * 2, 0.1, dtype=np.float32)
    x[70000] = bad
    src = write(tmp_path / "n.wav", x, 48000, subtype="FLOAT")
    with pytest.raises(ProbeFailure) as failure:
        resample_file(src, tmp_path / "out.flac", OutputSpec())
    assert failure.value.reason == "non_finite"
    assert "1.4" in failure.value.detail  # the time, near 70000 / 48000 s


def test_silence_and_clipping_are_measured(tmp_path: Path) -> None:
    silent = write(tmp_path / "s.wav", np.zeros(44100 * 2), 44100, subtype="PCM_16")
    assert resample_file(silent, tmp_path / "s.flac", OutputSpec()).peak == 0.0
    t = np.arange(44100 * 2) / 44100
    square = np.clip(4 * np.sin(2 * np.pi * 100 * t), -1, 1)
    clipped = write(tmp_path / "c.wav", square, 44100, subtype="PCM_16")
    result = resample_file(clipped, tmp_path / "c.flac", OutputSpec())
    assert result.clipped_samples > 0.01 * result.num_samples


def test_not_audio_is_a_probe_failure(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_text("not audio at all\n" * 100)
    with pytest.raises(ProbeFailure) as failure:
        resample_file(str(tmp_path / "x.wav"), tmp_path / "out.flac", OutputSpec())
    assert failure.value.reason == "not_audio"


def test_output_spec_validates() -> None:
    with pytest.raises(ValueError, match="format"):
        OutputSpec(format="MP3")
    with pytest.raises(ValueError, match="bits"):
        OutputSpec(bits=8)
    with pytest.raises(ValueError, match="quality"):
        OutputSpec(quality="LQ")


PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    import numpy as np, soundfile as sf
    from mert_pipeline.resample import OutputSpec, resample_file
    src, minutes = sys.argv[1], float(sys.argv[2])
    sr, block = 44100, 1 << 16
    with sf.SoundFile(src, "w", sr, 2, "PCM_16", format="FLAC") as handle:  # written in blocks too
        phase = 0
        total = int(minutes * 60 * sr)
        while phase < total:
            n = min(block, total - phase)
            t = (phase + np.arange(n)) / sr
            tone = 0.3 * np.sin(2 * np.pi * 440 * t)
            handle.write(np.stack([tone, 0.5 * tone], axis=1))
            phase += n
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = resample_file(src, Path(src + ".out.flac"), OutputSpec())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(result.num_samples, before, after)
    """
)


def test_peak_memory_does_not_grow_with_file_length(tmp_path: Path) -> None:
    """A 30-minute stereo file (466 MB as float32) costs the same peak RSS as a 1-minute one."""
    rss = {}
    for minutes in (1.0, 30.0):
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(tmp_path / f"{minutes}.flac"), str(minutes)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        samples, before_kb, after_kb = (int(v) for v in out)
        assert samples == int(minutes * 60 * 24000)
        rss[minutes] = int(after_kb)
    assert rss[30.0] - rss[1.0] < 32 * 1024, rss  # KiB: growth far below the 466 MB a whole decode needs
