"""Shards, sidecars, verify and the fairseq export, on inputs made by the real pipeline stages (manifest,
resample, tokenize with the test codec) and read back with the real `webdataset` reader."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.demo.synth import render_track
from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.fs import atomic_write_json
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records, iter_rejects
from mert_pipeline.manifests.io import ManifestWriter
from mert_pipeline.shards import load_index, verify_all
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage
from mert_pipeline.stages.shard import ShardConfig, ShardStage, SidecarConfig, SidecarStage
from tests.helpers import REPO, add_label_set, hidden_tmp_files, visible_files

LOCAL = ExecutorConfig(kind="local", workers=1)
OPTIONS = {"segment_seconds": 4.0, "shard_samples": 3, "seed": 7}


@pytest.fixture(scope="module")
def workdir(labelled_workdir: Path) -> Path:
    return labelled_workdir


def shard(workdir: Path, out: Path, executor: ExecutorConfig = LOCAL, **kw) -> dict:
    report = execute(ShardStage(ShardConfig(workdir=workdir, out=out, **{**OPTIONS, **kw})), executor)
    assert report.ok, report.failed
    return report.summary


@pytest.fixture(scope="module")
def shards(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shard(workdir, out, teachers=("rvq",))
    return out


def tars(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in visible_files(out).items() if k.endswith(".tar") or k == "index.json"}


def test_shards_of_test_codec_labels_say_so_in_index_verify_and_stats(shards: Path) -> None:
    index = json.loads((shards / "index.json").read_text())
    assert index["teachers"]["rvq"]["config"]["weights"] == "test"
    (warning,) = load_index(shards).warnings
    assert "TEST CODEC" in warning and "'rvq'" in warning
    runner = CliRunner()
    verified = runner.invoke(app, ["verify", str(shards)])
    assert verified.exit_code == 0 and "TEST CODEC" in verified.output
    assert verify_all(shards).warnings == (warning,)


def test_round_trip_through_webdataset_is_exact(workdir: Path, shards: Path) -> None:
    index = json.loads((shards / "index.json").read_text())
    audio = {
        r.id: r for r in iter_records(workdir / "audio_24k/manifest.parquet", record_type=ResampledRecord)
    }
    labels = {r.id: r for r in iter_records(workdir / "labels/rvq/labels.parquet", record_type=LabelRecord)}
    seen: dict[str, list[tuple[int, int]]] = {}
    whole_tracks = 0
    for name, entry in index["shards"].items():
        dataset = wds.WebDataset(str(shards / name), shardshuffle=False, empty_check=False)
        samples = list(dataset)
        assert len(samples) == entry["samples"] <= OPTIONS["shard_samples"]
        for sample in samples:
            meta = json.loads(sample["json"])
            record = audio[meta["id"]]
            assert meta["split"] == record.split == name.split("/")[0]
            assert meta["offset"] % 20480 == 0 and meta["num_samples"] <= 4 * 24000  # whole FLAC frames
            assert meta["teachers"] == {"rvq": labels[meta["id"]].config_hash}
            decoded, rate = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
            source, _ = sf.read(record.path, dtype="float32")  # what the teacher read
            assert rate == 24000
            np.testing.assert_array_equal(
                decoded, source[meta["offset"] : meta["offset"] + meta["num_samples"]]
            )
            codes = np.load(io.BytesIO(sample["rvq.npy"]))
            whole = np.load(workdir / "labels/rvq" / labels[meta["id"]].relpath)
            frames = -(-meta["num_samples"] // 320)
            first = meta["offset"] // 320
            assert codes.dtype == np.int16 and codes.shape == (2, frames)
            np.testing.assert_array_equal(codes, whole[:, first : first + frames])
            if meta["num_samples"] == record.num_samples:  # a whole FLAC track goes in as its own bytes
                assert sample["flac"] == Path(record.path).read_bytes()
                whole_tracks += 1
            seen.setdefault(meta["id"], []).append((meta["offset"], meta["num_samples"]))
    assert sorted(seen) == sorted(audio)
    assert whole_tracks == 1  # the 3 s track; the others are cut by copying frames
    for file_id, parts in seen.items():  # segments tile each track exactly
        parts.sort()
        assert parts[0][0] == 0 and sum(n for _, n in parts) == audio[file_id].num_samples
        assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:], strict=False))
    totals = index["totals"]["all"]
    assert totals["samples"] == sum(len(p) for p in seen.values())
    assert abs(totals["seconds"] - sum(r.duration for r in audio.values())) < 1e-6


def test_segments_are_shuffled_across_shards_deterministically(
    workdir: Path, shards: Path, tmp_path: Path
) -> None:
    order = []
    for name in sorted(json.loads((shards / "index.json").read_text())["shards"]):
        order += [
            json.loads(s["json"])["key"] for s in wds.WebDataset(str(shards / name), shardshuffle=False)
        ]
    assert order != sorted(order)  # shuffled, not in key order
    counts = shard(workdir, tmp_path / "again", teachers=("rvq",))["counts"]
    assert counts["audio_copied_frames"] > 0 and counts["audio_copied_whole"] == 1
    assert not [key for key in counts if key.startswith("audio_reencoded")]  # every segment copied
    assert tars(tmp_path / "again") == tars(shards)
    shard(workdir, tmp_path / "other", teachers=("rvq",), seed=8)
    assert tars(tmp_path / "other") != tars(shards)


def test_files_a_teacher_lacks_are_rejected_and_both_teachers_are_written(
    workdir: Path, tmp_path: Path
) -> None:
    summary = shard(workdir, tmp_path / "both", teachers=("rvq", "km"))
    first = next(iter_records(workdir / "labels/rvq/labels.parquet", record_type=LabelRecord))
    rejects = list(iter_rejects(tmp_path / "both/rejects.jsonl"))
    assert [(r.reason, "'km'" in r.detail) for r in rejects] == [("no_labels", True)]
    assert summary["counts"]["rejected.no_labels"] == 1 and summary["counts"]["accepted"] == 2
    index = json.loads((tmp_path / "both/index.json").read_text())
    assert sorted(index["teachers"]) == ["km", "rvq"]
    for name in index["shards"]:
        for sample in wds.WebDataset(str(tmp_path / "both" / name), shardshuffle=False):
            assert json.loads(sample["json"])["id"] != first.id
            assert set(sample) >= {"flac", "json", "rvq.npy", "km.npy"}
    assert verify_all(tmp_path / "both").ok


def test_misaligned_labels_fail_naming_the_file_and_leave_no_tar(workdir: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns(".work", ".lock"))
    shutil.copytree(work / "labels/km", work / "labels/cut")
    facts = json.loads((work / "labels/cut/teacher.json").read_text())
    atomic_write_json(work / "labels/cut/teacher.json", {**facts, "name": "cut"})
    record = next(iter_records(work / "labels/cut/labels.parquet", record_type=LabelRecord))
    npy = work / "labels/cut" / record.relpath
    np.save(npy, np.load(npy)[:, :-1])  # one frame short
    report = execute(
        ShardStage(ShardConfig(workdir=work, out=tmp_path / "s", teachers=("cut",), **OPTIONS)), LOCAL
    )
    assert report.failed and not (tmp_path / "s/index.json").exists()
    assert all(str(npy) in o.error and "ceil(num_samples / 320)" in o.error for o in report.failed)
    written = list((tmp_path / "s").rglob("*.tar"))
    assert len(written) == report.tasks - len(report.failed) and not hidden_tmp_files(tmp_path / "s")


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from mert_pipeline import shards
    from mert_pipeline.executor import ExecutorConfig, execute
    from mert_pipeline.stages.shard import ShardConfig, ShardStage

    real = shards.DeterministicTar.add
    added = []

    def dies_mid_shard(self, name, data):
        if len(added) == 2:  # the first shard, after its first sample's audio and json
            os.kill(os.getpid(), signal.SIGKILL)
        added.append(name)
        return real(self, name, data)

    shards.DeterministicTar.add = dies_mid_shard
    config = ShardConfig(workdir=Path(sys.argv[1]), out=Path(sys.argv[2]), teachers=("rvq",),
                         segment_seconds=4.0, shard_samples=3, seed=7)
    execute(ShardStage(config), ExecutorConfig(kind="local", workers=1))
    """
)


def test_a_shard_killed_mid_write_leaves_no_tar_and_a_rerun_completes(
    workdir: Path, shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(workdir), str(out)], cwd=REPO)
    assert killed.returncode == -9
    assert not list(out.rglob("*.tar")) and hidden_tmp_files(out)  # only the hidden temporary
    shard(workdir, out, teachers=("rvq",))
    assert tars(out) == tars(shards) and not hidden_tmp_files(out)


def test_rerun_skips_and_a_deleted_shard_is_rewritten(workdir: Path, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    before = tars(out)
    stage = ShardStage(ShardConfig(workdir=workdir, out=out, teachers=("rvq",), **OPTIONS))
    report = execute(stage, LOCAL)
    assert report.ok and report.done == 0 and report.skipped == report.tasks
    (out / "train/shard-000000.tar").unlink()
    report = execute(stage, LOCAL)
    assert report.done == 1 and tars(out) == before
    shard(workdir, out, teachers=("rvq",), shard_samples=100)  # fewer, bigger shards: stale ones go
    index = json.loads((out / "index.json").read_text())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(index["shards"])
    assert verify_all(out).ok


@pytest.mark.ray
def test_ray_writes_the_same_bytes_as_local(
    workdir: Path, shards: Path, tmp_path: Path, ray_cluster: None
) -> None:
    shard(workdir, tmp_path / "ray", ExecutorConfig(kind="ray"), teachers=("rvq",))
    assert tars(tmp_path / "ray") == tars(shards)


def test_verify_passes_clean_shards_and_names_a_flipped_byte(shards: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    clean = runner.invoke(app, ["verify", str(shards), "--workers", "1"])
    assert clean.exit_code == 0, clean.output
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    target = out / "valid/shard-000000.tar"
    data = bytearray(target.read_bytes())
    data[2000] ^= 0x01  # inside the first member's audio
    target.write_bytes(bytes(data))
    report = verify_all(out)
    assert report.problems and all(p.startswith("valid/shard-000000.tar") for p in report.problems)
    assert any("sha256" in p for p in report.problems)
    broken = runner.invoke(app, ["verify", str(out), "--workers", "2"])
    assert broken.exit_code == 1 and "valid/shard-000000.tar" in broken.output
    target.write_bytes(target.read_bytes()[:3000])  # cut short: decoding and counts fail too
    problems = verify_all(out).problems
    assert any("samples, index.json says" in p for p in problems)


def test_sidecar_shards_add_a_teacher_with_the_same_keys(workdir: Path, shards: Path, tmp_path: Path) -> None:
    shutil.copytree(shards, tmp_path / "lacking")
    report = execute(
        SidecarStage(SidecarConfig(workdir=workdir, out=tmp_path / "lacking", teacher="km")), LOCAL
    )
    assert report.failed and "has no labels" in report.failed[0].error  # km lacks a file the shards hold
    out = tmp_path / "s"
    shutil.copytree(shards, out)
    audio_before = tars(out)
    add_label_set(workdir, "km2")
    assert execute(SidecarStage(SidecarConfig(workdir=workdir, out=out, teacher="km2")), LOCAL).ok
    index = json.loads((out / "index.json").read_text())
    assert "km2" in index["sidecars"] and index["totals"]["all"]["sidecar_bytes"] > 0
    for name, entry in index["shards"].items():
        if "teacher" in entry:
            continue
        assert audio_before[name] == (out / name).read_bytes()  # audio never rewritten
        side = out / name.replace(".tar", ".km2.tar")
        assert index["shards"][side.relative_to(out).as_posix()]["base_sha256"] == entry["sha256"]
        paired = zip(
            wds.WebDataset(str(out / name), shardshuffle=False),
            wds.WebDataset(str(side), shardshuffle=False),
            strict=True,
        )
        for sample, extra in paired:
            assert sample["__key__"] == extra["__key__"]
            assert {k for k in extra if not k.startswith("__")} == {"km2.npy"}
            np.testing.assert_array_equal(
                np.load(io.BytesIO(extra["km2.npy"])), np.load(io.BytesIO(sample["rvq.npy"]))[:1] % 500
            )
    assert verify_all(out).ok
    side = out / "train/shard-000000.km2.tar"
    data = bytearray(side.read_bytes())
    data[700] ^= 0x10
    side.write_bytes(bytes(data))
    assert any(p.startswith("train/shard-000000.km2.tar") for p in verify_all(out).problems)


def test_cli_shard_and_its_misuse(workdir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["shard", str(workdir), "--out", str(tmp_path / "s"), "--workers", "1"]
    bad = runner.invoke(app, [*args, "--teachers", "nope"])
    assert bad.exit_code == 2 and "no teacher 'nope'" in bad.output
    assert runner.invoke(app, [*args, "--shard-size", "big"]).exit_code == 2
    assert runner.invoke(app, [*args, "--labels-only"]).exit_code == 2
    ok = runner.invoke(app, [*args, "--teachers", "rvq", "--segment-seconds", "30"])
    assert ok.exit_code == 0, ok.output
    index = json.loads((tmp_path / "s/index.json").read_text())
    assert index["totals"]["all"]["samples"] == 3  # every track fits one 30 s segment
    assert runner.invoke(app, ["verify", str(tmp_path / "s"), "--workers", "1"]).exit_code == 0
    sized = runner.invoke(
        app, [*args[:3], str(tmp_path / "sized"), "--segment-seconds", "4", "--shard-size", "150KB"]
    )
    assert sized.exit_code == 0, sized.output
    entries = json.loads((tmp_path / "sized/index.json").read_text())["shards"].values()
    assert len(entries) > 3 and all(e["bytes"] <= 150_000 * 1.2 or e["samples"] == 1 for e in entries)


def test_float_audio_is_rejected_as_unshardable_and_the_rest_is_sharded(tmp_path: Path) -> None:
    """`resample --format wav` keeps float sources float; FLAC holds integers only, so such a file cannot
    go into a shard unchanged: it is rejected with a reason, the integer files are sharded."""
    from mert_pipeline.resample import OutputSpec

    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    for name, subtype in (("float", "FLOAT"), ("int", "PCM_16")):
        sf.write(corpus / f"{name}.wav", render_track(3, 2.0, 24000, 1), 24000, subtype=subtype)
    manifest = ManifestConfig(roots=resolve_roots([corpus]), workdir=work, valid_percent=0.0, min_seconds=0.0)
    assert execute(ManifestStage(manifest), LOCAL).ok
    assert execute(ResampleStage(ResampleConfig(workdir=work, output=OutputSpec(format="WAV"))), LOCAL).ok
    root = work / "labels" / "km"  # a label set in the tokenize layout for both files
    facts = {"name": "km", "kind": "kmeans", "config_hash": "km", "config": {}, "n_q": 1}
    facts |= {"num_classes": 8, "label_rate": 75.0, "hop": 320, "sampling_rate": 24000}
    with ManifestWriter(root / "labels.parquet", str(root), record_type=LabelRecord) as writer:
        for audio in iter_records(work / "audio_24k/manifest.parquet", record_type=ResampledRecord):
            frames = -(-audio.num_samples // 320)
            (root / f"{audio.id}.npy").parent.mkdir(parents=True, exist_ok=True)
            np.save(root / f"{audio.id}.npy", np.zeros((1, frames), dtype=np.int16))
            writer.write(
                LabelRecord(
                    audio.id,
                    "km",
                    "kmeans",
                    "km",
                    f"{audio.id}.npy",
                    1,
                    frames,
                    8,
                    75.0,
                    audio.num_samples,
                    24000,
                    audio.split,
                )  # fmt: skip
            )
    atomic_write_json(root / "teacher.json", facts)
    summary = shard(work, tmp_path / "shards")
    rejects = list(iter_rejects(tmp_path / "shards/rejects.jsonl"))
    assert [(Path(r.path).suffix, r.reason) for r in rejects] == [(".wav", "unshardable")]
    assert "float" in rejects[0].detail.lower() and summary["counts"]["accepted"] == 1
    assert verify_all(tmp_path / "shards").ok
