"""`mert-pipe export hf`: plain transformers (no remote code, offline) reproduces every hidden state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mert_pipeline.cli import app
from mert_pipeline.hf_export import build_encoder, load_checkpoint, mert_hidden_states
from mert_pipeline.trainer.model import MERT
from mert_pipeline.trainer.pretrain import load_config, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def write_tiny_checkpoint(out: Path, pre_ln: bool, seed: int = 0) -> Path:
    """A checkpoint in the trainer's format (its own save_checkpoint) of the tiny config, every weight
    perturbed so that norms and biases are not at their identity init."""
    mcfg, tcfg = load_config(REPO / "trainer/configs/tiny.yaml", [f"layer_norm_first={str(pre_ln).lower()}"])
    mcfg.codebooks = [("rvq", 2, 8), ("kmeans", 1, 4)]
    torch.manual_seed(seed)
    model = MERT(mcfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    state = {
        "model": model.state_dict(),
        "step": 3,
        "config": {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg)},
    }
    out.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, state, keep_last=1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-LN", "pre-LN"])
def test_transformers_reproduces_all_hidden_states(tmp_path: Path, pre_ln: bool) -> None:
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    ckpt = write_tiny_checkpoint(tmp_path / "run", pre_ln)
    out = tmp_path / "hf"
    result = CliRunner().invoke(
        app, ["export", "hf", str(tmp_path / "run"), str(out)]
    )  # run folder -> newest
    assert result.exit_code == 0, result.output
    assert "dropped (training only): label_embs_concat" in result.output
    assert "final_proj.weight" in result.output and "cqt_head.weight" in result.output

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hubert" and config["architectures"] == ["HubertModel"]
    assert "auto_map" not in config and config["do_stable_layer_norm"] is pre_ln
    assert config["feat_extract_norm"] == "group" and config["hidden_size"] == 64
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["sampling_rate"], pre["feature_size"], pre["do_normalize"]) == (24000, 1, False)
    assert pre["return_attention_mask"] is True and pre["padding_value"] == 0
    assert Wav2Vec2FeatureExtractor.from_pretrained(str(out)).sampling_rate == 24000

    hf = AutoModel.from_pretrained(str(out))  # no trust_remote_code
    assert type(hf).__name__ == "HubertModel" and not hf.training
    cfg, state, _ = load_checkpoint(ckpt)
    ours = build_encoder(cfg, state)
    audio = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 31000)).astype(np.float32) * 0.2)
    with torch.no_grad():
        theirs = hf(audio, output_hidden_states=True)
    mine = mert_hidden_states(ours, audio)
    assert len(theirs.hidden_states) == len(mine) == cfg.num_layers + 1
    # every layer; transformers 5 gives layer L's output before the final pre-LN norm as hidden_states[-1]
    for layer, (a, b) in enumerate(zip(mine[:-1], theirs.hidden_states[:-1], strict=True)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"layer {layer}")
    torch.testing.assert_close(theirs.last_hidden_state, mine[-1], atol=1e-4, rtol=0)
    assert mine[0].shape == (2, 96, 64)
    assert float((mine[-1] - mine[0]).abs().max()) > 0.1  # the layers do something


def test_export_is_deterministic_and_misuse_is_one_line(tmp_path: Path) -> None:
    from mert_pipeline.hf_export import export_hf

    ckpt = write_tiny_checkpoint(tmp_path / "run", pre_ln=False)
    first = export_hf(ckpt, tmp_path / "a", verify=False)
    export_hf(ckpt, tmp_path / "b", verify=False)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["parameters"] + first["dropped_parameters"] == sum(
        v.numel() for v in torch.load(ckpt, weights_only=True)["model"].values()
    )
    result = CliRunner().invoke(app, ["export", "hf", str(tmp_path / "missing.pt"), str(tmp_path / "c")])
    assert result.exit_code == 2 and "error:" in result.output and "no such file" in result.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["export", "hf", str(tmp_path / "junk.pt"), str(tmp_path / "c")])
    assert result.exit_code == 2 and "not a torch checkpoint file" in result.output
