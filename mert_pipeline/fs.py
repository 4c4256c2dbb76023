"""Filesystem helpers that keep half-written files invisible and runs from stepping on each other.

Every output of the pipeline is written to a hidden temporary name in its final directory and renamed
into place only when complete, so a killed run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mert_pipeline.layout import LOCK

TMP_MARK = ".tmp-"


def tmp_name(final: Path) -> Path:
    """A hidden sibling of `final`, unique per writer, recognisable as temporary by `TMP_MARK`."""
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


DURABLE = os.environ.get("MERT_PIPELINE_FSYNC", "1") != "0"  # MERT_PIPELINE_FSYNC=0: no fsync (benchmarks)


def fsync_path(path: Path) -> None:
    """Push a file's (or a directory's entries') bytes to the disk, so that what a later file vouches for
    (a completion marker, index.json) survives a power loss too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path | str, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path; rename it to `final` if the block succeeds, delete it if not. The file is
    fsynced before the rename and its directory after, so a file under its final name is on the disk
    before anything written later (the task's marker, index.json) can say it is done. `durable=False`
    skips both, for scratch that every run rewrites before reading it (task listings)."""
    durable = durable and DURABLE
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        yield tmp
        if durable and tmp.exists():
            fsync_path(tmp)
        os.replace(tmp, final)
        if durable:
            fsync_path(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: Path | str, data: bytes, durable: bool = True) -> None:
    with atomic_path(final, durable) as tmp:
        tmp.write_bytes(data)


def atomic_save_npy(final: Path | str, array: Any) -> None:
    """`np.save` of one array (no pickles) under a temporary name, renamed when whole: per-file labels,
    features, fingerprints, centroids."""
    import numpy as np

    with atomic_path(final) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_write_text(final: Path | str, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """Stable JSON text (sorted keys) so that equal content is equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(final: Path | str, obj: Any) -> None:
    atomic_write_text(final, to_json(obj))


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights, centroids: identities of teachers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files that killed writers left under `directory`; return how many."""
    removed = 0
    if not directory.exists():
        return 0
    for path in directory.rglob(f".*{TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
            removed += 1
    return removed


def ensure_writable_dir(path: Path) -> None:
    """Create `path` and prove we can write in it; raise OSError with a one-line reason if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OSError(errno.ENOTDIR, f"{path} exists and is not a directory") from exc
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc
    if not path.is_dir():
        raise OSError(errno.ENOTDIR, f"{path} is not a directory")
    probe = tmp_name(path / "write-test")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"{path} is not writable: {exc.strerror}") from exc


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir lock."""


_HELD: dict[str, int] = {}  # this process's workdir locks: real path -> nesting depth


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `workdir` so two drivers never interleave writes to the same outputs.
    Re-entrant within a process: a command holds it for all its stages, each of which takes it again."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock_path = workdir / LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusy(f"another mert-pipe run (pid {holder}) is using {workdir}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)
