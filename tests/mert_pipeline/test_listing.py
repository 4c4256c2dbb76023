"""Task listings and per-file journals: how file-by-file stages plan, resume inside a task, and merge."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mert_pipeline.executor import Resources, Task, rank_path
from mert_pipeline.listing import (
    Journal,
    drop_journals,
    merge_task_parts,
    prune_unlisted,
    read_listing,
    write_listings,
)
from mert_pipeline.manifests.io import ManifestWriter, RejectsWriter
from mert_pipeline.manifests.records import FeatureRecord, Reject


@dataclass
class Bookkeeper:
    """The part of a stage the listing functions use."""

    workdir: Path
    name: str = "listed"
    resources: Resources = field(default_factory=Resources)


def rows(n: int) -> list[dict]:
    return [{"id": f"{i:016x}", "path": f"/data/{i}.flac", "n": i} for i in range(n)]


def test_listings_cut_rows_into_tasks_fingerprinted_by_config_and_content(tmp_path: Path) -> None:
    stage = Bookkeeper(tmp_path)
    tasks = write_listings(stage, rows(7), 3, "config-a", ["listing", "parts"])
    assert [t.size for t in tasks] == [3, 3, 1] and [t.rank for t in tasks] == [0, 1, 2]
    assert read_listing(stage, 1) == rows(7)[3:6]
    again = write_listings(stage, rows(7), 3, "config-a", ["listing", "parts"])
    assert [t.fingerprint for t in again] == [t.fingerprint for t in tasks]
    other = write_listings(stage, rows(7), 3, "config-b", ["listing", "parts"])
    assert all(a.fingerprint != b.fingerprint for a, b in zip(tasks, other, strict=True))
    changed = rows(7)
    changed[4]["n"] = 99
    moved = write_listings(stage, changed, 3, "config-a", ["listing", "parts"])
    assert [a.fingerprint == b.fingerprint for a, b in zip(tasks, moved, strict=True)] == [True, False, True]


def test_a_shrunk_input_drops_the_outputs_of_ranks_that_no_longer_exist(tmp_path: Path) -> None:
    stage = Bookkeeper(tmp_path)
    write_listings(stage, rows(9), 3, "c", ["listing", "parts"])
    rank_path(stage, "parts", 2, ".parquet").parent.mkdir(parents=True, exist_ok=True)
    rank_path(stage, "parts", 2, ".parquet").write_bytes(b"old")
    tasks = write_listings(stage, rows(4), 3, "c", ["listing", "parts"])
    assert len(tasks) == 2
    assert not rank_path(stage, "parts", 2, ".parquet").exists()
    assert not rank_path(stage, "listing", 2, ".jsonl").exists()


def test_task_key_starts_a_task_per_output(tmp_path: Path) -> None:
    stage = Bookkeeper(tmp_path)
    items = [{"shard": s, "i": i} for i, s in enumerate("aaabbc")]
    tasks = write_listings(stage, items, 100, "c", ["listing"], task_key=lambda r: r["shard"])
    assert [t.size for t in tasks] == [3, 2, 1]


def test_journal_resumes_finished_files_and_ignores_a_torn_line_or_another_task(tmp_path: Path) -> None:
    stage = Bookkeeper(tmp_path)
    task = Task(0, "fp-1", 3)
    with Journal(stage, task) as journal:
        assert journal.done == {}
        journal.add({"id": "a", "record": {"x": 1}})
        journal.add({"id": "b", "reject": {"reason": "empty"}})
    path = rank_path(stage, "journal", 0, ".jsonl")
    with path.open("a") as handle:
        handle.write('{"id": "c", "rec')  # killed mid-line
    with Journal(stage, task) as journal:
        assert set(journal.done) == {"a", "b"}
        journal.add({"id": "c", "record": {}})  # appended after the torn line: never read back
    with Journal(stage, task) as journal:
        assert set(journal.done) == {"a", "b"}
    with Journal(stage, Task(0, "fp-2", 3)) as journal:  # other inputs or options: start over
        assert journal.done == {}
    assert path.read_text().splitlines() == ["fp-2"]
    drop_journals(stage, [task])
    assert not path.exists()


def test_prune_unlisted_deletes_only_matching_files_not_kept(tmp_path: Path) -> None:
    for name in (
        "ab/abababababababab.npy",
        "ab/0000000000000000.npy",
        "ab/notes.txt",
        "cd/cdcdcdcdcdcdcdcd.npy",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    kept = {"ab/abababababababab.npy"}
    removed = prune_unlisted(tmp_path, kept, re.compile(r"^[0-9a-f]{16}\.npy$"))
    assert removed == 2
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["ab/abababababababab.npy", "ab/notes.txt"]


def test_merge_task_parts_in_rank_order(tmp_path: Path) -> None:
    stage = Bookkeeper(tmp_path)
    tasks = [Task(0, "a", 1), Task(1, "b", 1)]
    for task in tasks:
        record = FeatureRecord(
            id=f"{task.rank:016x}",
            kind="mfcc",
            config_hash="h",
            relpath=f"00/{task.rank:016x}.npy",
            frames=1,
            dim=39,
            dtype="float32",
            frame_rate=75.0,
            num_samples=320,
            sampling_rate=24000,
            split="train",
        )
        with ManifestWriter(
            rank_path(stage, "parts", task.rank, ".parquet"), "/x", record_type=FeatureRecord
        ) as w:
            w.write(record)
        with RejectsWriter(rank_path(stage, "rejects", task.rank, ".jsonl")) as rejects:
            rejects.write(Reject(f"/bad/{task.rank}", "empty", "0 bytes"))
    summary: Counter = Counter()
    with (
        ManifestWriter(tmp_path / "all.parquet", "/x", record_type=FeatureRecord) as manifest,
        RejectsWriter(tmp_path / "rejects.jsonl") as rejects,
    ):
        merged = list(merge_task_parts(stage, tasks, manifest, rejects, FeatureRecord, summary))
    assert [r.id for r in merged] == ["0000000000000000", "0000000000000001"]
    assert summary == {"rejected.empty": 2}
    lines = [json.loads(line)["path"] for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert lines == ["/bad/0", "/bad/1"]
