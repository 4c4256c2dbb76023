"""Records are validated when written; readers and writers round-trip exactly and stream."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mert_pipeline.manifests import (
    AudioRecord,
    FairseqTsvWriter,
    ManifestWriter,
    RecordError,
    Reject,
    RejectsWriter,
    assign_split,
    count_records,
    iter_records,
    iter_rejects,
    manifest_root,
    read_fairseq_tsv,
)


def record(i: int, **changes: object) -> AudioRecord:
    content_hash = f"{i:032x}"
    base = AudioRecord(
        id=content_hash[:16],
        path=f"/music/album/track {i}.flac",
        relpath=f"album/track {i}.flac",
        format="FLAC",
        subtype="PCM_16",
        sampling_rate=44100,
        num_samples=44100 * (i + 1),
        duration=float(i + 1),
        channels=2,
        size_bytes=1000 + i,
        content_hash=content_hash,
        split="train",
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"id": "XYZ"}, "16 lowercase hex"),
        ({"content_hash": "f" * 32}, "starting with the id"),
        ({"path": "music/album/track 3.flac"}, "absolute"),
        ({"relpath": "/album/track 3.flac"}, "relative"),
        ({"relpath": "album/other.flac"}, "end with relpath"),
        ({"relpath": "album/tra\tck 3.flac", "path": "/music/album/tra\tck 3.flac"}, "tab or newline"),
        ({"num_samples": 0, "duration": 0.0}, "positive"),
        ({"duration": 3.5}, "num_samples / sampling_rate"),
        ({"split": "test"}, "split"),
    ],
)
def test_invalid_records_are_refused_by_the_writer(tmp_path: Path, changes: dict, why: str) -> None:
    bad = record(3, **changes)
    with pytest.raises(RecordError, match=why), ManifestWriter(tmp_path / "m.parquet", "/music") as writer:
        writer.write(record(1))
        writer.write(bad)
    assert list(tmp_path.iterdir()) == [], "a failed write leaves neither the file nor a temporary"


def test_manifest_round_trip_streams_in_fixed_row_groups(tmp_path: Path) -> None:
    records = [record(i) for i in range(25)]
    with ManifestWriter(tmp_path / "m.parquet", "/music", row_group_size=10) as writer:
        for r in records:
            writer.write(r)
    assert writer.count == 25
    meta = pq.ParquetFile(tmp_path / "m.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10, 10, 5]
    assert list(iter_records(tmp_path / "m.parquet", batch_size=7)) == records
    assert count_records(tmp_path / "m.parquet") == 25
    assert manifest_root(tmp_path / "m.parquet") == "/music"


def test_same_records_give_same_bytes(tmp_path: Path) -> None:
    for name in ("a", "b"):
        with ManifestWriter(tmp_path / f"{name}.parquet", "/music") as writer:
            for i in range(5):
                writer.write(record(i))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_rejects_round_trip_and_validation(tmp_path: Path) -> None:
    rejects = [
        Reject("/m/ünï code.wav", "not_audio", "libsndfile: Format not recognised."),
        Reject("/m/x", "empty", "0"),
    ]
    with RejectsWriter(tmp_path / "r.jsonl") as writer:
        for r in rejects:
            writer.write(r)
    assert list(iter_rejects(tmp_path / "r.jsonl")) == rejects
    with (
        pytest.raises(RecordError, match="unknown reject reason"),
        RejectsWriter(tmp_path / "s.jsonl") as writer,
    ):
        writer.write(Reject("/m/y", "bad vibes", "?"))
    with pytest.raises(RecordError, match="one line"):
        Reject("/m/y", "empty", "two\nlines").validate()
    assert not (tmp_path / "s.jsonl").exists()


def test_fairseq_tsv_round_trip(tmp_path: Path) -> None:
    with FairseqTsvWriter(tmp_path / "train.tsv", "/music") as writer:
        writer.write("a/b c.flac", 12345)
        writer.write("東京.wav", 1)
    assert (tmp_path / "train.tsv").read_text() == "/music\na/b c.flac\t12345\n東京.wav\t1\n"
    assert read_fairseq_tsv(tmp_path / "train.tsv") == ("/music", [("a/b c.flac", 12345), ("東京.wav", 1)])


def test_split_is_deterministic_and_close_to_the_fraction() -> None:
    ids = [f"{i * 2654435761 % 2**64:016x}" for i in range(20000)]
    splits = [assign_split(i, 1317, 0.1) for i in ids]
    assert splits == [assign_split(i, 1317, 0.1) for i in ids]
    assert 0.09 < splits.count("valid") / len(ids) < 0.11
    assert splits != [assign_split(i, 7, 0.1) for i in ids], "the seed changes the split"
    assert {assign_split(i, 1317, 0.0) for i in ids} == {"train"}
    assert {assign_split(i, 1317, 1.0) for i in ids} == {"valid"}
