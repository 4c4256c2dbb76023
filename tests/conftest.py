"""Shared fixtures. Tests import `tests.helpers`; worker processes (spawned pools, Ray) find it through
PYTHONPATH, which is set here so that they import the same modules as the test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, add_label_set


@pytest.fixture(autouse=True, scope="session")
def _repo_on_pythonpath() -> None:
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


@pytest.fixture(scope="session")
def ray_cluster(_repo_on_pythonpath: None):
    """One real local Ray cluster shared by the tests that ask for it (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def test_codec_file(tmp_path_factory: pytest.TempPathFactory):
    """The test codec (real EnCodec architecture, seeded weights, k-means codebooks), built once per session:
    building it takes tens of seconds on a small machine."""
    from mert_pipeline.demo.test_codec import make_test_codec

    return make_test_codec(tmp_path_factory.mktemp("codec") / "test-codec.pt", seed=0)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on a local port, reached through s3fs as any bucket would be. The
    endpoint and fake credentials go into the environment, which subprocesses and spawned workers
    inherit, exactly as a user's AWS settings would."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    yield settings["AWS_ENDPOINT_URL_S3"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def labelled_workdir(tmp_path_factory: pytest.TempPathFactory, test_codec_file: Path) -> Path:
    """Resampled audio (three tracks, one of 72017 samples, not a multiple of 320) labelled by the RVQ
    teacher (2 codebooks) and a single-codebook set `km` that lacks the first file: shared by the shard,
    export and hostile-input tests, made once per session."""
    import soundfile as sf

    from mert_pipeline import pipeline
    from mert_pipeline.demo.synth import render_track, synthesize_demo_corpus
    from mert_pipeline.executor import ExecutorConfig

    local = ExecutorConfig(kind="local", workers=1)
    root = tmp_path_factory.mktemp("corpus")
    synthesize_demo_corpus(root, n_tracks=2, seed=5, with_bad_files=False)
    sf.write(root / "odd.flac", render_track(72017, 72017 / 24000, 24000, 1), 24000, subtype="PCM_16")
    work = tmp_path_factory.mktemp("work")
    pipeline.manifest([str(root)], work, valid_percent=0.4, executor=local)
    pipeline.resample(work, executor=local)
    rvq = pipeline.rvq_teacher(work, checkpoint=test_codec_file, device="cpu", bandwidth=1.5)
    pipeline.tokenize(work, rvq, executor=local)
    add_label_set(work, "km", skip=1)
    return work


@pytest.fixture(scope="session")
def pipeline_workdir(tmp_path_factory: pytest.TempPathFactory, test_codec_file: Path) -> Path:
    """Four synthesized tracks taken through manifest, resample and the RVQ teacher (8 codebooks of the test
    codec), both splits used: the WORKDIR that `pipeline_shards` and `trained_run` are made from."""
    from mert_pipeline import pipeline
    from mert_pipeline.demo.synth import synthesize_demo_corpus
    from mert_pipeline.executor import ExecutorConfig

    local = ExecutorConfig(kind="local", workers=1)
    corpus, work = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("work")
    synthesize_demo_corpus(corpus, n_tracks=4, seed=11, with_bad_files=False)
    pipeline.manifest([str(corpus)], work, valid_percent=0.5, seed=1317, executor=local)  # both splits used
    pipeline.resample(work, executor=local)
    rvq = pipeline.rvq_teacher(work, checkpoint=test_codec_file, device="cpu")
    pipeline.tokenize(work, rvq, executor=local)
    return work


@pytest.fixture(scope="session")
def pipeline_shards(tmp_path_factory: pytest.TempPathFactory, pipeline_workdir: Path) -> Path:
    """`pipeline_workdir` cut into 4 s segments, 8 to a shard."""
    from mert_pipeline import pipeline
    from mert_pipeline.executor import ExecutorConfig

    shards = tmp_path_factory.mktemp("shards")
    local = ExecutorConfig(kind="local", workers=1)
    pipeline.shard(pipeline_workdir, shards, segment_seconds=4.0, shard_samples=8, executor=local)
    return shards


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, pipeline_shards: Path) -> Path:
    """A run folder as the trainer writes it (real torchrun, 1 process, the tiny config, 4 steps on
    `pipeline_shards`): the trainer's `config.json` and `log.jsonl` beside ckpt-00000002.pt and
    ckpt-00000004.pt. The commands that take a model are tested on it."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += ["trainer/pretrain.py", "--config", "trainer/configs/tiny.yaml"]
    command += ["--shards", str(pipeline_shards)]
    command += ["--out", str(out), "teachers=[rvq]", "batch_size=2", "max_steps=4", "ckpt_interval=2"]
    command += ["eval_interval=0", "num_workers=0", "log_interval=1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out
