"""A test-only generator of shard sets, written with the shard format's own writer (`mert_pipeline.shards`),
with audio whose labels are learnable: each clip is a sequence of held sine notes, and the teachers' codes
are the note's pitch and loudness, frame by frame (320 samples at 24 kHz, ceil(num_samples / 320) labels).

Teachers written: `rvq` (n_q 2, 8 classes: pitch index, pitch index % 4) and `kmeans` (n_q 1, 4 classes:
pitch index // 2). The benchmark uses `write_shards` too, for a synthetic shard set that needs no
pipeline run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from mert_pipeline.grid import HOP, SAMPLE_RATE, num_frames
from mert_pipeline.shards import (
    FORMAT,
    DeterministicTar,
    SegmentMeta,
    encode_flac,
    npy_bytes,
    segment_key,
    shard_name,
    sidecar_name,
    write_index,
    write_sample,
)

RATE = SAMPLE_RATE
PITCHES = 220.0 * 2 ** (np.arange(8) * 4 / 12)  # 8 notes a major third apart, 220 Hz .. 1108 Hz
LEVELS = np.array([0.08, 0.16, 0.25, 0.35])
TIMBRES = np.array([[1.0, 0.0, 0.0], [1.0, 0.7, 0.0], [1.0, 0.0, 0.7], [0.6, 0.6, 0.6]])
TEACHERS = {
    "rvq": {"kind": "test", "n_q": 2, "num_classes": 8, "config_hash": "test-rvq"},
    "kmeans": {"kind": "test", "n_q": 1, "num_classes": 4, "config_hash": "test-kmeans"},
}


def synth_clip(rng: np.random.Generator, num_samples: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """int16 audio and {teacher: int16 (n_q, ceil(num_samples / 320))} labels. Notes are held 12..30
    frames, each with a pitch (8), and a timbre (4 harmonic mixes) and loudness that no label names (a
    tiny model learns them too slowly for a short test run)."""
    frames = num_frames(num_samples)
    pitch, timbre, level = (np.empty(frames, np.int64) for _ in range(3))
    start = 0
    while start < frames:
        length = int(rng.integers(12, 31))
        pitch[start : start + length] = rng.integers(8)
        timbre[start : start + length] = rng.integers(4)
        level[start : start + length] = rng.integers(4)
        start += length
    per_sample = np.repeat(np.arange(frames), HOP)[:num_samples]
    phase = np.cumsum(2 * np.pi * PITCHES[pitch[per_sample]] / RATE)
    mix = TIMBRES[timbre[per_sample]]  # (num_samples, 3): weights of harmonics 1, 2, 3
    tone = sum(mix[:, h] * np.sin((h + 1) * phase) for h in range(3))
    wave = LEVELS[level[per_sample]] * tone + 0.01 * rng.standard_normal(num_samples)
    audio = np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)
    labels = {
        "rvq": np.stack([pitch, pitch % 4]).astype(np.int16),
        "kmeans": (pitch // 2)[None, :].astype(np.int16),
    }
    return audio, labels


def _flac(audio: np.ndarray) -> bytes:
    return encode_flac(audio, RATE, "PCM_16")


def write_shards(
    root: Path,
    *,
    train_shards: int = 2,
    valid_shards: int = 1,
    per_shard: int = 8,
    seconds: tuple[float, float] = (1.0, 2.0),
    short_clips: int = 1,
    sidecar_teacher: str | None = None,
    seed: int = 0,
) -> Path:
    """A shard set under `root` (index.json, train/, valid/), written by the shard format's own writer;
    `short_clips` clips per shard of 0.5 s (below any min_samples used here, so dropped); `sidecar_teacher`'s
    labels go into label-only sidecars."""
    rng = np.random.default_rng(seed)
    entries: dict[str, dict] = {}
    hashes = {t: f["config_hash"] for t, f in TEACHERS.items()}
    for split_index, (split, count) in enumerate((("train", train_shards), ("valid", valid_shards))):
        (root / split).mkdir(parents=True, exist_ok=True)
        for number in range(count):
            name = shard_name(split, number)
            side_name = sidecar_name(name, sidecar_teacher) if sidecar_teacher else None
            total = 0
            with contextlib.ExitStack() as stack:
                tar = DeterministicTar(stack.enter_context(open(root / name, "wb")))
                side = None
                if side_name is not None:
                    side = DeterministicTar(stack.enter_context(open(root / side_name, "wb")))
                for item in range(per_shard + short_clips):
                    short = item >= per_shard
                    low, high = (0.5, 0.5) if short else seconds
                    num_samples = int(rng.integers(int(low * RATE), int(high * RATE) + 1))
                    audio, labels = synth_clip(rng, num_samples)
                    file_id = f"{split_index:02x}{number:06x}{item:08x}"
                    meta = SegmentMeta(
                        key=segment_key(file_id, 0),
                        id=file_id,
                        relpath=f"{file_id[:2]}/{file_id}.flac",
                        split=split,
                        segment=0,
                        offset=0,
                        num_samples=num_samples,
                        source_num_samples=num_samples,
                        sample_rate=RATE,
                        label_rate=RATE / HOP,
                        hop=HOP,
                        frames=num_frames(num_samples, HOP),
                        teachers=hashes,
                    )
                    if side is not None and sidecar_teacher is not None:
                        side.add(f"{meta.key}.{sidecar_teacher}.npy", npy_bytes(labels.pop(sidecar_teacher)))
                    write_sample(tar, meta, _flac(audio), labels)
                    total += num_samples
                size, sha256 = tar.close()
                entries[name] = {
                    "split": split,
                    "samples": per_shard + short_clips,
                    "bytes": size,
                    "sha256": sha256,
                    "seconds": total / RATE,
                }
                if side is not None and side_name is not None:
                    side_size, side_sha = side.close()
                    entries[side_name] = {
                        "split": split,
                        "teacher": sidecar_teacher,
                        "base": name,
                        "base_sha256": sha256,
                        "bytes": side_size,
                        "sha256": side_sha,
                        "samples": per_shard + short_clips,
                        "seconds": total / RATE,
                    }
    index = {
        "format": FORMAT,
        "sample_rate": RATE,
        "hop": HOP,
        "label_rate": RATE / HOP,
        "teachers": {t: f for t, f in TEACHERS.items() if t != sidecar_teacher},
        "sidecars": {t: f for t, f in TEACHERS.items() if t == sidecar_teacher},
        "shards": entries,
    }
    write_index(root, index)
    return root
