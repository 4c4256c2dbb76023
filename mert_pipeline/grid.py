"""The frame grid: 24 kHz mono audio, one label frame per started hop of 320 samples (75 Hz).

Every teacher (EnCodec RVQ, k-means, BEST-RQ, model features), the shards and the trainer put frame i on
samples [320 i, 320 i + 320), and a file of n samples has exactly `num_frames(n) = ceil(n / 320)` frames:
the last, partial hop gets a frame of its own, as EnCodec gives it one. That is what lets the labels of
different teachers line up frame for frame and a segment's labels be sliced out of a track's exactly
(segments start on multiples of the hop). This module is the one place that says so; everything else
imports it.
"""

from __future__ import annotations

from typing import Any

SAMPLE_RATE = 24000  # MERT's audio rate, and EnCodec 24 kHz's
HOP = 320  # samples per label frame: EnCodec's total stride, and the MERT conv front end's
FRAME_RATE = SAMPLE_RATE / HOP  # 75.0 label frames per second
RECEPTIVE_FIELD = 400  # samples one frame of the MERT conv front end sees: [320 i, 320 i + 400)


def num_frames(num_samples: Any, hop: int = HOP) -> Any:
    """Label frames of `num_samples` samples (an int, or a numpy array of them): one per started hop,
    ceil(num_samples / hop)."""
    if (num_samples < 0) if isinstance(num_samples, int) else (num_samples < 0).any():
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return -(-num_samples // hop)


def frame_span(offset: int, num_samples: int, hop: int = HOP) -> tuple[int, int]:
    """(first frame, frame count) of the samples [offset, offset + num_samples) of a longer file: the
    columns of the file's labels that describe them. `offset` must sit on the grid."""
    if offset < 0 or offset % hop:
        raise ValueError(f"offset {offset} is not a non-negative multiple of the hop {hop}")
    return offset // hop, num_frames(num_samples, hop)


def hop_of(sampling_rate: int, label_rate: float) -> int:
    """The whole number of samples per frame that `label_rate` frames per second of `sampling_rate` audio
    imply; ValueError when it is not whole (labels would drift off the audio)."""
    hop = sampling_rate / label_rate if label_rate > 0 else 0.5
    if abs(hop - round(hop)) > 1e-9 or round(hop) < 1:
        raise ValueError(f"{label_rate:g} frames/s of {sampling_rate} Hz audio is not a whole hop")
    return round(hop)
