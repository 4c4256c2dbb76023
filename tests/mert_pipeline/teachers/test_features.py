"""Features at 75 Hz: exact frame counts, agreement with torchaudio's Kaldi MFCC and mel spectrogram and with
nnAudio's CQT, streaming equal to whole-file, and the BEST-RQ quantizer's statistics and reproducibility."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torchaudio
from hypothesis import given, settings
from hypothesis import strategies as st

from mert_pipeline.demo.synth import render_track
from mert_pipeline.grid import HOP, SAMPLE_RATE, num_frames
from mert_pipeline.teachers.bestrq import BestRQ
from mert_pipeline.teachers.features import (
    C2_HZ,
    MFCC,
    STREAM_MIN_SAMPLES,
    LogCQT,
    LogMel,
    RunningStats,
    frame_signal,
    log_mel,
    make_extractor,
    mfcc,
)

# Around one hop, the 600-sample MFCC window, the 2048-sample log-mel window, one second, the 16384-sample
# log-CQT window, and a long odd file.
LENGTHS = [1, 2, 139, 140, 141, 319, 320, 321, 599, 600, 601, 640, 1000]
LENGTHS += [2047, 2048, 2049, 24000, 24001, 16383, 16384, 16385, 120007]
KINDS = ["mfcc", "log_mel", "cqt"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread, as a features worker of a one-core share runs: on the shared 2-core machine two
    threads made every extractor call tens of times slower (tests/trainer/conftest.py does the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def music() -> np.ndarray:
    """About four seconds of synthesized music ending in a partial hop: a real, varied signal."""
    return render_track(11, 4.0, SAMPLE_RATE)[: 4 * SAMPLE_RATE - 250]  # 70 samples past a hop boundary


@pytest.fixture(scope="module")
def extractors() -> dict[str, MFCC | LogMel | LogCQT]:
    return {kind: make_extractor(kind) for kind in KINDS}


_EXTRACTORS = [MFCC(), LogMel(), LogCQT()]  # for the hypothesis test, which rejects function-scoped fixtures


def _stream(
    extractor: MFCC | LogMel | LogCQT, x: np.ndarray, sizes: list[int], min_block: int = 1
) -> np.ndarray:
    """Feed x in consecutive blocks of the given sizes (cycled) and concatenate the yielded blocks.

    min_block=1 processes every block as it comes, so block boundaries fall where the sizes put them."""
    blocks, start, i = [], 0, 0
    while start < len(x):
        blocks.append(x[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    parts = list(extractor.stream(iter(blocks), min_block=min_block))
    return np.concatenate(parts) if parts else np.zeros((0, extractor.dim), np.float32)


def _kaldi_reference(x: np.ndarray, deltas: bool) -> np.ndarray:
    """torchaudio's Kaldi MFCC on the signal mirrored as documented (numpy's 'symmetric' pad), snip_edges=True
    so that window i starts at padded sample i * 320; then fairseq's compute_deltas."""
    n, m = len(x), num_frames(len(x))
    left = 600 // 2 - HOP // 2
    padded = np.pad(x, (left, (m - 1) * HOP + 600 - left - n), mode="symmetric")
    feats = torchaudio.compliance.kaldi.mfcc(
        torch.from_numpy(padded)[None],
        sample_frequency=SAMPLE_RATE,
        frame_shift=1000.0 * HOP / SAMPLE_RATE,
        frame_length=25.0,
        use_energy=False,
        dither=0.0,
    )
    if not deltas:
        return feats.numpy()
    c = feats.T
    d = torchaudio.functional.compute_deltas(c)
    return torch.cat([c, d, torchaudio.functional.compute_deltas(d)]).T.numpy()


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_frame_count_is_ceil_n_over_320(extractors: dict, kind: str, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    extractor = extractors[kind]
    whole = extractor(x)
    assert whole.shape == (math.ceil(n / 320), extractor.dim) == (num_frames(n), extractor.dim)
    assert whole.dtype == np.float32 and np.isfinite(whole).all()
    streamed = _stream(extractor, x, [777, 1, 4096])
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-4)


def test_num_frames() -> None:
    assert [num_frames(n) for n in (0, 1, 319, 320, 321, 640, 641)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        num_frames(-1)


def test_mfcc_matches_torchaudio_kaldi_on_music(music: np.ndarray) -> None:
    ours = MFCC(deltas=False)(music)
    # Kaldi's own snip_edges=False framing gives round(n / 320) frames with the same centres: ours add one.
    kaldi = torchaudio.compliance.kaldi.mfcc(
        torch.from_numpy(music)[None],
        sample_frequency=SAMPLE_RATE,
        frame_shift=1000.0 * HOP / SAMPLE_RATE,
        frame_length=25.0,
        use_energy=False,
        dither=0.0,
        snip_edges=False,
    ).numpy()
    assert len(kaldi) == (len(music) + 160) // 320 == len(ours) - 1
    np.testing.assert_allclose(ours[: len(kaldi)], kaldi, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(ours, _kaldi_reference(music, deltas=False), rtol=1e-4, atol=2e-3)
    assert np.abs(ours).max() > 10.0  # real cepstra, not a degenerate signal


def test_mfcc_with_deltas_matches_fairseq_recipe(music: np.ndarray) -> None:
    ours = mfcc(music)
    assert ours.shape == (num_frames(len(music)), 39)
    np.testing.assert_allclose(ours, _kaldi_reference(music, deltas=True), rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("n", [1, 7, 150, 321, 599, 1000])
def test_mfcc_matches_kaldi_for_files_shorter_than_a_window(n: int) -> None:
    x = np.random.default_rng(n).uniform(-0.5, 0.5, n).astype(np.float32)
    # A few samples mirrored over a whole window are periodic: some mel bins are nearly empty and their
    # float32 logs differ by 1e-2 between two correct implementations. Wrong framing would differ by tens.
    np.testing.assert_allclose(mfcc(x), _kaldi_reference(x, deltas=True), rtol=1e-3, atol=3e-2)


def test_log_mel_matches_torchaudio_mel_spectrogram(music: np.ndarray) -> None:
    n, m = len(music), num_frames(len(music))
    left = 2048 // 2 - HOP // 2
    padded = np.pad(music, (left, (m - 1) * HOP + 2048 - left - n), mode="symmetric")
    spec = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=2048,
        hop_length=HOP,
        n_mels=128,
        center=False,
        power=2.0,
        norm=None,
        mel_scale="htk",
    )(torch.from_numpy(padded))
    reference = (spec + 1e-6).log().T.numpy()
    ours = log_mel(music)
    assert ours.shape == reference.shape == (m, 128)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", [[1, 2, 3, 5, 7, 11, 13], [319, 321], [4099], [24000, 17, 5], [10**7]])
def test_stream_equals_whole_file(music: np.ndarray, extractors: dict, kind: str, sizes: list[int]) -> None:
    x = music if sizes[0] > 100 else music[:7000]  # one-sample blocks on a short excerpt keep this fast
    whole = extractors[kind](x)
    np.testing.assert_allclose(_stream(extractors[kind], x, sizes), whole, rtol=1e-5, atol=1e-4)


def test_stream_with_default_gathering_equals_whole_file(extractors: dict) -> None:
    x = np.random.default_rng(5).standard_normal(2 * STREAM_MIN_SAMPLES + 777).astype(np.float32)
    for extractor in extractors.values():
        streamed = _stream(extractor, x, [24000, 1001], min_block=STREAM_MIN_SAMPLES)
        np.testing.assert_allclose(streamed, extractor(x), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stream_equals_whole_file_any_length_and_blocks(data: st.DataObject) -> None:
    """Any length, any block boundaries (empty and one-sample blocks included), processed as they come."""
    n = data.draw(st.integers(1, 6000), label="n")
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=40), label="cuts"))
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    blocks = np.split(x, cuts)
    for extractor in _EXTRACTORS:
        whole = extractor(x)
        assert whole.shape == (-(-n // 320), extractor.dim)
        parts = list(extractor.stream(iter(blocks), min_block=1))
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("min_block", [1, STREAM_MIN_SAMPLES])
def test_stream_lags_input_by_a_bounded_amount(extractors: dict, kind: str, min_block: int) -> None:
    """Feature blocks come out as samples go in: the stream never waits for the whole file."""
    extractor = extractors[kind]
    length = 3 * STREAM_MIN_SAMPLES + 5000 if min_block > 1 else 60_500
    x = np.random.default_rng(0).standard_normal(length).astype(np.float32)
    received, produced, yields = 0, 0, 0
    block = 1000

    def blocks():
        nonlocal received
        for start in range(0, len(x), block):
            received = min(start + block, len(x))
            yield x[start : start + block]

    for feats in extractor.stream(blocks(), min_block=min_block):
        produced += len(feats)
        yields += 1
        if received < len(x):
            # Behind by at most the gathered input, one window and four frames of delta-delta context.
            assert received - produced * HOP <= max(min_block, block) + extractor.win + 5 * HOP
    assert produced == num_frames(len(x))
    assert yields >= (len(x) - extractor.win) // max(min_block, block) - 3  # nothing before one window


def test_batch_equals_one_file_at_a_time(music: np.ndarray, extractors: dict) -> None:
    files = [music[:1], music[:5000], music, music[123:20000]]
    for extractor in extractors.values():
        for one, many in zip(files, extractor.batch(files), strict=True):
            np.testing.assert_allclose(many, extractor(one), rtol=1e-5, atol=1e-4)


def test_rejects_multichannel_input() -> None:
    with pytest.raises(ValueError, match="mono"):
        mfcc(np.zeros((2, 1000), np.float32))


def test_mfcc_is_deterministic(music: np.ndarray) -> None:
    assert np.array_equal(mfcc(music), mfcc(music))


# --------------------------------------------------------------------------------------------------
# log-CQT (the music k-means teacher)
# --------------------------------------------------------------------------------------------------


def _nnaudio_reference(x: np.ndarray, extractor: LogCQT) -> np.ndarray:
    """nnAudio's CQT1992v2 (time-domain kernels, "wrap" scaling) on the signal mirrored as documented, no
    centring of its own: frame i is the window starting at padded sample i * 320."""
    from nnAudio.features import CQT1992v2

    windows = frame_signal(torch.from_numpy(x), extractor.win)
    padded = torch.cat([windows[0], windows[1:, -HOP:].reshape(-1)])  # the windows' padded signal
    cqt = CQT1992v2(
        sr=SAMPLE_RATE, hop_length=HOP, fmin=extractor.fmin, n_bins=extractor.dim,
        bins_per_octave=extractor.bins_per_octave, norm=1, window="hann", center=False,
        output_format="Complex", verbose=False,
    )  # fmt: skip
    complex_out = cqt(padded[None], normalization_type="wrap")[0]
    magnitude = torch.linalg.vector_norm(complex_out, dim=-1).T.numpy()
    return np.log(magnitude + extractor.log_offset)


def test_cqt_matches_nnaudio_on_music(music: np.ndarray) -> None:
    extractor = LogCQT()
    assert (extractor.dim, extractor.win, extractor.fmin) == (168, 16384, C2_HZ)
    x = music[: 2 * SAMPLE_RATE + 70]  # 2 s and a partial hop: 151 frames
    ours = extractor(x)
    reference = _nnaudio_reference(x, extractor)
    assert ours.shape == reference.shape == (num_frames(len(x)), 168)
    np.testing.assert_allclose(ours, reference, atol=2e-3)  # 0.2% of a magnitude; FFT-sparse vs time domain
    assert ours.max() > np.log(0.01) and ours.min() >= np.log(1e-4)  # real spectra, floored at the offset


def test_cqt_frame_i_is_centred_on_sample_320i_plus_160() -> None:
    """An impulse is loudest, in every bin, in the frame whose window is centred on it."""
    extractor = LogCQT()
    for frame in (60, 61):
        x = np.zeros(150 * HOP, np.float32)
        x[frame * HOP + HOP // 2] = 1.0
        feats = extractor(x)
        assert np.all(feats.argmax(axis=0) == frame)


@pytest.mark.parametrize("midi", [38, 45, 57, 60, 61, 62, 69, 81, 96, 108])
def test_cqt_peak_moves_one_semitone_per_semitone(midi: int) -> None:
    """A pure tone at MIDI note m peaks in bin 2 (m - 36) (24 bins an octave from C2): its pitch class is
    (argmax // 2) mod 12, over the whole range."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)).astype(np.float32)
    peaks = LogCQT()(tone)[30:45].argmax(axis=1)  # frames whose 0.68 s windows lie inside the tone
    assert np.all(peaks == 2 * (midi - 36))
    assert np.all((peaks // 2) % 12 == midi % 12)


def test_cqt_is_deterministic_and_refuses_bins_above_nyquist(music: np.ndarray) -> None:
    assert np.array_equal(LogCQT()(music), LogCQT()(music))
    with pytest.raises(ValueError, match="below Nyquist"):
        LogCQT(octaves=8)
    with pytest.raises(ValueError, match="one of mfcc, log_mel, cqt"):
        make_extractor("chroma")


# --------------------------------------------------------------------------------------------------
# BEST-RQ
# --------------------------------------------------------------------------------------------------


def _frames(seed: int, n: int, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * np.arange(1, dim + 1) + 100.0).astype(np.float32)


def test_running_stats_merge_equals_single_pass(tmp_path) -> None:
    parts = [_frames(s, n) for s, n in enumerate([1, 1000, 70000, 3, 12345])]
    everything = np.concatenate(parts).astype(np.float64)
    single = RunningStats(8)
    for part in parts:
        single.update(part)
    workers = [RunningStats(8).update(parts[0]).update(parts[1]), RunningStats(8).update(parts[2])]
    workers.append(RunningStats(8).update(parts[3]).update(parts[4]))
    merged = RunningStats(8).merge(workers[2]).merge(workers[0]).merge(workers[1])
    for stats in (single, merged):
        assert stats.count == len(everything)
        np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.std, everything.std(axis=0), rtol=1e-9)
    single.save(tmp_path / "stats.npz")
    loaded = RunningStats.load(tmp_path / "stats.npz")
    assert loaded.count == single.count
    assert np.array_equal(loaded.mean, single.mean) and np.array_equal(loaded.std, single.std)


def test_running_stats_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        RunningStats(8).update(np.zeros((3, 7)))
    with pytest.raises(ValueError):
        RunningStats(8).merge(RunningStats(7))
    with pytest.raises(ValueError):
        RunningStats(8).mean  # noqa: B018 - the property raises before any frame


def test_best_rq_labels_are_nearest_normalised_codebook_entry() -> None:
    train = _frames(0, 5000)
    quantizer = BestRQ(RunningStats(8).update(train), seed=3, codebook_size=256)
    x = _frames(1, 3000)
    labels = quantizer.labels(x)
    assert labels.dtype == np.int16 and labels.shape == (3000,)
    z = (x.astype(np.float64) - train.mean(axis=0)) / train.astype(np.float64).std(axis=0)
    proj = z @ quantizer.projections[0].astype(np.float64)
    proj /= np.linalg.norm(proj, axis=1, keepdims=True)
    book = quantizer.codebooks[0].astype(np.float64)
    dist = ((proj[:, None, :] - book[None]) ** 2).sum(-1)
    expected = dist.argmin(axis=1)
    gap = dist[np.arange(len(x)), labels] - dist.min(axis=1)
    assert np.all((labels == expected) | (gap < 1e-5))
    assert (labels == expected).mean() > 0.999
    assert len(np.unique(labels)) > 100  # normalised inputs spread over the codebook
    # Xavier normal: std sqrt(2 / (fan_in + fan_out)); unit-norm codebook entries.
    assert quantizer.projections.std() == pytest.approx(math.sqrt(2 / (8 + 16)), rel=0.2)
    np.testing.assert_allclose(np.linalg.norm(quantizer.codebooks[0], axis=1), 1.0, rtol=1e-6)


def test_best_rq_save_load_reproduces_labels(tmp_path) -> None:
    stats = RunningStats(128).update(log_mel(render_track(5, 2.0, SAMPLE_RATE)))
    quantizer = BestRQ(stats, seed=7, num_codebooks=3)
    feats = log_mel(render_track(6, 1.0, SAMPLE_RATE))
    labels = quantizer.labels(feats)
    assert labels.shape == (3, num_frames(SAMPLE_RATE)) and labels.dtype == np.int16
    assert labels.max() < 4096 and not np.array_equal(labels[0], labels[1])
    quantizer.save(tmp_path / "bestrq.npz")
    loaded = BestRQ.load(tmp_path / "bestrq.npz")
    assert loaded.config_hash == quantizer.config_hash
    assert np.array_equal(loaded.labels(feats), labels)
    assert np.array_equal(BestRQ(stats, seed=7, num_codebooks=3).labels(feats), labels)
    other_seed = BestRQ(stats, seed=8, num_codebooks=3)
    assert other_seed.config_hash != quantizer.config_hash
    assert not np.array_equal(other_seed.labels(feats), labels)
    other_stats = BestRQ(RunningStats(128).update(feats), seed=7, num_codebooks=3)
    assert other_stats.config_hash != quantizer.config_hash


def test_best_rq_load_refuses_tampered_file(tmp_path) -> None:
    quantizer = BestRQ(RunningStats(8).update(_frames(0, 100)), seed=1, codebook_size=64)
    quantizer.save(tmp_path / "q.npz")
    with np.load(tmp_path / "q.npz") as data:
        fields = dict(data)
    fields["mean"] = fields["mean"] + 1.0
    np.savez(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match="config hash"):
        BestRQ.load(tmp_path / "bad.npz")


def test_best_rq_rejects_codebooks_too_big_for_int16() -> None:
    with pytest.raises(ValueError, match="int16"):
        BestRQ(RunningStats(8).update(_frames(0, 10)), codebook_size=40000)
