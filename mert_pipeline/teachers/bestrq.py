"""The BEST-RQ teacher: a frozen random projection of normalised log-mel frames, quantized to the nearest
entry of a random codebook (Chiu et al., 2022; MusicFM's teacher).

`BestRQ` is the quantizer (regenerated from a seed and the train set's log-mel mean/std, saved as an `.npz`
named by its hash); `BestRQTeacher` is what `tokenize --teacher bestrq` runs. The statistics come from the
features stage run with log-mel features and nothing stored (`stages.features.log_mel_stats_config`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mert_pipeline.devices import set_threads
from mert_pipeline.fs import atomic_path
from mert_pipeline.grid import HOP, SAMPLE_RATE
from mert_pipeline.manifests.records import Reject
from mert_pipeline.teachers import FileToLabel, label_frames
from mert_pipeline.teachers.features import LogMel, RunningStats

FILES_PER_TASK = 16  # files of a tokenize task: log-mel is hundreds of times real time
_QUANTIZERS: dict[tuple, Any] = {}  # per process: (kind, quantizer hash) -> (extractor, quantizer)


@dataclass
class BestRQ:
    """BEST-RQ random-projection quantizer: frozen projection and codebooks regenerated from (seed, stats).

    Frames are normalised with the dataset mean/std, projected by a Xavier-normal matrix to `proj_dim`, and
    labelled with the nearest l2-normalised codebook entry to the l2-normalised projection. For unit vectors
    ``|p - c|^2 = 2 - 2 p.c``, and scaling p by a positive number does not change which entry has the largest
    dot product, so the label is ``argmax(p @ c.T)`` without normalising p. With several codebooks each one
    has its own projection and codebook (independent targets); labels are then (num_codebooks, frames).

    The random matrices come from ``numpy.random.default_rng(SeedSequence([seed, codebook]))``. `save` stores
    a digest of them and `load` refuses a file whose matrices this numpy would regenerate differently.
    """

    stats: RunningStats
    seed: int = 0
    proj_dim: int = 16
    codebook_size: int = 4096
    num_codebooks: int = 1
    std_floor: float = 1e-5
    projections: np.ndarray = field(init=False, repr=False)  # (num_codebooks, input_dim, proj_dim)
    codebooks: np.ndarray = field(init=False, repr=False)  # (num_codebooks, codebook_size, proj_dim)

    _VERSION = 1
    _CHUNK = 4096

    def __post_init__(self) -> None:
        if not 2 <= self.codebook_size <= 32768:
            raise ValueError(
                f"codebook_size must be in [2, 32768] for int16 labels, got {self.codebook_size}"
            )
        if self.num_codebooks < 1 or self.proj_dim < 1:
            raise ValueError("num_codebooks and proj_dim must be >= 1")
        d, p = self.input_dim, self.proj_dim
        projections, codebooks = [], []
        for book in range(self.num_codebooks):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, book]))
            projections.append(rng.standard_normal((d, p)) * math.sqrt(2.0 / (d + p)))  # Xavier normal
            entries = rng.standard_normal((self.codebook_size, p))
            codebooks.append(entries / np.linalg.norm(entries, axis=1, keepdims=True))
        self.projections = np.stack(projections).astype(np.float32)
        self.codebooks = np.stack(codebooks).astype(np.float32)
        self._mean = self.stats.mean.astype(np.float32)
        self._inv_std = (1.0 / np.maximum(self.stats.std, self.std_floor)).astype(np.float32)

    @property
    def input_dim(self) -> int:
        return self.stats.dim

    def config(self) -> dict[str, Any]:
        return {
            "kind": "best-rq",
            "version": self._VERSION,
            "seed": self.seed,
            "input_dim": self.input_dim,
            "proj_dim": self.proj_dim,
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "std_floor": self.std_floor,
        }

    @property
    def config_hash(self) -> str:
        """16 hex digits naming the labelling function: settings plus the exact mean and std used."""
        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        digest.update(self.stats.mean.tobytes())
        digest.update(self.stats.std.tobytes())
        return digest.hexdigest()[:16]

    def _matrices_digest(self) -> str:
        return hashlib.sha256(self.projections.tobytes() + self.codebooks.tobytes()).hexdigest()[:16]

    def labels(self, features: np.ndarray) -> np.ndarray:
        """int16 labels: (frames,) with one codebook, (num_codebooks, frames) with several."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(f"expected features shaped (T, {self.input_dim}), got {features.shape}")
        out = np.empty((self.num_codebooks, len(features)), dtype=np.int16)
        for start in range(0, len(features), self._CHUNK):
            x = (features[start : start + self._CHUNK] - self._mean) * self._inv_std
            for book in range(self.num_codebooks):
                scores = (x @ self.projections[book]) @ self.codebooks[book].T
                out[book, start : start + len(x)] = scores.argmax(axis=1)
        return out[0] if self.num_codebooks == 1 else out

    def save(self, path: Path | str) -> None:
        config = self.config()
        with open(path, "wb") as handle:
            np.savez(
                handle,
                config=np.array(json.dumps(config, sort_keys=True)),
                count=np.int64(self.stats.count),
                mean=self.stats._mean,
                m2=self.stats._m2,
                config_hash=np.array(self.config_hash),
                matrices_digest=np.array(self._matrices_digest()),
            )

    @classmethod
    def load(cls, path: Path | str) -> BestRQ:
        stats = RunningStats.load(path)  # the quantizer's file holds RunningStats.save's fields
        with np.load(path) as data:
            config = json.loads(str(data["config"]))
            saved_hash, saved_digest = str(data["config_hash"]), str(data["matrices_digest"])
        if config.get("kind") != "best-rq" or config.get("version") != cls._VERSION:
            raise ValueError(f"{path}: not a version-{cls._VERSION} BEST-RQ file: {config}")
        quantizer = cls(
            stats=stats,
            seed=config["seed"],
            proj_dim=config["proj_dim"],
            codebook_size=config["codebook_size"],
            num_codebooks=config["num_codebooks"],
            std_floor=config["std_floor"],
        )
        if quantizer.config_hash != saved_hash:
            raise ValueError(f"{path}: config hash {quantizer.config_hash} != saved {saved_hash}")
        if quantizer._matrices_digest() != saved_digest:
            raise ValueError(
                f"{path}: this numpy regenerates different random matrices from seed {config['seed']} "
                "(labels would not match the saved quantizer's)"
            )
        return quantizer


@dataclass(frozen=True)
class BestRQTeacher:
    """BEST-RQ labels: log-mel (128, 75 Hz) normalised with train-set statistics, a frozen random
    projection and the nearest l2-normalised random codebook entry, one row per codebook.

    The quantizer (seed, settings, mean/std) is saved by `save_quantizer` as an `.npz` named by its hash;
    workers load it with `BestRQ.load`, which refuses a file whose random matrices this numpy would not
    regenerate, so labels are reproducible from that file alone.
    """

    quantizer: str  # path of the saved BestRQ .npz
    quantizer_hash: str
    num_codebooks: int
    codebook_size: int
    threads: int = 1

    kind: str = "bestrq"
    sampling_rate: int = SAMPLE_RATE
    hop: int = HOP

    @property
    def n_q(self) -> int:
        return self.num_codebooks

    @property
    def num_classes(self) -> int:
        return self.codebook_size

    @classmethod
    def save_quantizer(cls, quantizer: Any, directory: Path, threads: int = 1) -> BestRQTeacher:
        """Write `quantizer` (a `features.BestRQ`) to DIRECTORY/<config_hash>.npz, atomically, and return
        the teacher that uses it. The name is content-addressed, so reruns reuse the same file."""
        path = directory / f"{quantizer.config_hash}.npz"
        if not path.exists():
            with atomic_path(path) as tmp:
                quantizer.save(tmp)
        return cls(
            quantizer=str(path),
            quantizer_hash=quantizer.config_hash,
            num_codebooks=quantizer.num_codebooks,
            codebook_size=quantizer.codebook_size,
            threads=threads,
        )

    def model_device(self) -> None:
        return None

    def files_per_task(self) -> int:
        return FILES_PER_TASK

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.kind,
            "features": LogMel().config(),
            "quantizer_hash": self.quantizer_hash,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
        }

    def _state(self) -> tuple[Any, Any]:
        key = (self.kind, self.quantizer_hash)
        if key not in _QUANTIZERS:
            set_threads(self.threads)
            quantizer = BestRQ.load(self.quantizer)
            if quantizer.config_hash != self.quantizer_hash:
                raise RuntimeError(
                    f"{self.quantizer} holds quantizer {quantizer.config_hash}, not the planned one"
                )
            _QUANTIZERS[key] = (LogMel(), quantizer)
        return _QUANTIZERS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        if not files:
            return
        extractor, quantizer = self._state()
        rows = self.num_codebooks
        yield from label_frames(
            files, extractor, lambda block: quantizer.labels(block).reshape(rows, -1), rows
        )
