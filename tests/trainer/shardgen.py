"""A test-only writer of shard sets in the shard stage's format (webdataset.TarWriter), with audio whose
labels are learnable: each clip is a sequence of held sine notes, and the teachers' codes are the note's
pitch and loudness, frame by frame (frame = 320 samples at 24 kHz, labels ceil(num_samples / 320)).

Teachers written: `rvq` (n_q 2, 8 classes: pitch index, pitch index % 4) and `kmeans` (n_q 1, 4 classes:
pitch index // 2). The benchmark uses `write_shards` too, for a synthetic shard set that needs no
pipeline run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds

RATE, HOP = 24000, 320
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
    frames = -(-num_samples // HOP)
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
    buffer = io.BytesIO()
    sf.write(buffer, audio, RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


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
    """A shard set under `root` (index.json, train/, valid/); `short_clips` clips per shard of 0.5 s (below
    any min_samples used here, so dropped); `sidecar_teacher`'s labels go into label-only sidecars."""
    rng = np.random.default_rng(seed)
    entries: dict[str, dict] = {}
    for split, count in (("train", train_shards), ("valid", valid_shards)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for number in range(count):
            name = f"{split}/shard-{number:06d}.tar"
            side_name = f"{split}/shard-{number:06d}.{sidecar_teacher}.tar"
            total = 0
            with contextlib.ExitStack() as stack:
                tar = stack.enter_context(wds.TarWriter(str(root / name)))
                side = stack.enter_context(wds.TarWriter(str(root / side_name))) if sidecar_teacher else None
                for item in range(per_shard + short_clips):
                    short = item >= per_shard
                    low, high = (0.5, 0.5) if short else seconds
                    num_samples = int(rng.integers(int(low * RATE), int(high * RATE) + 1))
                    audio, labels = synth_clip(rng, num_samples)
                    key = f"{split}{number:03d}clip{item:04d}_0000"
                    meta = {
                        "key": key,
                        "id": key,
                        "offset": 0,
                        "num_samples": num_samples,
                        "sample_rate": RATE,
                        "label_rate": RATE / HOP,
                        "hop": HOP,
                        "teachers": {t: f["config_hash"] for t, f in TEACHERS.items()},
                    }
                    sample = {"__key__": key, "flac": _flac(audio), "json": json.dumps(meta).encode()}
                    for teacher, codes in labels.items():
                        if side is not None and teacher == sidecar_teacher:
                            side.write({"__key__": key, f"{teacher}.npy": _npy(codes)})
                        else:
                            sample[f"{teacher}.npy"] = _npy(codes)
                    tar.write(sample)
                    total += num_samples
            data = (root / name).read_bytes()
            entries[name] = {
                "split": split,
                "samples": per_shard + short_clips,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "seconds": total / RATE,
            }
            if sidecar_teacher:
                side_data = (root / side_name).read_bytes()
                entries[side_name] = {
                    "split": split,
                    "teacher": sidecar_teacher,
                    "base": name,
                    "base_sha256": entries[name]["sha256"],
                    "bytes": len(side_data),
                    "sha256": hashlib.sha256(side_data).hexdigest(),
                    "samples": per_shard,
                }
    in_shards = {t: f for t, f in TEACHERS.items() if t != sidecar_teacher}
    index = {
        "format": "mert-pipeline-shards/1",
        "sample_rate": RATE,
        "hop": HOP,
        "label_rate": RATE / HOP,
        "teachers": in_shards,
        "sidecars": {t: f for t, f in TEACHERS.items() if t == sidecar_teacher},
        "shards": entries,
    }
    (root / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return root
