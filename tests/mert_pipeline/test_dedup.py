"""The near-duplicate decisions (`mert_pipeline.dedup`) on short music-like clips through real Chromaprint:
each transformation that separates copies of one recording is found, different pieces and remixes are not,
and the keep rule, keep list, union and candidate index behave as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from mert_pipeline import chromaprint
from mert_pipeline.dedup import (
    DedupSettings,
    UnionFind,
    candidate_pairs,
    choose_kept,
    compare,
    fingerprint_file,
    index_keys,
    informative,
    is_lossless,
)
from mert_pipeline.demo.synth import render_track

SR = 44100
SETTINGS = DedupSettings()


@pytest.fixture(scope="module")
def track() -> np.ndarray:
    """40 s of a synthesized stereo piece (melody, chords, drums): the original recording."""
    return render_track(seed=3, seconds=40, sample_rate=SR, channels=2)


def _encoded(audio: np.ndarray, tmp_path: Path, fmt: str, subtype: str, **options: object) -> np.ndarray:
    """`audio` through a lossy codec and back (written in blocks: libsndfile's MP3 writer wants that)."""
    path = tmp_path / f"copy.{fmt.lower()}"
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    with sf.SoundFile(path, "w", SR, channels, format=fmt, subtype=subtype, **options) as out:
        for start in range(0, len(audio), 8192):
            out.write(audio[start : start + 8192])
    decoded, rate = sf.read(path, dtype="float32")
    assert rate == SR
    return decoded


def _fp(audio: np.ndarray, rate: int = SR) -> np.ndarray:
    return chromaprint.fingerprint(audio.astype(np.float32), rate)


TRANSFORMS = {
    # libsndfile's constant-bitrate MP3 at level 0.9 is 56 kbps (stereo): under the 64
    "mp3_56kbps": lambda a, tmp: _encoded(
        a, tmp, "MP3", "MPEG_LAYER_III", compression_level=0.9, bitrate_mode="CONSTANT"
    ),
    "ogg_vorbis_q0": lambda a, tmp: _encoded(a, tmp, "OGG", "VORBIS", compression_level=1.0),
    "rate_22050": lambda a, tmp: (soxr.resample(a, SR, 22050), 22050),
    "rate_48000_pcm24": lambda a, tmp: (soxr.resample(a, SR, 48000), 48000),
    "mono": lambda a, tmp: a.mean(axis=1),
    "gain_minus_12db": lambda a, tmp: a * 0.25,
    "silence_added": lambda a, tmp: np.concatenate([np.zeros((3 * SR, 2), np.float32), a]),
    "end_trimmed": lambda a, tmp: a[: -4 * SR],
    "crop_middle_15s": lambda a, tmp: a[12 * SR + 311 : 27 * SR],
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_each_transformation_of_a_recording_is_a_duplicate(
    track: np.ndarray, tmp_path: Path, name: str
) -> None:
    result = TRANSFORMS[name](track, tmp_path)
    audio, rate = result if isinstance(result, tuple) else (result, SR)
    original, copy = _fp(track), _fp(audio, rate)
    match = compare(original, copy, SETTINGS)
    assert match.is_duplicate(SETTINGS), (name, match)
    assert match.score > 0.8
    shared = np.intersect1d(index_keys(original, 4), index_keys(copy, 4))
    assert len(shared) >= SETTINGS.min_shared, "the index must bring the pair together"
    if name == "silence_added":
        assert abs(match.offset_seconds - 3.0) < 0.2
    if name == "crop_middle_15s":
        assert abs(match.offset_seconds - 12.0) < 0.3 and match.overlap_seconds > 10


def test_different_pieces_and_a_remix_are_not_duplicates(track: np.ndarray) -> None:
    """Other pieces of the same synthesizer (same instruments, tempo range, scales): the sound-alike case;
    and a remix that keeps 10 s of the original within 40 s of another piece."""
    original = _fp(track)
    for seed in (4, 5, 6):
        other = _fp(render_track(seed=seed, seconds=40, sample_rate=SR, channels=2))
        match = compare(original, other, SETTINGS)
        assert not match.is_duplicate(SETTINGS), (seed, match)
        assert match.coverage < 0.2
    remix = np.concatenate([track[: 10 * SR], render_track(seed=7, seconds=30, sample_rate=SR, channels=2)])
    match = compare(original, _fp(remix), SETTINGS)
    assert not match.is_duplicate(SETTINGS)
    assert 0.1 < match.coverage < 0.4, "the shared 10 s are found, and are not enough"


def test_an_edit_spliced_from_two_parts_is_contained(track: np.ndarray) -> None:
    """A radio edit: the first 12 s and the last 12 s of the album version, joined."""
    edit = np.concatenate([track[: 12 * SR], track[-12 * SR :]])
    match = compare(_fp(edit), _fp(track), SETTINGS)
    assert match.is_duplicate(SETTINGS), match


def test_silence_and_held_items_are_no_evidence() -> None:
    quiet = _fp(np.zeros(SR * 20, np.float32))
    assert not informative(quiet).any()
    assert len(index_keys(quiet, 1)) == 0
    assert compare(quiet, quiet, SETTINGS).coverage == 0.0


def test_fingerprint_file_streams_the_same_as_in_memory(track: np.ndarray, tmp_path: Path) -> None:
    mono = soxr.resample(track.mean(axis=1), SR, 24000)
    path = tmp_path / "a.flac"
    sf.write(path, mono, 24000, subtype="PCM_16")
    streamed, seconds = fingerprint_file(str(path))
    decoded, _ = sf.read(path, dtype="int16")
    assert np.array_equal(streamed, chromaprint.fingerprint(decoded, 24000))
    assert seconds == pytest.approx(40.0, abs=1e-3)
    assert len(streamed) == pytest.approx(40 / chromaprint.item_seconds(), abs=30)


def _row(file_id: str, duration: float, subtype: str, rate: int) -> dict:
    return {
        "id": file_id,
        "duration": duration,
        "lossless": is_lossless(subtype),
        "source_sampling_rate": rate,
        "source_path": f"/music/{file_id}",
    }


def test_keep_rule_longest_then_lossless_then_rate_then_id() -> None:
    a = _row("a" * 16, 200.0, "VORBIS", 44100)
    b = _row("b" * 16, 180.0, "PCM_16", 96000)
    assert choose_kept([a, b], set())[0] is a, "the longest first"
    c = _row("c" * 16, 200.0, "PCM_16", 44100)
    assert choose_kept([a, c], set())[0] is c, "then lossless over lossy"
    d = _row("d" * 16, 200.0, "FLOAT", 48000)
    assert choose_kept([c, d], set())[0] is d, "then the higher sample rate"
    e = _row("0" * 16, 200.0, "PCM_24", 48000)
    kept, dropped = choose_kept([d, e], set())
    assert kept is e and dropped == [d], "then the smallest id"
    assert is_lossless("ALAC_16") and not is_lossless("MPEG_LAYER_III") and not is_lossless("OPUS")


def test_keep_list_wins_and_listed_files_are_never_dropped() -> None:
    long_ = _row("a" * 16, 200.0, "PCM_16", 44100)
    short = _row("b" * 16, 30.0, "VORBIS", 22050)
    other = _row("c" * 16, 100.0, "PCM_16", 44100)
    kept, dropped = choose_kept([long_, short, other], {short["id"]})
    assert kept is short and dropped == [long_, other]
    kept, dropped = choose_kept([long_, short, other], {short["id"], other["id"]})
    assert kept is other and dropped == [long_], "the best listed file is kept, the other listed one stays"


def test_union_find_groups_are_sorted_and_transitive() -> None:
    groups = UnionFind()
    groups.union("c", "b")
    groups.union("b", "a")
    groups.union("x", "y")
    assert groups.groups() == [["a", "b", "c"], ["x", "y"]]


def test_candidate_pairs_skip_stop_keys() -> None:
    keys = np.array([1, 1, 1, 2, 2, 9, 9, 9, 9], np.uint32)
    files = np.array([10, 11, 12, 10, 11, 1, 2, 3, 4], np.uint64)
    pairs = candidate_pairs(keys, files, max_df=3)
    assert sorted(map(tuple, pairs.tolist())) == [(10, 11), (10, 11), (10, 12), (11, 12)]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_error"):
        DedupSettings(max_error=0.6)
    with pytest.raises(ValueError, match="min_coverage"):
        DedupSettings(min_coverage=0)
