"""The features stage: aligned per-file MFCC and log-CQT, a bounded stratified sample, statistics; resume,
executors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.manifests import ResampledRecord, iter_records, iter_rejects
from mert_pipeline.manifests.records import FeatureRecord
from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage, split_quota
from mert_pipeline.teachers.features import MFCC, LogCQT, RunningStats
from tests.helpers import KillOnce, hidden_tmp_files, resampled_workdir, visible_files

LOCAL = ExecutorConfig(kind="local", workers=1)
SAMPLE = 1500  # fewer than the corpus's frames, so the sample is a strict subset


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resampled_workdir(tmp_path_factory.mktemp("features"))


def run_features(workdir: Path, executor: ExecutorConfig = LOCAL, **kw) -> dict:
    kw = {"sample_frames": SAMPLE, "files_per_task": 3, **kw}
    report = execute(FeaturesStage(FeaturesConfig(workdir=workdir, **kw)), executor)
    assert report.ok, report.failed
    return report.summary


def audio_records(workdir: Path) -> dict[str, ResampledRecord]:
    path = workdir / "audio_24k/manifest.parquet"
    return {r.id: r for r in iter_records(path, record_type=ResampledRecord)}


def outputs(directory: Path) -> dict[str, bytes]:
    """Every output file; features.json without its `name` and the manifest's rows without its root
    metadata: the two places that name the directory."""
    files = visible_files(directory)
    files["features.parquet"] = repr(pq.read_table(directory / "features.parquet").to_pylist()).encode()
    description = json.loads(files.pop("features.json"))
    description.pop("name")
    files["features.json"] = json.dumps(description, sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def extracted(workdir: Path) -> Path:
    run_features(workdir)
    return workdir / "features/mfcc"


def assert_aligned_and_equal(workdir: Path, directory: Path, extractor: MFCC | LogCQT) -> None:
    """Every file's stored features: float32, ceil(num_samples / 320) frames, the extractor's numbers."""
    import soundfile as sf

    audio = audio_records(workdir)
    records = list(iter_records(directory / "features.parquet", record_type=FeatureRecord))
    assert sorted(r.id for r in records) == sorted(audio)
    for record in records:
        feats = np.load(directory / record.relpath)
        frames = -(-audio[record.id].num_samples // 320)
        assert feats.dtype == np.float32
        assert feats.shape == (frames, extractor.dim) == (record.frames, record.dim)
        wav, _ = sf.read(audio[record.id].path, dtype="float32")
        np.testing.assert_allclose(feats, extractor(wav), rtol=1e-4, atol=1e-3)
    assert {r.num_samples % 320 for r in records} >= {0, 1, 319}  # lengths off the hop grid included


def test_features_are_aligned_float32_and_equal_the_extractor(workdir: Path, extracted: Path) -> None:
    assert_aligned_and_equal(workdir, extracted, MFCC())


def test_sample_is_bounded_true_frames_and_stats_cover_every_frame(extracted: Path) -> None:
    every = np.concatenate([np.load(p) for p in sorted(extracted.glob("*/*.npy"))])
    sample = np.load(extracted / "sample.npy")
    assert sample.shape == (SAMPLE, 39) and SAMPLE < len(every)
    rows = {row.tobytes() for row in every}
    assert all(row.tobytes() in rows for row in sample)  # real frames, not averages or copies of one
    assert len({row.tobytes() for row in sample}) > 0.95 * SAMPLE
    stats = RunningStats.load(extracted / "stats.npz")
    assert stats.count == len(every)
    np.testing.assert_allclose(stats.mean, every.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.std, every.astype(np.float64).std(axis=0), rtol=1e-5)
    description = json.loads((extracted / "features.json").read_text())
    assert description["sample"] == {"frames": SAMPLE, "from_frames": len(every), "requested": SAMPLE}


def test_cqt_features_are_aligned_and_equal_the_extractor(workdir: Path) -> None:
    """`--kind cqt` (the music k-means teacher's features) through the same stage: features/cqt, 168 dims,
    the extractor's numbers, the sample and the statistics; `store=False` keeps only those two."""
    summary = run_features(workdir, kind="cqt")
    assert summary["features"]["kind"] == "cqt" and summary["features"]["dim"] == 168
    directory = workdir / "features/cqt"
    assert_aligned_and_equal(workdir, directory, LogCQT())
    description = json.loads((directory / "features.json").read_text())
    assert description["config"] == LogCQT().config() and description["sample"]["frames"] == SAMPLE
    assert np.load(directory / "sample.npy").shape == (SAMPLE, 168)
    run_features(workdir, kind="cqt", name="cqt_sample_only", store=False)
    sample_only = workdir / "features/cqt_sample_only"
    kept = sorted(p.name for p in sample_only.iterdir())
    assert kept == ["features.json", "features.parquet", "rejects.jsonl", "sample.npy", "stats.npz"]
    assert np.array_equal(np.load(sample_only / "sample.npy"), np.load(directory / "sample.npy"))


def test_split_quota_is_proportional_exact_and_capped() -> None:
    assert split_quota(10, [50, 30, 20]) == [5, 3, 2]
    assert sum(split_quota(7, [3, 3, 3])) == 7 and split_quota(7, [3, 3, 3]) == [3, 2, 2]
    assert split_quota(100, [5, 7]) == [5, 7]  # asking for more than exists keeps everything
    quotas = split_quota(1000, list(range(1, 200)))
    assert sum(quotas) == 1000 and all(0 <= q <= w for q, w in zip(quotas, range(1, 200), strict=True))
    shares = np.array(quotas) / 1000 - np.arange(1, 200) / sum(range(1, 200))
    assert np.abs(shares).max() < 1 / 1000


def test_workers_and_a_killed_worker_give_identical_bytes(workdir: Path, extracted: Path) -> None:
    reference = outputs(extracted)
    config = FeaturesConfig(workdir=workdir, name="mfcc_pool", sample_frames=SAMPLE, files_per_task=3)
    killed = execute(KillOnce(FeaturesStage(config), kill_rank=1), ExecutorConfig(kind="local", workers=2))
    assert not killed.ok
    resumed = execute(FeaturesStage(config), LOCAL)  # the rest in-process: one worker instead of two
    assert resumed.ok and resumed.done >= 1
    assert outputs(workdir / "features/mfcc_pool") == reference
    assert not hidden_tmp_files(workdir / "features")


@pytest.mark.ray
def test_ray_executor_gives_identical_bytes(workdir: Path, extracted: Path, ray_cluster: None) -> None:
    run_features(workdir, ExecutorConfig(kind="ray"), name="mfcc_ray")
    assert outputs(workdir / "features/mfcc_ray") == outputs(extracted)


def test_rerun_skips_and_a_grown_corpus_reuses_stored_features(workdir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("features", ".work", "labels"))
    from mert_pipeline.manifests.io import write_records

    records = list(audio_records(workdir).values())
    moved = [ResampledRecord(**{**r.__dict__, "path": str(copy / "audio_24k" / r.relpath)}) for r in records]
    manifest = copy / "audio_24k/manifest.parquet"
    write_records(manifest, str(copy / "audio_24k"), moved[:-1], ResampledRecord)
    first = run_features(copy)
    assert first["counts"]["accepted"] == len(moved) - 1
    again = execute(FeaturesStage(FeaturesConfig(copy, sample_frames=SAMPLE, files_per_task=3)), LOCAL)
    assert again.ok and again.done == 0
    stored = {p: p.stat().st_mtime_ns for p in (copy / "features/mfcc").glob("*/*.npy")}
    write_records(manifest, str(copy / "audio_24k"), moved, ResampledRecord)  # one more file
    grown = run_features(copy)
    # Quotas moved, so tasks reran, but they read the stored features back instead of rewriting them.
    assert grown["counts"]["accepted"] == len(moved) and grown["counts"]["reused"] >= 1
    assert {p: p.stat().st_mtime_ns for p in stored} == stored
    assert len(list((copy / "features/mfcc").glob("*/*.npy"))) == len(moved)
    assert np.load(copy / "features/mfcc/sample.npy").shape == (SAMPLE, 39)


def test_broken_and_missing_files_are_rejected(workdir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("features", ".work", "labels"))
    from mert_pipeline.manifests.io import write_records

    records = sorted(audio_records(workdir).values(), key=lambda r: -r.num_samples)
    moved = [ResampledRecord(**{**r.__dict__, "path": str(copy / "audio_24k" / r.relpath)}) for r in records]
    write_records(copy / "audio_24k/manifest.parquet", str(copy / "audio_24k"), moved, ResampledRecord)
    broken, gone = Path(moved[0].path), Path(moved[1].path)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    gone.unlink()
    summary = run_features(copy)
    rejected = {r.path: r.reason for r in iter_rejects(copy / "features/mfcc/rejects.jsonl")}
    assert rejected == {str(broken): "decode_error", str(gone): "missing"}
    assert summary["counts"]["accepted"] == len(moved) - 2
    assert len(list((copy / "features/mfcc").glob("*/*.npy"))) == len(moved) - 2


def test_missing_resample_output_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found: run `mert-pipe resample"):
        FeaturesStage(FeaturesConfig(workdir=tmp_path)).plan()
    with pytest.raises(ValueError, match="feature kind"):
        FeaturesConfig(workdir=tmp_path, kind="wav2vec")
    with pytest.raises(ValueError, match="needs --checkpoint and --layer"):
        FeaturesConfig(workdir=tmp_path, kind="model")
