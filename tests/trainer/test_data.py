"""The loader on real WebDataset tars: crops on the frame grid with labels that match the audio, fixed
batch sizes, short clips dropped, determinism, restart at a saved position, sidecars, and slots that
outnumber the shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from mert_pipeline.trainer.data import CropSpec, Loader, load_shard_index, valid_batches
from tests.trainer.shardgen import HOP, PITCHES, write_shards

SPEC = CropSpec(
    ("rvq", "kmeans"), batch_size=3, crop_samples=16000, min_samples=16000, shuffle_buffer=8, seed=5
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), train_shards=3, per_shard=6, seconds=(0.8, 1.5))


def take(loader: Loader, count: int) -> list[dict]:
    return list(itertools.islice(iter(loader), count))


def fundamental(frame: np.ndarray) -> int:
    """Index of the note whose pitch is nearest the lowest strong spectral peak of one frame."""
    spectrum = np.abs(np.fft.rfft(frame * np.hanning(len(frame)), 8192))
    inner = spectrum[1:-1]
    peaks = np.flatnonzero((inner > spectrum[:-2]) & (inner >= spectrum[2:]) & (inner > 0.5 * spectrum.max()))
    peak = (peaks[0] + 1) * 24000 / 8192
    return int(np.argmin(np.abs(np.log(PITCHES / peak))))


def test_batches_crops_and_label_alignment(shards: Path) -> None:
    index = load_shard_index(shards)
    assert index.teachers == {"rvq": (2, 8), "kmeans": (1, 4)} and index.samples("train") == 21
    batches = take(Loader(index, SPEC, rank=0, world=1, workers=2), 6)
    for batch in batches:
        audio, rvq, km = batch["audio"], batch["labels"]["rvq"], batch["labels"]["kmeans"]
        assert audio.shape[0] == 3 and audio.shape[1] % HOP == 0 and 16000 - HOP < audio.shape[1] <= 16000
        assert rvq.shape == (3, 2, audio.shape[1] // HOP) and km.shape == (3, 1, audio.shape[1] // HOP)
        assert rvq.dtype == torch.int16
        assert torch.equal(km[:, 0], rvq[:, 0] // 2)
        for row in range(3):  # the label of frame t is the note sounding in samples [320 t, 320 t + 320)
            frames = audio[row].numpy().reshape(-1, HOP)
            for t in range(2, frames.shape[0] - 2, 7):
                if rvq[row, 0, t - 1] == rvq[row, 0, t] == rvq[row, 0, t + 1]:  # not at a note change
                    assert fundamental(frames[t]) == int(rvq[row, 0, t])


def test_deterministic_and_restartable(shards: Path) -> None:
    index = load_shard_index(shards)
    first = take(Loader(index, SPEC, rank=1, world=2, workers=2, epoch_batches=4), 10)
    again = take(Loader(index, SPEC, rank=1, world=2, workers=2, epoch_batches=4), 10)
    position = {"epoch": 1, "batch": 1, "world": 2, "workers": 2}  # batch 5 of the run is epoch 1, batch 1
    resumed = take(Loader(index, SPEC, rank=1, world=2, workers=2, epoch_batches=4, position=position), 5)
    for a, b in zip(first + first[5:], again + resumed, strict=True):
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["labels"]["rvq"], b["labels"]["rvq"])
    other_rank = take(Loader(index, SPEC, rank=0, world=2, workers=2, epoch_batches=4), 1)
    assert not torch.equal(other_rank[0]["audio"], first[0]["audio"])
    with pytest.raises(ValueError, match="same"):
        Loader(index, SPEC, rank=1, world=2, workers=3, position=position)


def test_more_slots_than_shards_every_rank_gets_its_epoch(tmp_path: Path) -> None:
    index = load_shard_index(write_shards(tmp_path, train_shards=1, per_shard=4))
    for rank in range(2):  # 2 ranks x 3 workers = 6 slots on 1 shard: every slot resamples it
        loader = Loader(index, SPEC, rank=rank, world=2, workers=3, epoch_batches=5)
        batches = take(loader, 7)
        assert len(batches) == 7 and loader.position["epoch"] == 1 and loader.position["batch"] == 2


def test_sidecar_labels_equal_in_shard_labels(tmp_path: Path) -> None:
    plain = load_shard_index(write_shards(tmp_path / "a", train_shards=1, per_shard=4, seed=3))
    side = load_shard_index(
        write_shards(tmp_path / "b", train_shards=1, per_shard=4, seed=3, sidecar_teacher="kmeans")
    )
    assert side.sidecars == {
        "train/shard-000000.tar": {"kmeans": "train/shard-000000.kmeans.tar"},
        "valid/shard-000000.tar": {"kmeans": "valid/shard-000000.kmeans.tar"},
    }
    for a, b in zip(
        take(Loader(plain, SPEC, rank=0, world=1, workers=0), 3),
        take(Loader(side, SPEC, rank=0, world=1, workers=0), 3),
        strict=True,
    ):
        assert torch.equal(a["labels"]["kmeans"], b["labels"]["kmeans"])
        assert torch.equal(a["audio"], b["audio"])


def test_valid_batches_are_fixed_and_short_clips_dropped(shards: Path) -> None:
    index = load_shard_index(shards)
    spec = CropSpec(("rvq",), batch_size=2, crop_samples=16000, min_samples=16000)
    first, second = list(valid_batches(index, spec, 0, 2, 10)), list(valid_batches(index, spec, 0, 2, 10))
    # one valid shard, 2 ranks: rank 0 takes samples 0, 2, 4 (3 long clips; the 0.5 s clip 6 is dropped)
    assert len(first) == 1
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(first, second, strict=True))
    other = list(valid_batches(index, spec, 1, 2, 10))  # samples 1, 3, 5: another batch
    assert len(other) == 1 and not torch.equal(other[0]["audio"], first[0]["audio"])
    assert len(list(valid_batches(index, spec, 0, 1, 10))) == 3  # alone, a rank reads all 6
    with pytest.raises(ValueError, match="no train clip"):
        strict = CropSpec(("rvq",), batch_size=2, crop_samples=16000, min_samples=10**7)
        take(Loader(index, strict, rank=0, world=1, workers=0), 1)
