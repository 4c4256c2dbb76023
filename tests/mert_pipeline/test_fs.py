"""Atomic writes and the workdir lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mert_pipeline.fs import (
    WorkdirBusy,
    atomic_path,
    atomic_write_json,
    ensure_writable_dir,
    remove_stale_tmp,
    workdir_lock,
)


def test_atomic_path_publishes_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list((tmp_path / "sub").iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
        assert not target.exists(), "nothing is visible under the final name before the rename"
    assert target.read_bytes() == b"whole"


def test_json_is_stable(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2], "ü": "é"})
    atomic_write_json(tmp_path / "b.json", {"ü": "é", "a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_remove_stale_tmp_only_removes_temporaries(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    (tmp_path / ".keep.txt.tmp-0123456789ab").write_text("x")
    assert remove_stale_tmp(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_ensure_writable_dir_explains_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as info:
        ensure_writable_dir(tmp_path / "file" / "sub")
    assert "file" in str(info.value.strerror) and "\n" not in str(info.value.strerror)
    ensure_writable_dir(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()


def test_workdir_lock_excludes_a_second_process(tmp_path: Path) -> None:
    holder = "import sys, time; from pathlib import Path; from mert_pipeline.fs import workdir_lock\n"
    holder += "with workdir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)\n"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(WorkdirBusy, match=f"pid {proc.pid}"), workdir_lock(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()
    with workdir_lock(tmp_path):  # released when the holder died
        pass
