"""The trainer on shards the pipeline itself wrote: synthesized music -> manifest -> resample -> tokenize
(RVQ with the test codec) -> shard, then real torchrun with 2 gloo processes. The learning tests use
shards of pitch-labelled audio (test_pretrain.py); this one checks that the trainer and the shard stage
agree on the format, that it trains on them (loss falls) and resumes from its checkpoint. The shards are
the session's `pipeline_shards` (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.trainer.test_pretrain import records, run

SMALL_HEADS = {"final_dim": 16, "cqt_bins": 24, "cqt_bins_per_octave": 12, "codebooks": [("rvq", 8, 1024)]}


def command(shards: Path, out: Path, *args: str, resume: bool = False) -> list[str]:
    import sys

    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    base += ["trainer/pretrain.py", "--config", "trainer/configs/tiny.yaml", "--shards", str(shards)]
    base += ["--out", str(out)] + (["--resume"] if resume else [])
    options = ["teachers=[rvq]", "batch_size=2", "log_interval=1", "eval_interval=30", "ckpt_interval=30"]
    return base + options + list(args)


def test_trains_and_resumes_on_shards_the_pipeline_wrote(pipeline_shards: Path, tmp_path: Path) -> None:
    index = json.loads((pipeline_shards / "index.json").read_text())
    assert index["teachers"]["rvq"]["n_q"] == 8
    out = tmp_path / "run"
    run(command(pipeline_shards, out, "max_steps=60", "stop_after=30"))
    run(command(pipeline_shards, out, "max_steps=60", resume=True))
    train = records(out)
    assert sorted(train) == list(range(1, 61)), "the resumed run continues at step 31"
    start = sum(train[s]["loss"] for s in range(1, 6)) / 5
    end = sum(train[s]["loss"] for s in range(56, 61)) / 5
    assert end < 0.95 * start, (start, end)
    assert sorted(records(out, "valid")) == [30, 60]
    checkpoint = torch.load(sorted(out.glob("ckpt-*.pt"))[-1], weights_only=True)
    assert checkpoint["step"] == 60


def test_mert_pipe_train_checks_then_launches_torchrun(pipeline_shards: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    def train(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mert_pipeline", "train", "--config", "tiny", "--out", str(tmp_path)]
        return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    wrong = train("--shards", str(tmp_path / "nope"))
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and len(lines) == 1 and "`mert-pipe shard`" in lines[0], wrong.stderr
    done = train("--shards", str(pipeline_shards), "max_steps=3", "num_workers=0", "eval_interval=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ckpt-00000003.pt").exists() and "train finished" in done.stderr
    assert "TEST CODEC" in done.stderr, "the trainer says its labels come from test weights"


def test_training_from_an_hf_mert_directory_lowers_the_loss(pipeline_shards: Path, tmp_path: Path) -> None:
    """--init-from a MERT-format directory (another shape than the config's: the source decides), on the
    pipeline's shards: the loss falls, the checkpoints and the HF export say where the weights came from."""
    import dataclasses

    from mert_pipeline.hf_export import export_hf
    from tests.trainer.test_weights import TINY, trained_looking, write_mert_hf

    source = write_mert_hf(
        tmp_path / "mert", trained_looking(dataclasses.replace(TINY, **SMALL_HEADS), 5, 0.002)
    )
    out = tmp_path / "run"
    base = command(pipeline_shards, out, "max_steps=40", "eval_interval=0", "ckpt_interval=40")
    base[base.index("2")] = "1"  # one process
    run([*base, "--init-from", str(source)])
    train = records(out)
    start = sum(train[s]["loss"] for s in range(1, 6)) / 5
    end = sum(train[s]["loss"] for s in range(36, 41)) / 5
    assert end < 0.95 * start, (start, end)
    init = json.loads((out / "config.json").read_text())["init"]
    assert init["kind"] == "hf" and init["path"].endswith("pytorch_model.bin") and len(init["sha256"]) == 64
    assert "cqt_head" in init["reinitialised"] and init["unused"] == []
    assert json.loads((out / "config.json").read_text())["model"]["embed_dim"] == 48
    summary = export_hf(out, tmp_path / "hf")
    assert summary["init_from"]["sha256"] == init["sha256"] and summary["max_abs_diff"] < 1e-4
