"""The WORKDIR layout: every path named once, ids and names read from files checked before they are paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from mert_pipeline.layout import (
    AudioDir,
    LabelSet,
    Workdir,
    audio_dir_name,
    bookkeeping_dir,
    check_name,
    id_numbers,
    id_relpath,
    stage_stats,
)


def test_paths_of_every_stage(tmp_path: Path) -> None:
    work = Workdir(tmp_path)
    assert work.manifest == tmp_path / "manifest.parquet" and work.rejects == tmp_path / "rejects.jsonl"
    assert (work.train_tsv.name, work.valid_tsv.name) == ("train.tsv", "valid.tsv")
    assert work.audio() == AudioDir(tmp_path / "audio_24k")
    assert work.audio().manifest == tmp_path / "audio_24k/manifest.parquet"
    assert work.labels("rvq").manifest == tmp_path / "labels/rvq/labels.parquet"
    assert work.labels("rvq").teacher == tmp_path / "labels/rvq/teacher.json"
    assert work.features("mfcc").sample == tmp_path / "features/mfcc/sample.npy"
    assert work.kmeans("mfcc_k500").centroids == tmp_path / "kmeans/mfcc_k500/centroids.npy"
    assert work.kmeans_last == tmp_path / "kmeans/last.json"
    assert work.default_shards == tmp_path / "shards" and work.run_stats == tmp_path / "stats/run.json"
    assert work.gpu_locks == tmp_path / ".work/gpu-locks" and work.lock == tmp_path / ".lock"
    assert bookkeeping_dir(tmp_path, "shard") == tmp_path / ".work/shard"
    assert stage_stats(tmp_path, "shard") == tmp_path / "stats/shard.json"
    remote = work.remote_shards("s3://bucket/shards")
    assert remote.parent == tmp_path / "remote_shards" and remote == work.remote_shards("s3://bucket/shards")
    assert remote != work.remote_shards("s3://bucket/other")


def test_audio_dir_names() -> None:
    assert [audio_dir_name(r) for r in (24000, 16000, 22050)] == ["audio_24k", "audio_16k", "audio_22050hz"]


def test_ids_from_files_cannot_name_another_place() -> None:
    assert id_relpath("0123456789abcdef", ".npy") == "01/0123456789abcdef.npy"
    for bad in ("../outside/pwned", "../../../pwned", "0123456789ABCDEF", "abc", "", 7):
        with pytest.raises(ValueError, match="16 lowercase hex digits"):
            id_relpath(bad, ".flac")  # type: ignore[arg-type]


def test_names_and_relpaths_are_checked(tmp_path: Path) -> None:
    assert check_name("kmeans500") == "kmeans500"
    for bad in ("../x", "a/b", "", "a b"):
        with pytest.raises(ValueError, match="letters, digits"):
            Workdir(tmp_path).labels(bad)
    label_set = LabelSet(tmp_path / "labels/rvq")
    assert label_set.npy("ab/abcdef0123456789.npy") == tmp_path / "labels/rvq/ab/abcdef0123456789.npy"
    for bad in ("/etc/passwd", "../x.npy", "ab/../../x.npy", ""):
        with pytest.raises(ValueError, match="not a path inside"):
            label_set.npy(bad)


def test_label_sets_are_the_folders_with_a_teacher(tmp_path: Path) -> None:
    work = Workdir(tmp_path)
    for name in ("rvq", "kmeans500"):
        (work.labels_root / name).mkdir(parents=True)
        work.labels(name).teacher.write_text("{}")
    (work.labels_root / "stray").mkdir()
    assert [s.name for s in work.label_sets()] == ["kmeans500", "rvq"]


def test_id_numbers_sort_as_the_ids_and_mark_invalid_ones() -> None:
    import numpy as np
    import pyarrow as pa

    ids = [
        "ffffffffffffffff",
        "0123456789abcdef",
        "../../pwned",
        None,
        "0123456789ABCDEF",
        "00000000000000ff",
    ]
    numbers, valid = id_numbers(pa.chunked_array([ids[:3], ids[3:]]))
    assert valid.tolist() == [True, True, False, False, False, True]
    assert numbers.dtype == np.uint64 and numbers[0] == 2**64 - 1 and numbers[1] == 0x0123456789ABCDEF
    good = [i for i, ok in zip(ids, valid, strict=True) if ok]
    assert [good[i] for i in np.argsort(numbers[valid])] == sorted(good)
    assert numbers[~valid].tolist() == [0, 0, 0]
