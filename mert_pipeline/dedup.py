"""Near-duplicate recordings: Chromaprint fingerprints, the hash index that finds candidate pairs, the
alignment that verifies them, and the rule that keeps one file of each group.

The same recording reaches a corpus many times (album and compilation, FLAC and MP3, a radio edit cut from
the album version). `mert_pipeline.stages.dedup` runs these functions as tasks; this module owns the
decisions:

- **Fingerprint** (`fingerprint_file`): Chromaprint's raw fingerprint of the resampled mono file, one
  32-bit sub-fingerprint ("item") per 0.124 s, 32 KB an hour. Robust to lossy codecs, sample rate, channels,
  gain and added or trimmed silence (those move the grid by a fraction of an item: a few bits differ).
- **Index keys** (`index_keys`): the items whose hash is 0 modulo `sample_mod`, a content-defined sample:
  a crop or a shifted copy samples the same items, so copies share keys wherever their items are equal.
  Items of silence and of steady runs say nothing about the recording and are left out.
- **Candidates**: two files sharing at least `min_shared` keys. Keys held by more than `max_df` files
  (generic sounds) are stop keys.
- **Verification** (`match`): the offsets at which the two fingerprints' items agree, then each item's bit
  error rate at those offsets. Copies differ in 0-8% of bits, different recordings in about 50%. The
  shorter file is a duplicate when at least `min_coverage` of its informative items match the longer one
  (at one offset, or at several: an edit spliced from the album version).
- **Keep rule** (`keep_order`): per group, the longest file, then lossless over lossy, then the higher
  source sample rate, then the smallest id. Files on the user's keep list are always kept.

Not robust to: a speed or pitch change (a remaster at another speed, tape transfers); the items of a 2%
faster copy differ in 30-40% of bits, short of a match. Covers, remixes and other takes are different
recordings and stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from mert_pipeline import chromaprint

BUCKETS = 256  # hash buckets of the index: the candidate search's partitions are ranges of these
BLOCK_FRAMES = 1 << 18  # audio fed to Chromaprint per block (about 11 s at 24 kHz)
LOSSLESS_SUBTYPES = ("PCM_", "FLOAT", "DOUBLE", "ALAC_", "DPCM_", "DWVW_")


@dataclass(frozen=True)
class DedupSettings:
    """What decides which files are duplicates; recorded with the results (`dedup.json`)."""

    sample_mod: int = 4  # index keys: items whose hash is 0 mod this (1 in 4)
    min_shared: int = 2  # keys two files share before they are compared
    max_df: int = 100  # a key held by more files is a stop key (generic sound), not a candidate source
    max_error: float = 0.2  # an item matches when its window's bit error rate is under this (benchmark)
    window: int = 8  # items (1 s) over which the bit error rate is smoothed
    min_coverage: float = 0.8  # fraction of the shorter file's informative items that must match
    min_overlap_seconds: float = 5.0  # and at least this much audio

    def __post_init__(self) -> None:
        if self.sample_mod < 1 or self.min_shared < 1 or self.max_df < 2 or self.window < 1:
            raise ValueError("dedup: sample_mod, min_shared and window must be >= 1 and max_df >= 2")
        if not 0 < self.max_error < 0.5:
            raise ValueError(f"dedup: max_error is a bit error rate in (0, 0.5), got {self.max_error}")
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"dedup: min_coverage is a fraction in (0, 1], got {self.min_coverage}")
        if self.min_overlap_seconds < 0:
            raise ValueError("dedup: min_overlap_seconds must be >= 0")


def fingerprint_file(path: str) -> tuple[np.ndarray, float]:
    """A resampled file's raw fingerprint (uint32 items) and its seconds, read in blocks (bounded memory)."""
    import soundfile as sf

    with sf.SoundFile(path) as handle:
        printer = chromaprint.Fingerprinter(handle.samplerate, handle.channels)
        frames = 0
        for block in handle.blocks(BLOCK_FRAMES, dtype="int16", always_2d=True):
            printer.feed(block)
            frames += len(block)
        return printer.finish(), frames / handle.samplerate


def mix32(values: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (the murmur3 finaliser): spreads Chromaprint's structured items evenly."""
    x = values.astype(np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    return x


@lru_cache(maxsize=1)
def silence_items() -> np.ndarray:
    """The items Chromaprint gives digital silence (and near-silence): never evidence of a match."""
    quiet = np.zeros(11025 * 12, np.int16)
    quiet[::7] = 1  # dither-level noise fingerprints like silence, or nearly
    values = [
        chromaprint.fingerprint(np.zeros(11025 * 12, np.int16), 11025),
        chromaprint.fingerprint(quiet, 11025),
    ]
    return np.unique(np.concatenate(values)).astype(np.uint32)


def informative(fp: np.ndarray) -> np.ndarray:
    """A mask of the items that identify a recording: not silence, not inside a run of 4 or more equal items
    (a held note or a digital pad gives the same item for seconds in any recording)."""
    mask = ~np.isin(fp, silence_items())
    if len(fp) >= 4:
        same = fp[1:] == fp[:-1]
        run = np.zeros(len(fp), bool)
        triple = same[:-2] & same[1:-1] & same[2:]  # items i..i+3 equal
        for k in range(4):
            run[k : k + len(triple)] |= triple
        mask &= ~run
    return mask


def index_keys(fp: np.ndarray, sample_mod: int) -> np.ndarray:
    """The file's index keys: its distinct informative items whose hash is 0 mod `sample_mod`, sorted."""
    items = fp[informative(fp)]
    if sample_mod > 1:
        items = items[mix32(items) % np.uint64(sample_mod) == 0]
    return np.unique(items).astype(np.uint32)


def bucket_of(keys: np.ndarray) -> np.ndarray:
    """A key's bucket (of `BUCKETS`), from hash bits that the sampling does not use."""
    return (mix32(keys) >> np.uint64(24)).astype(np.int64) % BUCKETS


@dataclass(frozen=True)
class Match:
    """How a shorter fingerprint `a` sits in a longer `b`."""

    coverage: float  # fraction of a's informative items matched in b
    overlap_seconds: float  # audio of a matched
    score: float  # 1 - the bit error rate over the matched items (1.0: identical items)
    offset_seconds: float  # where a starts in b, at the offset that matches the most items

    def is_duplicate(self, settings: DedupSettings) -> bool:
        return self.coverage >= settings.min_coverage and self.overlap_seconds >= settings.min_overlap_seconds


NO_MATCH = Match(0.0, 0.0, 0.0, 0.0)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _bit_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Differing bits of each pair of items, 0..32."""
    return _POPCOUNT[(x ^ y).view(np.uint8)].reshape(-1, 4).sum(axis=1)


def _offsets(a: np.ndarray, b: np.ndarray, mask: np.ndarray, top: int) -> list[int]:
    """The `top` offsets d (b[i + d] vs a[i]) at which the most informative items of a are equal in b."""
    positions = np.flatnonzero(mask)
    values = a[positions]
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    left = np.searchsorted(sorted_b, values, side="left")
    right = np.searchsorted(sorted_b, values, side="right")
    count = right - left
    keep = (count > 0) & (count <= 8)  # an item repeated all over b places a nowhere in particular
    if not keep.any():
        return []
    reps = count[keep]
    starts = np.repeat(left[keep], reps) + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    deltas = order[starts] - np.repeat(positions[keep], reps)
    shift = len(a)
    votes = np.bincount(deltas + shift)
    # a grid shift of a fraction of an item makes neighbouring offsets agree too: pool them
    pooled = votes + np.concatenate([[0], votes[:-1]]) + np.concatenate([votes[1:], [0]])
    chosen: list[int] = []
    for index in np.argsort(-pooled, kind="stable"):
        if pooled[index] < 2 or len(chosen) == top:
            break
        delta = int(index) - shift
        if all(abs(delta - other) > 2 for other in chosen):
            chosen.append(delta)
    return chosen


def match(a: np.ndarray, b: np.ndarray, settings: DedupSettings, top: int = 4) -> Match:
    """How much of fingerprint `a` (the shorter) is found in `b`: at each of the offsets where most items
    agree, the bit error rate item by item, smoothed over `window` items; an item matches where that rate
    is under `max_error` at any of the offsets (so an edit spliced from several parts of b matches too)."""
    mask = informative(a)
    useful = int(mask.sum())
    if useful == 0 or len(b) == 0:
        return NO_MATCH
    best_error = np.full(len(a), 1.0)
    best_matched = -1
    best_delta = 0
    kernel = np.ones(settings.window) / settings.window
    for delta in _offsets(a, b, mask, top):
        lo, hi = max(0, -delta), min(len(a), len(b) - delta)
        if hi - lo < 1:
            continue
        errors = np.full(len(a), 1.0)
        errors[lo:hi] = _bit_errors(a[lo:hi], b[lo + delta : hi + delta]) / 32.0
        smooth = np.convolve(errors, kernel, mode="same") if len(a) >= settings.window else errors
        smooth = np.where(np.isfinite(smooth), smooth, 1.0)
        matched = int(((smooth < settings.max_error) & mask).sum())
        if matched > best_matched:
            best_matched, best_delta = matched, delta
        better = smooth < best_error
        best_error = np.where(better, smooth, best_error)
    hit = (best_error < settings.max_error) & mask
    matched = int(hit.sum())
    if matched == 0:
        return NO_MATCH
    seconds = chromaprint.item_seconds()
    return Match(
        coverage=matched / useful,
        overlap_seconds=matched * seconds,
        score=float(1.0 - best_error[hit].mean()),
        offset_seconds=best_delta * seconds,
    )


def compare(fp_x: np.ndarray, fp_y: np.ndarray, settings: DedupSettings) -> Match:
    """`match` with the shorter fingerprint first (containment is of the shorter in the longer)."""
    return match(fp_x, fp_y, settings) if len(fp_x) <= len(fp_y) else match(fp_y, fp_x, settings)


def is_lossless(subtype: str) -> bool:
    """Whether a source's libsndfile subtype keeps every sample (PCM, float, ALAC), unlike MP3 or Vorbis."""
    return subtype.upper().startswith(LOSSLESS_SUBTYPES)


def keep_order(row: dict[str, Any]) -> tuple:
    """The keep rule's sort key (smallest is kept): longest, lossless, higher source rate, smallest id."""
    return (
        -round(float(row["duration"]), 3),
        not row["lossless"],
        -int(row["source_sampling_rate"]),
        row["id"],
    )


def choose_kept(members: list[dict[str, Any]], keep: set[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One group's kept file (the best of the user's keep list if any is in it, else the keep rule's
    first) and the members dropped (every member not kept and not on the keep list)."""
    listed = [m for m in members if m["id"] in keep]
    kept = min(listed or members, key=keep_order)
    return kept, sorted((m for m in members if m["id"] != kept["id"] and m["id"] not in keep), key=keep_order)


class UnionFind:
    """Groups of ids joined by verified pairs."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)

    def groups(self) -> list[list[str]]:
        found: dict[str, list[str]] = {}
        for item in sorted(self.parent):
            found.setdefault(self.find(item), []).append(item)
        return sorted(found.values())


def candidate_pairs(keys: np.ndarray, files: np.ndarray, max_df: int) -> np.ndarray:
    """Every pair of files (uint64 numbers, a < b) that hold one key, once per key they share, from one
    partition's postings; keys held by more than `max_df` files are skipped. Returns (n, 2) uint64."""
    if len(keys) == 0:
        return np.zeros((0, 2), np.uint64)
    order = np.lexsort((files, keys))
    keys, files = keys[order], files[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(keys)]]))
    pairs: list[np.ndarray] = []
    for size in np.unique(sizes):
        if size < 2 or size > max_df:
            continue
        group = files[starts[sizes == size][:, None] + np.arange(size)]  # (groups, size), sorted rows
        i, j = np.triu_indices(int(size), 1)
        pairs.append(np.stack([group[:, i].ravel(), group[:, j].ravel()], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)


def count_pairs(pairs: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs and how many keys each shares, over several partitions' candidate pairs."""
    stacked = [p for p in pairs if len(p)]
    if not stacked:
        return np.zeros((0, 2), np.uint64), np.zeros(0, np.int64)
    unique, counts = np.unique(np.concatenate(stacked), axis=0, return_counts=True)
    return unique, counts
