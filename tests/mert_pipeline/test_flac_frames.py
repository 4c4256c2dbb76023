"""Segments cut out of libsndfile's FLAC files by copying frames: exact samples, seekable, valid CRCs; and
the cases that must fall back to decode + encode (checked through the shard stage's `segment_flac`)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mert_pipeline.demo.synth import render_track
from mert_pipeline.flac_frames import (
    FLAC_BLOCK,
    NotCopyable,
    _from_table,
    _open_stream,
    add_seektable,
    crc16,
    cut_segment,
    parse_header,
)
from mert_pipeline.shards import ShardError, segment_bounds
from mert_pipeline.stages.shard import segment_flac, segment_unit

RATE = 24000
UNIT = 20480  # lcm(320, 4096)
LENGTH = 7 * RATE + 1234  # 169234 samples: 42 frames, the last one of 1298 samples


def write(path: Path, subtype: str = "PCM_16", **kw) -> np.ndarray:
    """A real libsndfile file of LENGTH samples; its samples as soundfile decodes them (int32)."""
    sf.write(path, render_track(11, LENGTH / RATE, RATE, 1)[:LENGTH], RATE, subtype=subtype, **kw)
    return sf.read(path, dtype="int32")[0]


def frames_of(flac: bytes) -> list[bytes]:
    """The frames of a FLAC with only a STREAMINFO, split at the headers numbered 0, 1, 2, ..."""
    assert flac[:4] == b"fLaC" and flac[4] == 0x80  # one metadata block, the last
    starts: list[int] = []
    pos = 42
    while pos >= 0:
        header = parse_header(flac, pos)
        if header is not None and header.number == len(starts):
            starts.append(pos)
        pos = flac.find(b"\xff\xf8", pos + 1)
    return [flac[a:b] for a, b in zip(starts, [*starts[1:], len(flac)], strict=True)]


@pytest.mark.parametrize(("subtype", "bits"), [("PCM_16", 16), ("PCM_24", 24)])
def test_copied_frames_decode_to_the_source_samples_and_seek(tmp_path: Path, subtype: str, bits: int) -> None:
    path = tmp_path / "x.flac"
    source = write(path, subtype)
    size = path.stat().st_size
    bounds = segment_bounds(LENGTH, 3, UNIT)  # first, middle and last (short, to the end of the file)
    assert [offset for offset, _ in bounds] == [0, 3 * UNIT, 6 * UNIT] and bounds[-1][1] % FLAC_BLOCK
    for offset, n in [*bounds, (FLAC_BLOCK * 41, LENGTH - FLAC_BLOCK * 41), (FLAC_BLOCK, FLAC_BLOCK)]:
        flac = cut_segment(str(path), offset, n, RATE, bits, LENGTH, size)
        decoded, rate = sf.read(io.BytesIO(flac), dtype="int32")
        assert rate == RATE and sf.info(io.BytesIO(flac)).subtype == subtype
        np.testing.assert_array_equal(decoded, source[offset : offset + n])
        with sf.SoundFile(io.BytesIO(flac)) as handle:
            handle.seek(n // 2)
            np.testing.assert_array_equal(
                handle.read(100, dtype="int32"), source[offset + n // 2 : offset + n // 2 + 100]
            )
    middle = frames_of(cut_segment(str(path), 3 * UNIT, 3 * UNIT, RATE, bits, LENGTH, size))
    assert len(middle) == 3 * UNIT // FLAC_BLOCK  # renumbered from 0, each CRC-16 right
    assert all(crc16(frame[:-2]) == int.from_bytes(frame[-2:], "big") for frame in middle)


def test_segment_bounds_are_whole_flac_and_label_frames() -> None:
    assert segment_unit(720000, 320) == UNIT and segment_unit(12000, 320) == 320  # 0.5 s: labels only
    for n in (1, 320, 20480, 20481, 716800, 716801, 1_500_000, 7_654_321):
        bounds = segment_bounds(n, 35, UNIT)  # 35 units: at most 29.87 s of 30
        assert bounds[0][0] == 0 and sum(m for _, m in bounds) == n
        assert all(offset % UNIT == 0 and 0 < m <= 35 * UNIT for offset, m in bounds)
        assert all(a + m == b for (a, m), (b, _) in zip(bounds, bounds[1:], strict=False))
        assert max(m for _, m in bounds) - min(m for _, m in bounds) <= UNIT + n % UNIT
    assert len(segment_bounds(716800, 35, UNIT)) == 1 and len(segment_bounds(716801, 35, UNIT)) == 2


def row(path: Path, subtype: str, offset: int, n: int, fmt: str = "FLAC") -> dict:
    return {
        "path": str(path),
        "format": fmt,
        "subtype": subtype,
        "offset": offset,
        "num_samples": n,
        "source_num_samples": LENGTH,
        "size_bytes": path.stat().st_size,
        "content_hash": "",
    }


def test_other_block_sizes_and_wav_are_reencoded_exactly(tmp_path: Path) -> None:
    """libFLAC's compression levels 0-2 use 1152-sample blocks: a real file the frames cannot be cut from."""
    small = tmp_path / "small_blocks.flac"
    write(small, compression_level=0.0)
    assert int.from_bytes(small.read_bytes()[8:10], "big") == 1152  # STREAMINFO's min block size
    with pytest.raises(NotCopyable, match="block sizes 1152"):
        cut_segment(str(small), UNIT, UNIT, RATE, 16, LENGTH, small.stat().st_size)
    wav = tmp_path / "x.wav"
    write(wav, "PCM_24")
    stats: Counter = Counter()
    for path, fmt, subtype in ((small, "FLAC", "PCM_16"), (wav, "WAV", "PCM_24")):
        flac = segment_flac(row(path, subtype, UNIT, 2 * UNIT, fmt), RATE, stats)
        decoded, _ = sf.read(io.BytesIO(flac), dtype="int32")
        np.testing.assert_array_equal(decoded, sf.read(path, dtype="int32")[0][UNIT : 3 * UNIT])
    assert stats == {"audio_reencoded": 2, "audio_reencoded.block_size": 1, "audio_reencoded.not_flac": 1}
    good = tmp_path / "good.flac"
    write(good)
    flac = segment_flac(row(good, "PCM_16", UNIT, 2 * UNIT), RATE, stats)
    assert stats["audio_copied_frames"] == 1 and flac[4:8] == b"\x80\x00\x00\x22"  # STREAMINFO alone
    misaligned = segment_flac(row(good, "PCM_16", 320 * 7, 2 * UNIT), RATE, stats)
    assert stats["audio_reencoded.unaligned"] == 1
    np.testing.assert_array_equal(
        sf.read(io.BytesIO(misaligned), dtype="int32")[0],
        sf.read(good, dtype="int32")[0][2240 : 2240 + 2 * UNIT],
    )


def test_a_corrupt_frame_header_is_never_copied(tmp_path: Path) -> None:
    """A flipped bit in the number of frame 7 (inside the segment): the frames are not copied; decoding the
    damaged file fails too, so the task fails naming the file."""
    path = tmp_path / "x.flac"
    write(path)
    data = bytearray(path.read_bytes())
    starts = [p for p in range(len(data)) if (h := parse_header(data, p)) is not None and h.number == 7]
    assert len(starts) == 1
    data[starts[0] + 4] ^= 0x01  # frame number 7 -> 6: the CRC-8 no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(NotCopyable, match="frame 7"):
        cut_segment(str(path), 0, 2 * UNIT, RATE, 16, LENGTH, len(data))
    stats: Counter = Counter()
    with pytest.raises(ShardError, match=str(path)):
        segment_flac(row(path, "PCM_16", 0, 2 * UNIT), RATE, stats)
    assert stats == {"audio_reencoded": 1, "audio_reencoded.frames": 1}
    path.write_bytes(bytes(data[:-100]))  # size differs from the manifest's
    with pytest.raises(NotCopyable, match="the manifest says"):
        cut_segment(str(path), UNIT, UNIT, RATE, 16, LENGTH, len(data))


@pytest.mark.parametrize(("subtype", "bits"), [("PCM_16", 16), ("PCM_24", 24)])
def test_seek_table_gives_the_same_cuts_and_a_wrong_one_is_not_trusted(
    tmp_path: Path, subtype: str, bits: int
) -> None:
    plain, tabled = tmp_path / "plain.flac", tmp_path / "tabled.flac"
    source = write(plain, subtype)
    tabled.write_bytes(plain.read_bytes())
    assert add_seektable(tabled) and add_seektable(tabled)  # a second call keeps the table it finds
    data = tabled.read_bytes()
    frames = -(-LENGTH // FLAC_BLOCK)
    assert len(data) == plain.stat().st_size + 4 + 18 * frames  # one point per frame
    decoded, _ = sf.read(tabled, dtype="int32")
    np.testing.assert_array_equal(decoded, source)
    with sf.SoundFile(tabled) as handle:  # readers may seek with it
        handle.seek(LENGTH - 5000)
        np.testing.assert_array_equal(handle.read(5000, dtype="int32"), source[-5000:])
    cuts = [*segment_bounds(LENGTH, 3, UNIT), (FLAC_BLOCK * 41, LENGTH - FLAC_BLOCK * 41)]
    for offset, n in cuts:  # byte for byte what scanning the file without a table gives
        assert cut_segment(str(tabled), offset, n, RATE, bits, LENGTH, len(data)) == cut_segment(
            str(plain), offset, n, RATE, bits, LENGTH, plain.stat().st_size
        )
    assert data[42] & 0x7F == 3  # the SEEKTABLE block, right after STREAMINFO
    wrong = bytearray(data)
    wrong[42 + 4 + 18 * 10 + 15] ^= 1  # frame 10's offset one byte off: its header is not there
    tabled.write_bytes(bytes(wrong))
    for blob, used in ((data, True), (bytes(wrong), False)):
        stream = _open_stream(blob, RATE, bits, LENGTH)  # type: ignore[arg-type]
        assert stream.seektable and (_from_table(stream, 10, 20) is not None) == used
    assert cut_segment(str(tabled), 2 * UNIT, UNIT, RATE, bits, LENGTH, len(wrong)) == cut_segment(
        str(plain), 2 * UNIT, UNIT, RATE, bits, LENGTH, plain.stat().st_size
    )  # a table that does not hold is not trusted: the file is scanned


def test_seek_table_is_not_added_to_other_flac(tmp_path: Path) -> None:
    path = tmp_path / "fast.flac"
    write(path, compression_level=0.0)  # libsndfile's fastest level: 1152-sample frames
    before = path.read_bytes()
    assert not add_seektable(path) and path.read_bytes() == before
