"""`export fairseq`: the files the official MERT fairseq task reads, from a WORKDIR labelled by the stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records
from mert_pipeline.stages.export import export_fairseq, label_names


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
