"""EnCodec 24 kHz teacher: streamed, chunked, batched codes equal whole-file ``model.encode`` codes.

Everything runs the real encodec architecture with the seeded test weights of ``make_test_codec``, loaded
through ``load_codec(checkpoint=...)`` exactly as a user's checkpoint would be.
"""

from __future__ import annotations

import hashlib
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mert_pipeline.demo.synth import render_track
from mert_pipeline.demo.test_codec import make_test_codec
from mert_pipeline.grid import HOP, SAMPLE_RATE, num_frames
from mert_pipeline.teachers.rvq import (
    BANDWIDTHS,
    CHECKPOINT_NAME,
    WEIGHTS,
    CodecCheckpointError,
    CodecUnavailable,
    StreamingEncoder,
    checkpoint_url,
    chunk_samples_for,
    encode_stream,
    encode_whole,
    load_codec,
    weights_of,
)


@pytest.fixture(scope="module")
def codec_file(test_codec_file: Path) -> Path:
    return test_codec_file  # built once per session (tests/conftest.py), shared with the tokenize tests


@pytest.fixture(scope="module")
def codec(codec_file: Path):
    return load_codec(codec_file, bandwidth=6.0)


def blocks(audio: np.ndarray, size: int = 4999) -> Iterator[np.ndarray]:
    """A reader yielding blocks of an odd size, so chunks never line up with blocks."""
    for start in range(0, len(audio), size):
        yield audio[start : start + size]


def stream(model, files: dict[str, np.ndarray], **kwargs) -> dict[str, np.ndarray]:
    out = dict(encode_stream(model, [(key, blocks(audio)) for key, audio in files.items()], **kwargs))
    assert sorted(out) == sorted(files)
    return out


# ---- 1. codes: shape, dtype, range, diversity, bandwidths ------------------------------------------


def test_codes_are_diverse_int16_in_range(codec) -> None:
    model, info = codec
    codes = stream(model, {"a": render_track(11, 4.0, SAMPLE_RATE)}, chunk_seconds=1.0, batch_rows=1)["a"]
    assert codes.dtype == np.int16
    assert codes.shape == (8, num_frames(4 * SAMPLE_RATE)) == (info.n_q, 300)
    assert codes.min() >= 0 and codes.max() < info.codebook_size
    distinct = [len(np.unique(row)) for row in codes]
    assert distinct[0] > 100, distinct
    assert min(distinct) > 50, distinct


@pytest.mark.parametrize("n", [1, 319, 320, 321, 2240, 24000, 24001, 24319, 24320, 72000 + 17])
def test_frame_count_and_exact_codes_for_any_length(codec, n: int) -> None:
    """ceil(n / 320) frames; files up to a few chunks long give exactly the whole-file codes."""
    model, _ = codec
    audio = render_track(12, 3.1, SAMPLE_RATE)[:n]
    codes = stream(model, {"x": audio}, chunk_seconds=0.4, batch_rows=2)["x"]
    assert codes.shape == (8, -(-n // HOP))
    np.testing.assert_array_equal(codes, encode_whole(model, audio))


def test_bandwidth_sets_number_of_codebooks(codec_file: Path) -> None:
    audio = render_track(13, 1.0, SAMPLE_RATE)
    previous = None
    for bandwidth, n_q in BANDWIDTHS.items():
        model, info = load_codec(codec_file, bandwidth=bandwidth)
        assert info.n_q == n_q == {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}[bandwidth]
        codes = stream(model, {"x": audio}, chunk_seconds=0.5, batch_rows=1)["x"]
        assert codes.shape == (n_q, 75)
        if previous is not None:  # residual VQ: a lower bandwidth's codes are a prefix of a higher one's
            np.testing.assert_array_equal(codes[: previous.shape[0]], previous)
        previous = codes
    with pytest.raises(ValueError, match="bandwidth"):
        load_codec(codec_file, bandwidth=5.0)


def test_teacher_info_identifies_weights_and_settings(codec_file: Path, codec) -> None:
    _, info = codec
    assert info.name == "encodec_24khz"
    assert (info.bandwidth, info.n_q, info.frame_rate, info.hop, info.sample_rate) == (6.0, 8, 75, 320, 24000)
    assert info.checkpoint_sha256 == hashlib.sha256(codec_file.read_bytes()).hexdigest()
    assert load_codec(codec_file, 6.0)[1].config_hash == info.config_hash
    assert load_codec(codec_file, 12.0)[1].config_hash != info.config_hash
    assert info.to_dict()["config_hash"] == info.config_hash and len(info.config_hash) == 16
    assert info.weights == "test", "the test codec's file says what it is, whatever its name"


def test_weights_are_named_by_what_made_them() -> None:
    assert weights_of("d7cc33bc" + "0" * 56, test_mark=False) == "official"
    assert weights_of("ab" * 32, test_mark=False) == "custom"
    assert weights_of("d7cc33bc" + "0" * 56, test_mark=True) == "test"
    assert set(WEIGHTS) == {"official", "test", "custom"}


# ---- 2. streaming equals whole-file encoding ----------------------------------------------------------


def test_streamed_60s_file_matches_whole_file_encode(codec) -> None:
    model, _ = codec
    audio = render_track(21, 60.0, SAMPLE_RATE)
    whole = encode_whole(model, audio)
    streamed = stream(model, {"long": audio}, chunk_seconds=2.5, batch_rows=1)["long"]
    assert streamed.shape == whole.shape == (8, 4500)
    agreement = (streamed == whole).mean(axis=1)
    assert agreement.min() >= 0.9999, agreement


def test_file_shorter_than_a_chunk_is_exact(codec) -> None:
    model, _ = codec
    audio = render_track(22, 1.7, SAMPLE_RATE)
    codes = stream(model, {"short": audio}, chunk_seconds=2.5, batch_rows=3)["short"]
    np.testing.assert_array_equal(codes, encode_whole(model, audio))


# ---- 3./4. batch composition and determinism --------------------------------------------------------

LENGTHS_S = {"a": 3.3, "b": 0.7, "c": 5.1, "d": 1.234, "e": 2.0, "f": 0.05, "g": 1.0}


@pytest.fixture(scope="module")
def files() -> dict[str, np.ndarray]:
    return {key: render_track(100 + i, s, SAMPLE_RATE) for i, (key, s) in enumerate(LENGTHS_S.items())}


@pytest.fixture(scope="module")
def alone(codec, files) -> dict[str, np.ndarray]:
    """Each file encoded on its own, one row per batch."""
    model, _ = codec
    return {
        key: stream(model, {key: audio}, chunk_seconds=0.5, batch_rows=1)[key] for key, audio in files.items()
    }


@pytest.mark.parametrize(
    ("order", "batch_rows"),
    [("abcdefg", 3), ("gfedcba", 3), ("cafgbed", 2), ("abcdefg", 8), ("dbfaceg", 5)],
)
def test_batch_composition_does_not_change_codes(codec, files, alone, order: str, batch_rows: int) -> None:
    """Other files in the batch, the row a file lands in and batch_rows leave its codes bit-identical."""
    model, _ = codec
    together = stream(model, {key: files[key] for key in order}, chunk_seconds=0.5, batch_rows=batch_rows)
    for key in files:
        np.testing.assert_array_equal(together[key], alone[key], err_msg=key)


def test_codes_match_whole_file_and_runs_are_deterministic(codec, files, alone) -> None:
    model, _ = codec
    for key, audio in files.items():
        np.testing.assert_array_equal(alone[key], encode_whole(model, audio), err_msg=key)
    again = stream(model, files, chunk_seconds=0.5, batch_rows=1)
    assert all(again[key].tobytes() == alone[key].tobytes() for key in files)


def test_test_codec_is_deterministic(tmp_path: Path, codec_file: Path) -> None:
    other = make_test_codec(tmp_path / "again.th", seed=0)
    assert other.read_bytes() == codec_file.read_bytes()


def test_idle_rows_keep_state(codec, files) -> None:
    """A row may sit out a step in the middle of its file without losing its stream."""
    model, _ = codec
    enc = StreamingEncoder(model, batch_rows=2, chunk_samples=chunk_samples_for(0.5))
    width = enc.chunk_samples
    audio = files["c"]
    out: list[np.ndarray] = []
    for i, start in enumerate(range(0, len(audio), width)):
        chunk = audio[start : start + width]
        batch = np.zeros((2, width), dtype=np.float32)
        batch[0, : len(chunk)] = chunk
        last = start + width >= len(audio)
        if i == 2:  # row 0 idles for one step while row 1 does something else
            enc.step(np.stack([np.zeros(width), audio[:width]]), [0, width], [False, True], [False, False])
        codes = enc.step(batch, [len(chunk), 0], [i == 0, False], [last, False])
        out.append(codes[0])
        assert codes[1] is None
    np.testing.assert_array_equal(np.concatenate(out, axis=1), encode_whole(model, audio))


# ---- 5. loading errors ------------------------------------------------------------------------------


def test_load_without_weights_names_url_and_cache_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    # An empty torch hub dir, and a proxy that refuses at once: fails fast even on a machine with internet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(CodecUnavailable) as caught:
        load_codec(None)
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "\n" not in message
    assert checkpoint_url() == "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th"
    assert checkpoint_url() in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / CHECKPOINT_NAME) in message
    assert "--codec-checkpoint" in message
    assert "Downloading" not in capfd.readouterr().err, "no download line when nothing can be downloaded"


def test_bad_checkpoints_give_one_line_errors(tmp_path: Path, codec_file: Path) -> None:
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"\x00\x01 this is not a torch file" * 100)
    wrong_keys = tmp_path / "wrong_keys.th"
    torch.save({"encoder.bogus.weight": torch.zeros(3)}, wrong_keys)
    not_a_dict = tmp_path / "list.th"
    torch.save([torch.zeros(3)], not_a_dict)
    cases = [
        (garbage, "cannot read"),
        (wrong_keys, "252 missing keys"),
        (not_a_dict, "state dict"),
        (tmp_path / "missing.th", "does not exist"),
    ]
    for path, expected in cases:
        with pytest.raises(CodecCheckpointError) as caught:
            load_codec(path)
        message = str(caught.value)
        assert "\n" not in message and expected in message and str(path) in message, message
    wrapped = tmp_path / "wrapped.th"
    torch.save({"state_dict": torch.load(codec_file, weights_only=True)["state_dict"]}, wrapped)
    _, info = load_codec(wrapped)
    assert info.n_q == 8 and info.weights == "custom", "the same weights without the test mark are custom"


# ---- 6. long inputs stream through bounded memory ------------------------------------------------------


class _Enough(Exception):
    pass


def test_ten_minute_file_is_read_lazily_with_bounded_memory(codec) -> None:
    """A 10-minute reader is consumed in step with encoding; stopped after 30 s, little was ever held.

    A forward hook on the real first conv counts encoder steps, so each pull of the reader can check that
    encoding keeps up (read-ahead of at most one chunk plus a block); tracemalloc sees numpy's buffers.
    """
    model, _ = codec
    chunk = chunk_samples_for(2.5)
    block, total, stop_after = 4800, 10 * 60 * SAMPLE_RATE, 30 * SAMPLE_RATE
    steps: list[int] = []
    pulled = 0

    def reader() -> Iterator[np.ndarray]:
        nonlocal pulled
        rng = np.random.default_rng(0)
        while pulled < total:
            assert pulled <= len(steps) * chunk + chunk + block, (pulled, len(steps))
            if pulled >= stop_after:
                raise _Enough
            pulled += block
            yield (0.1 * rng.standard_normal(block)).astype(np.float32)

    handle = model.encoder.model[0].conv.register_forward_hook(lambda *args: steps.append(1))
    tracemalloc.start()
    try:
        with pytest.raises(_Enough):
            for _ in encode_stream(model, [("ten_minutes", reader())], chunk_seconds=2.5, batch_rows=1):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        handle.remove()
    assert len(steps) >= stop_after // chunk - 1
    # About 4 chunks of float32 (batch, buffered blocks, the chunk being cut); the file would be 57.6 MB.
    assert peak < 8 * chunk * 4, peak


# ---- small helpers ----------------------------------------------------------------------------------


def test_empty_and_invalid_inputs(codec) -> None:
    model, _ = codec
    out = dict(encode_stream(model, [("empty", iter([np.zeros(0, np.float32)])), ("none", iter([]))]))
    assert out["empty"].shape == out["none"].shape == (8, 0)
    with pytest.raises(ValueError, match="1-D"):
        list(encode_stream(model, [("stereo", iter([np.zeros((100, 2), np.float32)]))]))
    with pytest.raises(ValueError, match="NaN"):
        list(encode_stream(model, [("nan", iter([np.full(100, np.nan, np.float32)]))]))
    with pytest.raises(ValueError, match="multiple of 320"):
        StreamingEncoder(model, batch_rows=1, chunk_samples=1000)
    enc = StreamingEncoder(model, batch_rows=1, chunk_samples=2560)
    with pytest.raises(ValueError, match="no file is open"):
        enc.step(np.zeros((1, 2560), np.float32), [2560], [False], [False])
    with pytest.raises(ValueError, match="float16"):
        StreamingEncoder(model, batch_rows=1, chunk_samples=2560, dtype="float16")


def test_bfloat16_autocast_runs(codec) -> None:
    model, _ = codec
    audio = render_track(23, 0.5, SAMPLE_RATE)
    codes = stream(model, {"x": audio}, chunk_seconds=0.5, batch_rows=1, dtype="bfloat16")["x"]
    assert codes.shape == (8, 38) and codes.dtype == np.int16
