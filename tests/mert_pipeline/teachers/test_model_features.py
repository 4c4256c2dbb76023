"""`features --kind model` (HuBERT iteration 2): a trainer checkpoint's layer L on the teachers' frame grid,
then `kmeans fit` and `tokenize --teacher kmeans` on those features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import Result
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.fs import sha256_file
from mert_pipeline.hf_export import build_encoder, load_checkpoint, mert_hidden_states
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records
from mert_pipeline.manifests.records import FeatureRecord
from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage
from mert_pipeline.teachers.kmeans import assign
from mert_pipeline.teachers.model_features import PAD, ModelFeatures, padded_length
from tests.helpers import ODD_LENGTHS, resampled_workdir
from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint

LOCAL = ExecutorConfig(kind="local", workers=1)
LAYER = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config's model, weights perturbed, saved by the trainer's own save_checkpoint (crop 16000
    samples: files longer than 50 frames run in several windows)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), pre_ln=False, seed=5)


@pytest.fixture(scope="module")
def encoder(checkpoint: Path) -> torch.nn.Module:
    cfg, state, _ = load_checkpoint(checkpoint)
    return build_encoder(cfg, state)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resampled_workdir(tmp_path_factory.mktemp("model_features"), n_tracks=1)


@pytest.fixture(scope="module")
def extracted(workdir: Path, checkpoint: Path) -> Path:
    config = FeaturesConfig(
        workdir=workdir, kind="model", checkpoint=str(checkpoint), layer=LAYER, sample_frames=300
    )
    report = execute(FeaturesStage(config), LOCAL)
    assert report.ok, report.failed
    return config.features_dir


def audio(workdir: Path) -> dict[str, ResampledRecord]:
    return {
        r.id: r for r in iter_records(workdir / "audio_24k/manifest.parquet", record_type=ResampledRecord)
    }


def test_every_file_gets_ceil_n_over_320_frames(workdir: Path, extracted: Path, checkpoint: Path) -> None:
    assert extracted.name == f"model_l{LAYER}"
    records = {r.id: r for r in iter_records(extracted / "features.parquet", record_type=FeatureRecord)}
    files = audio(workdir)
    assert records.keys() == files.keys()
    assert {r.num_samples for r in files.values()} >= set(ODD_LENGTHS)
    for file_id, record in records.items():
        feats = np.load(extracted / record.relpath)
        frames = -(-files[file_id].num_samples // 320)
        assert feats.dtype == np.float32 and feats.shape == (frames, 64) == (record.frames, record.dim)
        assert np.isfinite(feats).all()
    described = json.loads((extracted / "features.json").read_text())
    assert described["config"]["checkpoint_sha256"] == sha256_file(checkpoint)
    assert described["config"]["layer"] == LAYER and described["dim"] == 64
    assert np.load(extracted / "sample.npy").shape == (300, 64)


def test_features_equal_the_models_own_hidden_state(
    workdir: Path, extracted: Path, encoder: torch.nn.Module
) -> None:
    """A file shorter than a window: the stored features are hidden state LAYER of the model run on the
    file right-padded to 320 ceil(n / 320) + 80 samples."""
    for n in (1, 2047):
        record = next(r for r in audio(workdir).values() if r.num_samples == n)
        wav, _ = sf.read(record.path, dtype="float32")
        padded = torch.from_numpy(np.pad(wav, (0, padded_length(n) - n)))[None]
        expected = mert_hidden_states(encoder, padded)[LAYER][0].numpy()
        stored = np.load(extracted / f"{record.id[:2]}/{record.id}.npy")
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


def test_long_files_run_in_training_crop_windows_on_one_grid(
    checkpoint: Path, encoder: torch.nn.Module
) -> None:
    """Every layer; window j = frames [50 j, 50 j + 50) from samples [16000 j, 16000 j + 16080); blocks
    of any size give the same frames."""
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(72017)).astype(np.float32)
    for layer in (0, 2):
        extractor = ModelFeatures.from_checkpoint(checkpoint, layer)
        assert extractor.window_samples == 16000
        whole = extractor(wav)
        assert whole.shape == (226, 64)
        blocks = [wav[i : i + 7001] for i in range(0, len(wav), 7001)]
        np.testing.assert_array_equal(np.concatenate(list(extractor.stream(blocks))), whole)
        for start, frames in [(0, 50), (48000, 50), (64000, 26)]:
            piece = wav[start : start + frames * 320 + PAD]
            piece = np.pad(piece, (0, frames * 320 + PAD - len(piece)))
            expected = mert_hidden_states(encoder, torch.from_numpy(piece)[None])[layer][0].numpy()
            got = whole[start // 320 : start // 320 + frames]
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"--layer must be in 0..2"):
        ModelFeatures.from_checkpoint(checkpoint, 3)


def test_rerun_is_byte_identical_and_the_layer_names_the_features(
    workdir: Path, extracted: Path, checkpoint: Path
) -> None:
    again = FeaturesConfig(
        workdir=workdir,
        kind="model",
        checkpoint=str(checkpoint),
        layer=LAYER,
        sample_frames=300,
        name="again",
    )
    assert execute(FeaturesStage(again), LOCAL).ok
    for path in sorted(extracted.glob("*/*.npy")) + [extracted / "sample.npy", extracted / "stats.npz"]:
        assert (again.features_dir / path.relative_to(extracted)).read_bytes() == path.read_bytes()
    other = FeaturesConfig(workdir=workdir, kind="model", checkpoint=str(checkpoint), layer=2)
    assert other.feature_name == "model_l2"
    assert other.facts()["config_hash"] != again.facts()["config_hash"]


def mert_pipe(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_kmeans_fit_and_tokenize_on_model_features(tmp_path: Path, checkpoint: Path) -> None:
    workdir = resampled_workdir(tmp_path, n_tracks=1)
    w = str(workdir)
    result = mert_pipe(
        "features", w, "--kind", "model", "--checkpoint", str(checkpoint.parent), "--layer", "2",
        "--sample-frames", "400", "--workers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "sample for `kmeans fit`: 400 of" in result.stderr
    result = mert_pipe("kmeans", "fit", w, "--features", "model_l2", "--k", "8")
    assert result.exit_code == 0, result.stderr
    fit = json.loads((workdir / "kmeans/model_l2_k8/fit.json").read_text())
    assert fit["dim"] == 64 and fit["features_extractor"]["layer"] == 2
    result = mert_pipe("tokenize", w, "--teacher", "kmeans", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    centroids = np.load(workdir / "kmeans/model_l2_k8/centroids.npy")
    facts = json.loads((workdir / "labels/kmeans8/teacher.json").read_text())
    assert facts["config"]["features"]["checkpoint_sha256"] == sha256_file(checkpoint)
    features = workdir / "features/model_l2"
    records = {r.id: r for r in iter_records(features / "features.parquet", record_type=FeatureRecord)}
    labels = list(iter_records(workdir / "labels/kmeans8/labels.parquet", record_type=LabelRecord))
    assert {r.id for r in labels} == records.keys()
    for label in labels:
        feats = np.load(features / records[label.id].relpath)
        codes = np.load(workdir / "labels/kmeans8" / label.relpath)
        assert codes.shape == (1, len(feats))
        np.testing.assert_array_equal(codes[0], assign(feats, centroids))
    for args, message in [
        (("features", w, "--kind", "model", "--checkpoint", w, "--layer", "1"), "looked for ckpt-*.pt"),
        (("features", w, "--kind", "model", "--checkpoint", str(checkpoint), "--layer", "9"), "0..2"),
        (("features", w, "--layer", "1"), "go with --kind model only"),
    ]:
        result = mert_pipe(*args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_mert_v1_directory_gives_the_features_of_the_same_weights(
    checkpoint: Path, encoder: torch.nn.Module, tmp_path: Path
) -> None:
    """HuBERT's second iteration on MERT-v1's features: a directory in the released format (MERTConfig,
    weight_g / weight_v) gives the features of our checkpoint holding the same weights, in 5 s windows."""
    from tests.trainer.test_weights import write_mert_hf

    mert_dir = write_mert_hf(tmp_path / "mert-v1", encoder)
    from_dir = ModelFeatures.from_checkpoint(mert_dir, LAYER)
    from_ckpt = ModelFeatures.from_checkpoint(checkpoint, LAYER)
    assert from_dir.window_samples == 120000 and from_dir.checkpoint_sha256 == sha256_file(
        mert_dir / "pytorch_model.bin"
    )
    wav = (0.1 * np.random.default_rng(1).standard_normal(12000)).astype(np.float32)  # one window for both
    np.testing.assert_allclose(from_dir(wav), from_ckpt(wav), rtol=0, atol=1e-6)


@pytest.mark.ray
def test_mert_v1_features_on_ray_actors_equal_the_local_pool_and_label(
    workdir: Path, encoder: torch.nn.Module, tmp_path: Path, ray_cluster: None
) -> None:
    """HuBERT iteration 2 from a MERT-v1 directory: features on Ray actors (the model loaded once per
    actor) are the local pool's bytes; kmeans fit and tokenize --teacher kmeans then label with them."""
    from tests.trainer.test_weights import write_mert_hf

    mert_dir = str(write_mert_hf(tmp_path / "MERT-v1-95M", encoder))
    made = {}
    for kind in ("local", "ray"):
        config = FeaturesConfig(
            workdir=workdir,
            kind="model",
            checkpoint=mert_dir,
            layer=LAYER,
            sample_frames=300,
            name=f"v1_{kind}",
        )
        assert execute(FeaturesStage(config), ExecutorConfig(kind=kind, workers=1)).ok
        made[kind] = {
            p.relative_to(config.features_dir): p.read_bytes() for p in config.features_dir.glob("*/*.npy")
        }
    assert made["local"] and made["local"] == made["ray"]
    w = str(workdir)
    assert mert_pipe("kmeans", "fit", w, "--features", "v1_ray", "--k", "4").exit_code == 0
    result = mert_pipe("tokenize", w, "--teacher", "kmeans", "--name", "v1k4", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    facts = json.loads((workdir / "labels/v1k4/teacher.json").read_text())
    assert facts["config"]["features"]["checkpoint_sha256"] == sha256_file(
        Path(mert_dir) / "pytorch_model.bin"
    )
