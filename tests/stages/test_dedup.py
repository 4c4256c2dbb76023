"""The dedup stages end to end on a real corpus (manifest -> resample -> dedup, real Chromaprint, the local
pool): three pieces and copies of them in other formats, rates, gains and lengths. Each recording keeps one
file by the rule, the others become rejects naming it; the splits, reruns, added files, the keep list and
the step turned off behave as documented."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from mert_pipeline import pipeline
from mert_pipeline.demo.synth import render_track
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.layout import Workdir
from mert_pipeline.manifests.io import iter_rejects, read_fairseq_tsv

LOCAL = ExecutorConfig(kind="local", workers=2)
SR = 44100


def _write_corpus(root: Path) -> dict[str, Path]:
    """Three 20 s pieces (FLAC, 44.1 kHz stereo) and, in other folders, copies of each."""
    pieces = {i: render_track(seed=40 + i, seconds=20, sample_rate=SR, channels=2) for i in range(3)}
    files = {}
    for i in pieces:
        files[f"piece{i}"] = root / "album" / f"piece{i}.flac"
    files["piece0_ogg"] = root / "compilation" / "piece0.ogg"
    files["piece1_edit"] = root / "singles" / "piece1-edit.wav"
    files["piece2_48k_quiet"] = root / "remaster" / "piece2.flac"
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for i, audio in pieces.items():
        sf.write(files[f"piece{i}"], audio, SR, subtype="PCM_16")
    sf.write(files["piece0_ogg"], pieces[0], SR, format="OGG", subtype="VORBIS")
    sf.write(files["piece1_edit"], pieces[1][3 * SR : 17 * SR].mean(axis=1), SR, subtype="PCM_16")
    quiet = soxr.resample(pieces[2] * 0.3, SR, 48000)
    sf.write(files["piece2_48k_quiet"], quiet, 48000, subtype="PCM_24")
    return files


def _dedup_all(work: Path, **options: object) -> dict:
    pipeline.resample(work, executor=LOCAL)
    return pipeline.dedup(work, executor=LOCAL, **options).summary


@pytest.fixture(scope="module")
def deduped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict]:
    corpus, work = tmp_path_factory.mktemp("dup-corpus"), tmp_path_factory.mktemp("dup-work")
    files = _write_corpus(corpus)
    pipeline.manifest([str(corpus)], work, valid_percent=0.5, seed=5, executor=LOCAL)  # both splits
    return work, files, _dedup_all(work)


def _copy(work: Path, tmp_path: Path) -> Path:
    """The shared WORKDIR copied, for a test that changes it."""
    shutil.copytree(work, tmp_path / "work", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "work"


def _rejected(work: Path) -> dict[str, str]:
    rejects = iter_rejects(Workdir(work).audio().rejects)
    return {r.path: r.detail for r in rejects if r.reason == "near_duplicate"}


def _listed(work: Path) -> set[str]:
    table = pq.read_table(Workdir(work).audio().manifest, columns=["source_path"])
    return set(table["source_path"].to_pylist())


def test_one_file_per_recording_by_the_keep_rule(deduped: tuple[Path, dict[str, Path], dict]) -> None:
    work, files, summary = deduped
    # piece0: same length, lossless FLAC over Ogg Vorbis; piece1: the album version contains the edit;
    # piece2: same length, both lossless, the 48 kHz remaster over 44.1 kHz
    kept = {files["piece0"], files["piece1"], files["piece2_48k_quiet"]}
    assert _listed(work) == {str(p) for p in kept}
    rejected = _rejected(work)
    assert set(rejected) == {str(files[n]) for n in ("piece0_ogg", "piece1_edit", "piece2")}
    assert f"the same recording as {files['piece0']} " in rejected[str(files["piece0_ogg"])]
    assert f"the same recording as {files['piece1']} " in rejected[str(files["piece1_edit"])]
    assert "s overlap, score 0." in rejected[str(files["piece2"])]
    counts = summary["counts"]
    assert (counts["groups"], counts["dropped"], counts["accepted"], counts["files_seen"]) == (3, 3, 3, 6)
    assert counts["dropped_hours"] == pytest.approx((20 + 14 + 20) / 3600, abs=1e-3)
    groups = [json.loads(line) for line in Workdir(work).dedup.groups.read_text().splitlines()]
    assert sorted(len(g["dropped"]) for g in groups) == [1, 1, 1]
    assert all(g["kept_by"] == "rule" and g["dropped"][0]["score"] > 0.8 for g in groups)
    summary_file = json.loads(Workdir(work).dedup.summary.read_text())
    assert summary_file["examples"] and summary_file["chromaprint"]


def test_a_recording_never_lands_in_both_splits(deduped: tuple[Path, dict[str, Path], dict]) -> None:
    work, _, _ = deduped
    audio = Workdir(work).audio()
    manifest = pq.read_table(audio.manifest).to_pylist()
    _, train = read_fairseq_tsv(audio.train_tsv)
    _, valid = read_fairseq_tsv(audio.valid_tsv)
    assert sorted(r for r, _ in train + valid) == sorted(row["relpath"] for row in manifest)
    before = pq.read_table(Workdir(work).manifest, columns=["split"])["split"].to_pylist()
    assert set(before) == {"train", "valid"}, "the corpus had copies in both splits"
    groups = [json.loads(line) for line in Workdir(work).dedup.groups.read_text().splitlines()]
    listed = {row["id"] for row in manifest}
    for group in groups:  # exactly one file of each recording is left, so it is in one split only
        assert sum(m["id"] in listed for m in [group["kept"], *group["dropped"]]) == 1


def test_rerun_is_byte_identical_and_fingerprints_nothing(
    deduped: tuple[Path, dict[str, Path], dict],
) -> None:
    work, _, _ = deduped
    audio, out = Workdir(work).audio(), Workdir(work).dedup
    outputs = [audio.manifest, audio.rejects, audio.train_tsv, audio.valid_tsv, out.groups, out.dropped]
    before = {path: path.read_bytes() for path in outputs}
    again = pipeline.dedup(work, executor=LOCAL)  # on the deduplicated manifest: the input is whole again
    assert {path: path.read_bytes() for path in outputs} == before
    assert again.summary["counts"]["dropped"] == 3
    fingerprints = json.loads(Workdir(work).stage_stats("dedup_fingerprint").read_text())
    assert fingerprints["tasks"]["done"] == 0


def test_added_file_is_the_only_one_fingerprinted(
    deduped: tuple[Path, dict[str, Path], dict], tmp_path: Path
) -> None:
    work, files, _ = deduped
    copy_work = _copy(work, tmp_path)
    corpus = files["piece0"].parents[1]
    extra = tmp_path / "more" / "piece0-mono-22k.wav"
    extra.parent.mkdir()
    audio, _ = sf.read(files["piece0"], dtype="float32")
    sf.write(extra, soxr.resample(audio.mean(axis=1) * 0.5, SR, 22050), 22050, subtype="PCM_16")
    pipeline.manifest([str(corpus), str(extra.parent)], copy_work, valid_percent=0.5, seed=5, executor=LOCAL)
    summary = _dedup_all(copy_work)
    fingerprints = json.loads(Workdir(copy_work).stage_stats("dedup_fingerprint").read_text())
    assert fingerprints["summary"]["counts"]["fingerprinted"] == 1
    assert fingerprints["summary"]["counts"]["reused"] == 6
    assert summary["counts"]["dropped"] == 4
    assert str(extra) in _rejected(copy_work)


def test_keep_list_through_the_cli_and_resample_undoes_until_dedup(
    deduped: tuple[Path, dict[str, Path], dict], tmp_path: Path
) -> None:
    work, files, _ = deduped
    copy_work = _copy(work, tmp_path)
    pipeline.resample(copy_work, executor=LOCAL)  # the step not taken: every file is back
    assert len(_listed(copy_work)) == 6
    keep = tmp_path / "keep.txt"
    keep.write_text(f"# the compilation's copy is the one we want\n{files['piece0_ogg']}\n")
    command = [sys.executable, "-m", "mert_pipeline", "dedup", str(copy_work), "--keep", str(keep)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 groups of one recording, 3 files dropped" in " ".join(done.stderr.split())
    assert str(files["piece0_ogg"]) in _listed(copy_work)
    assert str(files["piece0"]) in _rejected(copy_work)
    groups = [json.loads(line) for line in Workdir(copy_work).dedup.groups.read_text().splitlines()]
    assert sum(g["kept_by"] == "keep list" for g in groups) == 1


def test_run_without_dedup_keeps_every_copy(
    deduped: tuple[Path, dict[str, Path], dict], tmp_path: Path
) -> None:
    _, files, _ = deduped
    corpus = files["piece0"].parents[1]
    command = [sys.executable, "-m", "mert_pipeline", "run", str(corpus), "--out", str(tmp_path / "w")]
    command += ["--teachers", "kmeans4", "--no-dedup", "--workers", "2", "--segment-seconds", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "dedup" not in json.loads((tmp_path / "w" / "stats" / "run.json").read_text())["stages"]
    assert len(_listed(tmp_path / "w")) == 6
    assert not np.any(
        [r.reason == "near_duplicate" for r in iter_rejects(Workdir(tmp_path / "w").audio().rejects)]
    )


def test_ray_executor_gives_identical_verdicts(
    deduped: tuple[Path, dict[str, Path], dict], tmp_path: Path, ray_cluster: None
) -> None:
    work, _, _ = deduped
    copy_work = _copy(work, tmp_path)
    ray = ExecutorConfig(kind="ray", force=True)
    report = pipeline.dedup(copy_work, executor=ray, files_per_task=2)  # three fingerprint tasks on Ray
    assert report.done == report.tasks
    assert (copy_work / "dedup/groups.jsonl").read_bytes() == (work / "dedup/groups.jsonl").read_bytes()
    for path in ("dedup/dropped.parquet", "audio_24k/manifest.parquet"):  # the same rows (another root)
        assert pq.read_table(copy_work / path).to_pylist() == pq.read_table(work / path).to_pylist()
