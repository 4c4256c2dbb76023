"""Hostile and careless inputs: each is a clean reject, a refusal or a reported problem; nothing crashes,
nothing unbounded is read, nothing outside the output is touched.

In order: shards that would exhaust memory (verify, the trainer's reader, sidecars) and index.json names
outside the set; trainer run folders (reuse, lock); ids and paths from manifests and label tables (every
stage, embed); credentials in URLs; hour-long inputs (embed, probe); shard outputs that are not this
WORKDIR's (a user's tars, another WORKDIR's set); `--force` against a held WORKDIR lock. A second run on a
busy WORKDIR is refused in tests/mert_pipeline/test_cli.py. Last, the order of fsyncs, renames, markers
and index.json."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.shards import (
    ShardError,
    iter_samples,
    load_index,
    member_limits,
    read_index,
    read_samples,
    verify_all,
)
from tests.helpers import REPO
from tests.trainer.shardgen import write_shards

LOCAL = ExecutorConfig(kind="local", workers=1)


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", train_shards=2, valid_shards=1, per_shard=4, seconds=(1.0, 1.5))


def tar_of(*members: tuple[str | tarfile.TarInfo, bytes]) -> bytes:
    """A plain tar of (name or TarInfo, bytes) members: regular files, or raw entries (links, sparse)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for head, data in members:
            info = head if isinstance(head, tarfile.TarInfo) else tarfile.TarInfo(head)
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sparse_member(name: str, declared: int) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX GNU-sparse 1.0 member: a few hundred bytes on disk that declare `declared` bytes of holes."""
    info = tarfile.TarInfo(name)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(declared),
    }
    return info, f"1\n{declared - 1}\n1\n".encode().ljust(512, b"\0") + b"x"


def link_member(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info, b""


def run_measured(code: str) -> tuple[str, float]:
    """Run `code` in a fresh Python: (its stdout, its peak RSS in MB). The peak is VmHWM, the process's
    own; ru_maxrss would carry over pytest's from before the exec."""
    code += "\nprint('VmHWM', [x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM')][0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    out, _, peak = done.stdout.rpartition("VmHWM")
    return out, int(peak) / 1024


def replace_shard(shards: Path, data: bytes, name: str = "train/shard-000000.tar") -> str:
    (shards / name).write_bytes(data)
    return name


def test_a_10_kb_tar_declaring_6_gb_is_a_verify_problem_read_in_bounded_memory(shards: Path) -> None:
    key = json.loads((shards / "index.json").read_text())
    assert key["shards"]
    name = replace_shard(shards, tar_of(sparse_member("00000000000000000_0000.flac", 6_000_000_000)))
    assert (shards / name).stat().st_size < 16_000
    out, peak_mb = run_measured(
        "from mert_pipeline.shards import verify_all\n"
        f"print('\\n'.join(verify_all({str(shards)!r}).problems))"
    )
    assert (
        f"{name}: tar unreadable after 0 samples (member 00000000000000000_0000.flac: a sparse member" in out
    )
    assert peak_mb < 600, "the 6 GB member was never read"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([link_member("0000000000000000_0000.flac")], "a link, not a regular file"),
        ([("0000000000000000_0000.json", b"{" + b" " * 70_000 + b"}")], "more than the 65536 such a member"),
    ],
)
def test_links_and_oversized_members_are_refused_before_reading(
    shards: Path, members: list, message: str
) -> None:
    name = replace_shard(shards, tar_of(*members))
    problems = "\n".join(verify_all(shards).problems)
    assert f"{name}: tar unreadable after 0 samples" in problems and message in problems


def test_an_oversized_flac_member_is_refused_by_its_segment_bound(shards: Path) -> None:
    limits = member_limits(json.loads((shards / "index.json").read_text()))
    too_big = ("0000000000000000_0000.flac", bytes(limits.flac + 1))
    with pytest.raises(ShardError, match=r"bytes, more than the \d+ such a member can hold"):
        list(iter_samples(io.BytesIO(tar_of(too_big)), limits))
    index = {**json.loads((shards / "index.json").read_text()), "segment_seconds": 2.0}
    frames = -(-(2 * 24000 + 320) // 320)  # the longest segment's frames
    assert member_limits(index).labels["rvq"] == 256 + 2 * 2 * frames  # int16 x 2 codebooks, plus header


def test_a_compressed_tar_is_refused(shards: Path) -> None:
    name = replace_shard(shards, gzip.compress((shards / "train/shard-000001.tar").read_bytes()))
    problems = "\n".join(verify_all(shards).problems)
    assert (
        f"{name}: tar unreadable after 0 samples (a gzip-compressed tar: shards are plain tars)" in problems
    )


def test_the_trainer_reader_skips_a_damaged_shard_counts_it_and_stops_past_the_limit(
    shards: Path, capsys: pytest.CaptureFixture
) -> None:
    from mert_pipeline.trainer.data import CropBatches, CropSpec

    replace_shard(shards, tar_of(sparse_member("00000000000000000_0000.flac", 6_000_000_000)))
    index = load_index(shards)
    with pytest.raises(ShardError, match="a sparse member"):
        list(read_samples(index, "train/shard-000000.tar"))
    spec = CropSpec(("rvq",), batch_size=2, crop_samples=16000, min_samples=16000, shuffle_buffer=1)
    batches = CropBatches(index, "train", spec, epoch=0, rank=0, world=1, workers=1, start=0, count=4)
    assert len(list(batches)) == 4, "the other shard still feeds the epoch"
    assert batches.bad >= 1 and "[data] skipped train/shard-000000.tar: member" in capsys.readouterr().err
    strict = CropSpec(("rvq",), 2, 16000, 16000, 1, max_bad_fraction=0.0)
    broken = write_shards(shards.parent / "all_bad", train_shards=1, valid_shards=1, per_shard=2)
    replace_shard(broken, tar_of(link_member("x_0000.flac")))
    batches = CropBatches(
        load_index(broken), "train", strict, epoch=0, rank=0, world=1, workers=1, start=0, count=1
    )
    with pytest.raises(
        ValueError, match=r"3 bad samples of 0 read in .*, and no usable clip in the others: .* verify"
    ):
        list(batches)


@pytest.mark.parametrize(
    "name", ["../outside.tar", "/etc/shard-000000.tar", "train/../../x.tar", "train/a.tar"]
)
def test_index_json_naming_a_file_outside_the_shard_set_is_refused_before_any_open(
    shards: Path, name: str
) -> None:
    index = json.loads((shards / "index.json").read_text())
    index["shards"][name] = index["shards"].pop(next(iter(index["shards"])))
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="index.json names a shard"):
        read_index(shards)
    with pytest.raises(ShardError, match="index.json names a shard"):
        load_index(shards)


def test_a_non_empty_run_folder_without_resume_is_refused(shards: Path, tmp_path: Path) -> None:
    from mert_pipeline.trainer.pretrain import check_run_dir, main

    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-00009000.pt").write_bytes(b"an older run's checkpoint")
    with pytest.raises(
        ValueError, match=r"already holds ckpt-00009000.pt: pass --resume .* or give an empty --out"
    ):
        check_run_dir(out, resume=False)
    assert check_run_dir(out, resume=True) == out
    args = ["--config", "tiny", "--shards", str(shards), "--out", str(out), "teachers=[rvq]"]
    assert main(args) == 2
    assert (out / "ckpt-00009000.pt").read_bytes() == b"an older run's checkpoint", "nothing was touched"


def test_a_second_run_into_a_locked_run_folder_is_refused(shards: Path, tmp_path: Path) -> None:
    from mert_pipeline.fs import workdir_lock
    from mert_pipeline.trainer.pretrain import main

    out = tmp_path / "run"
    code = (
        "import time; from pathlib import Path; from mert_pipeline.fs import workdir_lock\n"
        f"with workdir_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["--config", "tiny", "--shards", str(shards), "--out", str(out), "--resume", "teachers=[rvq]"]
        assert main(args) == 2
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock(out):  # released with its holder
        pass
    assert os.listdir(out) == [".lock"]


def test_a_crafted_manifest_id_never_becomes_a_path_outside_workdir(tmp_path: Path) -> None:
    """An id of `../outside/pwned` in manifest.parquet (the writer refuses it, so it is crafted with
    pyarrow): resample fails that row with the id named, and writes nothing outside WORKDIR."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from mert_pipeline import pipeline

    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "a.wav", (0.1 * np.sin(np.arange(24000 * 4) / 9)).astype(np.float32), 24000)
    work = tmp_path / "work"
    pipeline.manifest([str(music)], work)
    table = pq.read_table(work / "manifest.parquet")
    crafted = table.set_column(table.schema.get_field_index("id"), "id", pa.array(["../outside/pwned"]))
    pq.write_table(crafted.replace_schema_metadata(table.schema.metadata), work / "manifest.parquet")
    with pytest.raises((pipeline.PipelineError, pipeline.StageFailed)) as caught:
        pipeline.resample(work)
    failed = caught.value
    said = str(failed) + " ".join(
        o.error or "" for o in getattr(getattr(failed, "report", None), "failed", [])
    )
    assert "'../outside/pwned' is not 16 lowercase hex digits" in said
    assert not (tmp_path / "outside").exists() and not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("stage", ["tokenize", "features"])
def test_tokenize_and_features_refuse_a_crafted_id_before_it_names_a_file(
    stage: str, tmp_path: Path, test_codec_file: Path
) -> None:
    """An id of `../../outside/pwned` in `audio_24k/manifest.parquet`: the stage's task fails with the id
    named (its other files are retried by a rerun once the manifest is fixed), and nothing is written
    outside WORKDIR."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from mert_pipeline import pipeline
    from mert_pipeline.executor import ExecutorConfig

    local = ExecutorConfig(kind="local", workers=1)
    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "a.wav", (0.1 * np.sin(np.arange(24000 * 4) / 9)).astype(np.float32), 24000)
    work = tmp_path / "w" / "work"
    pipeline.manifest([str(music)], work, executor=local)
    pipeline.resample(work, executor=local)
    manifest = work / "audio_24k" / "manifest.parquet"
    table = pq.read_table(manifest)
    crafted = table.set_column(table.schema.get_field_index("id"), "id", pa.array(["../../outside/pwned"]))
    pq.write_table(crafted.replace_schema_metadata(table.schema.metadata), manifest)
    with pytest.raises(pipeline.StageFailed) as caught:
        if stage == "tokenize":
            rvq = pipeline.rvq_teacher(work, checkpoint=test_codec_file, device="cpu", bandwidth=1.5)
            pipeline.tokenize(work, rvq, executor=local)
        else:
            pipeline.features(work, kind="mfcc", executor=local)
    errors = " ".join(o.error or "" for o in caught.value.report.failed)
    assert "'../../outside/pwned' is not 16 lowercase hex digits" in errors
    assert not (tmp_path / "w" / "outside").exists() and not list(tmp_path.rglob("*pwned*"))


def test_embed_rejects_a_crafted_manifest_id_and_writes_nothing_outside_out(tmp_path: Path) -> None:
    """`embed` of a manifest.parquet whose id is `../outside/pwned`: that row is a `bad_record` reject
    naming the id, the other file is embedded, and nothing is written outside OUT."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    from mert_pipeline import pipeline
    from mert_pipeline.executor import ExecutorConfig
    from mert_pipeline.manifests import iter_rejects
    from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "run", pre_ln=False, seed=3)
    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", (0.1 * np.sin(np.arange(24000) / 7)).astype(np.float32), 24000)
    ids = ["0123456789abcdef", "../outside/pwned"]
    paths = [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
    pq.write_table(pa.table({"id": ids, "path": paths}), tmp_path / "manifest.parquet")
    out = tmp_path / "deep" / "emb"
    report = pipeline.embed(
        str(tmp_path / "manifest.parquet"), str(checkpoint), str(out),
        executor=ExecutorConfig(kind="local", workers=1),
    )  # fmt: skip
    assert report.ok
    rejects = list(iter_rejects(out / "rejects.jsonl"))
    assert [(r.reason, r.path) for r in rejects] == [("bad_record", paths[1])]
    assert "'../outside/pwned' cannot name a file" in rejects[0].detail
    assert (out / "0123456789abcdef.npy").exists()
    assert not list(tmp_path.rglob("*pwned*")) and not (tmp_path / "deep" / "outside").exists()


@pytest.mark.parametrize("url", ["s3://AKIA:s3cr3t@bucket/music", "https://user:tok3n@example.com/a.flac"])
def test_urls_with_credentials_are_refused_without_showing_them(url: str, tmp_path: Path) -> None:
    from mert_pipeline import pipeline

    with pytest.raises(pipeline.PipelineError) as caught:
        pipeline.manifest([url], tmp_path / "w")
    said = str(caught.value)
    assert "must not carry credentials" in said and "backend's own settings" in said
    assert "s3cr3t" not in said and "tok3n" not in said and "\n" not in said
    with pytest.raises(pipeline.PipelineError, match="must not carry credentials"):
        pipeline.shards_location(url)


def test_query_strings_of_urls_are_redacted_in_errors() -> None:
    from mert_pipeline.pipeline import _line
    from mert_pipeline.storage import redact

    presigned = "https://bucket.s3.amazonaws.com/a.flac?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA"
    assert redact(presigned) == "https://bucket.s3.amazonaws.com/a.flac?<redacted>"
    assert redact("/local/file?name.flac") == "/local/file?name.flac"  # a local name may hold a '?'
    line = _line(OSError(f"cannot open {presigned}: 403"))
    assert "abcdef" not in line and "AKIA" not in line and "a.flac?<redacted>" in line


def test_an_hour_long_file_is_embedded_in_bounded_memory(tmp_path: Path) -> None:
    """`embed --pool none` of a 1-hour file: the hidden states go to disk as they are made and the audio
    is read block by block, so the process peaks far below the file's decoded audio plus its states
    (345 MB + 207 MB here), and the .npy holds every frame."""
    import numpy as np
    import soundfile as sf

    from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "run", pre_ln=False, seed=3)
    long = tmp_path / "hour.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(long, "w", samplerate=24000, channels=1, subtype="PCM_16") as handle:
        for _ in range(60):  # one minute at a time
            handle.write((0.05 * rng.standard_normal(24000 * 60)).astype(np.float32))
    _, peak_mb = run_measured(
        "from mert_pipeline import pipeline; from mert_pipeline.executor import ExecutorConfig\n"
        f"pipeline.embed({str(long)!r}, {str(checkpoint)!r}, {str(tmp_path / 'emb')!r}, pool='none',"
        " batch_size=2, executor=ExecutorConfig(kind='local', workers=1))"
    )
    (npy,) = (tmp_path / "emb").glob("*.npy")
    states = np.load(npy, mmap_mode="r")
    assert states.shape == (3, 3600 * 75 - 120, 64)  # 120 chunks of 30 s, 2249 frames each
    assert np.isfinite(states[:, ::1000]).all()
    assert peak_mb < 900, f"peak {peak_mb:.0f} MB"
    assert not list((tmp_path / "emb").rglob("layer*.f32")), "the per-layer scratch files are gone"


def test_probe_streams_a_long_clip_instead_of_decoding_it_whole(tmp_path: Path) -> None:
    """`probe` reads a clip longer than 30 s block by block (for the model, its random init and the MFCC
    baseline), and short clips a batch at a time, never the whole dataset. A 20-minute clip then peaks
    where a 1-minute one does; decoding it whole would add 109 MB of float32 audio (twice that while the
    blocks are joined) and its MFCC windows."""
    import numpy as np
    import soundfile as sf

    from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "run", pre_ln=False, seed=3)
    rng = np.random.default_rng(0)
    for minutes in (1, 20):
        with sf.SoundFile(
            tmp_path / f"{minutes}min.wav", "w", samplerate=24000, channels=1, subtype="PCM_16"
        ) as f:
            for _ in range(minutes):  # one minute at a time
                f.write((0.05 * rng.standard_normal(24000 * 60)).astype(np.float32))
        (tmp_path / f"{minutes}min.csv").write_text(
            f"path,label\n{minutes}min.wav,a\na.wav,a\nb1.wav,b\nb2.wav,b\n"
        )
    for name in ("a", "b1", "b2"):
        sf.write(tmp_path / f"{name}.wav", (0.05 * rng.standard_normal(24000)).astype(np.float32), 24000)
    peak = "[x.split()[1] for x in open('/proc/self/status') if x.startswith('VmHWM')][0]"
    out, peak_mb = run_measured(
        "from pathlib import Path\n"
        "from mert_pipeline.probe import run_probe\n"
        f"def probe(data): return run_probe(Path({str(checkpoint)!r}), data, Path({str(tmp_path)!r}) / "
        "Path(data).stem, folds=2, device='cpu')\n"
        f"probe({str(tmp_path / '1min.csv')!r})\n"
        f"print('one', {peak})\n"
        f"print('clips', probe({str(tmp_path / '20min.csv')!r})['clips'])\n"
    )
    one_mb = int(out.split("one")[1].split()[0]) / 1024
    assert "clips 4" in out
    assert peak_mb - one_mb < 40, f"20 minutes peaked {peak_mb - one_mb:.0f} MB above 1 minute"


def test_crafted_ids_splits_and_label_paths_are_rejects_that_say_why(
    labelled_workdir: Path, tmp_path: Path
) -> None:
    """The plan builds no path from what a file says before checking it: a manifest row with the id
    `../../pwned`, one with the split `test`, and labels.parquet naming `../../../outside.npy` for a file
    are three rejects that name the value; the other files are sharded, nothing outside is touched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    shutil.copytree(labelled_workdir, work)
    manifest = work / "audio_24k" / "manifest.parquet"
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    crafted = [{**rows[0], "id": "../../pwned"}, {**rows[0], "split": "test"}]
    out = pa.Table.from_pylist(rows + crafted, schema=table.schema)
    pq.write_table(out.replace_schema_metadata(table.schema.metadata), manifest)
    labels = work / "labels" / "rvq" / "labels.parquet"
    table = pq.read_table(labels)
    relpaths = table.column("relpath").to_pylist()
    victim = table.column("id").to_pylist().index(rows[2]["id"])
    relpaths[victim] = "../../../outside.npy"
    column = table.schema.get_field_index("relpath")
    pq.write_table(table.set_column(column, "relpath", pa.array(relpaths)), labels)
    from mert_pipeline import pipeline
    from mert_pipeline.manifests import iter_rejects

    options = {"segment_seconds": 4.0, "shard_samples": 3, "seed": 7}
    summary = pipeline.shard(work, tmp_path / "shards", teachers=("rvq",), executor=LOCAL, **options).summary
    rejects = [(r.reason, r.detail) for r in iter_rejects(tmp_path / "shards" / "rejects.jsonl")]
    assert [reason for reason, _ in rejects] == ["label_mismatch", "bad_record", "bad_record"]
    assert "'../../../outside.npy' for this file: outside" in rejects[0][1]
    assert "id '../../pwned' is not 16 lowercase hex digits" == rejects[1][1]
    assert "split 'test' is not one of train, valid" == rejects[2][1]
    counts = summary["counts"]
    assert counts["accepted"] == 2 and counts["rejected"] == 3 and counts["files_seen"] == 5
    assert verify_all(tmp_path / "shards").ok
    assert not list(tmp_path.rglob("*pwned*")) and not list(tmp_path.rglob("outside*"))


def test_sidecars_read_the_audio_shards_within_their_member_limits(
    labelled_workdir: Path, tmp_path: Path
) -> None:
    """An audio shard replaced by a tar whose FLAC member is larger than any 4 s segment can be: the
    sidecar task fails on it, naming it, before reading it (the member limits index.json implies, as
    `verify` and the trainer's reader apply them)."""
    from mert_pipeline import pipeline
    from mert_pipeline.executor import execute
    from mert_pipeline.stages.shard import SidecarConfig, SidecarStage
    from tests.helpers import add_label_set

    out = tmp_path / "s"
    pipeline.shard(labelled_workdir, out, teachers=("rvq",), segment_seconds=4.0, executor=LOCAL)
    (out / "train" / "shard-000000.tar").write_bytes(tar_of(("k_0000.flac", b"\0" * 2**20)))
    add_label_set(labelled_workdir, "km3")
    report = execute(SidecarStage(SidecarConfig(workdir=labelled_workdir, out=out, teacher="km3")), LOCAL)
    failed = [f for f in report.failed if "train/shard-000000" in f.error or "k_0000.flac" in f.error]
    assert failed and "such a member can hold" in failed[0].error, [f.error for f in report.failed]
    assert not (out / "train" / "shard-000000.km3.tar").exists()


def test_a_users_own_tar_in_out_is_never_overwritten_or_pruned(
    labelled_workdir: Path, tmp_path: Path
) -> None:
    """SHARDS that holds shard-named tars this shard set did not write is refused (--force overwrites);
    a reshard prunes only tars of this set's own earlier plans."""
    from mert_pipeline import pipeline

    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train/shard-000000.tar").write_bytes(b"a user's own tar")
    with pytest.raises(
        pipeline.PipelineError, match=r"holds train/shard-000000.tar, which this shard set did"
    ):
        pipeline.shard(labelled_workdir, out, teachers=("rvq",), shard_samples=2, executor=LOCAL)
    assert (out / "train/shard-000000.tar").read_bytes() == b"a user's own tar"
    (out / "train/shard-000000.tar").unlink()
    pipeline.shard(labelled_workdir, out, teachers=("rvq",), shard_samples=1, executor=LOCAL)
    many = sorted(p.name for p in (out / "train").glob("*.tar"))
    (out / "valid/shard-000099.tar").write_bytes(b"another of the user's")
    with pytest.raises(pipeline.PipelineError, match="valid/shard-000099.tar, which this shard set did not"):
        pipeline.shard(labelled_workdir, out, teachers=("rvq",), shard_samples=8, executor=LOCAL)
    (out / "valid/shard-000099.tar").rename(out / "users.tar")
    pipeline.shard(labelled_workdir, out, teachers=("rvq",), shard_samples=8, executor=LOCAL)
    few = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert len(many) > len(few) >= 1, "the earlier plan's extra tars, all its own, were pruned"
    assert (out / "users.tar").read_bytes() == b"another of the user's"
    assert verify_all(out).ok


def test_a_shard_set_belongs_to_one_workdir(labelled_workdir: Path, tmp_path: Path) -> None:
    """SHARDS/.owner names its WORKDIR; another WORKDIR writing into it is refused unless --force."""
    from mert_pipeline import pipeline

    out = tmp_path / "shared"
    pipeline.shard(labelled_workdir, out, teachers=("rvq",), executor=LOCAL)
    assert (out / ".owner").read_text() == f"{labelled_workdir.resolve()}\n"
    other = tmp_path / "other_work"
    shutil.copytree(labelled_workdir, other, ignore=shutil.ignore_patterns(".lock"))
    with pytest.raises(
        pipeline.PipelineError, match=r"holds the shards of WORKDIR .* \(.owner\); give another --out, or"
    ):
        pipeline.shard(other, out, teachers=("rvq",), executor=LOCAL)
    forced = pipeline.ExecutorConfig(kind="local", workers=1, force=True)
    pipeline.shard(other, out, teachers=("rvq",), executor=forced)
    assert (out / ".owner").read_text() == f"{other.resolve()}\n"


def test_force_deletes_nothing_while_another_run_holds_the_workdir(
    labelled_workdir: Path, test_codec_file: Path
) -> None:
    """`tokenize --force` of another teacher configuration clears the old labels only once it holds the
    WORKDIR lock: while another process holds it, the command is refused and every label file stays."""
    from mert_pipeline import pipeline

    audio = labelled_workdir
    before = {p: p.read_bytes() for p in (audio / "labels" / "rvq").rglob("*") if p.is_file()}
    holder = "import sys, time; from pathlib import Path; from mert_pipeline.fs import workdir_lock\n"
    holder += "with workdir_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(audio)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(pipeline.PipelineError, match=f"another mert-pipe run \\(pid {proc.pid}\\)"):
            pipeline.tokenize(
                audio,
                pipeline.rvq_teacher(audio, checkpoint=test_codec_file, device="cpu", bandwidth=3.0),
                name="rvq",
                replace=True,
                executor=ExecutorConfig(kind="local", force=True),
            )
    finally:
        proc.kill()
        proc.wait()
    after = {p: p.read_bytes() for p in (audio / "labels" / "rvq").rglob("*") if p.is_file()}
    assert after == before and len(before) > 5


def test_outputs_reach_the_disk_before_the_marker_or_index_that_vouches_for_them(
    labelled_workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard run, in process, with every fsync and rename recorded: each tar is fsynced under its
    temporary name before the rename that publishes it and its folder after, and index.json and every
    task's completion marker are renamed only after the tars they vouch for are on the disk."""
    from mert_pipeline import fs, pipeline

    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = fs.fsync_path, os.replace

    def fsync(path: Path) -> None:
        events.append(("fsync", Path(path)))
        real_fsync(path)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fs, "fsync_path", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "shards"
    options = {"segment_seconds": 4.0, "shard_samples": 2}
    pipeline.shard(labelled_workdir, out, teachers=("rvq",), executor=LOCAL, **options)
    renames = {path: i for i, (kind, path) in enumerate(events) if kind == "rename"}
    tars = [path for path in renames if path.suffix == ".tar"]
    assert len(tars) >= 3
    for tar in tars:
        at = renames[tar]
        assert any(k == "fsync" and p.name.startswith(f".{tar.name}") for k, p in events[:at]), tar
        assert ("fsync", tar.parent) in events[at:], f"{tar.parent} not fsynced after the rename"
        dir_synced = at + events[at:].index(("fsync", tar.parent))
        assert renames[out / "index.json"] > dir_synced, "index.json named a tar before it was on the disk"
    markers = [i for path, i in renames.items() if path.parent.name == "completions"]
    assert markers and min(markers) > min(renames[t] for t in tars)
