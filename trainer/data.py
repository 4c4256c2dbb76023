"""Batches of random crops with their teacher labels, read from the shard set (`SHARDS/index.json`).

Each sample of a shard is one segment: `KEY.flac` (24 kHz mono), `KEY.json` (num_samples, ...) and one
`KEY.<teacher>.npy` per teacher (int16 (n_q, ceil(num_samples / 320))), or the labels in a label-only
sidecar `shard-NNNNNN.<teacher>.tar` read in step with its audio shard. The shard format's own reader
(`mert_pipeline.shards.load_index`, `read_samples`) does the reading; this module crops and batches.

Reading: the train shards are dealt to the world's `ranks x workers` slots every epoch (a fresh seeded
permutation); a slot cycles its own shards, or, when there are fewer shards than slots, all of them in
its own order (resampled), so a slot never runs dry. Each slot shuffles samples in a buffer, drops clips
under `min_samples`, picks a random crop start on a multiple of 320 samples (so labels slice exactly)
and makes fixed-size batches cut to the batch's shortest crop. An epoch is a fixed number of batches
per rank (`epoch_batches`, by default the split's samples / (world x batch size)), the same on every
rank, so no rank waits on another at the end of an epoch.

Determinism and resume: everything a slot does follows one numpy generator seeded by (seed, epoch,
rank, slot), and only needs each sample's json, so a loader restarted at (epoch, batch) replays the
same choices without decoding the batches it skips. DataLoader hands out worker batches round robin;
the physical worker w plays slot (w + batch) % workers so batch `batch` comes next after a restart.
"""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mert_pipeline.grid import num_frames
from mert_pipeline.shards import SegmentMeta, ShardError, ShardIndex, load_index, read_samples

__all__ = ["CropBatches", "CropSpec", "Loader", "ShardIndex", "load_shard_index", "valid_batches"]
load_shard_index = load_index  # the trainer's name for the shard format's index reader


@dataclass
class CropSpec:
    """What the loader makes: `batch_size` crops of at most `crop_samples`, from clips of at least
    `min_samples`, with the labels of `teachers`."""

    teachers: tuple[str, ...]
    batch_size: int
    crop_samples: int
    min_samples: int
    shuffle_buffer: int = 1000
    seed: int = 0
    max_bad_fraction: float = 0.001  # samples a damaged shard set may lose before the run stops


class CropBatches(IterableDataset):
    """Batches `start .. count-1` of one rank's epoch (see the module docstring). `train=False` reads
    the rank's share of the shards once, in order, with crops at offset 0 (validation)."""

    def __init__(
        self,
        index: ShardIndex,
        split: str,
        spec: CropSpec,
        *,
        epoch: int,
        rank: int,
        world: int,
        workers: int,
        start: int,
        count: int,
        train: bool = True,
    ) -> None:
        self.index, self.split, self.spec, self.train = index, split, spec, train
        self.epoch, self.rank, self.world, self.workers = epoch, rank, world, max(1, workers)
        self.start, self.count = start, count
        self.seen, self.bad = 0, 0  # samples read and skipped by this worker

    def _shards(self, rng: np.random.Generator, slot: int, slots: int) -> Iterator[str]:
        names = [name for name, _ in self.index.shards.get(self.split, [])]
        if not names:
            raise ValueError(f"{self.index.root}: no {self.split} shards in index.json")
        if not self.train:
            yield from names[slot::slots] if len(names) >= slots else names
            return
        dealt = np.random.default_rng([self.spec.seed, self.epoch]).permutation(len(names))
        mine = [names[i] for i in (dealt[slot::slots] if len(names) >= slots else dealt)]
        while True:  # cycle (resample) so the slot always has data
            for i in rng.permutation(len(mine)):
                yield mine[i]

    def _shuffled(self, rng: np.random.Generator, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        size = self.spec.shuffle_buffer if self.train else 1
        barren, limit = 0, 2 * len(self.index.shards[self.split]) + 1
        shared = len(self.index.shards[self.split]) < slots
        for shard in self._shards(rng, slot, slots):
            barren += 1
            if barren > limit:  # cycling shards that hold no usable clip would never yield a batch
                if self.bad:
                    raise self._damaged("and no usable clip in the others")
                raise ValueError(f"no {self.split} clip of at least {self.spec.min_samples} samples")
            for number, sample in enumerate(self._read(shard)):
                if not self.train and shared and number % slots != slot:
                    continue  # validation on fewer shards than ranks: split the samples instead
                try:
                    meta = SegmentMeta.from_bytes(sample.get("json", b""))
                    missing = [t for t in self.spec.teachers if f"{t}.npy" not in sample]
                    if missing or "flac" not in sample:
                        raise ShardError(
                            f"no {'flac' if 'flac' not in sample else missing[0] + '.npy'} member"
                        )
                except ShardError as exc:
                    self._bad(f"{shard}: {sample['__key__']}: {exc}")
                    continue
                if meta.num_samples < self.spec.min_samples:
                    continue  # clips under min_samples (3 s) are dropped
                barren = 0
                sample["num_samples"] = meta.num_samples
                buffer.append(sample)
                if len(buffer) >= size:
                    yield buffer.pop(int(rng.integers(len(buffer))) if self.train else 0)
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))) if self.train else 0)

    def _read(self, shard: str) -> Iterator[dict[str, Any]]:
        """The shard's samples; a damaged shard (a member the format refuses, a truncated tar) ends
        where the damage starts, counted as one bad sample, and the loader goes on with the next."""
        try:
            for sample in read_samples(self.index, shard, self.spec.teachers):
                self.seen += 1
                yield sample
        except (ShardError, tarfile.TarError, OSError, EOFError) as exc:
            self._bad(f"{shard}: {' '.join(str(exc).split())}")

    def _bad(self, what: str) -> None:
        """Skip a bad sample, say so, and stop the run once more than max_bad_fraction of samples are bad."""
        self.bad += 1
        print(f"[data] skipped {what} ({self.bad} bad of {self.seen} read)", file=sys.stderr, flush=True)
        if self.bad > max(10, self.spec.max_bad_fraction * self.seen):
            raise self._damaged(f"more than {self.spec.max_bad_fraction:.1%}")

    def _damaged(self, why: str) -> ValueError:
        return ValueError(
            f"{self.bad} bad samples of {self.seen} read in {self.index.root}, {why}: the shard set is "
            f"damaged; run `mert-pipe verify {self.index.root}`"
        )

    def _plans(
        self, rng: np.random.Generator, slot: int, slots: int
    ) -> Iterator[list[tuple[dict, int, int]]]:
        """Lists of (sample, offset, length), all of the batch's shortest length (multiple of the hop)."""
        hop, batch = self.index.hop, []
        for sample in self._shuffled(rng, slot, slots):
            usable = sample["num_samples"] // hop * hop
            crop = min(self.spec.crop_samples // hop * hop, usable)
            offset = hop * int(rng.integers((usable - crop) // hop + 1)) if self.train else 0
            batch.append((sample, offset, crop))
            if len(batch) == self.spec.batch_size:
                length = min(c for _, _, c in batch)
                yield [(s, o, length) for s, o, _ in batch]
                batch = []

    def _decode(self, plan: list[tuple[dict, int, int]]) -> dict[str, Any]:
        hop = self.index.hop
        audio = np.empty((len(plan), plan[0][2]), dtype=np.float32)
        labels: dict[str, list[np.ndarray]] = {t: [] for t in self.spec.teachers}
        for row, (sample, offset, length) in enumerate(plan):
            data, rate = sf.read(
                io.BytesIO(sample["flac"]), frames=length, start=offset, dtype="float32", always_2d=True
            )
            if rate != self.index.sample_rate or data.shape != (length, 1):
                raise ValueError(f"{sample['__key__']}: flac {rate} Hz {data.shape}, expected ({length}, 1)")
            audio[row] = data[:, 0]
            frames = num_frames(sample["num_samples"], hop)
            for teacher in self.spec.teachers:
                codes = np.load(io.BytesIO(sample[f"{teacher}.npy"]), allow_pickle=False)
                if codes.shape[1] != frames:
                    raise ValueError(
                        f"{sample['__key__']}.{teacher}.npy: {codes.shape[1]} frames, not {frames}"
                    )
                labels[teacher].append(codes[:, offset // hop : (offset + length) // hop])
        return {
            "audio": torch.from_numpy(audio),
            "labels": {t: torch.from_numpy(np.stack(v).astype(np.int16)) for t, v in labels.items()},
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        slot = (physical + self.start) % self.workers
        mine = range(slot, self.count, self.workers)  # the epoch's batch numbers this slot makes
        skip = len(range(slot, min(self.start, self.count), self.workers))
        rng = np.random.default_rng([self.spec.seed, self.epoch, self.rank, slot])
        plans = self._plans(rng, self.rank * self.workers + slot, self.world * self.workers)
        for number, plan in zip(range(len(mine)), plans, strict=False):  # stops at the epoch's length
            if number >= skip:
                yield self._decode(plan)


class Loader:
    """Endless training batches for one rank; `position` (epoch, batch) is what a checkpoint saves."""

    def __init__(
        self,
        index: ShardIndex,
        spec: CropSpec,
        *,
        rank: int,
        world: int,
        workers: int,
        epoch_batches: int = 0,
        position: dict[str, int] | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.index, self.spec, self.rank, self.world, self.workers = index, spec, rank, world, workers
        self.pin_memory = pin_memory
        self.epoch_batches = epoch_batches or max(1, index.samples("train") // (world * spec.batch_size))
        position = position or {}
        if position and (position.get("world"), position.get("workers")) != (world, workers):
            raise ValueError(
                f"the checkpoint's data position is for world {position.get('world')} x workers "
                f"{position.get('workers')}; resume with the same (now {world} x {workers})"
            )
        self.epoch, self.batch = int(position.get("epoch", 0)), int(position.get("batch", 0))

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "world": self.world, "workers": self.workers}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            dataset = CropBatches(
                self.index,
                "train",
                self.spec,
                epoch=self.epoch,
                rank=self.rank,
                world=self.world,
                workers=self.workers,
                start=self.batch,
                count=self.epoch_batches,
            )
            loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                prefetch_factor=4 if self.workers else None,
                # its own generator: starting workers must not draw from the global torch RNG, which
                # the trainer reseeds per step (a restart would shift that step's masks)
                generator=torch.Generator().manual_seed(self.spec.seed),
            )
            for batch in loader:
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0


def valid_batches(index: ShardIndex, spec: CropSpec, rank: int, world: int, count: int) -> Iterator[dict]:
    """Up to `count` validation batches of this rank's share of the valid shards (crops from offset 0)."""
    if not index.shards.get("valid"):
        return iter(())
    dataset = CropBatches(
        index, "valid", spec, epoch=0, rank=rank, world=world, workers=1, start=0, count=count, train=False
    )
    return iter(dataset)
