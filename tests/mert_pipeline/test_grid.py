"""The frame grid: one frame per started hop, everywhere."""

from __future__ import annotations

import pytest

from mert_pipeline.grid import FRAME_RATE, HOP, RECEPTIVE_FIELD, SAMPLE_RATE, frame_span, hop_of, num_frames


def test_constants_are_merts() -> None:
    assert (SAMPLE_RATE, HOP, FRAME_RATE, RECEPTIVE_FIELD) == (24000, 320, 75.0, 400)


@pytest.mark.parametrize(
    ("n", "frames"), [(0, 0), (1, 1), (319, 1), (320, 1), (321, 2), (640, 2), (72017, 226)]
)
def test_num_frames_is_ceil_n_over_hop(n: int, frames: int) -> None:
    assert num_frames(n) == frames
    assert num_frames(n, 160) == -(-n // 160)


def test_num_frames_refuses_negative_lengths() -> None:
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        num_frames(-1)


def test_frame_span_slices_a_tracks_labels_exactly() -> None:
    assert frame_span(0, 321) == (0, 2)
    assert frame_span(20480, 20480) == (64, 64)
    with pytest.raises(ValueError, match="not a non-negative multiple of the hop"):
        frame_span(100, 320)


def test_hop_of_needs_a_whole_hop() -> None:
    assert hop_of(24000, 75.0) == 320 and hop_of(16000, 50) == 320
    for rate in (0.0, 77.0, 48000.0):
        with pytest.raises(ValueError, match="not a whole hop"):
            hop_of(24000, rate)
