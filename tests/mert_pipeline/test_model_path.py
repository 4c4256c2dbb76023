"""What a model path is (mert_pipeline.model_path), and every command that takes a model given a run folder
the trainer wrote (the session's `trained_run`: the trainer's config.json beside its checkpoints)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.hf_export import CheckpointError, export_hf, resolve_checkpoint
from mert_pipeline.model_path import NotAModel, identify_model, run_checkpoints
from mert_pipeline.trainer.weights import WeightsError, read_source
from tests.helpers import REPO
from tests.trainer.test_fairseq_checkpoint import tiny_config, write_checkpoint
from tests.trainer.test_weights import TINY, trained_looking, write_mert_hf

NEWEST = "ckpt-00000004.pt"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def sources(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One path of every kind, the first two written by the trainer itself."""
    root = tmp_path_factory.mktemp("sources")
    export_hf(trained_run, root / "export", verify=False)
    write_mert_hf(root / "mert", trained_looking(TINY, 1))
    write_checkpoint(
        root / "fairseq.pt",
        trained_looking(tiny_config(), 2),
        dictionaries=True,
        tied=False,
        legacy_args=False,
        plain_pos_weight=False,
    )
    return {
        "run": trained_run,
        "checkpoint": trained_run / NEWEST,
        "hf_export": root / "export",
        "mert_hf": root / "mert",
        "fairseq": root / "fairseq.pt",
    }


def test_each_kind_is_told_by_what_it_holds(sources: dict[str, Path]) -> None:
    assert (sources["run"] / "config.json").exists(), "a run folder holds the trainer's config.json"
    for kind, path in sources.items():
        found = identify_model(path)
        assert found.kind == kind, (path, found)
    assert identify_model(sources["run"]).file == sources["run"] / NEWEST
    assert [p.name for p in run_checkpoints(sources["run"])] == ["ckpt-00000002.pt", NEWEST]
    for kind in ("hf_export", "mert_hf"):
        assert identify_model(sources[kind]).file == sources[kind]
    assert read_source(sources["run"], with_state=False).path == sources["run"] / NEWEST
    assert read_source(sources["fairseq"], with_state=False).kind == "fairseq"


def test_checkpoints_are_ordered_by_step_number(tmp_path: Path) -> None:
    for name in ("ckpt-9.pt", "ckpt-10.pt", "ckpt-x.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in run_checkpoints(tmp_path)] == ["ckpt-9.pt", "ckpt-10.pt"]


def _refusal(path: Path) -> str:
    with pytest.raises(NotAModel) as caught:
        identify_model(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def test_paths_that_are_no_model_or_two_are_refused_in_one_line(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    both = tmp_path / "both"  # an export hf directory that also holds trainer checkpoints
    shutil.copytree(sources["hf_export"], both)
    shutil.copy(sources["checkpoint"], both / NEWEST)
    assert "both a Hugging Face model" in _refusal(both) and NEWEST in _refusal(both)
    with pytest.raises(CheckpointError, match="both a Hugging Face model"):
        resolve_checkpoint(both)
    with pytest.raises(WeightsError, match="both a Hugging Face model"):
        read_source(both)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "looked for ckpt-*.pt" in _refusal(empty)
    fresh = tmp_path / "fresh"  # a run folder before its first checkpoint
    fresh.mkdir()
    shutil.copy(sources["run"] / "config.json", fresh / "config.json")
    assert "no checkpoint yet" in _refusal(fresh)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type 'bert'" in _refusal(other)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sources["hf_export"] / "config.json", bare / "config.json")
    assert "neither model.safetensors nor pytorch_model.bin" in _refusal(bare)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "not a torch checkpoint" in _refusal(text)
    assert "pass the folder" in _refusal(sources["hf_export"] / "config.json")
    odd = tmp_path / "odd.pt"
    torch.save({"weights": torch.zeros(2)}, odd)
    assert "neither config+model nor cfg+model" in _refusal(odd)
    assert "no such file" in _refusal(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is a MERT-v1 Hugging Face directory, not a trainer"):
        resolve_checkpoint(sources["mert_hf"])


def test_every_command_that_takes_a_model_takes_a_run_folder(
    trained_run: Path, pipeline_workdir: Path, pipeline_shards: Path, tmp_path: Path
) -> None:
    """export hf, embed, probe and features --kind model through the CLI, and --init-from through the
    trainer's own check and through `mert-pipe train` (which launches torchrun with it)."""
    cli = CliRunner()
    exported = cli.invoke(app, ["export", "hf", str(trained_run), str(tmp_path / "hf"), "--no-verify"])
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["checkpoint"].endswith(NEWEST)

    clips = tmp_path / "clips"
    rng = np.random.default_rng(0)
    t = np.arange(9600) / 24000
    for i in range(8):
        for label, audio in (
            ("low", 0.3 * np.sin(2 * np.pi * rng.uniform(80, 160) * t)),
            ("bright", 0.2 * rng.standard_normal(len(t))),
        ):
            (clips / label).mkdir(parents=True, exist_ok=True)
            sf.write(clips / label / f"{i}.wav", audio, 24000)
    embedded = cli.invoke(
        app, ["embed", str(clips / "low"), "--checkpoint", str(trained_run), "--out", str(tmp_path / "emb")]
    )
    assert embedded.exit_code == 0, embedded.output
    assert NEWEST in json.loads((tmp_path / "emb" / "embed.json").read_text())["checkpoint"]
    probed = cli.invoke(
        app,
        ["probe", "--checkpoint", str(trained_run), "--data", str(clips), "--out", str(tmp_path / "probe")],
    )
    assert probed.exit_code == 0, probed.output
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["clips"] == 16

    work = tmp_path / "work"  # a copy: the session's WORKDIR is shared
    shutil.copytree(pipeline_workdir, work)
    featured = cli.invoke(
        app, ["features", str(work), "--kind", "model", "--checkpoint", str(trained_run), "--layer", "1"]
    )
    assert featured.exit_code == 0, featured.output
    described = json.loads((work / "features" / "model_l1" / "features.json").read_text())
    assert described["checkpoint"].endswith(NEWEST), described

    from mert_pipeline.trainer.pretrain import check_inputs

    tiny = str(REPO / "trainer/configs/tiny.yaml")
    mcfg, tcfg, _ = check_inputs(tiny, str(pipeline_shards), ["teachers=[rvq]", f"init_from={trained_run}"])
    assert (mcfg.embed_dim, tcfg.init_from) == (64, str(trained_run))
    out = tmp_path / "continued"
    command = [sys.executable, "-m", "mert_pipeline", "train", "--config", "tiny"]
    command += ["--shards", str(pipeline_shards), "--out", str(out), "--init-from", str(trained_run)]
    command += ["teachers=[rvq]", "batch_size=2"]
    command += ["max_steps=1", "num_workers=0", "eval_interval=0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    init = torch.load(out / "ckpt-00000001.pt", weights_only=True)["config"]["init"]
    assert init["kind"] == "checkpoint" and init["path"] == str(trained_run / NEWEST), init
    assert init["reinitialised"] == [], "the same teachers and shapes: the heads are loaded too"


def test_commands_refuse_an_ambiguous_folder_in_one_line(sources: dict[str, Path], tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(sources["hf_export"], both)
    shutil.copy(sources["checkpoint"], both / NEWEST)
    sf.write(tmp_path / "a.wav", np.zeros(4800), 24000)
    cli = CliRunner()
    for args in (
        ["embed", str(tmp_path / "a.wav"), "--checkpoint", str(both), "--out", str(tmp_path / "emb")],
        ["export", "hf", str(both), str(tmp_path / "hf")],
    ):
        result = cli.invoke(app, args)
        assert result.exit_code != 0 and "both a Hugging Face model" in result.output, result.output
