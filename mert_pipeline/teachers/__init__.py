"""The teachers: what turns 24 kHz mono audio into int16 labels on the frame grid (`mert_pipeline.grid`).

One module per teacher, each holding everything about it:

- `rvq`: EnCodec 24 kHz residual-VQ codes, MERT's acoustic teacher (exact streaming encoder, weights);
- `kmeans`: nearest of k centroids to each frame's features (HuBERT's recipe), the k-means fit and math;
- `bestrq`: BEST-RQ random-projection codes of normalised log-mel;
- `model_features`: layer L of a trained MERT checkpoint, the features of HuBERT's second iteration;
- `features`: the signal features the feature teachers read: MFCC (k-means) and log-mel (BEST-RQ).

A teacher is a plain, picklable config (it travels to pool and Ray workers) that loads its model lazily,
once per process, and labels a task's files at once, so it can batch across files: it yields every file
back, labels of shape (n_q, ceil(num_samples / 320)) or a reject, in whatever order files finish. The
`tokenize` stage (`mert_pipeline.stages.tokenize`) runs them; `mert_pipeline.labels` reads what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mert_pipeline.audio import ProbeFailure, open_audio, sndfile_message
from mert_pipeline.manifests.records import Reject

READ_BLOCK = 1 << 16


def test_weights_warning(name: str, facts: dict[str, Any]) -> str | None:
    """A one-line warning when a label set's teacher ran on test weights (the demo's random-weight codec),
    None otherwise: `verify`, `stats`, the trainer and the demo print it, so such labels never pass for
    MERT's teacher."""
    if (facts.get("config") or {}).get("weights") != "test":
        return None
    return (
        f"label set {name!r} was made by a TEST CODEC (the EnCodec architecture with random weights): "
        "its codes exercise the pipeline but are not MERT's teacher; do not pretrain on them"
    )


class Teacher(Protocol):
    """What the tokenize stage needs of a teacher."""

    kind: str
    sampling_rate: int
    hop: int
    num_classes: int
    n_q: int

    def describe(self) -> dict[str, Any]:
        """The facts that identify the labels (config, weights hash): hashed into `config_hash`."""
        ...

    def model_device(self) -> str | None:
        """The device its network runs on (auto, cpu, cuda); None when it computes signal features only.
        Decides the stage's default workers and whether a task reserves a GPU."""
        ...

    def files_per_task(self) -> int:
        """Files of a tokenize task by default: enough to keep a worker (and its batch) busy."""
        ...

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        """Labels (int16, shape (n_q, ceil(num_samples / hop))) or a reject for every file, any order."""
        ...


def config_hash(teacher: Teacher) -> str:
    """16 hex digits naming a teacher's exact configuration: labels with different hashes never mix."""
    text = json.dumps({"kind": teacher.kind, **teacher.describe()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def stream_features(extractor: Any, item: FileToLabel, failures: dict[str, Reject]) -> Iterator[np.ndarray]:
    """Feature blocks of one file, streamed from its audio blocks (`read_blocks`, `_Extractor.stream`).

    Every consumer (the features stage and the feature teachers) goes through this one path, so features
    stored by `mert-pipe features` and those a teacher computes on the fly are the same bits. A failure
    ends the stream and lands in `failures`; callers check it before using the blocks.
    """
    yield from extractor.stream(read_blocks(item, failures))


def label_frames(
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
