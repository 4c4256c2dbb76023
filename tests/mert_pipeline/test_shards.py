"""The shard format on its own: the sample metadata, the one writer and the one reader (sidecars merged in),
index.json, and round trips through `webdataset`'s own reader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from mert_pipeline.demo.synth import render_track
from mert_pipeline.shards import (
    FORMAT,
    DeterministicTar,
    SegmentMeta,
    ShardError,
    check_entry_name,
    encode_flac,
    load_index,
    npy_bytes,
    parse_size,
    read_index,
    read_samples,
    read_segment,
    segment_bounds,
    segment_columns,
    segment_key,
    shard_name,
    sidecar_name,
    write_index,
    write_sample,
)

FILE_ID = "0123456789abcdef"


def meta(num_samples: int = 4800, segment: int = 0, offset: int = 0, **kw) -> SegmentMeta:
    fields = dict(
        key=segment_key(FILE_ID, segment),
        id=FILE_ID,
        relpath=f"01/{FILE_ID}.flac",
        split="train",
        segment=segment,
        offset=offset,
        num_samples=num_samples,
        source_num_samples=offset + num_samples,
        sample_rate=24000,
        label_rate=75.0,
        hop=320,
        frames=-(-num_samples // 320),
        teachers={"rvq": "abc"},
    )
    return SegmentMeta(**{**fields, **kw})


def test_segment_meta_round_trips_and_keeps_the_shard_stages_bytes() -> None:
    m = meta(72017, segment=2, offset=20480)
    assert SegmentMeta.from_bytes(m.to_bytes()) == m
    assert m.to_bytes() == json.dumps(m.__dict__, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"key": "other_0000"}, "not id_segment"),
        ({"offset": 100, "source_num_samples": 4900}, "off the grid"),
        ({"frames": 3}, "!= ceil"),
        ({"source_num_samples": 10}, "past its track"),
        ({"split": "test"}, "split/hop/sample_rate invalid"),
        ({"num_samples": 4800.0}, "must be integers"),
        ({"label_rate": 50.0}, "label_rate"),
    ],
)
def test_segment_meta_refuses_inconsistent_metadata(change: dict, why: str) -> None:
    bad = replace(meta(), **change)
    with pytest.raises(ShardError, match=why):
        SegmentMeta.from_bytes(bad.to_bytes())


def test_unreadable_metadata_is_a_shard_error() -> None:
    for data in (b"", b"{not json", json.dumps({"key": "x"}).encode(), b"[1, 2]"):
        with pytest.raises(ShardError, match="unreadable json"):
            SegmentMeta.from_bytes(data)


def write_set(root: Path, sidecar: bool = True, shuffle_sidecar: bool = False) -> dict[str, dict]:
    """Two samples in one train shard (labels `rvq` inside, `km` in a sidecar) and the index."""
    (root / "train").mkdir(parents=True)
    expected: dict[str, dict] = {}
    samples = []
    for segment in range(2):
        m = meta(4800 + 320 * segment, segment=segment, offset=0 if segment == 0 else 4800)
        m = replace(m, source_num_samples=4800 + 5120)
        audio = (render_track(segment, 0.3, 24000, 1)[: m.num_samples] * 20000).astype(np.int16)
        rvq = np.full((2, m.frames), segment, np.int16)
        km = np.arange(m.frames, dtype=np.int16)[None] % 7
        samples.append((m, audio, rvq, km))
        expected[m.key] = {"audio": audio, "rvq": rvq, "km": km}
    name = shard_name("train", 0)
    with open(root / name, "wb") as handle:
        tar = DeterministicTar(handle)
        for m, audio, rvq, _ in samples:
            write_sample(tar, m, encode_flac(audio, 24000, "PCM_16"), {"rvq": rvq})
        size, sha = tar.close()
    shards = {name: {"split": "train", "samples": 2, "bytes": size, "sha256": sha, "seconds": 0.41}}
    if sidecar:
        side = sidecar_name(name, "km")
        with open(root / side, "wb") as handle:
            tar = DeterministicTar(handle)
            for m, _, _, km in samples[::-1] if shuffle_sidecar else samples:
                tar.add(f"{m.key}.km.npy", npy_bytes(km))
            side_size, side_sha = tar.close()
        entry = {"split": "train", "teacher": "km", "base": name, "base_sha256": sha}
        shards[side] = {**entry, "samples": 2, "bytes": side_size, "sha256": side_sha, "seconds": 0.41}
    index = {
        "format": FORMAT,
        "sample_rate": 24000,
        "hop": 320,
        "label_rate": 75.0,
        "teachers": {"rvq": {"n_q": 2, "num_classes": 1024, "config_hash": "abc"}},
        "sidecars": {"km": {"n_q": 1, "num_classes": 7, "config_hash": "def"}} if sidecar else {},
        "shards": shards,
    }
    write_index(root, index)
    return expected


def test_the_reader_merges_sidecars_and_webdataset_reads_the_same(tmp_path: Path) -> None:
    expected = write_set(tmp_path)
    index = load_index(tmp_path)
    assert index.shards == {"train": [("train/shard-000000.tar", 2)]}
    assert index.teachers == {"rvq": (2, 1024), "km": (1, 7)}
    assert index.sidecars == {"train/shard-000000.tar": {"km": "train/shard-000000.km.tar"}}
    ours = list(read_samples(index, "train/shard-000000.tar"))
    assert [s["__key__"] for s in ours] == list(expected)
    for sample in ours:
        want = expected[sample["__key__"]]
        audio, rate = sf.read(io.BytesIO(sample["flac"]), dtype="int16")
        assert rate == 24000 and np.array_equal(audio, want["audio"])
        assert np.array_equal(np.load(io.BytesIO(sample["rvq.npy"])), want["rvq"])
        assert np.array_equal(np.load(io.BytesIO(sample["km.npy"])), want["km"])
        assert SegmentMeta.from_bytes(sample["json"]).key == sample["__key__"]
    assert "km.npy" not in next(read_samples(index, "train/shard-000000.tar", teachers=("rvq",)))
    theirs = list(wds.WebDataset(str(tmp_path / "train/shard-000000.tar"), shardshuffle=False))
    assert [{k: v for k, v in s.items() if not k.startswith("__")} for s in theirs] == [
        {k: v for k, v in s.items() if not k.startswith("__") and k != "km.npy"} for s in ours
    ]
    totals = json.loads((tmp_path / "index.json").read_text())["totals"]
    assert totals["train"]["samples"] == 2 and totals["all"]["shards"] == 1
    assert totals["train"]["sidecar_bytes"] > 0


def test_a_sidecar_out_of_step_is_a_shard_error(tmp_path: Path) -> None:
    write_set(tmp_path, shuffle_sidecar=True)
    with pytest.raises(ShardError, match="shard-000000.km.tar: key"):
        list(read_samples(load_index(tmp_path), "train/shard-000000.tar"))


def test_index_that_is_not_a_shard_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `mert-pipe shard"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("[]")
    with pytest.raises(ShardError, match="no 'shards' table"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text('{"shards": {}}')
    with pytest.raises(ShardError, match="malformed"):
        load_index(tmp_path)


def test_names() -> None:
    assert shard_name("valid", 12) == "valid/shard-000012.tar"
    assert sidecar_name("valid/shard-000012.tar", "km") == "valid/shard-000012.km.tar"
    assert check_entry_name("train/shard-000001.kmeans500.tar") == "train/shard-000001.kmeans500.tar"
    assert segment_key(FILE_ID, 3) == f"{FILE_ID}_0003"


def test_segment_bounds_fall_on_label_frames_and_balance() -> None:
    for n in (320, 321, 72000, 72017, 720000, 720001, 1_500_000):
        bounds = segment_bounds(n, 2250, 320)
        assert bounds[0][0] == 0 and sum(m for _, m in bounds) == n
        assert all(offset % 320 == 0 and 0 < m <= 720000 for offset, m in bounds)
        assert max(m for _, m in bounds) - min(m for _, m in bounds) <= 320 + n % 320
    assert [m for _, m in segment_bounds(1_500_000, 2250, 320)] == [499840, 500160, 500000]
    assert parse_size("256MB") == 256 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="cannot read the size"):
        parse_size("lots")


def test_segment_columns_are_segment_bounds_of_every_file_at_once() -> None:
    lengths = np.array([320, 321, 72000, 72017, 720000, 720001, 1_500_000, 9_999_999])
    columns = segment_columns(lengths, 35, 20480)
    expected = [
        (f, i, o, n)
        for f, total in enumerate(lengths.tolist())
        for i, (o, n) in enumerate(segment_bounds(total, 35, 20480))
    ]
    got = list(zip(*(columns[k].tolist() for k in ("file", "index", "offset", "n")), strict=True))
    assert got == expected
    assert all(len(v) == 0 for v in segment_columns(np.zeros(0, np.int64), 35, 20480).values())


def test_deterministic_tar_writes_the_bytes_tarfile_writes() -> None:
    """Members are written whole with patched header templates: the archive must stay tarfile's."""
    members = [("0123456789abcdef_0001.flac", bytes(range(256)) * 40), ("0123456789abcdef_0001.json", b"{}")]
    members += [("k.npy", b""), ("x" * 100, b"a" * 512), ("y" * 101, b"b"), ("ü.npy", b"c" * 513)]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            tar.addfile(info, io.BytesIO(data))
    written = io.BytesIO()
    ours = DeterministicTar(written)
    for name, data in members:
        ours.add(name, data)
    size, sha256 = ours.close()
    assert written.getvalue() == expected.getvalue() and size == len(expected.getvalue())
    assert sha256 == hashlib.sha256(expected.getvalue()).hexdigest()


@pytest.mark.parametrize(("fmt", "subtype"), [("FLAC", "PCM_24"), ("WAV", "PCM_16"), ("WAV", "PCM_24")])
def test_segment_audio_is_sample_exact_at_every_bit_depth(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, render_track(48000, 2.0, 24000, 1), 24000, format=fmt, subtype=subtype)
    source, _ = sf.read(path, dtype="float64")
    samples = read_segment(str(path), subtype, 6400, 20000, 48000)
    decoded, _ = sf.read(io.BytesIO(encode_flac(samples, 24000, subtype)), dtype="float64")
    assert sf.info(io.BytesIO(encode_flac(samples, 24000, subtype))).subtype == subtype
    np.testing.assert_array_equal(decoded, source[6400:26400])
