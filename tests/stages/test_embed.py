"""The embed stage: the library's bytes on every executor, resume by completion markers, rejects."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mert_pipeline.embed import embed_files, list_inputs, load_embedder
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.stages.embed import EmbedConfig, EmbedStage
from mert_pipeline.trainer.model import ModelConfig, conv_frames
from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint and three short inputs: 24 kHz mono, 44.1 kHz stereo, a file that is not audio."""
    root = tmp_path_factory.mktemp("embed_stage")
    write_tiny_checkpoint(root / "run", pre_ln=True)
    audio = root / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    sf.write(audio / "a.wav", 0.2 * rng.standard_normal(12000), 24000)
    sf.write(audio / "b.flac", 0.2 * rng.standard_normal((30000, 2)), 44100)
    (audio / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    return root


def config(corpus: Path, out: Path, **kw: object) -> EmbedConfig:
    """Short chunks in batches of 2, a task per file: chunking, batching and task order all matter."""
    options = {"inputs": corpus / "audio", "checkpoint": corpus / "run", "device": "cpu", "pool": "none"}
    options |= {"chunk_seconds": 0.25, "batch_size": 2, "files_per_task": 1}  # threads 0: as they are
    return EmbedConfig(out=out, **options | kw)  # type: ignore[arg-type]


def outputs(out: Path) -> dict[str, bytes]:
    """What must be the same bytes everywhere: the embeddings and the merged rejects."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))} | {
        "rejects.jsonl": (out / "rejects.jsonl").read_bytes()
    }


def test_local_pool_and_ray_write_the_library_bytes(corpus: Path, tmp_path: Path, ray_cluster: None) -> None:
    cfg = config(corpus, tmp_path / "local", threads=1)
    embedder, threads = load_embedder(corpus / "run", "cpu"), torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # as the workers: other thread counts round sums differently
    try:
        results = dict(
            embed_files(embedder, list_inputs(cfg.inputs), tmp_path / "lib", None, "none", 0.25, 2)
        )
    finally:
        torch.set_num_threads(threads)
    assert sorted(results) == ["a", "b", "bad"] and results["bad"]["reject"] in ("not_audio", "decode_error")

    local = execute(EmbedStage(cfg), ExecutorConfig(kind="local", workers=2))
    ray = execute(EmbedStage(config(corpus, tmp_path / "ray", threads=1)), ExecutorConfig(kind="ray"))
    assert local.ok and ray.ok and local.done == ray.done == 3
    assert outputs(tmp_path / "local") == outputs(tmp_path / "ray")
    for name in ("a.npy", "b.npy"):  # the stage in worker processes computes what the library does here
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    model = ModelConfig()  # b: 30000 samples at 44.1 kHz -> 16327 at 24 kHz: 2 chunks of 6000, then the tail
    frames = 2 * conv_frames(6000, model) + conv_frames(16327 - 2 * 6000, model)
    assert np.load(tmp_path / "local" / "b.npy").shape == (3, frames, 64)

    rejects = [json.loads(line) for line in (tmp_path / "local" / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["reason"]) for r in rejects] == [("bad.wav", results["bad"]["reject"])]
    assert rejects[0]["detail"] and "\n" not in rejects[0]["detail"]
    summary = json.loads((tmp_path / "ray" / "embed.json").read_text())
    assert (summary["counts"]["accepted"], summary["counts"]["rejected"]) == (2, 1)
    assert summary["device"] == "cpu" and summary["throughput"]["x_real_time"] > 0


def test_rerun_skips_deleted_output_is_redone_new_layers_rerun(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    first = execute(EmbedStage(config(corpus, out)), ExecutorConfig())
    assert first.ok and (first.done, first.skipped) == (3, 0)
    before = outputs(out)

    again = execute(EmbedStage(config(corpus, out)), ExecutorConfig())
    assert (again.done, again.skipped) == (0, 3) and outputs(out) == before

    (out / "a.npy").unlink()
    redo = execute(EmbedStage(config(corpus, out)), ExecutorConfig())
    assert (redo.done, redo.skipped) == (1, 2) and outputs(out) == before

    layer = execute(EmbedStage(config(corpus, out, layers="1")), ExecutorConfig())
    assert (layer.done, layer.skipped) == (3, 0)
    np.testing.assert_array_equal(np.load(out / "a.npy"), np.load(io.BytesIO(before["a.npy"]))[1:2])
    assert json.loads((out / "embed.json").read_text())["layer_indices"] == [1]


def test_same_id_twice_is_rejected_as_duplicate(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.wav").write_bytes((corpus / "audio" / "a.wav").read_bytes())
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{corpus / 'audio' / 'a.wav'}\n{other / 'a.wav'}\n")
    out = tmp_path / "emb"
    report = execute(EmbedStage(config(corpus, out, inputs=listing, files_per_task=8)), ExecutorConfig())
    assert report.ok and sorted(p.name for p in out.glob("*.npy")) == ["a.npy"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejects] == [(str(other / "a.wav"), "duplicate")]


def test_embeds_a_folder_in_a_bucket_like_the_local_folder(
    corpus: Path, tmp_path: Path, s3_endpoint: str
) -> None:
    from mert_pipeline import storage

    fs, _ = storage.filesystem("s3://embed-corpus")
    if not fs.exists("embed-corpus"):
        fs.mkdir("embed-corpus")
    for path in sorted((corpus / "audio").iterdir()):
        fs.put_file(str(path), f"embed-corpus/audio/{path.name}")
    assert [i for i, _ in list_inputs("s3://embed-corpus/audio")] == ["a", "b", "bad"]
    local = execute(EmbedStage(config(corpus, tmp_path / "local")), ExecutorConfig())
    remote = execute(
        EmbedStage(config(corpus, tmp_path / "s3", inputs="s3://embed-corpus/audio")), ExecutorConfig()
    )
    assert local.ok and remote.ok
    assert {k: v for k, v in outputs(tmp_path / "s3").items() if k.endswith(".npy")} == {
        k: v for k, v in outputs(tmp_path / "local").items() if k.endswith(".npy")
    }
    rejects = [json.loads(line) for line in (tmp_path / "s3/rejects.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rejects] == ["s3://embed-corpus/audio/bad.wav"]
