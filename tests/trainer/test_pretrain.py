"""The trainer end to end: real `torchrun` (python -m torch.distributed.run), 2 processes, gloo, on shards
of learnable synthesized audio. One reference run is shared: it must learn, and every interrupted run
(resumed from one of its checkpoints, or SIGKILLed and resumed) must repeat its losses step for step.
The shard set has one train shard, fewer than ranks x workers: every run here is that case too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mert_pipeline.trainer.pretrain import check_inputs, config_path, main
from tests.helpers import REPO
from tests.trainer.shardgen import write_shards

STEPS = 100
COMMON = [
    "teachers=[rvq,kmeans]",
    "log_interval=1",
    f"max_steps={STEPS}",
    "eval_interval=50",
    "epoch_batches=4",
]


def torchrun(shards: Path, out: Path, *args: str, resume: bool = False) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["trainer/pretrain.py", "--config", "trainer/configs/tiny.yaml", "--shards", str(shards)]
    return command + ["--out", str(out)] + (["--resume"] if resume else []) + COMMON + list(args)


def run(command: list[str], timeout: float = 150) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def records(out: Path, kind: str = "train") -> dict[int, dict]:
    """The last record of each step (a resumed run logs again the steps after its checkpoint)."""
    found = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            found[record["step"]] = record
    return found


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), train_shards=1, valid_shards=1, per_shard=48)


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run(torchrun(shards, out, "ckpt_interval=40", "keep_last=5", "num_workers=0"))
    return out


def test_loss_falls_and_accuracy_beats_chance(reference: Path) -> None:
    train = records(reference)
    assert sorted(train) == list(range(1, STEPS + 1))
    for key in ("loss", "loss_rvq", "loss_kmeans"):  # the total, and each teacher's cross-entropy
        start = sum(train[s][key] for s in range(1, 11)) / 10
        end = sum(train[s][key] for s in range(STEPS - 9, STEPS + 1)) / 10
        assert end < 0.8 * start, (key, start, end)
    valid = records(reference, "valid")
    assert sorted(valid) == [50, 100]
    # chance: 1/8 for rvq 0 (pitch), 1/4 for rvq 1 (pitch % 4, 4 of 8 classes used) and kmeans
    for head, chance in (("acc_rvq_0", 1 / 8), ("acc_rvq_1", 1 / 4), ("acc_kmeans_0", 1 / 4)):
        early = sum(train[s][head] for s in range(1, 11)) / 10
        late = sum(train[s][head] for s in range(STEPS - 19, STEPS + 1)) / 20
        assert late > max(1.3 * chance, early + 0.1), (head, early, late)
        if head != "acc_rvq_1":  # pitch mod 4 is learned on held-out clips only after 100 steps
            assert valid[STEPS][head] > 1.1 * chance, (head, valid[STEPS])
    assert 0.0 < valid[STEPS]["collapse"] < 0.9  # a model that learns keeps its clips apart
    assert {"lr", "grad_norm", "samples_per_s", "audio_s_per_s", "cqt_mse"} <= set(train[STEPS])
    assert [p.name for p in sorted(reference.glob("ckpt-*.pt"))] == [
        f"ckpt-{s:08d}.pt" for s in (40, 80, 100)
    ]
    state = torch.load(reference / "ckpt-00000040.pt", weights_only=True)  # no pickled objects
    assert state["step"] == 40 and state["config"]["train"]["seed"] == 1
    assert state["data"] == {"epoch": 9, "batch": 4, "world": 2, "workers": 0}  # 4 batches per epoch
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)
    assert any((reference / "tb").iterdir())  # TensorBoard events (tensorboard is a dependency)


def test_resume_repeats_the_uninterrupted_losses(shards: Path, reference: Path, tmp_path: Path) -> None:
    shutil.copy(reference / "ckpt-00000040.pt", tmp_path / "ckpt-00000040.pt")  # a run stopped at 40
    run(torchrun(shards, tmp_path, "stop_after=46", "num_workers=0", resume=True))
    resumed, full = records(tmp_path), records(reference)
    assert sorted(resumed) == list(range(41, 47))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4, abs=1e-5), step
        assert resumed[step]["acc_rvq_0"] == pytest.approx(full[step]["acc_rvq_0"], abs=1e-6), step


def test_a_run_begun_before_label_specials_resumes_on_its_own_heads(
    shards: Path, reference: Path, tmp_path: Path
) -> None:
    """A checkpoint written before the fairseq-parity fix: heads of codes only, no label_specials in its
    config. --resume continues it with those heads (saying so) instead of failing on the shapes."""
    state = torch.load(reference / "ckpt-00000040.pt", weights_only=True)
    model_cfg = state["config"]["model"]
    specials = model_cfg.pop("label_specials")
    assert specials == 4
    blocks = [classes for _, n_q, classes in model_cfg["codebooks"] for _ in range(n_q)]
    keep = torch.cat(
        [
            torch.arange(start + specials, start + specials + k)
            for start, k in zip(
                [sum(specials + b for b in blocks[:i]) for i in range(len(blocks))], blocks, strict=True
            )
        ]
    )
    old_rows = state["model"]["label_embs_concat"].shape[0]
    state["model"]["label_embs_concat"] = state["model"]["label_embs_concat"][keep].clone()
    for slot in state["optimizer"]["state"].values():  # Adam's moments of that parameter, same rows
        for name in ("exp_avg", "exp_avg_sq"):
            if slot[name].shape[:1] == (old_rows,) and slot[name].dim() == 2:
                slot[name] = slot[name][keep].clone()
    torch.save(state, tmp_path / "ckpt-00000040.pt")

    done = subprocess.run(
        torchrun(shards, tmp_path, "stop_after=42", "num_workers=0", resume=True),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[resume] ckpt-00000040.pt has 0 special label rows a head" in done.stdout
    assert sorted(records(tmp_path)) == [41, 42]
    after = torch.load(tmp_path / "ckpt-00000042.pt", weights_only=True)
    assert after["config"]["model"]["label_specials"] == 0
    assert after["model"]["label_embs_concat"].shape[0] == sum(blocks)


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(
    shards: Path, reference: Path, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        torchrun(shards, tmp_path, "ckpt_interval=10", "num_workers=1"),  # the data stream of 0 workers
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "log.jsonl").exists() or max(records(tmp_path), default=0) < 12:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:  # SIGKILL the trainers (each leads its own group, with its loader workers), then torchrun
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for child in map(int, children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(child), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    saved = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert saved and saved[-1] in ("ckpt-00000010.pt", "ckpt-00000020.pt")
    killed_at = max(records(tmp_path))
    run(
        torchrun(
            shards, tmp_path, "ckpt_interval=10", "num_workers=1", f"stop_after={killed_at + 2}", resume=True
        )
    )
    after, full = records(tmp_path), records(reference)
    assert max(after) == killed_at + 2
    for step in range(1, killed_at + 3):
        assert after[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4, abs=1e-5), step


def test_fewer_shards_than_ranks_times_workers(tmp_path: Path) -> None:
    one = write_shards(tmp_path / "shards", train_shards=1, valid_shards=1, per_shard=8)
    out = tmp_path / "run"
    # 2 ranks x 2 workers = 4 slots on one shard; 2 batches per epoch, 3 steps: an epoch end
    run(
        torchrun(one, out, "num_workers=2", "epoch_batches=2", "stop_after=3", "eval_interval=3"), timeout=120
    )
    assert max(records(out)) == 3 and sorted(records(out, "valid")) == [3]
    state = torch.load(out / "ckpt-00000003.pt", weights_only=True)
    assert state["data"] == {"epoch": 1, "batch": 1, "world": 2, "workers": 2}


def test_misuse_is_one_line_error(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--config", "trainer/configs/tiny.yaml", "--shards", str(shards), "--out", str(tmp_path)]
    for extra, message in (["no_such_key=1"], "unknown config keys"), (["teachers=[bestrq]"], "not in"):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    bad = tmp_path / "bad_shards"
    bad.mkdir()
    index = json.loads((shards / "index.json").read_text())
    index["shards"] = {"../outside.tar": next(iter(index["shards"].values()))}
    (bad / "index.json").write_text(json.dumps(index))
    base[3] = str(bad)
    assert main(base) == 2  # an index naming a file outside the shard set: one line, nothing opened
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "index.json names a shard" in err and err.count("\n") == 1
    base[3] = str(tmp_path / "no_shards_here")
    assert main(base) == 2  # not a shard set: the line says what --shards must be
    err = capsys.readouterr().err
    assert "no index.json there" in err and "`mert-pipe shard`" in err and err.count("\n") == 1
    assert main(["--config", "nope", "--shards", str(shards), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--config nope: no such file" in err and "mert_95m" in err and "tiny" in err
    init = [
        "--config",
        "tiny",
        "--shards",
        str(shards),
        "--out",
        str(tmp_path),
        "--init-from",
        str(tmp_path / "x"),
    ]
    assert main(init) == 2  # weights that are not there: one line before anything starts
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from") and "no such file" in err and err.count("\n") == 1


def test_a_shipped_config_is_named_by_its_name(shards: Path) -> None:
    mcfg, tcfg, index = check_inputs("tiny", str(shards), ["batch_size=3"])
    assert config_path("tiny") == config_path("trainer/configs/tiny.yaml").resolve()
    assert tcfg.batch_size == 3 and mcfg.codebooks and index.samples("train")


def test_numbers_in_overrides_are_read_by_the_key_s_type() -> None:
    """YAML reads `2e-3` (no dot) as a string and the run used to crash on its first step: a number key takes
    any number spelling, a whole-number key refuses a fraction, and either refuses words, in one line."""
    from mert_pipeline.trainer.pretrain import load_config

    mcfg, tcfg = load_config(config_path("small"), ["lr=2e-3", "warmup_steps=1e3", "noise_prob=0"])
    assert (tcfg.lr, tcfg.warmup_steps, mcfg.noise_prob) == (0.002, 1000, 0.0)
    assert isinstance(tcfg.warmup_steps, int) and isinstance(mcfg.noise_prob, float)
    with pytest.raises(ValueError, match="config key max_steps is a whole number, not 1.5"):
        load_config(config_path("small"), ["max_steps=1.5"])
    with pytest.raises(ValueError, match="config key lr is a number, not 'fast'"):
        load_config(config_path("small"), ["lr=fast"])


def test_cross_clip_cosine_is_the_mean_over_pairs_of_frames_of_different_clips() -> None:
    from mert_pipeline.trainer.pretrain import cross_clip_cosine

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16)
    unit = torch.nn.functional.normalize(hidden, dim=-1).reshape(-1, 16)
    clip = torch.arange(21) // 7
    brute = (unit @ unit.T)[clip[:, None] != clip[None]].mean()
    assert torch.allclose(cross_clip_cosine(hidden), brute, atol=1e-6)
    collapsed = torch.ones(4, 5, 16) + 1e-3 * torch.randn(4, 5, 16)
    assert cross_clip_cosine(collapsed) > 0.999 and cross_clip_cosine(hidden[:1]) == 0
