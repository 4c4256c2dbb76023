"""The tokenize stage with the real EnCodec architecture (a test codec saved and loaded like user weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from mert_pipeline.demo.synth import render_track, synthesize_demo_corpus
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.labels import TEACHER_META
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records, iter_rejects
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage
from mert_pipeline.stages.tokenize import TeacherMismatch, TokenizeConfig, TokenizeStage
from mert_pipeline.teachers.rvq import RvqTeacher, encode_whole, load_codec
from tests.helpers import REPO, hidden_tmp_files

LOCAL = ExecutorConfig(kind="local", workers=1)


@pytest.fixture(scope="module")
def codec(test_codec_file: Path) -> Path:
    return test_codec_file


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WORKDIR with resampled audio: three short tracks plus files of 72000 (a multiple of 320) and
    72017 samples at 24 kHz mono."""
    root = tmp_path_factory.mktemp("corpus")
    synthesize_demo_corpus(root, n_tracks=3, seed=21, with_bad_files=False)
    for n in (72000, 72017):
        sf.write(root / f"exact_{n}.flac", render_track(n, n / 24000, 24000, 1), 24000, subtype="PCM_16")
    workdir = tmp_path_factory.mktemp("work")
    config = ManifestConfig(roots=resolve_roots([root]), workdir=workdir, valid_percent=0.3)
    assert execute(ManifestStage(config), LOCAL).ok
    assert execute(ResampleStage(ResampleConfig(workdir=workdir)), LOCAL).ok
    return workdir


def teacher(codec: Path, **kw) -> RvqTeacher:
    return RvqTeacher(checkpoint=str(codec), device="cpu", **kw).resolve()


def tokenize(workdir: Path, rvq: RvqTeacher, executor: ExecutorConfig = LOCAL, **kw) -> dict:
    stage = TokenizeStage(TokenizeConfig(workdir=workdir, teacher=rvq, replace=executor.force, **kw))
    report = execute(stage, executor)
    assert report.ok, report.failed
    return report.summary


def labels_of(workdir: Path, name: str = "rvq") -> dict[str, bytes]:
    root = workdir / "labels" / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def labelled(audio: Path, codec: Path) -> Path:
    tokenize(audio, teacher(codec), files_per_task=2)
    return audio


def test_labels_have_exact_shapes_and_are_diverse(labelled: Path) -> None:
    audio = {
        r.id: r for r in iter_records(labelled / "audio_24k/manifest.parquet", record_type=ResampledRecord)
    }
    records = list(iter_records(labelled / "labels/rvq/labels.parquet", record_type=LabelRecord))
    assert sorted(r.id for r in records) == sorted(audio)
    lengths = set()
    for record in records:
        codes = np.load(labelled / "labels/rvq" / record.relpath)
        frames = -(-audio[record.id].num_samples // 320)
        assert codes.dtype == np.int16 and codes.shape == (8, frames) == (record.n_q, record.frames)
        assert codes.min() >= 0 and codes.max() < 1024
        assert len(np.unique(codes[0])) > min(100, frames // 4)  # real, distinct codebooks
        assert (record.teacher, record.kind, record.label_rate, record.num_classes) == (
            "rvq",
            "encodec_24khz",
            75.0,
            1024,
        )
        lengths.add(audio[record.id].num_samples % 320 == 0)
    assert lengths == {True, False}
    facts = json.loads((labelled / "labels/rvq/teacher.json").read_text())
    assert {r.config_hash for r in records} == {facts["config_hash"]}
    assert facts["config"]["checkpoint_sha256"] and facts["n_q"] == 8
    # made with the test codec, and every record of it says so: teacher.json and labels.parquet's metadata
    assert facts["config"]["weights"] == "test"
    metadata = pq.read_schema(labelled / "labels/rvq/labels.parquet").metadata
    assert json.loads(metadata[TEACHER_META.encode()]) == facts


def test_labels_equal_whole_file_encoding(labelled: Path, codec: Path) -> None:
    model, _ = load_codec(codec, 6.0, "cpu")
    for record in iter_records(labelled / "labels/rvq/labels.parquet", record_type=LabelRecord):
        wav, _ = sf.read(labelled / "audio_24k" / f"{record.id[:2]}/{record.id}.flac", dtype="float32")
        whole = encode_whole(model, wav)
        streamed = np.load(labelled / "labels/rvq" / record.relpath)
        agreement = (whole == streamed).mean(axis=1)
        assert agreement.min() >= 0.9999, (record.id, agreement)


def test_batch_composition_and_workers_do_not_change_any_code(
    labelled: Path, codec: Path, tmp_path: Path
) -> None:
    reference = labels_of(labelled)
    summary = tokenize(
        labelled,
        teacher(codec, batch_seconds=8 * 2.56),
        ExecutorConfig(kind="local", workers=2),
        name="rvq_b8",
    )
    assert summary["counts"]["accepted"] == 5
    ours = labels_of(labelled, "rvq_b8")
    npy = {k: v for k, v in ours.items() if k.endswith(".npy")}
    assert npy == {k: v for k, v in reference.items() if k.endswith(".npy")}


@pytest.mark.ray
def test_ray_executor_gives_identical_labels(labelled: Path, codec: Path, ray_cluster: None) -> None:
    tokenize(labelled, teacher(codec), ExecutorConfig(kind="ray"), files_per_task=1, name="rvq_ray")
    ours = {k: v for k, v in labels_of(labelled, "rvq_ray").items() if k.endswith(".npy")}
    assert ours == {k: v for k, v in labels_of(labelled).items() if k.endswith(".npy")}


def test_rerun_skips_and_another_teacher_is_never_mixed_in(labelled: Path, codec: Path) -> None:
    reference = labels_of(labelled)
    stage = TokenizeStage(TokenizeConfig(workdir=labelled, teacher=teacher(codec), files_per_task=2))
    report = execute(stage, LOCAL)
    assert report.done == 0 and report.skipped == report.tasks
    assert labels_of(labelled) == reference
    other = TokenizeStage(TokenizeConfig(workdir=labelled, teacher=teacher(codec, bandwidth=3.0)))
    with pytest.raises(TeacherMismatch, match="another teacher configuration"):
        execute(other, LOCAL)
    assert labels_of(labelled) == reference


def test_force_replaces_labels_of_another_teacher(audio: Path, codec: Path, tmp_path: Path) -> None:
    tokenize(audio, teacher(codec, bandwidth=1.5), name="swap")
    summary = tokenize(
        audio, teacher(codec, bandwidth=3.0), ExecutorConfig(kind="local", force=True), name="swap"
    )
    assert summary["teacher"]["n_q"] == 4
    for record in iter_records(audio / "labels/swap/labels.parquet", record_type=LabelRecord):
        assert np.load(audio / "labels/swap" / record.relpath).shape[0] == 4


def test_a_broken_file_is_rejected_and_the_others_go_on(audio: Path, codec: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    (workdir / "audio_24k").mkdir(parents=True)
    records = list(iter_records(audio / "audio_24k/manifest.parquet", record_type=ResampledRecord))
    from mert_pipeline.manifests.io import write_records

    moved = []
    for record in records:
        target = workdir / "audio_24k" / record.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(record.path).read_bytes())
        moved.append(
            ResampledRecord(**{**record.__dict__, "path": str(target)})  # same file, new workdir
        )
    write_records(workdir / "audio_24k/manifest.parquet", str(workdir / "audio_24k"), moved, ResampledRecord)
    broken, gone = Path(moved[0].path), Path(moved[1].path)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    gone.unlink()
    summary = tokenize(workdir, teacher(codec, batch_seconds=4 * 2.56))
    rejected = {r.path: r.reason for r in iter_rejects(workdir / "labels/rvq/rejects.jsonl")}
    assert rejected == {str(broken): "decode_error", str(gone): "missing"}
    assert summary["counts"]["accepted"] == len(moved) - 2
    assert not hidden_tmp_files(workdir / "labels")


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from mert_pipeline.executor import ExecutorConfig, execute
    from mert_pipeline.teachers.rvq import RvqTeacher
    from mert_pipeline.stages.tokenize import TokenizeConfig, TokenizeStage

    real = TokenizeStage._store
    stored = []

    def dies_after_two_files(self, row, labels, facts):
        if len(stored) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        stored.append(row["id"])
        return real(self, row, labels, facts)

    TokenizeStage._store = dies_after_two_files
    teacher = RvqTeacher(checkpoint=sys.argv[2], device="cpu").resolve()
    stage = TokenizeStage(TokenizeConfig(workdir=Path(sys.argv[1]), teacher=teacher, name="killed"))
    execute(stage, ExecutorConfig(kind="local", workers=1))
    """
)


def test_a_killed_task_resumes_without_redoing_finished_files(labelled: Path, codec: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(labelled), str(codec)], cwd=REPO)
    assert killed.returncode == -9
    assert len(list((labelled / "labels/killed").rglob("*.npy"))) == 2
    summary = tokenize(labelled, teacher(codec), name="killed")
    assert summary["counts"]["resumed"] == 2
    ours = {k: v for k, v in labels_of(labelled, "killed").items() if k.endswith(".npy")}
    assert ours == {k: v for k, v in labels_of(labelled).items() if k.endswith(".npy")}
    assert not os.listdir(labelled / ".work/tokenize_killed/journal")


def test_missing_resample_output_is_a_clear_error(tmp_path: Path, codec: Path) -> None:
    stage = TokenizeStage(TokenizeConfig(workdir=tmp_path, teacher=teacher(codec)))
    with pytest.raises(FileNotFoundError, match="not found: run `mert-pipe resample"):
        stage.plan()
