"""Local paths and fsspec URLs (`s3://`, `gs://`, ...) behind a few small functions.

Cluster nodes rarely share a disk, so the corpus may be read from, and the shards written to, object
storage. Only the edges of the pipeline touch it: `manifest` lists and probes the corpus where it is,
`resample` reads it from there, `shard` uploads each finished tar, `verify` and the trainer read the
shards back. WORKDIR (resampled audio, labels, bookkeeping) stays a POSIX folder: on a cluster, one that
every node mounts.

Nothing half-written becomes visible: a shard is written to a local temporary file and uploaded whole,
and object stores (S3, GCS) show an object only once its upload has completed.

Credentials and endpoints come from each filesystem's usual settings (for S3: the AWS environment
variables or ~/.aws; `AWS_ENDPOINT_URL_S3` or `FSSPEC_S3_ENDPOINT_URL` for a non-AWS endpoint), so no
option of ours carries secrets.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from mert_pipeline.fs import atomic_path, atomic_write_bytes, tmp_name

Location = str | Path
READ_BLOCK = 4 << 20  # remote reads fetch this much at a time (s3fs's default is 50 MB per request)
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(OSError):
    """A remote location that cannot be used, with a one-line reason."""


def is_url(location: Location) -> bool:
    """True for `scheme://...` other than `file://` (which is a local path)."""
    match = _URL.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def redact(text: str) -> str:
    """A URL as it may be shown or stored: a presigned URL's query string (its signature) hidden."""
    head, sep, _ = str(text).partition("?")
    return f"{head}?<redacted>" if sep and is_url(head) else str(text)


def as_location(text: str | Path) -> Location:
    """A CLI argument as a location: URLs stay strings (without a trailing slash), `file://` and plain
    paths become `Path`s. A URL carrying credentials (`scheme://user:token@host/...`) is refused: they
    belong in the backend's own settings, not in arguments that end up in logs, manifests and stats."""
    text = str(text)
    if is_url(text):
        netloc = urlsplit(text).netloc
        if "@" in netloc:
            scheme = text.split("://", 1)[0]
            host = netloc.rsplit("@", 1)[1]
            raise ValueError(
                f"{scheme}://<credentials>@{host}/...: a URL must not carry credentials; set them in the "
                "storage backend's own settings (s3: AWS_* variables, ~/.aws or an instance role; gs: "
                "GOOGLE_APPLICATION_CREDENTIALS; http: a ~/.netrc), see docs/clusters.md"
            )
        return text.rstrip("/")
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    return Path(text)


def join(base: Location, *names: str) -> Location:
    if isinstance(base, Path) or not is_url(base):
        return Path(base).joinpath(*names)
    return "/".join([str(base).rstrip("/"), *(name.strip("/") for name in names)])


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it). fsspec caches filesystem instances per process."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:  # e.g. s3fs not installed
        scheme = url.split("://", 1)[0]
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, f"the fsspec backend for {scheme}")
        raise StorageError(f"{url}: reading {scheme}:// needs {extra} (pip install {extra})") from exc
    except ValueError as exc:
        raise StorageError(f"{url}: {exc}") from exc


def open_read(location: Location) -> IO[bytes]:
    """A seekable binary file for reading (remote: fetched `READ_BLOCK` bytes at a time)."""
    if not is_url(location):
        return open(location, "rb")  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(str(location))
    try:
        return fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")
    except OSError:  # missing, permission denied: their own types, which callers tell apart
        raise
    except Exception as exc:  # noqa: BLE001 - backends raise their own types: one line with the URL
        raise StorageError(f"{location}: cannot open: {exc}") from exc


def copy_to(location: Location, target: Path) -> None:
    """Copy a file, local or remote (streamed, `READ_BLOCK` bytes at a time), to a local path."""
    if not is_url(location):
        shutil.copyfile(location, target)
        return
    with open_read(location) as source, open(target, "wb") as handle:
        shutil.copyfileobj(source, handle, READ_BLOCK)


@contextlib.contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local path holding the file's bytes: the file itself when local, else a temporary download
    (one GET) that is deleted afterwards. For readers that go over a file more than once."""
    if not is_url(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mert-pipe-") as folder:
        target = Path(folder) / str(location).rsplit("/", 1)[-1]
        copy_to(location, target)
        yield target


def read_bytes(location: Location) -> bytes:
    with open_read(location) as handle:
        return handle.read()


def exists(location: Location) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    return fs.exists(path)


def size(location: Location) -> int:
    """Bytes in a file; FileNotFoundError if it is gone."""
    if not is_url(location):
        return os.stat(location).st_size
    fs, path = filesystem(str(location))
    fs.invalidate_cache(path)
    return int(fs.size(path))


def write_bytes(location: Location, data: bytes) -> None:
    """Atomically: a local temp name then rename; remotely one PUT, visible only when complete."""
    if not is_url(location):
        atomic_write_bytes(location, data)
        return
    fs, path = filesystem(str(location))
    fs.pipe_file(path, data)


@contextlib.contextmanager
def atomic_output(location: Location, staging: Path) -> Iterator[Path]:
    """Yield a local temporary file to write; when the block succeeds it becomes `location` (renamed
    locally, uploaded whole remotely), and it is deleted if the block fails. `staging` is a local folder
    for remote outputs' temporary files."""
    if not is_url(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    staging.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(staging / str(location).rsplit("/", 1)[-1])
    try:
        yield tmp
        fs, path = filesystem(str(location))
        fs.put_file(str(tmp), path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove(location: Location) -> None:
    """Delete a file; a missing one is fine."""
    if not is_url(location):
        with contextlib.suppress(FileNotFoundError):
            Path(location).unlink()
        return
    fs, path = filesystem(str(location))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def list_names(location: Location) -> list[str]:
    """Names of the files directly in a folder, sorted; [] if there is no such folder."""
    if not is_url(location):
        folder = Path(location)
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    fs, path = filesystem(str(location))
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")


def walk_files(url: str) -> Iterator[dict[str, Any]]:
    """Every object under a remote prefix (or the one object it names), in sorted order, as
    {"path": URL, "size": bytes, "mtime_ns": last modified}; object stores have no links or devices."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        if fs.isfile(path):
            found = {path: fs.info(path)}
        else:
            found = fs.find(path, detail=True, withdirs=False)
    except FileNotFoundError:
        found = {}
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{url}: cannot list: {exc}") from exc
    if not found:
        raise StorageError(f"{url}: no such file or prefix (or it is empty)")
    for name in sorted(found):
        info = found[name]
        size = int(info.get("size") or 0)
        yield {"path": fs.unstrip_protocol(name), "size": size, "mtime_ns": _mtime(info)}


def _mtime(info: dict[str, Any]) -> int:
    """Last-modified time in ns from a backend's info dict (S3: LastModified, GCS: updated, local: mtime)."""
    value = info.get("LastModified") or info.get("updated") or info.get("mtime") or info.get("created")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, int | float):
        return int(value * 1e9)
    return 0


def check_writable(location: Location) -> None:
    """Prove a remote folder can be written (write and delete a probe object); raise with one line."""
    if not is_url(location):
        return
    probe = join(location, f".write-test-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{location} is not writable: {' '.join(str(exc).split())}") from exc


def relative(location: str, root: str) -> str:
    """`location` relative to `root` for URLs (both `scheme://...`), like os.path.relpath."""
    return os.path.relpath(location.split("://", 1)[1], root.split("://", 1)[1])
