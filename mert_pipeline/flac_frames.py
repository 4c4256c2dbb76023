"""Cut a segment out of a FLAC file by copying its frames: no decode, no encode.

The resampled audio is FLAC as libsndfile writes it: `fLaC`, STREAMINFO (and a VORBIS_COMMENT), then
frames of a fixed FLAC_BLOCK samples each, numbered 0, 1, 2, ... (the last one shorter). A segment that
starts on a frame boundary and ends on one (or at the end of the file) is a run of whole frames, so its
FLAC is `fLaC` + a STREAMINFO of its own + those frames, byte for byte except that each is renumbered
from 0 (libsndfile neither opens nor seeks a stream whose first frame number is not 0). A frame header
holds its number (UTF-8 coded, so the header's length changes with the value) and a CRC-8 of the
header; the frame ends with a CRC-16 of all its bytes. Both are redone for the new header: the CRC-8
over the few header bytes, the CRC-16 without reading the body, because with init 0 the CRC is linear:
new = stored XOR ((crc16(old header) XOR crc16(new header)) * x^(8 * body bytes) mod P).

Where the frames are: the resample stage gives every FLAC it writes a SEEKTABLE with one point per frame
(`add_seektable`, which finds them with the checked scan below, once per file); a cut then reads the
positions of its frames from it, and checks each (the header found there must be exactly the expected
one). A file without such a table, or whose table does not hold, is scanned for its frames instead.

What is checked, so that a wrong cut cannot pass: the STREAMINFO (fixed block size FLAC_BLOCK, rate,
mono, bit depth, sample count as in the manifest), the file size against the manifest, and every frame
boundary: a sync code whose header is the exact expected one (constant bytes of frame 0, the next frame
number, a correct CRC-8). The scan runs from a frame before the segment through the header of the
second frame after it (or to the end of the file) and stops at any other well-formed header claiming a
number in that span, so a sync code inside a frame's data that happens to look like a header cannot
split a frame unnoticed: the real header would turn up as a second one. Anything else raises NotCopyable
with a short reason, and the caller decodes and re-encodes instead. Not checked: the frame bodies (their
CRC-16 is carried over, not recomputed), so a body damaged after resample is copied as is and fails
`mert-pipe verify`, which decodes every member.

The file is memory-mapped: the scan and the copy read the page cache directly. The resample stage
replaces files by rename, never in place; a file truncated while mapped would kill the process (SIGBUS).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from dataclasses import dataclass

import numpy as np

from mert_pipeline.fs import atomic_path

# Samples per FLAC frame as libsndfile 1.2.2 writes them (libFLAC's block size at its default compression
# level; levels 0-2 use 1152). Segments cut on multiples of it are runs of whole frames and can be copied.
FLAC_BLOCK = 4096

SEEKTABLE = 3  # FLAC metadata block type
SEEKPOINT = 18  # bytes per seek point: sample number, byte offset from the first frame, samples (u64 u64 u16)
SYNC = b"\xff\xf8"  # frame sync code, then reserved bit 0 and blocking strategy 0 (fixed block size)
SLACK = 8  # frames before the segment that a probe may land on (read for nothing, but harmless)
MAX_PROBES = 24
_POLY16 = 0x18005  # the CRC-16 polynomial x^16 + x^15 + x^2 + 1


class NotCopyable(Exception):
    """The segment cannot be cut from this file by copying frames; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _crc_table(poly: int, width: int) -> tuple[int, ...]:
    """Byte-at-a-time table of an MSB-first CRC (FLAC's CRC-8 and CRC-16)."""
    top, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return tuple(table)


_CRC8 = _crc_table(0x07, 8)
_CRC16 = _crc_table(0x8005, 16)


def crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def _utf8(value: int) -> bytes:
    """FLAC's UTF-8 coding of a frame number (up to 31 bits, 1 to 6 bytes)."""
    if value < 0x80:
        return bytes([value])
    tail = []
    while True:
        tail.append(0x80 | (value & 0x3F))
        value >>= 6
        room = 6 - len(tail)  # payload bits left in the lead byte
        if value < (1 << room):
            lead = (0xFF << (room + 1)) & 0xFF
            return bytes([lead | value, *reversed(tail)])


@dataclass(frozen=True)
class Header:
    number: int
    length: int  # bytes, CRC-8 included
    block_size: int
    utf8_length: int


def _block_size(code: int, buf: bytes | bytearray | mmap.mmap, at: int) -> tuple[int, int]:
    """(samples, extra header bytes) of a block-size code."""
    if code == 1:
        return 192, 0
    if 2 <= code <= 5:
        return 576 << (code - 2), 0
    if code == 6:
        return buf[at] + 1, 1
    if code == 7:
        return int.from_bytes(buf[at : at + 2], "big") + 1, 2
    return 256 << (code - 8), 0


def parse_header(buf: bytes | bytearray | mmap.mmap, p: int) -> Header | None:
    """The fixed-block-size frame header at `p` if it is well formed (its CRC-8 included), else None."""
    if len(buf) < p + 6 or buf[p : p + 2] != SYNC:
        return None
    b2, b3, lead = buf[p + 2], buf[p + 3], buf[p + 4]
    if b2 >> 4 == 0 or b2 & 15 == 15 or b3 & 1 or b3 >> 4 > 10 or (b3 >> 1) & 7 == 3:
        return None
    if lead < 0x80:
        size, number = 1, lead
    elif 0xC0 <= lead < 0xFE:
        size = next(n for n in range(2, 7) if lead < (0x100 - (1 << (7 - n))))
        number = lead & ((1 << (7 - size)) - 1)
    else:
        return None
    q = p + 4 + size
    if len(buf) < q + 5:
        return None
    for byte in buf[p + 5 : q]:
        if byte & 0xC0 != 0x80:
            return None
        number = number << 6 | (byte & 0x3F)
    block_size, extra = _block_size(b2 >> 4, buf, q)
    q += extra + {12: 1, 13: 2, 14: 2}.get(b2 & 15, 0)
    if crc8(buf[p:q]) != buf[q]:
        return None
    return Header(number, q + 1 - p, block_size, size)


def frame_header(prefix: bytes, number: int, extras: bytes) -> tuple[bytes, int]:
    """The header of frame `number` of a stream whose frames start with `prefix` (4 bytes) and carry
    `extras` after the number; with its CRC-16, which a renumbered frame's CRC-16 is corrected by."""
    head = prefix + _utf8(number) + extras
    head += bytes([crc8(head)])
    return head, crc16(head)


class _Gf16:
    """Products in GF(2)[x] / P, vectorised with tables: the CRC-16 correction of a frame body of m bytes
    is a 16-bit delta times x^(8m) mod P."""

    def __init__(self) -> None:
        a = np.arange(256, dtype=np.uint32)[:, None]
        b = np.arange(256, dtype=np.uint32)[None, :]
        clmul = np.zeros((256, 256), dtype=np.uint32)
        for bit in range(8):
            clmul ^= (a << bit) * ((b >> bit) & 1)
        self.clmul = clmul.ravel()  # carry-less product of two bytes, index (a << 8) | b
        high = np.arange(1 << 15, dtype=np.uint32) << 16
        for bit in range(30, 15, -1):
            high ^= ((high >> bit) & 1) * np.uint32(_POLY16 << (bit - 16))
        self.reduce = high  # t * x^16 mod P, for t below 2^15
        self.powers = np.ones(1, dtype=np.uint32)  # x^(8m) mod P for m = 0, 1, ...

    def power(self, m: np.ndarray) -> np.ndarray:
        top = int(m.max(initial=0))
        if top >= len(self.powers):
            powers = self.powers.tolist()
            crc = powers[-1]
            for _ in range(len(powers), max(top + 1, 2 * len(powers))):
                crc = ((crc << 8) & 0xFFFF) ^ _CRC16[crc >> 8]  # times x^8, mod P
                powers.append(crc)
            self.powers = np.array(powers, dtype=np.uint32)
        return self.powers[m]

    def multiply(self, d: np.ndarray, c: np.ndarray) -> np.ndarray:
        dh, dl, ch, cl = d >> 8, d & 0xFF, c >> 8, c & 0xFF
        t = self.clmul
        p = (t[dh << 8 | ch] << 16) ^ ((t[dh << 8 | cl] ^ t[dl << 8 | ch]) << 8) ^ t[dl << 8 | cl]
        return (p & 0xFFFF) ^ self.reduce[p >> 16]


@functools.cache
def _gf16() -> _Gf16:
    return _Gf16()


@dataclass(frozen=True)
class _Stream:
    """What the file's STREAMINFO and first frame say, checked against the manifest."""

    data: mmap.mmap  # the whole file, mapped read-only: no copy of what is scanned or copied out
    size: int
    audio_start: int
    streaminfo: bytes
    total: int
    frames: int
    prefix: bytes  # the first 4 bytes of every frame header but the last frame's
    extras: bytes  # block size / rate bytes after the frame number (none for libsndfile's files)
    window: int  # bytes a probe reads: twice the largest frame a mono frame of this bit depth can take
    seektable: int = 0  # byte position of a SEEKTABLE with one point per frame (resample writes it), or 0


def _open_stream(data: mmap.mmap, sample_rate: int, bits: int, total_samples: int) -> _Stream:
    if data[:4] != b"fLaC":
        raise NotCopyable("not_flac", "no fLaC marker")
    pos, info, table, table_length = 4, b"", 0, -1
    while True:
        block = data[pos : pos + 4]
        if len(block) < 4:
            raise NotCopyable("metadata", "metadata runs past the end of the file")
        kind, length = block[0] & 0x7F, int.from_bytes(block[1:4], "big")
        if pos == 4:
            if kind != 0 or length != 34:
                raise NotCopyable("metadata", "the first metadata block is not a STREAMINFO")
            info = data[pos + 4 : pos + 38]
        elif kind == SEEKTABLE:
            table, table_length = pos + 4, length
        pos += 4 + length
        if block[0] & 0x80:
            break
    min_block, max_block = int.from_bytes(info[0:2], "big"), int.from_bytes(info[2:4], "big")
    packed = int.from_bytes(info[10:18], "big")
    rate, channels = packed >> 44, ((packed >> 41) & 7) + 1
    depth, total = ((packed >> 36) & 31) + 1, packed & ((1 << 36) - 1)
    if min_block != FLAC_BLOCK or max_block != FLAC_BLOCK:
        raise NotCopyable("block_size", f"block sizes {min_block}..{max_block}, not a fixed {FLAC_BLOCK}")
    if (rate, channels, depth, total) != (sample_rate, 1, bits, total_samples):
        raise NotCopyable(
            "stream",
            f"{rate} Hz, {channels} ch, {depth} bit, {total} samples; expected {sample_rate} Hz, mono, "
            f"{bits} bit, {total_samples} samples",
        )
    header = parse_header(data, pos)
    if header is None or header.number != 0 or header.block_size != min(FLAC_BLOCK, total):
        raise NotCopyable("header", f"no header of frame 0 with {FLAC_BLOCK} samples at byte {pos}")
    extras = data[pos + 4 + header.utf8_length : pos + header.length - 1]
    window = 2 * (FLAC_BLOCK * bits // 8 + 64)
    frames = -(-total // FLAC_BLOCK)
    table = table if table_length == SEEKPOINT * frames else 0  # only a table of every frame is used
    return _Stream(data, len(data), pos, info, total, frames, data[pos : pos + 4], extras, window, table)


def _regular(stream: _Stream, p: int) -> Header | None:
    """A well-formed header at `p` that is exactly the one frame `number` of this stream would have."""
    header = parse_header(stream.data, p)
    if header is None or header.number >= stream.frames - 1:
        return None
    expected = frame_header(stream.prefix, header.number, stream.extras)[0]
    return header if stream.data[p : p + len(expected)] == expected else None


def _probe(stream: _Stream, target: int) -> tuple[int, int]:
    """(byte position, number) of the header of a frame in [target - SLACK, target]: interpolation
    search (for files without a seek table), each probe taking the first header of one window."""
    lo_pos, lo_k, hi_pos, hi_k = stream.audio_start, 0, stream.size, stream.frames
    for _ in range(MAX_PROBES):
        if lo_k >= target - SLACK:
            return lo_pos, lo_k
        goal = target - SLACK // 2
        at = max(lo_pos + 1, lo_pos + (hi_pos - lo_pos) * (goal - lo_k) // (hi_k - lo_k) - stream.window // 4)
        stop = min(at + stream.window, stream.size)
        p, hit = stream.data.find(SYNC, at, stop), None
        while p >= 0:
            hit = _regular(stream, p)
            if hit is not None and lo_k < hit.number < hi_k:
                break
            hit, p = None, stream.data.find(SYNC, p + 1, stop)
        if hit is None:
            hi_pos = at  # no header in range here: look before
        elif hit.number <= target:
            lo_pos, lo_k = p, hit.number
        else:
            hi_pos, hi_k = p, hit.number
    raise NotCopyable("seek", f"no frame near {target} found in {MAX_PROBES} probes")


def _last_header(stream: _Stream, p: int) -> Header | None:
    """The header at `p` if it is exactly the file's last frame's: its number, its (shorter) block size,
    and the stream's sample rate, channel and bit-depth codes."""
    header = parse_header(stream.data, p)
    final = stream.frames - 1
    if (
        header is not None
        and header.number == final
        and header.block_size == stream.total - FLAC_BLOCK * final
        and stream.data[p + 2] & 15 == stream.prefix[2] & 15
        and stream.data[p + 3] == stream.prefix[3]
    ):
        return header
    return None


def _syncs(data: mmap.mmap, start: int, stop: int) -> list[int]:
    """Positions in [start, stop) where a sync code begins (numpy: a loop of `find` reads ~1 GB/s)."""
    view = np.frombuffer(data, dtype=np.uint8, count=min(stop + 1, len(data)) - start, offset=start)
    found = np.flatnonzero(view[: stop - start] == 0xFF)
    found = found[found + 1 < len(view)]
    return (found[view[found + 1] == 0xF8] + start).tolist()


def _headers(prefix: bytes, extras: bytes, upto: int) -> list[tuple[bytes, int]]:
    """frame_header for numbers 0..upto, kept per stream layout (every libsndfile file shares one)."""
    table = _HEADERS.setdefault((prefix, extras), [])
    while len(table) <= upto:
        table.append(frame_header(prefix, len(table), extras))
    return table


_HEADERS: dict[tuple[bytes, bytes], list[tuple[bytes, int]]] = {}


def _scan(stream: _Stream, base: int, first: int, last: int, guess: int) -> tuple[list[int], Header | None]:
    """Positions of the headers of frames first..last, `first`'s at `base`; with `last` the file's last
    frame, the scan runs on to the end of the file. Any other well-formed header of this stream numbered
    in first..last on the way raises. The sync codes are found a window at a time (`guess` bytes first)."""
    data, size, final = stream.data, stream.size, stream.frames - 1
    positions = [base]
    tail: Header | None = None  # the file's last frame, whose block size may differ
    heads = _headers(stream.prefix, stream.extras, max(first, min(last, final - 1)))
    expect, pos = first + 1, base + len(heads[first][0])
    stop = min(size, base + guess)
    candidates, i = _syncs(data, pos, stop), 0
    while True:
        if i == len(candidates):
            if stop < size:
                start, stop = stop, min(size, stop + max((stop - base) // 4, stream.window))
                candidates, i = _syncs(data, start, stop), 0
                continue
            if expect <= last:
                raise NotCopyable("frames", f"no header for frame {expect} before the end of the file")
            return positions, tail
        p = candidates[i]
        i += 1
        if p < pos:
            continue
        if expect < final and expect <= last:
            head = heads[expect][0]
            if data[p : p + len(head)] == head:
                positions.append(p)
                expect, pos = expect + 1, p + len(head)
                if expect > last:
                    return positions, tail
                continue
        elif expect == final and expect <= last:
            header = _last_header(stream, p)
            if header is not None:
                positions.append(p)
                tail, expect, pos = header, expect + 1, p + header.length
                continue
        header = parse_header(data, p)  # a sync code in a frame's data, or trouble
        if header is not None and first <= header.number <= last and data[p + 3] == stream.prefix[3]:
            raise NotCopyable(
                "frames",
                f"expected the header of frame {expect}, found one of frame {header.number} at byte {p}",
            )


def _from_table(stream: _Stream, k0: int, k1: int) -> tuple[list[int], Header | None] | None:
    """Positions of the headers of frames k0..min(k1, last) from the seek table, each checked to hold
    exactly the header that frame has (as `_scan` checks); None if any does not (then scan instead)."""
    data, final = stream.data, stream.frames - 1
    upto = min(k1, final)
    start = stream.seektable + SEEKPOINT * k0
    rows = np.frombuffer(data[start : start + SEEKPOINT * (upto - k0 + 1)], dtype=np.uint8)
    rows = rows.reshape(-1, SEEKPOINT)
    samples = rows[:, 0:8].copy().view(">u8").ravel()
    offsets = rows[:, 8:16].copy().view(">u8").ravel()
    if not np.array_equal(samples, np.arange(k0, upto + 1, dtype=np.uint64) * FLAC_BLOCK):
        return None
    positions = (offsets.astype(np.int64) + stream.audio_start).tolist()
    heads = _headers(stream.prefix, stream.extras, max(k0, min(upto, final - 1)))
    tail = None
    for k, p in zip(range(k0, upto + 1), positions, strict=True):
        if k < final:
            head = heads[k][0]
            if data[p : p + len(head)] != head:
                return None
        else:
            tail = _last_header(stream, p)
            if tail is None:
                return None
    return positions, tail


def add_seektable(path: str | os.PathLike) -> bool:
    """Give a FLAC written by libsndfile a SEEKTABLE with one point per frame, found by the same checked
    scan that cutting uses (done once here, at resample, instead of once per segment at shard time;
    any FLAC reader may use the table to seek). The file is rewritten in place (through a temporary
    name). False, and the file untouched, when it is not a fixed-block FLAC of FLAC_BLOCK frames or a
    check fails; cutting then scans as before."""
    with open(path, "rb") as handle:
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        packed = int.from_bytes(data[18:26], "big")  # STREAMINFO's rate, channels, bits, samples
        bits, total = ((packed >> 36) & 31) + 1, packed & ((1 << 36) - 1)
        stream = _open_stream(data, packed >> 44, bits, total)
        if stream.seektable or SEEKPOINT * stream.frames >= 1 << 24:  # has one / too long for one block
            return bool(stream.seektable)
        positions, _ = _scan(stream, stream.audio_start, 0, stream.frames - 1, stream.size)
        points = np.zeros((stream.frames, SEEKPOINT), dtype=np.uint8)
        numbers = np.arange(stream.frames, dtype=np.uint64)
        points[:, 0:8] = (numbers * FLAC_BLOCK).astype(">u8").view(np.uint8).reshape(-1, 8)
        offsets = np.array(positions, dtype=np.uint64) - np.uint64(stream.audio_start)
        points[:, 8:16] = offsets.astype(">u8").view(np.uint8).reshape(-1, 8)
        sizes = np.minimum(FLAC_BLOCK, total - numbers * FLAC_BLOCK).astype(">u2")
        points[:, 16:18] = sizes.view(np.uint8).reshape(-1, 2)
        blocks, pos = [], 4  # the metadata blocks as they are (but an older, sparser seek table: a
        while pos < stream.audio_start:  # stream holds one at most), then the table after STREAMINFO
            length = int.from_bytes(data[pos + 1 : pos + 4], "big")
            if data[pos] & 0x7F != SEEKTABLE:
                blocks.append(bytearray(data[pos : pos + 4 + length]))
            pos += 4 + length
        table = bytearray([SEEKTABLE]) + (SEEKPOINT * stream.frames).to_bytes(3, "big") + points.tobytes()
        blocks.insert(1, table)
        for block in blocks:
            block[0] &= 0x7F
        blocks[-1][0] |= 0x80  # the last-metadata-block flag
        with atomic_path(path) as tmp, open(tmp, "wb") as out, memoryview(data) as mem:
            out.write(b"fLaC" + b"".join(blocks))
            out.write(mem[stream.audio_start :])
        return True
    except NotCopyable:
        return False
    finally:
        with contextlib.suppress(BufferError):
            data.close()


def cut_segment(
    path: str,
    offset: int,
    num_samples: int,
    sample_rate: int,
    bits: int,
    total_samples: int,
    size_bytes: int | None,
) -> bytes:
    """The FLAC of samples [offset, offset + num_samples) of `path`, made of its frames (renumbered).
    Raises NotCopyable when the file or the bounds do not allow it."""
    end = offset + num_samples
    if offset % FLAC_BLOCK or (end % FLAC_BLOCK and end != total_samples) or not 0 < end <= total_samples:
        raise NotCopyable("unaligned", f"samples {offset}..{end} are not whole {FLAC_BLOCK}-sample frames")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size_bytes is not None and size != size_bytes:
                raise NotCopyable("changed", f"{size} bytes, the manifest says {size_bytes}: rerun resample")
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise NotCopyable("unreadable", str(exc)) from exc
    try:
        return _cut(_open_stream(data, sample_rate, bits, total_samples), offset, end)
    finally:
        with contextlib.suppress(BufferError):  # a view still held (a traceback's): unmapped when freed
            data.close()


def _cut(stream: _Stream, offset: int, end: int) -> bytes:
    data = stream.data
    k0, k1 = offset // FLAC_BLOCK, -(-end // FLAC_BLOCK)  # frames k0 .. k1 - 1
    found = _from_table(stream, k0, k1) if stream.seektable else None
    if found is not None:
        first, positions, tail = k0, *found
    else:
        base, first = (stream.audio_start, 0) if k0 == 0 else _probe(stream, k0 - 1)
        # Scan through the header of frame k1 + 1: a false header of k1 (the segment's end) would meet
        # the real one on the way.
        last = min(k1 + 1, stream.frames - 1)
        per_frame = (stream.size - stream.audio_start) / stream.frames
        positions, tail = _scan(stream, base, first, last, int(per_frame * (last - first + 2) * 1.25))
    positions.append(stream.size)  # the end of the file's last frame, if the segment reaches it
    info = bytearray(stream.streaminfo)
    info[4:10] = bytes(6)  # min/max frame size: unknown
    packed = int.from_bytes(info[10:18], "big")
    info[10:18] = ((packed >> 36 << 36) | (end - offset)).to_bytes(8, "big")
    info[18:34] = bytes(16)  # MD5 of the samples: unknown (allowed; verify decodes every member)
    head = b"fLaC\x80\x00\x00\x22" + bytes(info)
    starts = positions[k0 - first : k1 - first]
    ends = positions[k0 - first + 1 : k1 - first + 1]
    with memoryview(data) as mem:
        if k0 == 0:  # numbers unchanged: the frames as they are
            return b"".join([head, mem[starts[0] : ends[-1]]])
        final = stream.frames - 1
        table = _headers(stream.prefix, stream.extras, min(k1, final))
        olds, news = table[k0 : min(k1, final)], table[: min(k1, final) - k0]
        if k1 > final:  # the file's last frame, whose block size may differ from the others'
            assert tail is not None
            raw = data[starts[-1] : starts[-1] + tail.length]
            fresh = raw[:4] + _utf8(final - k0) + raw[4 + tail.utf8_length : -1]
            fresh += bytes([crc8(fresh)])
            olds, news = [*olds, (raw, crc16(raw))], [*news, (fresh, crc16(fresh))]
        lengths = [len(h) for h, _ in olds]
        at, stop = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        stored = np.array([int.from_bytes(mem[e - 2 : e], "big") for e in ends], dtype=np.uint32)
        delta = np.array([o ^ n for (_, o), (_, n) in zip(olds, news, strict=True)], dtype=np.uint32)
        gf = _gf16()
        fixed = stored ^ gf.multiply(delta, gf.power(stop - at - np.array(lengths) - 2))
        parts: list[bytes | memoryview] = [head] * (3 * len(starts) + 1)
        parts[1::3] = [h for h, _ in news]
        parts[2::3] = [mem[a + n : b - 2] for a, n, b in zip(starts, lengths, ends, strict=True)]
        parts[3::3] = [c.to_bytes(2, "big") for c in fixed.tolist()]
        out = b"".join(parts)
        del parts  # the slices of `mem` go before it is released
        return out
