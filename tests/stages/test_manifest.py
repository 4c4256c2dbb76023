"""The manifest stage on a synthesized corpus full of broken files: every file lands somewhere, exactly."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import xxhash

from mert_pipeline.executor import ExecutorConfig, execute
from mert_pipeline.manifests import iter_records, iter_rejects, manifest_root, read_fairseq_tsv
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots, walk_roots
from tests.helpers import REPO

FINAL = ("manifest.parquet", "rejects.jsonl", "train.tsv", "valid.tsv")
SR = 24000


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    mono = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (0.5 + c / channels) for c in range(channels)], axis=1)


def make_corpus(root: Path, outside: Path) -> dict[str, str]:
    """Write the corpus; return {path relative to root: 'accepted' or the expected reject reason}."""
    expected: dict[str, str] = {}

    def write(rel: str, data: np.ndarray, sr: int, expect: str = "accepted", **kw: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data, sr, **kw)
        expected[rel] = expect
        return path

    write("a/one.flac", tone(4.0, 44100, 220), 44100, subtype="PCM_16")
    write("a/two.wav", tone(3.5, 48000, 330), 48000, subtype="PCM_24")
    write("a/b/three.ogg", tone(5.0, 32000, 440), 32000, format="OGG", subtype="VORBIS")
    write("a/b/Café del Mar – naïve 東京.flac", tone(4.0, SR, 550), SR, subtype="PCM_16")
    write("c/six channels.wav", tone(4.0, 22050, 660, channels=6), 22050, subtype="PCM_16")
    nan = tone(6.0, SR, 770)
    nan[SR * 3 + 17] = np.nan
    write("c/nan float.wav", nan, SR, subtype="FLOAT")  # accepted unless --deep
    write("c/stereo.flac", tone(3.2, 44100, 880, channels=2), 44100, subtype="PCM_24")

    full = write("bad/truncated.flac", tone(20.0, 44100, 440), 44100, "decode_error", subtype="PCM_16")
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    write("bad/ten ms.wav", tone(0.01, SR), SR, "too_short")
    (root / "bad/zero.wav").write_bytes(b"")
    expected["bad/zero.wav"] = "empty"
    (root / "bad/text.wav").write_text("this is not audio\n" * 20)
    expected["bad/text.wav"] = "not_audio"
    (root / "bad/random.ogg").write_bytes(np.random.default_rng(0).bytes(4096))
    expected["bad/random.ogg"] = "not_audio"
    (root / "bad/notes.txt").write_text("liner notes")
    expected["bad/notes.txt"] = "extension"
    (root / "z").mkdir()
    shutil.copy(root / "a/one.flac", root / "z/copy of one.flac")
    expected["z/copy of one.flac"] = "duplicate"

    outside.mkdir(parents=True, exist_ok=True)
    sf.write(outside / "elsewhere.wav", tone(4.0, SR), SR)
    os.symlink(outside / "elsewhere.wav", root / "c/link out.wav")
    expected["c/link out.wav"] = "symlink_out_of_tree"
    os.symlink(root / "a/two.wav", root / "c/link in.wav")
    expected["c/link in.wav"] = "symlink_in_tree"
    os.symlink(root / "missing.wav", root / "c/broken.wav")
    expected["c/broken.wav"] = "broken_symlink"
    os.symlink(outside, root / "c/dir link")
    expected["c/dir link"] = "symlink_out_of_tree"
    os.mkfifo(root / "c/pipe.wav")
    expected["c/pipe.wav"] = "not_regular_file"
    return expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("corpus")
    root = base / "music"
    return root, make_corpus(root, base / "outside")


def run_manifest(root: Path, workdir: Path, executor: ExecutorConfig | None = None, **kw: object):
    config = ManifestConfig(roots=resolve_roots([root]), workdir=workdir, valid_percent=0.3, **kw)  # type: ignore[arg-type]
    report = execute(ManifestStage(config), executor or ExecutorConfig(kind="local", workers=2))
    assert report.ok, report.failed
    return report


def final_bytes(workdir: Path) -> dict[str, bytes]:
    return {name: (workdir / name).read_bytes() for name in FINAL}


def outcome(root: Path, workdir: Path) -> dict[str, str]:
    """{relpath: 'accepted' or reason} from the stage's outputs; fails if a file appears twice."""
    seen: dict[str, str] = {}
    for record in iter_records(workdir / "manifest.parquet"):
        rel = os.path.relpath(record.path, root)
        assert rel not in seen
        seen[rel] = "accepted"
    for reject in iter_rejects(workdir / "rejects.jsonl"):
        rel = os.path.relpath(reject.path, root)
        assert rel not in seen, f"{rel} is both accepted and rejected"
        assert reject.detail and "\n" not in reject.detail
        seen[rel] = reject.reason
    return seen


def test_every_file_lands_in_manifest_or_rejects_with_its_reason(corpus, tmp_path: Path) -> None:
    root, expected = corpus
    report = run_manifest(root, tmp_path / "w", min_seconds=1.0, files_per_task=4)
    assert outcome(root, tmp_path / "w") == expected
    counts = report.summary["counts"]
    assert counts["files_seen"] == len(expected)
    assert counts["accepted"] == list(expected.values()).count("accepted")
    assert counts["rejected"] == len(expected) - counts["accepted"]
    assert counts["rejected.duplicate"] == 1
    detail = {r.reason: r.detail for r in iter_rejects(tmp_path / "w/rejects.jsonl")}
    assert detail["duplicate"] == f"same content as {root / 'a/one.flac'}"
    assert detail["too_short"] == "0.010s < --min-seconds 1"
    assert "truncated" in detail["decode_error"]


def test_records_hold_the_true_audio_facts(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "w", min_seconds=1.0)
    records = {os.path.relpath(r.path, root): r for r in iter_records(tmp_path / "w/manifest.parquet")}
    for rel, record in records.items():
        info = sf.info(root / rel)
        data = (root / rel).read_bytes()
        assert (record.sampling_rate, record.num_samples, record.channels) == (
            info.samplerate,
            info.frames,
            info.channels,
        )
        assert record.duration == pytest.approx(info.frames / info.samplerate, abs=1e-9)
        assert record.format == info.format and record.subtype == info.subtype
        assert record.size_bytes == len(data)
        assert record.content_hash == xxhash.xxh3_128(data).hexdigest()
        assert record.id == record.content_hash[:16]
        assert record.relpath == rel
    assert records["c/six channels.wav"].channels == 6


def test_fairseq_tsv_is_exact(corpus, tmp_path: Path) -> None:
    root, expected = corpus
    run_manifest(root, tmp_path / "w", min_seconds=1.0)
    accepted = sorted((rel for rel, why in expected.items() if why == "accepted"), key=lambda p: p.split("/"))
    split = {os.path.relpath(r.path, root): r.split for r in iter_records(tmp_path / "w/manifest.parquet")}
    assert set(split.values()) == {"train", "valid"}, "valid_percent 0.3 on 7 files gives both splits"
    assert manifest_root(tmp_path / "w/manifest.parquet") == str(root)
    for name in ("train", "valid"):
        text = (tmp_path / f"w/{name}.tsv").read_text(encoding="utf-8")
        want = [str(root)] + [
            f"{rel}\t{sf.info(root / rel).frames}" for rel in accepted if split[rel] == name
        ]
        assert text == "\n".join(want) + "\n"
        tsv_root, rows = read_fairseq_tsv(tmp_path / f"w/{name}.tsv")
        assert tsv_root == str(root) and len(rows) == len(want) - 1


def test_deep_decoding_rejects_nan_samples(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "w", min_seconds=1.0, deep=True)
    rejects = {os.path.relpath(r.path, root): r for r in iter_rejects(tmp_path / "w/rejects.jsonl")}
    assert rejects["c/nan float.wav"].reason == "non_finite"
    assert rejects["c/nan float.wav"].detail == "NaN or Inf samples at 2.73s"


def test_min_seconds_default_follows_mert_3s_rule(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "w")
    reasons = {os.path.relpath(r.path, root): r.reason for r in iter_rejects(tmp_path / "w/rejects.jsonl")}
    assert "c/stereo.flac" not in reasons  # 3.2 s
    assert reasons["bad/ten ms.wav"] == "too_short"


def test_outputs_do_not_depend_on_partition_or_workers(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "a", ExecutorConfig(kind="local", workers=1), files_per_task=1000)
    run_manifest(root, tmp_path / "b", ExecutorConfig(kind="local", workers=2), files_per_task=3)
    assert final_bytes(tmp_path / "a") == final_bytes(tmp_path / "b")


def test_rerun_skips_and_a_changed_file_reruns_only_its_task(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    copy = tmp_path / "music"
    shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns("pipe.wav"))
    first = run_manifest(copy, tmp_path / "w", files_per_task=4)
    again = run_manifest(copy, tmp_path / "w", files_per_task=4)
    assert (again.done, again.skipped) == (0, first.tasks)

    sf.write(copy / "c/stereo.flac", tone(3.3, 44100, 990, channels=2), 44100, subtype="PCM_24")
    third = run_manifest(copy, tmp_path / "w", files_per_task=4)
    assert (third.done, third.skipped) == (1, first.tasks - 1)
    records = {r.relpath: r for r in iter_records(tmp_path / "w/manifest.parquet")}
    assert records["c/stereo.flac"].num_samples == round(3.3 * 44100)


def test_removed_files_leave_no_stale_task_outputs(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    copy = tmp_path / "music"
    shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns("pipe.wav"))
    run_manifest(copy, tmp_path / "w", files_per_task=2)
    shutil.rmtree(copy / "bad")
    shutil.rmtree(copy / "c")
    shutil.rmtree(copy / "z")
    report = run_manifest(copy, tmp_path / "w", files_per_task=2)
    assert report.summary["counts"]["files_seen"] == 4
    assert len(list((tmp_path / "w/.work/manifest/parts").glob("*.parquet"))) == report.tasks


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mert_pipeline.executor import ExecutorConfig, execute
    from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots
    from tests.helpers import KillOnce
    config = ManifestConfig(roots=resolve_roots([sys.argv[1]]), workdir=Path(sys.argv[2]), files_per_task=3,
                            valid_percent=0.3)
    execute(KillOnce(ManifestStage(config), kill_rank=2), ExecutorConfig(kind="local", workers=1))
    """
)


def test_killed_run_resumes_through_the_cli_with_identical_outputs(corpus, tmp_path: Path) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "ref", files_per_task=3)
    workdir = tmp_path / "w"
    workdir.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(workdir)], cwd=REPO)
    assert killed.returncode == -9
    assert not (workdir / "manifest.parquet").exists()
    assert len(list((workdir / ".work/manifest/completions").iterdir())) == 2

    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "mert_pipeline",
            "manifest",
            str(root),
            "--out",
            str(workdir),
            "--files-per-task",
            "3",
            "--workers",
            "1",
            "--valid-percent",
            "0.3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((workdir / "stats/manifest.json").read_text())
    assert stats["tasks"]["skipped"] == 2 and stats["tasks"]["failed"] == 0
    assert final_bytes(workdir) == final_bytes(tmp_path / "ref")


@pytest.mark.ray
def test_ray_executor_gives_identical_outputs(corpus, tmp_path: Path, ray_cluster: None) -> None:
    root, _ = corpus
    run_manifest(root, tmp_path / "local", ExecutorConfig(kind="local", workers=2), files_per_task=3)
    run_manifest(root, tmp_path / "ray", ExecutorConfig(kind="ray"), files_per_task=3)
    assert final_bytes(tmp_path / "ray") == final_bytes(tmp_path / "local")


def test_walk_is_sorted_and_streams(corpus) -> None:
    root, expected = corpus
    walked = [
        os.path.relpath(item["path"], root) for item in walk_roots((str(root),), ("wav", "flac", "ogg"))
    ]
    assert walked == sorted(expected, key=lambda p: p.split("/"))
    assert inspect.isgenerator(walk_roots((str(root),), ("wav",))), "the walk streams; it builds no list"


def test_permission_denied_files_and_directories_are_rejected() -> None:
    """Root ignores permissions, so a forked child drops to user 'nobody' (65534) and runs the stage."""
    base = Path(tempfile.mkdtemp(prefix="mert-perm-"))
    corpus = base / "music"
    try:
        base.chmod(0o755)
        (corpus / "locked dir").mkdir(parents=True)
        for name in ("song 0.flac", "song 1.flac"):
            sf.write(corpus / name, tone(4.0, SR), SR)
        sf.write(corpus / "locked dir" / "inside.wav", tone(4.0, SR), SR)
        for path in (corpus, corpus / "song 0.flac"):
            path.chmod(0o755)
        (corpus / "locked dir").chmod(0)
        (corpus / "song 1.flac").chmod(0)
        out = base / "work"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        config = ManifestConfig(roots=resolve_roots([corpus]), workdir=out)
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                code = 0 if execute(ManifestStage(config), ExecutorConfig(kind="local", workers=1)).ok else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        reasons = {Path(r.path).name: (r.reason, r.detail) for r in iter_rejects(out / "rejects.jsonl")}
        assert reasons == {
            "locked dir": ("permission_denied", "cannot list directory: permission denied"),
            "song 1.flac": ("permission_denied", "cannot open: Permission denied"),
        }
        assert [Path(r.path).name for r in iter_records(out / "manifest.parquet")] == ["song 0.flac"]
    finally:
        if (corpus / "locked dir").exists():
            (corpus / "locked dir").chmod(0o755)
        shutil.rmtree(base)
