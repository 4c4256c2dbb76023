"""HuBERT's next iteration in one step (`pipeline.iterate`, `mert-pipe iterate`), on the session's shared
pipeline WORKDIR, its shards and the run folder the trainer wrote on them: the layer chosen by measurement,
the labels of every file, sidecars beside the untouched audio shards, and a training on both teachers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mert_pipeline import pipeline
from mert_pipeline.cli import app
from mert_pipeline.executor import ExecutorConfig
from mert_pipeline.iterate import choose_layer
from mert_pipeline.manifests.io import iter_records
from mert_pipeline.manifests.records import LabelRecord, ResampledRecord
from mert_pipeline.shards import load_index
from mert_pipeline.teachers.kmeans import assign
from mert_pipeline.teachers.model_features import ModelFeatures
from tests.helpers import REPO

LOCAL = ExecutorConfig(kind="local", workers=1)
SELECT = {"select_data": ("builtin:pitch",), "select_frames": 1500, "select_per_class": 3}


@pytest.fixture(scope="module")
def iterated(
    pipeline_workdir: Path, pipeline_shards: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, pipeline.IterationReport]:
    """Copies of the session's WORKDIR and shards, iterated once from the trained run folder (k = 8)."""
    root = tmp_path_factory.mktemp("iterate")
    work, shards = root / "work", root / "shards"
    shutil.copytree(pipeline_workdir, work)
    shutil.copytree(pipeline_shards, shards)
    (shards / ".owner").write_text(str(work.resolve()))  # the copied shards belong to the copied WORKDIR
    report = pipeline.iterate(work, trained_run, k=8, shards=shards, device="cpu", executor=LOCAL, **SELECT)
    return work, shards, report


def test_labels_every_file_with_the_chosen_layer_and_records_how(
    iterated: tuple[Path, Path, pipeline.IterationReport], trained_run: Path
) -> None:
    work, _, report = iterated
    record = json.loads((work / "kmeans" / "iter8" / "iteration.json").read_text())
    assert record == report.record and record["name"] == "iter8" and record["k"] == 8
    assert record["checkpoint_kind"] == "run" and record["checkpoint_file"].endswith("ckpt-00000004.pt")
    choice = record["layer_choice"]
    assert sorted(choice["per_layer"]) == ["0", "1", "2"] and choice["data"] == ["builtin:pitch"]
    means = {int(n): s["mean"] for n, s in choice["per_layer"].items()}
    assert record["layer"] == max(means, key=lambda n: (means[n], -n))  # the best, ties to the shallower
    assert not list((work / "features" / "iter8").glob("*/*.npy")), "the features are sampled, not stored"
    audio = {r.id: r for r in iter_records(work / "audio_24k/manifest.parquet", record_type=ResampledRecord)}
    labels = list(iter_records(work / "labels/iter8/labels.parquet", record_type=LabelRecord))
    assert {r.id for r in labels} == set(audio)  # every file, both splits
    centroids = np.load(record["centroids"])
    model = ModelFeatures.from_checkpoint(trained_run, record["layer"], device="cpu")
    import soundfile as sf

    first = labels[0]
    features = model(sf.read(audio[first.id].path, dtype="float32")[0])
    codes = np.load(work / "labels/iter8" / first.relpath)
    np.testing.assert_array_equal(codes[0], assign(features, centroids))  # the layer the record names


def test_sidecars_join_the_shards_and_the_trainer_reads_both_teachers(
    iterated: tuple[Path, Path, pipeline.IterationReport], tmp_path: Path
) -> None:
    _, shards, report = iterated
    assert report.sidecars is not None and report.sidecars.ok
    index = load_index(shards)
    assert index.teachers["iter8"] == (1, 8) and index.teachers["rvq"][0] == 8
    assert pipeline.verify(shards).ok, "sidecars match their audio shards' keys and hashes"
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += ["trainer/pretrain.py", "--config", "trainer/configs/tiny.yaml", "--shards", str(shards)]
    command += ["--out", str(out), "teachers=[rvq,iter8]", "batch_size=2", "max_steps=3", "ckpt_interval=3"]
    command += ["eval_interval=0", "num_workers=0", "log_interval=1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss_iter8"]) and np.isfinite(r["loss_rvq"]) for r in train)


def test_a_rerun_resumes_and_a_given_layer_skips_the_choice(
    iterated: tuple[Path, Path, pipeline.IterationReport], trained_run: Path
) -> None:
    work, shards, first = iterated
    labels = (work / "labels/iter8/labels.parquet").read_bytes()
    record = (work / "kmeans/iter8/iteration.json").read_text()
    options = ["--k", "8", "--shards", str(shards), "--device", "cpu", "--workers", "1"]
    options += ["--select-data", "builtin:pitch", "--select-frames", "1500", "--select-per-class", "3"]
    again = CliRunner().invoke(app, ["iterate", str(work), "--from", str(trained_run), *options])
    assert again.exit_code == 0, again.output
    shown = " ".join(again.output.split())
    assert "as chosen before" in shown and f"k-means k=8 on layer {first.record['layer']}" in shown
    assert (work / "kmeans/iter8/iteration.json").read_text() == record  # the choice reused, not measured
    assert (work / "labels/iter8/labels.parquet").read_bytes() == labels
    with pytest.raises(pipeline.PipelineError, match="--layer must be in 0..2"):
        pipeline.iterate(work, trained_run, layer=3, k=8, executor=LOCAL)
    with pytest.raises(pipeline.PipelineError, match="looked for ckpt"):
        pipeline.iterate(work, work, k=8, executor=LOCAL)


def test_choose_layer_prefers_the_layer_whose_clusters_hold_the_classes(pipeline_workdir: Path) -> None:
    """A stand-in extractor: layer 1 is the clip's pitch class spelled out, layer 0 noise: layer 1 wins."""

    class Spelled:
        num_layers = 1

        def stream(self, blocks, every_layer: bool = False):  # noqa: ANN001, ANN202 - the extractor protocol
            for block in blocks:
                frames = max(1, len(block) // 320)
                spectrum = np.abs(np.fft.rfft(block[:4800]))
                pitch = np.full((frames, 4), float(np.argmax(spectrum[30:]) % 12), np.float32)
                noise = np.random.default_rng(len(block)).standard_normal((frames, 4)).astype(np.float32)
                yield np.stack([noise, pitch])

    choice = choose_layer(
        Spelled(), pipeline_workdir / "audio_24k/manifest.parquet", k=8, data=("builtin:pitch",), frames=600,
        per_class=2,
    )  # fmt: skip
    assert choice.layer == 1 and choice.mean[1] > choice.mean[0], choice.mean
