"""`mert-pipe stats`: numbers against hand-computed values on a hand-made WORKDIR, plots written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.manifests.io import ManifestWriter, RejectsWriter
from mert_pipeline.manifests.records import AudioRecord, LabelRecord, Reject
from mert_pipeline.report import collect_stats, write_report

DURATIONS = [2.0, 4.0, 12.0]  # seconds at 24 kHz: histogram bins [1, 3), [3, 5), [10, 30)
# frame-aligned labels of the 3 files (4 frames each): teacher a (k 4, 2 codebooks), teacher b (k 2)
A0 = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]]
A1 = [[0, 1, 0, 1]] * 3
B0 = [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]]


def _record(root: Path, i: int, seconds: float, split: str) -> AudioRecord:
    hex_id = f"{i:016x}"
    n = int(seconds * 24000)
    return AudioRecord(
        id=hex_id, path=str(root / f"t{i}.wav"), relpath=f"t{i}.wav", format="WAV", subtype="PCM_16",
        sampling_rate=24000, num_samples=n, duration=n / 24000, channels=1, size_bytes=2 * n + 44,
        content_hash=hex_id * 2, split=split,
    )  # fmt: skip


def _labels(workdir: Path, name: str, rows: list[np.ndarray], k: int) -> None:
    folder = workdir / "labels" / name
    (folder / "ab").mkdir(parents=True)
    n_q = rows[0].shape[0]
    facts = {"name": name, "kind": "test", "config_hash": "h", "n_q": n_q, "num_classes": k}
    (folder / "teacher.json").write_text(json.dumps(facts))
    with ManifestWriter(folder / "labels.parquet", str(folder), record_type=LabelRecord) as writer:
        for i, array in enumerate(rows):
            np.save(folder / "ab" / f"{i}.npy", array.astype(np.int16))
            writer.write(
                LabelRecord(
                    id=f"{i:016x}",
                    teacher=name,
                    kind="test",
                    config_hash="h",
                    relpath=f"ab/{i}.npy",
                    n_q=n_q,
                    frames=array.shape[1],
                    num_classes=k,
                    label_rate=75.0,
                    num_samples=1280,
                    sampling_rate=24000,
                    split="train",
                )  # fmt: skip
            )


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    with ManifestWriter(work / "manifest.parquet", str(tmp_path)) as writer:
        for i, seconds in enumerate(DURATIONS):
            writer.write(_record(tmp_path, i, seconds, "valid" if i == 2 else "train"))
    with RejectsWriter(work / "rejects.jsonl") as rejects:
        for path, reason in [("x.txt", "extension"), ("y.wav", "decode_error"), ("z.wav", "decode_error")]:
            rejects.write(Reject(str(tmp_path / path), reason, "test"))
    _labels(work, "a", [np.array([r0, r1]) for r0, r1 in zip(A0, A1, strict=True)], 4)
    _labels(work, "b", [np.array([r]) for r in B0], 2)
    return work


def test_stats_match_hand_computed_values(workdir: Path) -> None:
    stats = collect_stats(workdir)
    assert stats["files"] == 3
    assert stats["hours"] == pytest.approx(18.0 / 3600)
    assert stats["splits"] == {"train": 2, "valid": 1}
    assert stats["rejects"]["manifest"] == {"decode_error": 2, "extension": 1}
    bins = {(b["from"], b["to"]): b["files"] for b in stats["durations"]["histogram"]}
    assert bins[(1, 3)] == bins[(3, 5)] == bins[(10, 30)] == 1 and sum(bins.values()) == 3
    assert stats["durations"]["median"] == 4.0
    # a, codebook 0: codes 0,1 four times each, 2,3 twice each of 12 frames -> H = 1.918 bits
    a0 = stats["teachers"]["a"]["codebooks"][0]
    p = np.array([4, 4, 2, 2]) / 12
    assert a0["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert a0["perplexity"] == pytest.approx(2 ** -(p * np.log2(p)).sum())
    assert a0["used"] == 4 and a0["frames"] == 12
    a1 = stats["teachers"]["a"]["codebooks"][1]  # codes 0 and 1 evenly: 1 bit, perplexity 2, 2 of 4 used
    assert (a1["entropy_bits"], a1["perplexity"], a1["used"]) == (pytest.approx(1.0), pytest.approx(2.0), 2)
    # b = (a0 in {1, 3}): H(b) = 1 bit, fully determined by a0 -> MI = H(b) = 1 bit, purity b|a = 1
    agreement = stats["agreement"]["a~b"]
    assert agreement["mutual_information"] == pytest.approx(1.0)
    assert agreement["mi_over_entropy_b"] == pytest.approx(1.0)
    assert agreement["purity_b_given_a"] == pytest.approx(1.0)
    assert agreement["nmi"] == pytest.approx(1.0 / ((-(p * np.log2(p)).sum() + 1.0) / 2))


def test_report_writes_markdown_and_non_empty_plots(workdir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["stats", str(workdir)])
    assert result.exit_code == 0, result.output
    out = workdir / "stats" / "report"
    for name in ("durations", "rejects", "codebooks", "agreement"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    text = (out / "report.md").read_text()
    assert "0.005 h" in text and "| manifest | decode_error | 2 |" in text
    assert "![agreement](agreement.png)" in text and "| a vs b | 1.000 |" in text
    assert json.loads((out / "stats.json").read_text())["files"] == 3
    again = write_report(workdir, tmp_path / "again")  # deterministic: same report, same plots
    assert (tmp_path / "again" / "report.md").read_text() == text
    assert (tmp_path / "again" / "codebooks.png").read_bytes() == (out / "codebooks.png").read_bytes()
    assert math.isclose(again["hours"], 18.0 / 3600)


def test_stats_on_shards_and_misuse(tmp_path: Path) -> None:
    from tests.trainer.shardgen import write_shards

    shards = tmp_path / "shards"
    write_shards(
        shards, train_shards=1, valid_shards=1, per_shard=4, seconds=(1.0, 1.0), short_clips=0,
        sidecar_teacher="kmeans",
    )  # fmt: skip
    stats = write_report(shards, tmp_path / "report")
    assert stats["kind"] == "shards" and stats["segments"] == 8
    assert stats["hours"] == pytest.approx(8.0 / 3600, rel=1e-3)
    # shardgen's kmeans code is rvq's codebook 0 // 2: knowing rvq fully determines kmeans
    assert stats["agreement"]["kmeans~rvq"]["purity_a_given_b"] == pytest.approx(1.0)
    assert (tmp_path / "report" / "agreement.png").stat().st_size > 5000
    result = CliRunner().invoke(app, ["stats", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output
