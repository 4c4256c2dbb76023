"""Task listings and per-file journals: the planning and resume plumbing that file-by-file stages share.

A stage that works file by file plans by streaming its input rows into `listing/RANK.jsonl` chunks of
`files_per_task` rows (chunk i is task i, fingerprinted by the stage config and the chunk's bytes), and
resumes inside a task through `journal/RANK.jsonl`: one line per finished file, so a task killed halfway
redoes only its unfinished files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mert_pipeline.executor import Stage, Task, rank_path, stage_dir
from mert_pipeline.fs import atomic_write_bytes


def write_listings(
    stage: Stage,
    rows: Iterable[dict[str, Any]],
    files_per_task: int,
    config_fingerprint: str,
    subdirs: Iterable[str],
    task_key: Callable[[dict[str, Any]], Any] | None = None,
) -> list[Task]:
    """Stream rows into task listings on disk; drop every `subdirs` output of ranks that no longer exist
    (the input shrank), so they cannot leak into a merge. With `task_key`, a row whose key differs from
    the previous row's starts a new task (one task per output file, e.g. a shard)."""
    tasks: list[Task] = []
    encode = json.JSONEncoder(ensure_ascii=True, sort_keys=True).encode  # json.dumps's bytes, one encoder
    chunk: list[str] = []
    current: list[Any] = []

    def flush() -> None:
        data = "".join(chunk).encode()
        rank = len(tasks)
        # not fsynced: every plan rewrites every listing before any task of that run reads one
        atomic_write_bytes(rank_path(stage, "listing", rank, ".jsonl"), data, durable=False)
        fingerprint = hashlib.sha256(config_fingerprint.encode() + data).hexdigest()
        tasks.append(Task(rank=rank, fingerprint=fingerprint, size=len(chunk)))
        chunk.clear()

    for row in rows:
        if task_key is not None:
            key = task_key(row)
            if chunk and current[0] != key:
                flush()
            current[:] = [key]
        chunk.append(encode(row) + "\n")
        if len(chunk) >= files_per_task:
            flush()
    if chunk:
        flush()
    drop_ranks_from(stage, len(tasks), subdirs)
    return tasks


def drop_ranks_from(stage: Stage, count: int, subdirs: Iterable[str]) -> None:
    """Delete the `subdirs` files of ranks `count` and above: tasks of an earlier, larger plan, so they can
    leak into no merge."""
    for sub in subdirs:
        for path in (stage_dir(stage) / sub).glob("[0-9]*"):
            if int(path.name[:5]) >= count:
                path.unlink()


def read_listing(stage: Stage, rank: int) -> list[dict[str, Any]]:
    text = rank_path(stage, "listing", rank, ".jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


class Journal:
    """`journal/RANK.jsonl`: the task fingerprint on the first line, then one JSON object per finished
    file (each with an "id"). A journal of other inputs or options is discarded; a line cut short by a
    kill fails to parse and is ignored with everything after it. Use as a context manager."""

    def __init__(self, stage: Stage, task: Task) -> None:
        self.path = rank_path(stage, "journal", task.rank, ".jsonl")
        self.done: dict[str, dict[str, Any]] = {}
        lines: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            lines = self.path.read_text(encoding="utf-8").split("\n")
        if lines and lines[0] == task.fingerprint:
            for line in lines[1:]:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.done[item["id"]] = item
            self._handle = self.path.open("a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", encoding="utf-8")
            self._handle.write(task.fingerprint + "\n")
            self._handle.flush()

    def add(self, item: dict[str, Any]) -> None:
        self._handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._handle.flush()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def drop_journals(stage: Stage, tasks: Iterable[Task]) -> None:
    """After finalize the task parts hold everything the journals did."""
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            rank_path(stage, "journal", task.rank, ".jsonl").unlink()


def prune_unlisted(root: Path, kept: set[str], name: re.Pattern[str]) -> int:
    """Delete files `root/ab/NAME` matching `name` whose relpath `ab/NAME` is not in `kept`; return how many.

    Per-id outputs live in two-hex-digit folders; after a merge the folder must hold exactly what the new
    manifest lists (files of rejected ids, or of an earlier run's options, go)."""
    removed = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and len(p.name) == 2):
        for path in sub.iterdir():
            if name.match(path.name) and f"{sub.name}/{path.name}" not in kept:
                path.unlink()
                removed += 1
    return removed


def merge_task_parts(
    stage: Stage,
    tasks: Iterable[Task],
    manifest: Any,
    rejects: Any,
    record_type: type,
    summary: Counter,
) -> Iterator[Any]:
    """Finalize's merge for file-by-file stages: copy each task's `rejects/RANK.jsonl` (counted as
    `rejected.REASON` in `summary`) and `parts/RANK.parquet` records, in rank order, into the final
    `RejectsWriter` and `ManifestWriter`; yield every record written, for the caller's own counts."""
    from mert_pipeline.manifests.io import iter_rejects

    for task in tasks:
        for reject in iter_rejects(rank_path(stage, "rejects", task.rank, ".jsonl")):
            rejects.write(reject)
            summary[f"rejected.{reject.reason}"] += 1
        for row in pq.read_table(rank_path(stage, "parts", task.rank, ".parquet")).to_pylist():
            record = record_type(**row)
            manifest.write(record)
            yield record
