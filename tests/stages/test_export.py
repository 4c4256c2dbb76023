"""`export fairseq`: the files the official MERT fairseq task reads, from a WORKDIR labelled by the stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records
from mert_pipeline.stages import export as export_module
from mert_pipeline.stages.export import export_fairseq, label_names

LABELS = [
    "encodec_0",
    "encodec_1",
]  # the RVQ teacher (2 codebooks): the only one with labels for both train rows


@pytest.fixture(scope="module")
def workdir(labelled_workdir: Path) -> Path:
    return labelled_workdir


def test_fairseq_export_has_exact_line_counts_and_formats(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fs"
    summary = export_fairseq(workdir, out, ["rvq", "km"])
    assert summary["counts"]["rejected.no_labels"] == 1
    audio = {
        r.relpath: r
        for r in iter_records(workdir / "audio_24k/manifest.parquet", record_type=ResampledRecord)
    }
    labels = {r.id: r for r in iter_records(workdir / "labels/rvq/labels.parquet", record_type=LabelRecord)}
    rows = 0
    for split in ("train", "valid"):
        lines = (out / f"{split}.tsv").read_text().splitlines()
        assert lines[0] == str((workdir / "audio_24k").resolve())
        tsv = [line.split("\t") for line in lines[1:]]
        rows += len(tsv)
        files = {f"encodec_{i}": (out / f"{split}.encodec_{i}").read_text().splitlines() for i in range(2)}
        files["km"] = (out / f"{split}.km").read_text().splitlines()
        for label, text in files.items():
            assert len(text) == len(tsv), label
        for number, (relpath, num_samples) in enumerate(tsv):
            record = audio[relpath]
            assert int(num_samples) == record.num_samples and record.split == split
            codes = np.load(workdir / "labels/rvq" / labels[record.id].relpath)
            for i in range(2):
                assert files[f"encodec_{i}"][number] == " ".join(str(v) for v in codes[i])
            km = [int(v) for v in files["km"][number].split(" ")]
            assert km == list(codes[0] % 500) and len(km) == -(-record.num_samples // 320)
    assert rows == len(audio) - 1
    for i in range(2):
        assert (out / f"dict.encodec_{i}.txt").read_text() == "".join(f"{k} 1\n" for k in range(1024))
    assert (out / "dict.km.txt").read_text().splitlines()[-1] == "499 1"
    result = CliRunner().invoke(app, ["export", "fairseq", str(workdir), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli/train.encodec_1").exists() and not (tmp_path / "cli/train.km").exists()


def test_label_names_follow_the_official_task_and_never_collide() -> None:
    facts = {
        "rvq": {"kind": "encodec_24khz", "n_q": 2},
        "kmeans500": {"kind": "kmeans", "n_q": 1},
        "bestrq": {"kind": "bestrq", "n_q": 2},
    }
    assert label_names(facts) == {
        "rvq": ["encodec_0", "encodec_1"],
        "kmeans500": ["km"],
        "bestrq": ["bestrq_0", "bestrq_1"],
    }
    with pytest.raises(ValueError, match="would both write the label 'km'"):
        label_names({"a": {"kind": "kmeans", "n_q": 1}, "b": {"kind": "bestrq", "n_q": 1}})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_sharded_export_deals_train_rows_round_robin_into_the_official_names(
    workdir: Path, tmp_path: Path
) -> None:
    """`--sharding N` writes train_{i}_N.tsv / train_{i}_N.{label} (mert_pretraining.py's names for
    task.sharding_data=N) instead of train.*: row k of the unsharded train.tsv is row k // N of shard k % N,
    with the same labels; valid.* and the dictionaries are the unsharded export's, byte for byte."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    rows = export_fairseq(workdir, plain, ["rvq"])["counts"]["rows.train"]
    n = min(6, rows)  # the fixture has 2 train rows; every shard must get one
    assert n >= 2
    args = ["export", "fairseq", str(workdir), "--teachers", "rvq"]
    result = CliRunner().invoke(app, [*args, "--out", str(sharded), "--sharding", str(n)])
    assert result.exit_code == 0, result.output
    stems = [f"train_{i}_{n}" for i in range(n)]
    expected = {f"{stem}.{ext}" for stem in [*stems, "valid"] for ext in ["tsv", *LABELS]}
    expected |= {f"dict.{label}.txt" for label in LABELS} | {"export.json", "rejects.jsonl"}
    assert {p.name for p in sharded.iterdir()} == expected  # no train.tsv, no train.{label}
    root, *train = lines(plain / "train.tsv")
    for i, stem in enumerate(stems):
        head, *shard = lines(sharded / f"{stem}.tsv")
        assert head == root and shard == train[i::n] and shard
        for label in LABELS:
            assert lines(sharded / f"{stem}.{label}") == lines(plain / f"train.{label}")[i::n], (stem, label)
    assert sorted(row for stem in stems for row in lines(sharded / f"{stem}.tsv")[1:]) == sorted(train)
    for name in [
        "valid.tsv",
        *(f"valid.{label}" for label in LABELS),
        *(f"dict.{label}.txt" for label in LABELS),
    ]:
        assert (sharded / name).read_bytes() == (plain / name).read_bytes(), name
    summary = json.loads((sharded / "export.json").read_text())
    assert summary["sharding"] == {
        "shards": n,
        "order": "round-robin",
        "train": stems,
        "rows": [len(train[i::n]) for i in range(n)],
    }
    assert json.loads((plain / "export.json").read_text())["sharding"]["shards"] == 0
    assert f"task.sharding_data={n}" in " ".join(result.output.split())

    # the same folder exported again without sharding holds only that layout (files the export did not
    # write stay), and back again
    (sharded / "notes.txt").write_text("mine")
    export_fairseq(workdir, sharded, ["rvq"])
    assert {p.name for p in sharded.iterdir()} == {p.name for p in plain.iterdir()} | {"notes.txt"}
    (sharded / "notes.txt").unlink()
    export_fairseq(workdir, sharded, ["rvq"], sharding=n)
    assert {p.name for p in sharded.iterdir()} == expected


def test_sharding_that_the_task_would_not_read_or_that_leaves_a_shard_empty_is_refused(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = export_fairseq(workdir, tmp_path / "plain", ["rvq"])["counts"]["rows.train"]
    out = tmp_path / "refused"
    args = ["export", "fairseq", str(workdir), "--out", str(out), "--sharding"]
    result = CliRunner().invoke(app, [*args, str(rows + 1)])
    assert result.exit_code == 2
    (message,) = [line for line in result.output.splitlines() if "error:" in line]  # one line
    assert f"--sharding {rows + 1} needs at least {rows + 1} train rows" in message
    assert f"this export has {rows}" in message
    assert not list(out.glob("*")), "nothing is written before the refusal"
    result = CliRunner().invoke(app, [*args, "1"])
    assert result.exit_code == 2 and "task.sharding_data <= 1" in " ".join(result.output.split())
    assert CliRunner().invoke(app, [*args, "-2"]).exit_code == 2
    with pytest.raises(ValueError, match="give 0"):
        export_fairseq(workdir, out, ["rvq"], sharding=-1)
    monkeypatch.setattr(export_module.resource, "getrlimit", lambda _: (16, 16))
    with pytest.raises(ValueError, match="open-file limit is 16: use a smaller --sharding"):
        export_fairseq(workdir, out, ["rvq"], sharding=2)
    assert not list(out.glob("*"))


def test_sharding_6_as_the_official_330m_config(tmp_path: Path, test_codec_file: Path) -> None:
    """The 330M layout on a corpus with 10 train rows: train_{0..5}_6.tsv with the root line and 2 or 1
    rows each (10 = 4 x 2 + 2 x 1), one label line per row in every train_{i}_6.encodec_k."""
    from mert_pipeline import pipeline
    from tests.helpers import resampled_workdir

    work = resampled_workdir(tmp_path, n_tracks=6)
    rvq = pipeline.rvq_teacher(work, checkpoint=test_codec_file, device="cpu", bandwidth=1.5)
    pipeline.tokenize(work, rvq, executor=pipeline.ExecutorConfig(kind="local", workers=1))
    out = tmp_path / "fairseq_330m"
    result = CliRunner().invoke(app, ["export", "fairseq", str(work), "--out", str(out), "--sharding", "6"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    for i in range(6):
        assert {f"train_{i}_6.tsv", f"train_{i}_6.encodec_0", f"train_{i}_6.encodec_1"} <= names
    assert not any(name.startswith("train.") for name in names)
    counts = [len(lines(out / f"train_{i}_6.tsv")) - 1 for i in range(6)]
    assert counts == [2, 2, 2, 2, 1, 1]
    for i, count in enumerate(counts):
        for label in LABELS:
            assert len(lines(out / f"train_{i}_6.{label}")) == count
    assert json.loads((out / "export.json").read_text())["sharding"]["shards"] == 6
