"""The resample stage on a real manifest: every row lands once, outputs exact, reruns and executors agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mert_pipeline.demo.synth import synthesize_demo_corpus
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.manifests import iter_records, iter_rejects, read_fairseq_tsv
from mert_pipeline.manifests.records import ResampledRecord
from mert_pipeline.resample import OutputSpec, output_length
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage, resample_one
from tests.helpers import REPO, hidden_tmp_files

LOCAL = ExecutorConfig(kind="local", workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    _, expected = synthesize_demo_corpus(root, n_tracks=5, seed=3, with_bad_files=False, with_edge_cases=True)
    return root, expected


def manifest(root: Path, workdir: Path) -> Path:
    config = ManifestConfig(roots=resolve_roots([root]), workdir=workdir, valid_percent=0.3)
    assert execute(ManifestStage(config), LOCAL).ok
    return workdir


def resample(workdir: Path, executor: ExecutorConfig = LOCAL, force: bool = False, **options) -> dict:
    config = ResampleConfig(workdir=workdir, **options)
    run = ExecutorConfig(**{**executor.__dict__, "force": force})
    report = execute(ResampleStage(config), run)
    assert report.ok, report.failed
    return report.summary


def audio_records(workdir: Path, rate: int = 24000) -> dict[str, ResampledRecord]:
    path = workdir / ("audio_24k" if rate == 24000 else f"audio_{rate // 1000}k") / "manifest.parquet"
    records = iter_records(path, record_type=ResampledRecord)
    return {os.path.basename(r.source_path): r for r in records}  # type: ignore[union-attr]


def outputs(workdir: Path) -> dict[str, bytes]:
    """Every file the stage publishes (audio, manifest, rejects, tsv): what must be byte-identical."""
    audio = workdir / "audio_24k"
    return {str(p.relative_to(audio)): p.read_bytes() for p in sorted(audio.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(corpus: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = manifest(corpus[0], tmp_path_factory.mktemp("work"))
    resample(workdir)
    return workdir


def test_every_manifest_row_is_written_or_rejected_exactly_once(corpus, done: Path) -> None:
    _, expected = corpus
    sources = {r.path for r in iter_records(done / "manifest.parquet")}
    written = {r.source_path for r in audio_records(done).values()}
    rejected = {r.path: r.reason for r in iter_rejects(done / "audio_24k/rejects.jsonl")}
    assert written.isdisjoint(rejected) and written | set(rejected) == sources
    by_name = {os.path.basename(p): reason for p, reason in rejected.items()}
    assert by_name == {"nan_middle.wav": "non_finite", "corrupt_middle.flac": "decode_error"}
    records = audio_records(done)
    assert records["silence.flac"].silent and not records["silence.flac"].clipped
    assert records["clipped.wav"].clipped and not records["clipped.wav"].silent
    assert expected["edge/already_24k.flac"] == "copied"
    copied = records["already_24k.flac"]
    assert Path(copied.path).read_bytes() == Path(copied.source_path).read_bytes()
    assert sum(r.silent or r.clipped for r in records.values()) == 2
    assert not hidden_tmp_files(done / "audio_24k")


def test_records_describe_the_written_files(done: Path) -> None:
    sources = {r.path: r for r in iter_records(done / "manifest.parquet")}
    for record in audio_records(done).values():
        source = sources[record.source_path]
        info = sf.info(record.path)
        assert (info.samplerate, info.channels, info.frames) == (24000, 1, record.num_samples)
        assert record.num_samples == output_length(source.num_samples, source.sampling_rate, 24000)
        assert record.id == source.id and record.split == source.split
        assert record.path == str(done / "audio_24k" / record.relpath)
        assert record.relpath == f"{record.id[:2]}/{record.id}.flac"
        assert record.size_bytes == os.path.getsize(record.path)
        assert (record.source_sampling_rate, record.source_channels) == (
            source.sampling_rate,
            source.channels,
        )


def test_fairseq_tsv_root_is_the_resampled_directory(done: Path) -> None:
    records = audio_records(done).values()
    rows = []
    for split in ("train", "valid"):
        root, split_rows = read_fairseq_tsv(done / f"audio_24k/{split}.tsv")
        assert root == str(done / "audio_24k")  # not the original corpus root (an official-script bug)
        assert all(os.path.exists(os.path.join(root, rel)) for rel, _ in split_rows)
        rows += split_rows
    assert sorted(rows) == sorted((r.relpath, r.num_samples) for r in records)


def test_rerun_skips_everything_and_changes_nothing(done: Path) -> None:
    before = outputs(done)
    mtimes = {p: p.stat().st_mtime_ns for p in (done / "audio_24k").rglob("*.flac")}
    report = execute(ResampleStage(ResampleConfig(workdir=done)), LOCAL)
    assert report.done == 0 and report.skipped == report.tasks
    assert outputs(done) == before
    assert {p: p.stat().st_mtime_ns for p in (done / "audio_24k").rglob("*.flac")} == mtimes


def test_outputs_do_not_depend_on_partition_or_workers(corpus, tmp_path: Path, done: Path) -> None:
    workdir = manifest(corpus[0], tmp_path / "w")
    resample(workdir, ExecutorConfig(kind="local", workers=2), files_per_task=1)
    theirs = {k: v for k, v in outputs(done).items() if not k.endswith((".parquet", ".tsv", ".jsonl"))}
    ours = {k: v for k, v in outputs(workdir).items() if not k.endswith((".parquet", ".tsv", ".jsonl"))}
    assert ours == theirs  # audio bytes (paths inside the manifests differ with the workdir)
    reference = outputs(workdir)
    resample(workdir, ExecutorConfig(kind="local", workers=1), force=True, files_per_task=3)
    assert outputs(workdir) == reference


@pytest.mark.ray
def test_ray_executor_gives_identical_outputs(corpus, tmp_path: Path, ray_cluster: None) -> None:
    workdir = manifest(corpus[0], tmp_path / "w")
    resample(workdir, files_per_task=2)
    reference = outputs(workdir)
    summary = resample(workdir, ExecutorConfig(kind="ray"), force=True, files_per_task=2)
    assert outputs(workdir) == reference
    assert summary["counts"]["resampled"] + summary["counts"]["copied"] == summary["counts"]["accepted"]


def test_reject_policies_drop_flagged_files_and_prune_their_audio(corpus, tmp_path: Path) -> None:
    workdir = manifest(corpus[0], tmp_path / "w")
    resample(workdir)
    silent_path = Path(audio_records(workdir)["silence.flac"].path)
    assert silent_path.exists()
    summary = resample(workdir, on_silence="reject", on_clipping="reject")
    rejected = {os.path.basename(r.path): r for r in iter_rejects(workdir / "audio_24k/rejects.jsonl")}
    assert rejected["silence.flac"].reason == "silent"
    assert rejected["clipped.wav"].reason == "clipped" and "full scale" in rejected["clipped.wav"].detail
    assert "silence.flac" not in audio_records(workdir)
    assert not silent_path.exists()  # the file the earlier run kept is gone with its record
    assert summary["counts"]["removed_stale"] == 2
    flac = {str(p.relative_to(workdir / "audio_24k")) for p in (workdir / "audio_24k").rglob("*.flac")}
    assert flac == {r.relpath for r in audio_records(workdir).values()}


def test_changed_and_missing_sources_are_rejected(tmp_path: Path) -> None:
    root = tmp_path / "c"
    synthesize_demo_corpus(root, n_tracks=3, seed=9, with_bad_files=False)
    workdir = manifest(root, tmp_path / "w")
    paths = sorted(r.path for r in iter_records(workdir / "manifest.parquet"))
    with open(paths[0], "ab") as handle:
        handle.write(b"\0" * 10)
    os.unlink(paths[1])
    resample(workdir)
    rejected = {r.path: r for r in iter_rejects(workdir / "audio_24k/rejects.jsonl")}
    assert rejected[paths[0]].reason == "changed" and "rerun manifest" in rejected[paths[0]].detail
    assert rejected[paths[1]].reason == "missing"
    assert len(audio_records(workdir)) == 1


def test_a_truncated_file_leaves_nothing_behind(tmp_path: Path) -> None:
    """A FLAC whose header promises 20 s (the manifest's quick probe would not pass it; the row is
    built by hand, as if the file had been cut after the manifest ran)."""
    t = np.arange(44100 * 20) / 44100
    src = tmp_path / "t.flac"
    sf.write(src, 0.3 * np.sin(2 * np.pi * 300 * t), 44100, subtype="PCM_16")
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    row = {
        "id": "0123456789abcdef",
        "path": str(src),
        "size_bytes": src.stat().st_size,
        "content_hash": "0123456789abcdef" * 2,
        "split": "train",
        "sampling_rate": 44100,
        "channels": 1,
    }
    config = ResampleConfig(workdir=tmp_path / "w")
    result = resample_one(row, config)
    assert result.reason == "decode_error" and "of 20.00s" in result.detail  # type: ignore[union-attr]
    assert not any(p.is_file() for p in (tmp_path / "w").rglob("*"))


def test_other_rates_formats_and_widths(corpus, tmp_path: Path) -> None:
    workdir = manifest(corpus[0], tmp_path / "w")
    summary = resample(workdir, output=OutputSpec(sample_rate=16000, format="WAV", bits=24))
    assert summary["root"] == str(workdir / "audio_16k")
    source_subtype = {r.path: r.subtype for r in iter_records(workdir / "manifest.parquet")}
    subtypes = set()
    for record in audio_records(workdir, 16000).values():
        info = sf.info(record.path)
        float_source = source_subtype[record.source_path] in ("FLOAT", "DOUBLE")
        assert (info.samplerate, info.format) == (16000, "WAV") and record.relpath.endswith(".wav")
        assert info.subtype == record.subtype == ("FLOAT" if float_source else "PCM_24")
        subtypes.add(info.subtype)
    assert subtypes == {"FLOAT", "PCM_24"}  # the corpus holds float WAVs, which stay float


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import mert_pipeline.stages.resample as stage_module
    from mert_pipeline.executor import ExecutorConfig, execute
    from mert_pipeline.stages.resample import ResampleConfig, ResampleStage

    real = stage_module.resample_one
    calls = []

    def dies_on_the_third_file(row, config):
        calls.append(row["id"])
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(row, config)

    stage_module.resample_one = dies_on_the_third_file
    execute(ResampleStage(ResampleConfig(workdir=Path(sys.argv[1]), files_per_task=100)),
            ExecutorConfig(kind="local", workers=1))
    """
)


def test_a_task_killed_halfway_resumes_without_redoing_finished_files(
    corpus, tmp_path: Path, done: Path
) -> None:
    workdir = manifest(corpus[0], tmp_path / "w")
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(workdir)], cwd=REPO)
    assert killed.returncode == -9
    assert not (workdir / "audio_24k/manifest.parquet").exists()
    journal = (workdir / ".work/resample/journal/00000.jsonl").read_text().splitlines()
    assert len(journal) == 3  # the task fingerprint, then the two finished files
    written = sum('"record"' in line for line in journal)
    assert len(list((workdir / "audio_24k").rglob("*.flac"))) == written  # whole files, nothing partial
    assert not hidden_tmp_files(workdir / "audio_24k")
    report = execute(ResampleStage(ResampleConfig(workdir=workdir, files_per_task=100)), LOCAL)
    assert report.ok and report.stats["resumed"] == 2
    assert not hidden_tmp_files(workdir / "audio_24k")
    theirs = {k: v for k, v in outputs(done).items() if not k.endswith((".parquet", ".tsv", ".jsonl"))}
    ours = {k: v for k, v in outputs(workdir).items() if not k.endswith((".parquet", ".tsv", ".jsonl"))}
    assert ours == theirs
    assert not list((workdir / ".work/resample/journal").glob("*"))


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `mert-pipe manifest` first"):
        ResampleStage(ResampleConfig(workdir=tmp_path)).plan()


def test_stats_count_what_happened(done: Path) -> None:
    stats = json.loads((done / "stats/resample.json").read_text())
    counts = stats["summary"]["counts"]
    assert counts["accepted"] + counts["rejected"] == counts["files_seen"]
    assert counts["copied"] == 2  # already_24k.flac and the all-zero 24 kHz silence.flac
    assert counts["flag.silent"] == 1 and counts["flag.clipped"] == 1
