"""Teachers the `tokenize` stage runs: plain, picklable configs whose models load once per process.

A teacher turns files of 24 kHz mono audio into int16 labels of shape (n_q, ceil(num_samples / 320)).
The stage sends it a task's files at once, so a teacher can batch across files; it yields every file
back (labels or a reject) in whatever order files finish.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from manifests.records import Reject
from mert_pipeline.audio import ProbeFailure, open_audio, sndfile_message

READ_BLOCK = 1 << 16
_MODELS: dict[tuple, Any] = {}  # per process: (checkpoint, bandwidth, device) -> model
_GPU_LOCKS: list[int] = []


@dataclass(frozen=True)
class FileToLabel:
    id: str
    path: str
    num_samples: int


def read_blocks(
    item: FileToLabel, failures: dict[str, Reject], block: int = READ_BLOCK
) -> Iterator[np.ndarray]:
    """Stream one mono file as float32 blocks. A decode failure or NaN ends the stream early and is
    recorded in `failures`, so a batch shared with other files goes on and only this file is rejected."""
    if not os.path.exists(item.path):  # libsndfile would call it a decode error
        failures[item.id] = Reject(item.path, "missing", "listed in the audio manifest but no longer exists")
        return
    try:
        with open_audio(item.path) as handle:
            if handle.channels != 1:
                raise ProbeFailure("changed", f"{handle.channels} channels; the resample stage writes mono")
            decoded = 0
            while True:
                try:
                    data = handle.read(block, dtype="float32", always_2d=True)
                except Exception as exc:  # noqa: BLE001 - libsndfile's decode errors
                    raise ProbeFailure(
                        "decode_error", f"decoding stopped at sample {decoded}: {sndfile_message(exc)}"
                    ) from exc
                if not len(data):
                    break
                mono = data[:, 0]
                if not np.isfinite(mono).all():
                    raise ProbeFailure("non_finite", f"NaN or Inf samples after sample {decoded}")
                decoded += len(mono)
                yield mono
            if decoded != item.num_samples:
                raise ProbeFailure(
                    "changed", f"decoded {decoded} samples, the manifest says {item.num_samples}"
                )
    except ProbeFailure as failure:
        failures[item.id] = Reject(item.path, failure.reason, failure.detail)


def claim_gpu(lock_dir: Path) -> str:
    """`cuda:N` for this process: the first GPU no other worker of this run holds (a lock file per GPU,
    held until the process exits), so a local pool puts one model on each GPU. Ray pins GPUs itself
    (CUDA_VISIBLE_DEVICES), so there only one device is visible and this returns cuda:0."""
    import torch

    count = torch.cuda.device_count()
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        fd = os.open(lock_dir / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _GPU_LOCKS.append(fd)
        return f"cuda:{index}"
    return f"cuda:{os.getpid() % max(count, 1)}"  # more workers than GPUs: share


@dataclass(frozen=True)
class RvqTeacher:
    """EnCodec 24 kHz residual-VQ codes (MERT's acoustic teacher), exact under chunking (see codec.py).

    `resolve()` (driver side) loads the weights once to fail early and records their sha256, which is
    part of the teacher's identity; workers load the same file again, once per process.
    """

    bandwidth: float = 6.0
    checkpoint: str | None = None  # None: the encodec package's own pretrained loader
    checkpoint_sha256: str = ""
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16 (CUDA)
    chunk_seconds: float | None = None  # streamed chunk (a multiple of 320 samples); None: see chunk_for
    batch_seconds: float | None = None  # audio per batch; None: see batch_rows
    threads: int = 1  # torch intra-op threads of each worker
    gpu_lock_dir: str = ""

    kind: str = "encodec_24khz"
    sampling_rate: int = 24000
    hop: int = 320
    num_classes: int = 1024

    @property
    def n_q(self) -> int:
        from mert_pipeline.codec import BANDWIDTHS

        return BANDWIDTHS[float(self.bandwidth)]

    def resolve(self) -> RvqTeacher:
        """Load once here (errors surface before workers start) and fill in the checkpoint hash."""
        from mert_pipeline.codec import load_codec

        _, info = load_codec(self.checkpoint, self.bandwidth, "cpu")
        return replace(self, checkpoint_sha256=info.checkpoint_sha256)

    def describe(self) -> dict[str, Any]:
        """What identifies the codes: weights, codebook count, precision (bf16 flips some codes)."""
        return {
            "teacher": self.kind,
            "bandwidth": float(self.bandwidth),
            "n_q": self.n_q,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dtype": self.dtype,
        }

    def _device(self) -> str:
        from mert_pipeline.codec import resolve_device

        device = resolve_device(self.device)
        if device.type == "cuda" and device.index is None:
            return claim_gpu(Path(self.gpu_lock_dir or "/tmp"))
        return str(device)

    def chunk_for(self, device: str) -> float:
        """Streamed chunk: 2.56 s on CPU (short chunks run fastest there), 10.24 s on GPU (fewer steps)."""
        if self.chunk_seconds is not None:
            return self.chunk_seconds
        return 10.24 if device.startswith("cuda") else 2.56

    def batch_rows(self, device: str) -> int:
        """Rows per batch: one on CPU, where batching does not help; 64 files side by side on GPU."""
        chunk = self.chunk_for(device)
        seconds = self.batch_seconds
        if seconds is None:
            seconds = 64 * chunk if device.startswith("cuda") else chunk
        return max(1, round(seconds / chunk))

    def model(self) -> tuple[Any, str]:
        """This process's model (loaded on first use, then cached) and its device."""
        from mert_pipeline.codec import configure_threads, load_codec

        key = (self.checkpoint, float(self.bandwidth), self.device)
        if key not in _MODELS:
            configure_threads(self.threads)
            device = self._device()
            model, info = load_codec(self.checkpoint, self.bandwidth, device)
            if self.checkpoint_sha256 and info.checkpoint_sha256 != self.checkpoint_sha256:
                raise RuntimeError(
                    f"EnCodec weights changed during the run (sha256 {info.checkpoint_sha256[:12]}, "
                    f"planned with {self.checkpoint_sha256[:12]}); rerun"
                )
            _MODELS[key] = (model, device)
        return _MODELS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        from mert_pipeline.codec import encode_stream

        if not files:
            return
        model, device = self.model()
        failures: dict[str, Reject] = {}
        by_id = {f.id: f for f in files}
        items = ((f.id, read_blocks(f, failures)) for f in files)
        rows = self.batch_rows(device)
        chunk_seconds = self.chunk_for(device)
        chunk = round(chunk_seconds * self.sampling_rate)
        for file_id, codes in encode_stream(model, items, chunk_seconds, rows, device, self.dtype):
            stats["chunks"] += -(-by_id[file_id].num_samples // chunk)
            failure = failures.pop(file_id, None)
            yield file_id, (failure if failure is not None else codes)


# --------------------------------------------------------------------------------------------------
# Feature teachers: k-means on MFCC, BEST-RQ on log-mel
# --------------------------------------------------------------------------------------------------

_FEATURE_TEACHERS: dict[tuple, Any] = {}  # per process: (kind, identity) -> loaded state


def stream_features(extractor: Any, item: FileToLabel, failures: dict[str, Reject]) -> Iterator[np.ndarray]:
    """Feature blocks of one file, streamed from its audio blocks (`read_blocks`, `_Extractor.stream`).

    Every consumer (the features stage and the feature teachers) goes through this one path, so features
    stored by `mert-pipe features` and those a teacher computes on the fly are the same bits. A failure
    ends the stream and lands in `failures`; callers check it before using the blocks.
    """
    yield from extractor.stream(read_blocks(item, failures))


def _label_frames(
    files: list[FileToLabel], extractor: Any, to_labels: Any, rows: int
) -> Iterator[tuple[str, np.ndarray | Reject]]:
    """Each file's features, block by block, through `to_labels` ((frames, dim) -> int16 (rows, frames)),
    joined along frames; a file whose audio fails is a reject."""
    for item in files:
        failures: dict[str, Reject] = {}
        parts = [to_labels(block) for block in stream_features(extractor, item, failures)]
        if item.id in failures:
            yield item.id, failures[item.id]
        else:
            yield item.id, np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0), np.int16)


def set_torch_threads(threads: int) -> None:
    """Give this worker process `threads` intra-op threads (workers x threads should fit the cores)."""
    import torch

    if threads >= 1 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class KMeansTeacher:
    """Nearest of k centroids to each 39-dim MFCC frame (HuBERT iteration 1), computed from the audio.

    MFCC is computed on the fly (hundreds of times real time, see benchmarks/RESULTS.md) rather than read
    from `mert-pipe features`: tokenizing then needs no 156-bytes-per-frame feature store, and the labels
    equal the assignment of stored features bit for bit because both stream the same blocks through
    `stream_features`. `resolve()` loads the centroids once on the driver and records their sha256, which
    is part of the teacher's identity; workers check it when they load them.

    Centroids fitted on model features (`features --kind model`, HuBERT iteration 2) carry the checkpoint
    and layer in their `fit.json`; `resolve()` then sets `model` and the teacher recomputes those features.
    """

    centroids: str  # path of a (k, dim) float32 .npy
    centroids_sha256: str = ""
    num_classes: int = 0  # k, from the centroids
    threads: int = 1  # torch intra-op threads of each worker
    model: Any = None  # a ModelFeatures when the centroids were fitted on model features; None: MFCC

    kind: str = "kmeans"
    sampling_rate: int = 24000
    hop: int = 320
    n_q: int = 1

    def resolve(self) -> KMeansTeacher:
        """Check the centroids here (errors surface before workers start) and fill in k and the hash."""
        from mert_pipeline.fs import sha256_file

        model = _fitted_model_features(Path(self.centroids))
        centroids = _load_centroids(self.centroids, model.dim if model is not None else 39)
        return replace(
            self, centroids_sha256=sha256_file(self.centroids), num_classes=len(centroids), model=model
        )

    def _extractor(self) -> Any:
        from mert_pipeline.features import MFCC

        return self.model if self.model is not None else MFCC()

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.kind,
            "features": self._extractor().config(),
            "k": self.num_classes,
            "centroids_sha256": self.centroids_sha256,
            "distance": "squared_l2, exact",
        }

    def _state(self) -> tuple[Any, np.ndarray]:
        from mert_pipeline.fs import sha256_file

        key = (self.kind, self.centroids_sha256)
        if key not in _FEATURE_TEACHERS:
            set_torch_threads(self.threads)
            if sha256_file(self.centroids) != self.centroids_sha256:
                raise RuntimeError(f"{self.centroids} changed during the run; rerun")
            extractor = self._extractor()
            _FEATURE_TEACHERS[key] = (extractor, _load_centroids(self.centroids, extractor.dim))
        return _FEATURE_TEACHERS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        from mert_pipeline.kmeans import assign

        if not files:
            return
        extractor, centroids = self._state()
        yield from _label_frames(files, extractor, lambda block: assign(block, centroids)[None], 1)


def _fitted_model_features(centroids: Path) -> Any:
    """The model-feature extractor `kmeans fit` recorded beside these centroids (fit.json), else None."""
    from mert_pipeline.model_features import ModelFeatures

    try:
        fit = json.loads((centroids.parent / "fit.json").read_text())
    except (OSError, ValueError):
        return None  # centroids from elsewhere: MFCC, as before
    saved = fit.get("features_extractor") or {}
    if saved.get("kind") != "model":
        return None
    model = ModelFeatures.from_checkpoint(
        fit["features_checkpoint"], saved["layer"], batch_windows=saved["batch_windows"]
    )
    if model.config() != saved:
        raise ValueError(
            f"{centroids} were fitted on features of checkpoint sha256 {saved['checkpoint_sha256'][:12]}, "
            f"but {model.checkpoint} is now {model.checkpoint_sha256[:12]}"
        )
    return model


def _load_centroids(path: str, dim: int = 39) -> np.ndarray:
    """A (k, dim) finite float32 array, k in [1, 32768]; anything else is a ValueError naming the file."""
    try:
        centroids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read centroids {path}: {exc}") from exc
    if centroids.ndim != 2 or centroids.shape[1] != dim or not 1 <= len(centroids) <= 32768:
        raise ValueError(f"centroids {path} have shape {centroids.shape}, expected (k <= 32768, {dim})")
    if not np.issubdtype(centroids.dtype, np.floating) or not np.isfinite(centroids).all():
        raise ValueError(f"centroids {path} must be finite floats")
    return np.ascontiguousarray(centroids, dtype=np.float32)


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
    sampling_rate: int = 24000
    hop: int = 320

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
        from mert_pipeline.fs import atomic_path

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

    def describe(self) -> dict[str, Any]:
        from mert_pipeline.features import LogMel

        return {
            "teacher": self.kind,
            "features": LogMel().config(),
            "quantizer_hash": self.quantizer_hash,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
        }

    def _state(self) -> tuple[Any, Any]:
        from mert_pipeline.features import BestRQ, LogMel

        key = (self.kind, self.quantizer_hash)
        if key not in _FEATURE_TEACHERS:
            set_torch_threads(self.threads)
            quantizer = BestRQ.load(self.quantizer)
            if quantizer.config_hash != self.quantizer_hash:
                raise RuntimeError(
                    f"{self.quantizer} holds quantizer {quantizer.config_hash}, not the planned one"
                )
            _FEATURE_TEACHERS[key] = (LogMel(), quantizer)
        return _FEATURE_TEACHERS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        if not files:
            return
        extractor, quantizer = self._state()
        rows = self.num_codebooks
        yield from _label_frames(
            files, extractor, lambda block: quantizer.labels(block).reshape(rows, -1), rows
        )
