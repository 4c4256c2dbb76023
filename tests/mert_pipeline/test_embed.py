"""`mert-pipe embed`: shapes, determinism, any input rate, checkpoint and HF directory agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.embed import load_embedder
from mert_pipeline.hf_export import export_hf
from mert_pipeline.trainer.model import ModelConfig, conv_frames
from tests.helpers import visible_files
from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    write_tiny_checkpoint(root / "run", pre_ln=True)
    return root


@pytest.fixture(scope="module")
def audio_dir(model_dir: Path) -> Path:
    folder = model_dir / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sf.write(folder / "a.wav", 0.2 * rng.standard_normal(24000 * 2), 24000)  # 2 s at 24 kHz
    sf.write(folder / "b.flac", 0.2 * rng.standard_normal((44100 * 3, 2)), 44100)  # 3 s stereo 44.1 kHz
    sf.write(folder / "c.wav", 0.2 * rng.standard_normal(100), 8000)  # shorter than one frame
    (folder / "d.wav").write_bytes(b"RIFF0000WAVEjunk")
    return folder


def test_embed_shapes_rejects_and_determinism(model_dir: Path, audio_dir: Path) -> None:
    run = CliRunner()
    out = model_dir / "emb"
    base = ["embed", str(audio_dir), "--checkpoint", str(model_dir / "run"), "--device", "cpu"]
    result = run.invoke(app, base + ["--out", str(out), "--chunk-seconds", "1"])
    assert result.exit_code == 0, result.output
    assert np.load(out / "a.npy").shape == (3, 64)  # all layers: L + 1 = 3, mean-pooled
    assert np.load(out / "b.npy").shape == (3, 64) and np.load(out / "c.npy").shape == (3, 64)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [Path(r["path"]).name for r in rejects] == ["d.wav"] and rejects[0]["reason"] in (
        "not_audio",
        "decode_error",
    )
    assert json.loads((out / "embed.json").read_text())["counts"]["accepted"] == 3
    first = visible_files(out)
    again = run.invoke(app, base + ["--out", str(out), "--chunk-seconds", "1", "--force"])
    assert again.exit_code == 0 and "1 (1 run, 0 already done" in again.output  # --force: no skips
    timing = ("embed.json",)  # its throughput; every other file holds the same bytes
    assert {k: v for k, v in visible_files(out).items() if k not in timing} == {
        k: v for k, v in first.items() if k not in timing
    }

    frames = model_dir / "frames"
    result = run.invoke(app, base + ["--out", str(frames), "--layers", "2", "--pool", "none"])
    assert result.exit_code == 0, result.output
    cfg = ModelConfig(conv_dim=32, embed_dim=64)
    assert np.load(frames / "a.npy").shape == (1, conv_frames(48000, cfg), 64)
    assert np.load(frames / "b.npy").shape == (1, conv_frames(72000, cfg), 64)  # resampled to 24 kHz
    bad = run.invoke(app, base + ["--out", str(frames), "--layers", "7"])
    assert bad.exit_code == 2 and "out of range" in bad.output


def test_checkpoint_and_hf_directory_give_the_same_embeddings(model_dir: Path) -> None:
    from mert_pipeline.embed import embed_array

    export_hf(model_dir / "run", model_dir / "hf", verify=False)
    audio = (0.2 * np.random.default_rng(2).standard_normal(30000)).astype(np.float32)
    ours = embed_array(load_embedder(model_dir / "run", "cpu"), audio, None, "none", 12000, 2)
    theirs = embed_array(load_embedder(model_dir / "hf", "cpu"), audio, None, "none", 12000, 2)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours.shape[1] == 2 * conv_frames(12000, ModelConfig()) + conv_frames(6000, ModelConfig())


def test_chunks_cover_the_file_and_a_tail_without_a_frame_is_dropped(model_dir: Path) -> None:
    from mert_pipeline.embed import embed_array

    embedder = load_embedder(model_dir / "run", "cpu")
    frames = {n: conv_frames(n, ModelConfig()) for n in (300, 400, 450, 500)}
    for samples, chunk, expected in [
        (1000, 400, 2 * frames[400]),  # a 200-sample tail holds no frame
        (1300, 400, 3 * frames[400]),
        (1450, 500, 2 * frames[500] + frames[450]),
        (300, 500, frames[400]),  # shorter than a frame: padded to one
    ]:
        audio = (0.1 * np.random.default_rng(samples).standard_normal(samples)).astype(np.float32)
        assert embed_array(embedder, audio, None, "none", chunk, 2).shape[1] == expected


def test_list_inputs_reads_fairseq_tsv_and_path_lists(tmp_path: Path) -> None:
    from mert_pipeline.embed import list_inputs

    (tmp_path / "a").mkdir()
    tsv = tmp_path / "train.tsv"  # fairseq: the root, then relpath<TAB>num_samples
    tsv.write_text(f"{tmp_path}\na/x.wav\t100\nb.flac\t200\n")
    assert list_inputs(tsv) == [("a__x", tmp_path / "a/x.wav"), ("b", tmp_path / "b.flac")]
    listing = tmp_path / "a" / "paths.txt"  # relative paths are relative to the list, not the cwd
    listing.write_text("x.wav\n/abs/y.ogg\n")
    assert list_inputs(listing) == [("x", tmp_path / "a/x.wav"), ("y", Path("/abs/y.ogg"))]
