"""Remote storage against a real S3 API (moto's server) through s3fs: the corpus is read from a bucket,
the shards are written to a bucket, and both equal what local folders give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mert_pipeline import storage
from tests.mert_pipeline.test_cli import mert_pipe, small_corpus

pytestmark = pytest.mark.usefixtures("s3_endpoint")


def s3():
    fs, _ = storage.filesystem("s3://any")
    return fs


def make_bucket(name: str) -> str:
    fs = s3()
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"


def test_locations_and_joins() -> None:
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b") and not storage.is_url("/a/b")
    assert not storage.is_url("file:///a/b") and storage.as_location("file:///a/b") == Path("/a/b")
    assert storage.as_location("s3://b/prefix/") == "s3://b/prefix"
    assert storage.join("s3://b/p", "train", "x.tar") == "s3://b/p/train/x.tar"
    assert storage.join(Path("/a"), "train") == Path("/a/train")


def test_a_failed_upload_leaves_no_object_and_no_temporary(tmp_path: Path) -> None:
    bucket = make_bucket("atomic")
    target = f"{bucket}/set/train/shard-000000.tar"
    with pytest.raises(RuntimeError), storage.atomic_output(target, tmp_path) as tmp:
        tmp.write_bytes(b"half a shard")
        raise RuntimeError("killed")
    assert not storage.exists(target) and list(tmp_path.iterdir()) == []
    with storage.atomic_output(target, tmp_path) as tmp:
        tmp.write_bytes(b"a whole shard")
    assert storage.read_bytes(target) == b"a whole shard" and list(tmp_path.iterdir()) == []
    assert storage.list_names(f"{bucket}/set/train") == ["shard-000000.tar"]
    assert storage.list_names(f"{bucket}/set/valid") == []
    storage.remove(target)
    storage.remove(target)  # a missing object is fine
    assert not storage.exists(target)


def test_walk_lists_objects_in_order_and_names_an_empty_prefix() -> None:
    bucket = make_bucket("walk")
    fs = s3()
    for key in ("b/2.flac", "a/1.flac", "a/sub/3.wav"):
        fs.pipe_file(f"walk/music/{key}", b"x" * len(key))
    found = list(storage.walk_files(f"{bucket}/music"))
    assert [f["path"] for f in found] == [
        f"{bucket}/music/a/1.flac",
        f"{bucket}/music/a/sub/3.wav",
        f"{bucket}/music/b/2.flac",
    ]
    assert [f["size"] for f in found] == [8, 11, 8] and all(f["mtime_ns"] > 0 for f in found)
    with pytest.raises(storage.StorageError, match="no such file or prefix"):
        list(storage.walk_files(f"{bucket}/nothing"))


def same(a: object, b: object) -> bool:
    """Equal batches: tensors equal element for element, dicts key for key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return a == b


def upload(folder: Path, url: str) -> None:
    fs = s3()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.relative_to(folder).as_posix()}")


def test_run_reads_the_corpus_from_a_bucket_and_writes_shards_to_a_bucket(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "corpus", n=3)
    (corpus / "more").mkdir()
    (corpus / "song 2.flac").rename(corpus / "more" / "song 2.flac")
    (corpus / "junk.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    upload(corpus, f"{make_bucket('corpus')}/music")
    shards = f"{make_bucket('shards')}/set1"
    common = ["--teachers", "kmeans8", "--valid-percent", "0.25", "--segment-seconds", "2"]

    remote = mert_pipe(
        "run", "s3://corpus/music/", "--out", str(tmp_path / "w1"), "--shards", shards, *common
    )
    assert remote.returncode == 0, remote.stderr
    assert "no problems" in remote.stderr and shards in remote.stderr
    local = mert_pipe("run", str(corpus), "--out", str(tmp_path / "w2"), *common)
    assert local.returncode == 0, local.stderr

    rejects = [json.loads(line) for line in (tmp_path / "w1/rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejects] == [("s3://corpus/music/junk.wav", "not_audio")]
    assert (tmp_path / "w1/train.tsv").read_text().splitlines()[0] == "s3://corpus/music"
    assert (tmp_path / "w1/train.tsv").read_text().splitlines()[1:] == (
        (tmp_path / "w2/train.tsv").read_text().splitlines()[1:]
    )
    index = json.loads(storage.read_bytes(f"{shards}/index.json"))
    assert index == json.loads((tmp_path / "w2/shards/index.json").read_text())
    for name in index["shards"]:  # the same bytes, shard by shard, as from local folders
        assert storage.read_bytes(f"{shards}/{name}") == (tmp_path / "w2/shards" / name).read_bytes()
    assert (
        storage.read_bytes(f"{shards}/rejects.jsonl") == (tmp_path / "w2/shards/rejects.jsonl").read_bytes()
    )

    report = mert_pipe("stats", shards, "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    from mert_pipeline.report import collect_stats

    remote_stats = json.loads((tmp_path / "report/stats.json").read_text())
    local_stats = json.loads(json.dumps(collect_stats(tmp_path / "w2/shards")))
    for key in ("source", "outputs"):
        remote_stats.pop(key), local_stats.pop(key, None)
    assert remote_stats == local_stats

    from mert_pipeline.shards import read_samples
    from mert_pipeline.trainer.data import CropSpec, Loader, load_shard_index

    loaded = load_shard_index(shards)
    name, count = loaded.shards["train"][0]
    assert len(list(read_samples(loaded, name, ("kmeans8",)))) == count
    spec = CropSpec(teachers=("kmeans8",), batch_size=2, crop_samples=24000, min_samples=24000)
    batches = []  # the trainer's loader, with forked DataLoader workers streaming from the bucket
    for index_of in (loaded, load_shard_index(tmp_path / "w2/shards")):
        loader = iter(Loader(index_of, spec, rank=0, world=1, workers=2))
        batches.append([next(loader) for _ in range(2)])
    for remote_batch, local_batch in zip(*batches, strict=True):
        assert same(remote_batch, local_batch)

    s3().rm_file(f"shards/set1/{name}")  # lost object: the rerun writes it again, and only it
    again = mert_pipe("run", "s3://corpus/music", "--out", str(tmp_path / "w1"), "--shards", shards, *common)
    assert again.returncode == 0, again.stderr
    assert storage.read_bytes(f"{shards}/{name}") == (tmp_path / "w2/shards" / name).read_bytes()
    stats = json.loads((tmp_path / "w1/stats/run.json").read_text())
    assert [s["tasks"]["done"] for s in stats["stages"]] == [0, 0, 0, 0, 0, 1]

    labelled = mert_pipe("tokenize", str(tmp_path / "w1"), "--teacher", "bestrq")  # a new teacher later:
    assert labelled.returncode == 0, labelled.stderr  # label-only sidecars next to the remote shards
    sidecars = mert_pipe(
        "shard", str(tmp_path / "w1"), "--out", shards, "--labels-only", "--teacher", "bestrq"
    )
    assert sidecars.returncode == 0, sidecars.stderr
    assert (
        f"{name.removesuffix('.tar')}.bestrq.tar"
        in json.loads(storage.read_bytes(f"{shards}/index.json"))["shards"]
    )
    verified = mert_pipe("verify", shards)
    assert verified.returncode == 0 and "0 problems" in verified.stderr, verified.stderr


def test_missing_remote_root_or_unwritable_bucket_is_a_one_line_error(tmp_path: Path) -> None:
    make_bucket("empty")
    missing = mert_pipe("manifest", "s3://empty/nothing", "--out", str(tmp_path / "w"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: root s3://empty/nothing does not exist"
    ], missing.stderr
    corpus = small_corpus(tmp_path / "corpus", n=1)
    upload(corpus, f"{make_bucket('one')}/c")
    nowhere = mert_pipe(
        "run", "s3://one/c", "--out", str(tmp_path / "w"), "--shards", "s3://no-such-bucket/x"
    )
    lines = nowhere.stderr.strip().splitlines()
    assert nowhere.returncode == 2 and len(lines) == 1, nowhere.stderr
    assert lines[0].startswith("error: s3://no-such-bucket/x is not writable"), lines
