"""k-means (MFCC and the music teacher's log-CQT) and BEST-RQ teachers through the tokenize stage, `kmeans
fit` on the features sample, the label report (with labelled clips), and the commands as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import Result
from typer.testing import CliRunner

from mert_pipeline import pipeline
from mert_pipeline.cli import app
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.fs import sha256_file
from mert_pipeline.labels import LabelsError, label_report
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records
from mert_pipeline.manifests.records import FeatureRecord
from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage, log_mel_stats_config
from mert_pipeline.stages.tokenize import TeacherMismatch, TokenizeConfig, TokenizeStage
from mert_pipeline.teachers import FileToLabel, stream_features
from mert_pipeline.teachers.bestrq import BestRQ, BestRQTeacher
from mert_pipeline.teachers.features import LogMel, RunningStats
from mert_pipeline.teachers.kmeans import (
    JointCounts,
    KMeansInputError,
    KMeansTeacher,
    assign,
    cluster_usage,
    fit_from_features,
    last_centroids,
)
from mert_pipeline.teachers.rvq import RvqTeacher
from tests.helpers import resampled_workdir

LOCAL = ExecutorConfig(kind="local", workers=1)
K = 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = resampled_workdir(tmp_path_factory.mktemp("kmeans"))
    config = FeaturesConfig(workdir=workdir, sample_frames=2000, files_per_task=4)
    assert execute(FeaturesStage(config), LOCAL).ok
    return workdir


def tokenize(workdir: Path, teacher, name: str, executor: ExecutorConfig = LOCAL) -> dict:
    config = TokenizeConfig(
        workdir=workdir, teacher=teacher, name=name, files_per_task=3, replace=executor.force
    )
    stage = TokenizeStage(config)
    report = execute(stage, executor)
    assert report.ok, report.failed
    return report.summary


def labels(workdir: Path, name: str) -> dict[str, np.ndarray]:
    root = workdir / "labels" / name
    records = iter_records(root / "labels.parquet", record_type=LabelRecord)
    return {r.id: np.load(root / r.relpath) for r in records}


def bestrq_teacher(workdir: Path, **kw) -> BestRQTeacher:
    stats_stage = FeaturesStage(log_mel_stats_config(workdir))
    assert execute(stats_stage, LOCAL).ok
    quantizer = BestRQ(RunningStats.load(stats_stage.config.features.stats), **kw)
    return BestRQTeacher.save_quantizer(quantizer, workdir / "bestrq")


@pytest.fixture(scope="module")
def fitted(workdir: Path) -> dict:
    return fit_from_features(workdir, k=K, seed=0)


@pytest.fixture(scope="module")
def kmeans_labelled(workdir: Path, fitted: dict) -> Path:
    tokenize(workdir, KMeansTeacher(str(last_centroids(workdir))).resolve(), "km")
    return workdir


@pytest.fixture(scope="module")
def bestrq_labelled(workdir: Path) -> Path:
    tokenize(workdir, bestrq_teacher(workdir, codebook_size=64, num_codebooks=2), "brq")
    return workdir


def test_fit_is_deterministic_records_the_last_fit_and_subsamples(workdir: Path, fitted: dict) -> None:
    centroids = np.load(fitted["centroids"])
    assert centroids.shape == (K, 39) and centroids.dtype == np.float32
    assert fitted["sample_frames"] == 2000 and fitted["centroids_sha256"] == sha256_file(fitted["centroids"])
    again = fit_from_features(workdir, k=K, seed=0, name="again")
    assert np.load(again["centroids"]).tobytes() == centroids.tobytes()
    assert again["inertia"] == fitted["inertia"]
    assert last_centroids(workdir) == Path(again["centroids"])  # the last fit is the default
    other = fit_from_features(workdir, k=K, seed=1, sample_frames=1000, name="seed1")
    assert other["sample_frames"] == 1000 and other["sample_available"] == 2000
    assert np.load(other["centroids"]).tobytes() != centroids.tobytes()
    fit_json = json.loads((workdir / "kmeans/seed1/fit.json").read_text())
    assert fit_json["fit_config"]["seed"] == 1 and fit_json["features_config_hash"]
    fit_from_features(workdir, k=K, seed=0)  # the module's fit is the last one again


def test_faiss_and_the_sklearn_recipe_reach_comparable_inertia(workdir: Path, fitted: dict) -> None:
    sk = fit_from_features(workdir, k=K, seed=0, backend="sklearn", name="sk")
    assert fitted["inertia"] <= 1.03 * sk["inertia"]
    fit_from_features(workdir, k=K, seed=0)


def test_fit_needs_features_and_enough_frames(tmp_path: Path, workdir: Path) -> None:
    with pytest.raises(KMeansInputError, match="run `mert-pipe features"):
        fit_from_features(tmp_path, k=K)
    with pytest.raises(KMeansInputError, match="fewer than k=5000"):
        fit_from_features(workdir, k=5000, name="too_big")
    with pytest.raises(KMeansInputError, match="no centroids fitted"):
        last_centroids(tmp_path)


def test_kmeans_labels_are_the_assignment_of_the_stored_features(kmeans_labelled: Path, fitted: dict) -> None:
    centroids = np.load(fitted["centroids"])
    ours = labels(kmeans_labelled, "km")
    features = kmeans_labelled / "features/mfcc/features.parquet"
    for record in iter_records(features, record_type=FeatureRecord):
        feats = np.load(kmeans_labelled / "features/mfcc" / record.relpath)
        assert ours[record.id].dtype == np.int16 and ours[record.id].shape == (1, len(feats))
        np.testing.assert_array_equal(ours[record.id][0], assign(feats, centroids))
    facts = json.loads((kmeans_labelled / "labels/km/teacher.json").read_text())
    assert facts["config"]["centroids_sha256"] == fitted["centroids_sha256"]
    assert facts["kind"] == "kmeans" and facts["num_classes"] == K and facts["n_q"] == 1


def test_other_centroids_are_another_teacher_configuration(kmeans_labelled: Path) -> None:
    other = KMeansTeacher(str(kmeans_labelled / "kmeans/seed1/centroids.npy")).resolve()
    stage = TokenizeStage(TokenizeConfig(workdir=kmeans_labelled, teacher=other, name="km"))
    with pytest.raises(TeacherMismatch, match="another teacher configuration"):
        stage.claim_labels_dir()


def test_kmeans_teacher_refuses_bad_centroids(tmp_path: Path) -> None:
    np.save(tmp_path / "c.npy", np.zeros((4, 13), np.float32))
    with pytest.raises(ValueError, match=r"expected \(k <= 32768, 39\)"):
        KMeansTeacher(str(tmp_path / "c.npy")).resolve()


def test_bestrq_labels_reproducible_from_the_saved_quantizer(bestrq_labelled: Path) -> None:
    facts = json.loads((bestrq_labelled / "labels/brq/teacher.json").read_text())
    assert facts["kind"] == "bestrq" and facts["n_q"] == 2 and facts["num_classes"] == 64
    quantizer = BestRQ.load(bestrq_labelled / "bestrq" / f"{facts['config']['quantizer_hash']}.npz")
    # The statistics are the train files' log-mel mean/std, computed by the stage itself.
    frames = []
    for record in iter_records(bestrq_labelled / "audio_24k/manifest.parquet", record_type=ResampledRecord):
        item = FileToLabel(record.id, record.path, record.num_samples)
        feats = np.concatenate(list(stream_features(LogMel(), item, {})))
        if record.split == "train":
            frames.append(feats)
        expected = quantizer.labels(feats)
        np.testing.assert_array_equal(labels(bestrq_labelled, "brq")[record.id], expected)
    every = np.concatenate(frames).astype(np.float64)
    assert quantizer.stats.count == len(every)
    np.testing.assert_allclose(quantizer.stats.mean, every.mean(axis=0), rtol=1e-5, atol=1e-5)
    # A quantizer rebuilt from the same seed and statistics is the same labelling function.
    rebuilt = BestRQ(quantizer.stats, seed=0, codebook_size=64, num_codebooks=2)
    assert rebuilt.config_hash == quantizer.config_hash
    assert np.array_equal(rebuilt.codebooks, quantizer.codebooks)


def test_frame_counts_equal_across_teachers_and_features(
    kmeans_labelled: Path, bestrq_labelled: Path, test_codec_file: Path
) -> None:
    workdir = kmeans_labelled
    tokenize(workdir, RvqTeacher(checkpoint=str(test_codec_file), device="cpu").resolve(), "rvq")
    audio = {
        r.id: r for r in iter_records(workdir / "audio_24k/manifest.parquet", record_type=ResampledRecord)
    }
    sets = {name: labels(workdir, name) for name in ("rvq", "km", "brq")}
    assert all(sorted(found) == sorted(audio) for found in sets.values())
    remainders = set()
    for file_id, record in audio.items():
        frames = -(-record.num_samples // 320)
        feats = np.load(workdir / "features/mfcc" / f"{file_id[:2]}/{file_id}.npy", mmap_mode="r")
        assert [sets[name][file_id].shape[1] for name in sets] + [len(feats)] == [frames] * 4
        remainders.add(record.num_samples % 320)
    assert {0, 1, 319} <= remainders and min(r.num_samples for r in audio.values()) == 1


def test_report_counts_usage_and_agreement(kmeans_labelled: Path, bestrq_labelled: Path) -> None:
    reports = label_report(kmeans_labelled, "km")
    report = json.loads((kmeans_labelled / "labels/km/report.json").read_text())
    assert report == json.loads(json.dumps(reports["km"]))
    km, brq = labels(kmeans_labelled, "km"), labels(kmeans_labelled, "brq")
    ids = sorted(km)
    assert report["usage"][0] == {"codebook": 0, **cluster_usage([km[i] for i in ids], K)}
    joint = JointCounts(K, 64)
    for i in ids:
        joint.update(km[i][0], brq[i][0])
    assert report["agreement"]["brq"] == {"files": len(ids), **joint.metrics()}
    both = label_report(kmeans_labelled, "brq")["brq"]
    assert len(both["usage"]) == 2  # one row per codebook
    mi = both["agreement"]["km"]["mutual_information"]
    assert mi == pytest.approx(report["agreement"]["brq"]["mutual_information"])
    assert label_report(kmeans_labelled).keys() == {"km"}  # default: the k-means label sets


def mert_pipe(*args: str) -> Result:
    """The command in this process (typer's runner): a subprocess per step would spend most of this
    test importing torch. tests/mert_pipeline/test_cli.py covers the real entry point and exit codes."""
    return CliRunner().invoke(app, list(args))


def test_commands_as_a_user_runs_them(tmp_path: Path) -> None:
    workdir = resampled_workdir(tmp_path, n_tracks=2)
    w = str(workdir)
    assert mert_pipe("tokenize", w, "--teacher", "kmeans").stderr.startswith("error: no centroids fitted")
    result = mert_pipe("features", w, "--sample-frames", "900", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert "sample for `kmeans fit`: 900 of" in result.stderr
    result = mert_pipe("kmeans", "fit", w, "--k", "16", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    assert "mfcc_k16" in result.stderr and (workdir / "kmeans/mfcc_k16/centroids.npy").exists()
    result = mert_pipe("tokenize", w, "--teacher", "kmeans", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert "teacher kmeans config" in result.stderr and "1 codebooks x 16 at 75 Hz" in result.stderr
    records = iter_records(workdir / "labels/kmeans16/labels.parquet", record_type=LabelRecord)
    assert {r.teacher for r in records} == {"kmeans16"}
    result = mert_pipe("tokenize", w, "--teacher", "bestrq", "--codebook-size", "32", "--workers", "1")
    assert result.exit_code == 0, result.stderr
    assert "teacher bestrq config" in result.stderr and "1 codebooks x 32" in result.stderr
    result = mert_pipe("kmeans", "report", w)
    assert result.exit_code == 0, result.stderr
    assert "kmeans16: cluster usage" in result.stderr and "bestrq" in result.stderr
    assert (workdir / "labels/kmeans16/report.json").exists()
    for args, message in [
        (("features", w, "--kind", "model"), "--kind model needs --checkpoint and --layer"),
        (("kmeans", "fit", w, "--backend", "torch"), "--backend must be faiss or sklearn"),
        (("kmeans", "fit", w, "--k", "5000"), "fewer than k=5000"),
        (("kmeans", "report", w, "--teacher", "nope"), "no label set 'nope'"),
    ]:
        result = mert_pipe(*args)
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# The music k-means teacher: centroids fitted on log-CQT, beside MFCC's in one WORKDIR
# --------------------------------------------------------------------------------------------------

PITCHES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def _tone(midi: int, amplitude: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    return (amplitude * np.sin(2 * np.pi * 440.0 * 2 ** ((midi - 69) / 12) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def music_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WORKDIR of pure tones (MIDI 48-71 at random levels, 6 a file) labelled by both k-means teachers
    under their default names, kmeans24 (MFCC) and music24 (log-CQT), each fitted on its own features."""
    root = tmp_path_factory.mktemp("music")
    corpus, workdir = root / "corpus", root / "work"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        tones = [_tone(midi, rng.uniform(0.1, 0.5)) for midi in range(48 + i, 72, 4)]
        sf.write(corpus / f"tones{i}.wav", np.concatenate(tones), 24000)
    pipeline.manifest([str(corpus)], workdir, valid_percent=0.3, min_seconds=0.0, executor=LOCAL)
    pipeline.resample(workdir, executor=LOCAL)
    for kind in ("mfcc", "cqt"):
        config = FeaturesConfig(workdir=workdir, kind=kind, sample_frames=1500, files_per_task=4)
        assert execute(FeaturesStage(config), LOCAL).ok
        fit = fit_from_features(workdir, features=kind, k=K, seed=0)
        assert pipeline.tokenize(workdir, KMeansTeacher(fit["centroids"]).resolve(), executor=LOCAL).ok
    return workdir


def test_music_labels_are_the_assignment_of_the_stored_log_cqt(music_workdir: Path) -> None:
    fit = json.loads((music_workdir / "kmeans/cqt_k24/fit.json").read_text())
    assert fit["features_extractor"]["kind"] == "cqt" and fit["dim"] == 168
    teacher = KMeansTeacher(fit["centroids"]).resolve()
    assert teacher.features == "cqt" and pipeline.label_set_name(teacher) == "music24"
    centroids = np.load(fit["centroids"])
    ours = labels(music_workdir, "music24")
    for record in iter_records(music_workdir / "features/cqt/features.parquet", record_type=FeatureRecord):
        feats = np.load(music_workdir / "features/cqt" / record.relpath)
        np.testing.assert_array_equal(ours[record.id][0], assign(feats, centroids))
    music = json.loads((music_workdir / "labels/music24/teacher.json").read_text())
    mfcc = json.loads((music_workdir / "labels/kmeans24/teacher.json").read_text())
    assert music["config"]["features"]["kind"] == "cqt" and mfcc["config"]["features"]["kind"] == "mfcc"
    assert music["config_hash"] != mfcc["config_hash"]
    assert labels(music_workdir, "kmeans24").keys() == ours.keys()  # both sets, side by side


def test_kmeans_teacher_refuses_centroids_its_features_do_not_fit(
    music_workdir: Path, tmp_path: Path
) -> None:
    fit_dir = tmp_path / "cqt_k24"
    shutil.copytree(music_workdir / "kmeans/cqt_k24", fit_dir)
    np.save(fit_dir / "centroids.npy", np.zeros((4, 39), np.float32))  # MFCC-shaped, fitted on log-CQT
    with pytest.raises(ValueError, match=r"expected \(k <= 32768, 168\)"):
        KMeansTeacher(str(fit_dir / "centroids.npy")).resolve()
    fit = json.loads((fit_dir / "fit.json").read_text())
    fit["features_extractor"]["bins_per_octave"] = 12  # features this version does not compute
    (fit_dir / "fit.json").write_text(json.dumps(fit))
    with pytest.raises(ValueError, match="a configuration this version does not compute"):
        KMeansTeacher(str(fit_dir / "centroids.npy")).resolve()


def _tone_csvs(folder: Path) -> tuple[Path, Path]:
    """Pure tones of the 12 pitch classes in two octaves: pitch.csv (label: pitch class) and octave.csv
    (label: octave), the `path,label` CSVs `mert-pipe probe --data` reads."""
    folder.mkdir()
    for midi in range(48, 72):
        sf.write(folder / f"tone{midi}.wav", _tone(midi, 0.3), 24000)
    for task, label in (("pitch", lambda m: PITCHES[m % 12]), ("octave", lambda m: f"o{m // 12}")):
        rows = "".join(f"tone{midi}.wav,{label(midi)}\n" for midi in range(48, 72))
        (folder / f"{task}.csv").write_text("path,label\n" + rows)
    return folder / "pitch.csv", folder / "octave.csv"


def test_report_measures_each_kmeans_set_against_labelled_clips(music_workdir: Path, tmp_path: Path) -> None:
    pitch, octave = _tone_csvs(tmp_path / "tones")
    reports = label_report(music_workdir, probe_data=[str(pitch), f"register={octave}"])
    assert reports.keys() == {"kmeans24", "music24"}
    for name, report in reports.items():
        assert report["probe"].keys() == {"pitch", "register"}
        assert report["probe"]["pitch"]["clips"] == 24 and report["probe"]["pitch"]["classes"] == 12
        assert report["probe"]["pitch"]["frames"] == 24 * 38  # ceil(12000 / 320) frames a tone
        on_disk = json.loads((music_workdir / "labels" / name / "report.json").read_text())
        assert on_disk["probe"] == json.loads(json.dumps(report["probe"]))
        assert report["probe"]["pitch"]["mi_over_h_class"] > 0.3  # chance: about 0 (12 classes, 912 frames)
        assert report["probe"]["pitch"]["purity_class_given_label"] > 2 / 12
    result = mert_pipe("kmeans", "report", str(music_workdir), "--probe-data", str(pitch))
    assert result.exit_code == 0, result.stderr
    assert "music24 against labelled clips" in result.stderr and "MI/H(class)" in result.stderr
    with pytest.raises(LabelsError, match="names task 'pitch' twice"):
        label_report(music_workdir, probe_data=[str(pitch), f"pitch={octave}"])
    result = mert_pipe("kmeans", "report", str(music_workdir), "--probe-data", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2 and result.stderr.strip().endswith("nope.csv: no such CSV or folder")
