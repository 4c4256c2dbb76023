"""Streaming readers and writers for manifests, rejects lists and fairseq tsv files.

Nothing here holds a whole corpus in memory: writers buffer one Parquet row group at a time and
readers yield record batches, so a million-file manifest costs the same RAM as a thousand-file one.
Every writer writes to a temporary name and renames on success.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq

from mert_pipeline.fs import atomic_path
from mert_pipeline.manifests.records import (
    SCHEMA_VERSION,
    SCHEMAS,
    AudioRecord,
    Record,
    Reject,
    record_to_row,
)

ROW_GROUP = 65536
META_ROOT = b"mert_pipeline.root"
META_VERSION = b"mert_pipeline.schema_version"


class ManifestWriter:
    """Append validated records (`AudioRecord` by default) to a Parquet file; row groups have a fixed size
    so the bytes depend only on the records, not on how callers batched them."""

    def __init__(
        self,
        path: Path | str,
        root: str,
        row_group_size: int = ROW_GROUP,
        record_type: type[Record] = AudioRecord,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.metadata = {key.encode(): value.encode() for key, value in (metadata or {}).items()}
        self.root = root
        self.record_type = record_type
        self.row_group_size = row_group_size
        self.count = 0
        self._rows: list[dict] = []
        self._atomic = atomic_path(self.path)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ManifestWriter:
        tmp = self._atomic.__enter__()
        schema = SCHEMAS[self.record_type].with_metadata(
            {META_ROOT: self.root.encode(), META_VERSION: SCHEMA_VERSION.encode(), **self.metadata}
        )
        self._writer = pq.ParquetWriter(tmp, schema, compression="zstd")
        return self

    def write(self, record: Record) -> None:
        if type(record) is not self.record_type:
            raise TypeError(f"this writer takes {self.record_type.__name__}, not {type(record).__name__}")
        record.validate()
        self._rows.append(record_to_row(record))
        self.count += 1
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            assert self._writer is not None
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._writer.schema))
            self._rows = []

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._writer is not None
        try:
            if exc is None:
                self._flush()
            self._writer.close()
        finally:
            self._atomic.__exit__(exc_type, exc, tb)


def manifest_root(path: Path | str) -> str:
    """The root directory recorded in a manifest (the first line of its fairseq tsv files)."""
    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(META_ROOT, b"").decode()


def iter_batches(
    path: Path | str, batch_size: int = 4096, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def iter_records(
    path: Path | str, batch_size: int = 4096, record_type: type[Record] = AudioRecord
) -> Iterator[Record]:
    """Stream records from a manifest, one batch of rows in memory at a time."""
    for batch in iter_batches(path, batch_size):
        for row in batch.to_pylist():
            yield record_type(**row)


def count_records(path: Path | str) -> int:
    return pq.ParquetFile(path).metadata.num_rows


class RejectsWriter:
    """JSON lines, one validated `Reject` per line (path, reason code, one-line detail)."""

    def __init__(self, path: Path | str) -> None:
        self._atomic = atomic_path(path)
        self.count = 0

    def __enter__(self) -> RejectsWriter:
        self._handle = self._atomic.__enter__().open("w", encoding="utf-8")
        return self

    def write(self, reject: Reject) -> None:
        reject.validate()
        row = {"path": reject.path, "reason": reject.reason, "detail": reject.detail}
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._handle.close()
        self._atomic.__exit__(exc_type, exc, tb)


def iter_rejects(path: Path | str) -> Iterator[Reject]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield Reject(**json.loads(line))


class FairseqTsvWriter:
    """fairseq/HuBERT manifest: the root on the first line, then `relpath<TAB>num_samples` per file."""

    def __init__(self, path: Path | str, root: str) -> None:
        self._atomic = atomic_path(path)
        self.root = root
        self.count = 0

    def __enter__(self) -> FairseqTsvWriter:
        self._handle = self._atomic.__enter__().open("w", encoding="utf-8")
        self._handle.write(self.root + "\n")
        return self

    def write(self, relpath: str, num_samples: int) -> None:
        self._handle.write(f"{relpath}\t{num_samples}\n")
        self.count += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._handle.close()
        self._atomic.__exit__(exc_type, exc, tb)


def read_fairseq_tsv(path: Path | str) -> tuple[str, list[tuple[str, int]]]:
    with open(path, encoding="utf-8") as handle:
        root = handle.readline().rstrip("\n")
        rows = []
        for line in handle:
            relpath, num_samples = line.rstrip("\n").split("\t")
            rows.append((relpath, int(num_samples)))
    return root, rows


def write_records(
    path: Path | str, root: str, records: Iterable[Record], record_type: type[Record] = AudioRecord
) -> int:
    with ManifestWriter(path, root, record_type=record_type) as writer:
        for record in records:
            writer.write(record)
    return writer.count
