"""A WORKDIR labelled through the Python API, shared by the shard and export tests (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from mert_pipeline import pipeline
from mert_pipeline.demo.synth import render_track, synthesize_demo_corpus
from mert_pipeline.executor import ExecutorConfig
from tests.helpers import add_label_set

LOCAL = ExecutorConfig(kind="local", workers=1)


@pytest.fixture(scope="session")
def labelled_workdir(tmp_path_factory: pytest.TempPathFactory, test_codec_file: Path) -> Path:
    """Resampled audio (three tracks, one of 72017 samples, not a multiple of 320) labelled by the RVQ
    teacher (2 codebooks) and a single-codebook set `km` that lacks the first file."""
    root = tmp_path_factory.mktemp("corpus")
    synthesize_demo_corpus(root, n_tracks=2, seed=5, with_bad_files=False)
    sf.write(root / "odd.flac", render_track(72017, 72017 / 24000, 24000, 1), 24000, subtype="PCM_16")
    work = tmp_path_factory.mktemp("work")
    pipeline.manifest([str(root)], work, valid_percent=0.4, executor=LOCAL)
    pipeline.resample(work, executor=LOCAL)
    rvq = pipeline.rvq_teacher(work, checkpoint=test_codec_file, device="cpu", bandwidth=1.5)
    pipeline.tokenize(work, rvq, executor=LOCAL)
    add_label_set(work, "km", skip=1)
    return work
