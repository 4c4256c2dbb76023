"""Reading official MERT fairseq checkpoints: a tiny fairseq-style trainer pickle written here (fairseq's
names, its 4 special label rows, weight-normed pos conv, Dictionary objects, meters, numpy scalars) loads
into our MERT exactly, and pickles naming anything else are refused without running it."""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mert_pipeline.trainer import fairseq_checkpoint as fc
from mert_pipeline.trainer.fairseq_checkpoint import codebooks_from_labels, load_fairseq_checkpoint
from mert_pipeline.trainer.model import MERT, ModelConfig

CODES = 16  # classes per codebook in the tiny model; fairseq's blocks hold CODES + 4 rows


class Dictionary:
    """What fairseq.data.dictionary.Dictionary pickles: symbols (4 specials first), indices, nspecial."""

    __module__ = "fairseq.data.dictionary"

    def __init__(self, codes: list[int]) -> None:
        self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
        self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(c) for c in codes]
        self.count = [1] * len(self.symbols)
        self.indices = {s: i for i, s in enumerate(self.symbols)}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
        self.nspecial = 4


class AverageMeter:
    __module__ = "fairseq.logging.meters"

    def __init__(self) -> None:
        self.val, self.sum, self.count, self.round = 2.5, 250.0, 100, 3


class Gadget:
    """A class no allow-list knows."""

    __module__ = "evil.gadgets"


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _save_with_fake_modules(obj: object, path: Path, classes: dict[str, type]) -> None:
    """torch.save needs the classes importable under their module names: register throwaway modules
    (or, where the parity extra installed fairseq, these stand-ins in its modules) only while saving."""
    imported = "fairseq" in sys.modules
    with pytest.MonkeyPatch.context() as mp:
        for module, cls in classes.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    mp.setitem(sys.modules, name, types.ModuleType(name))
            mp.setattr(sys.modules[module], cls.__qualname__, cls, raising=False)
        torch.save(obj, path)
    assert ("fairseq" in sys.modules) == imported


def tiny_config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = dict(
        conv_dim=32,
        embed_dim=64,
        num_layers=2,
        num_heads=2,
        ffn_dim=128,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        final_dim=16,
        cqt_fmin=32.7,
        cqt_bins=28,  # MERT's bins per octave are bins // 7
        cqt_bins_per_octave=4,
        codebooks=[("rvq", 2, CODES)],
    )
    values.update(overrides)
    return ModelConfig(**values)


def fairseq_name(ours: str, layer_norm_extractor: bool) -> str:
    """Our parameter name -> fairseq's (the inverse mapping, written from fairseq's module layout)."""
    norm = (
        r"feature_extractor.conv_layers.\1.2.1.\2"
        if layer_norm_extractor
        else r"feature_extractor.conv_layers.\1.2.\2"
    )
    rules = [
        (
            r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight",
            r"feature_extractor.conv_layers.\1.0.weight",
        ),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", norm),
        (r"feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
        (r"feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
        (r"masked_spec_embed", "mask_emb"),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (
            r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
            "encoder.pos_conv.0.weight_g",
        ),
        (
            r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
            "encoder.pos_conv.0.weight_v",
        ),
        (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
        (r"encoder\.layers\.(\d+)\.attention\.(\w+_proj)\.(\w+)", r"encoder.layers.\1.self_attn.\2.\3"),
        (r"encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
        (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
        (r"cqt_head\.(\w+)", r"encoder_cqt_model.fc.\1"),
        (r"final_proj\.(\w+)", r"final_proj.\1"),
        (r"label_embs_concat", "label_embs_concat"),
    ]
    names = [re.sub(pattern, repl, ours) for pattern, repl in rules if re.fullmatch(pattern, ours)]
    assert len(names) == 1, (ours, names)
    return names[0]


def fairseq_model_cfg(cfg: ModelConfig, *, tied: bool) -> dict[str, Any]:
    """The `model` section fairseq stores (OmegaConf.to_container of MERTConfig), tiny sizes."""
    convs = [f"[({cfg.conv_dim},{k},{s})]" for k, s in zip(cfg.conv_kernels, cfg.conv_strides, strict=True)]
    return {
        "_name": "mert",
        "label_rate": 75.0,
        "extractor_mode": "layer_norm" if cfg.feat_extract_norm == "layer" else "default",
        "encoder_layers": cfg.num_layers,
        "encoder_embed_dim": cfg.embed_dim,
        "encoder_ffn_embed_dim": cfg.ffn_dim,
        "encoder_attention_heads": cfg.num_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "encoder_layerdrop": cfg.layerdrop,
        "dropout_input": cfg.dropout_input,
        "dropout_features": 0.1,
        "final_dim": cfg.final_dim,
        "untie_final_proj": not tied,
        "layer_norm_first": cfg.layer_norm_first,
        "audio_extract_type": "w2v_conv",
        "conv_feature_layers": " + ".join(convs),
        "conv_bias": False,
        "logit_temp": cfg.logit_temp,
        "target_glu": False,
        "feature_grad_mult": cfg.feature_grad_mult,
        "conv_pos": cfg.pos_conv_kernel,
        "conv_pos_groups": cfg.pos_conv_groups,
        "pos_conv_depth": 1,
        "mask_length": cfg.mask_length,
        "mask_prob": cfg.mask_prob,
        "mask_selection": "static",
        "mask_dynamic_prob_step": "[]",
        "mask_dynamic_len_step": "[]",
        "no_mask_overlap": False,
        "mask_channel_prob": 0.0,
        "audio_cqt_loss_m": True,
        "audio_cqt_bins": cfg.cqt_bins,
        "audio_mel_loss_m": False,
        "feature_extractor_cqt": False,
        # MERT mixes a clip when torch.rand(1) > mixture_prob (and mixture_prob > 0)
        "mixture_prob": 1.0 - cfg.noise_prob if cfg.noise_prob > 0 else 0.0,
        "inbatch_noise_augment_len_range": f"[{cfg.noise_min_samples}, {cfg.noise_max_samples}]",
        "inbatch_noise_augment_number_range": f"[1, {cfg.noise_max_segments}]",
        "inbatch_noise_augment_volume": 1.0,
        "learnable_temp": False,
        "random_codebook": -1,
        "deepnorm": False,
        "subln": False,
        "attention_relax": cfg.attention_relax if cfg.attention_relax > 0 else -1.0,
        "do_cnn_feat_stable_layernorm": False,
        "wav_normalize": False,
    }


def write_checkpoint(
    path: Path, model: MERT, *, dictionaries: bool, tied: bool, legacy_args: bool, plain_pos_weight: bool
) -> dict[str, torch.Tensor]:
    """Our model's weights under fairseq's names in a fairseq-0.12-style trainer pickle; returns the
    fairseq state dict written."""
    cfg = model.cfg
    ours = model.state_dict()
    layer_mode = cfg.feat_extract_norm == "layer"
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if name in ("label_embs_concat", "final_proj.weight", "final_proj.bias"):
            continue
        sd[fairseq_name(name, layer_mode)] = tensor.clone()
    if plain_pos_weight:  # weight norm removed: only the effective weight is stored
        del sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
        sd["encoder.pos_conv.0.weight"] = model.encoder.pos_conv_embed.conv.weight.detach().clone()
    heads = len(model.heads)
    if tied:  # one shared projection: its outputs serve every codebook
        sd["final_proj.weight"] = ours["final_proj.weight"][: cfg.final_dim].clone()
        sd["final_proj.bias"] = ours["final_proj.bias"][: cfg.final_dim].clone()
    else:
        sd["final_proj.weight"] = ours["final_proj.weight"].clone()
        sd["final_proj.bias"] = ours["final_proj.bias"].clone()
    # codebook 0's dictionary lists codes in order (code k at row k + 4), codebook 1's in reverse
    dicts = [Dictionary(list(range(CODES))), Dictionary(list(reversed(range(CODES))))]
    blocks = []
    for i in range(heads):  # ours: each head's 4 special rows, then its codes; fairseq: by dictionary row
        mine = ours["label_embs_concat"][i * (CODES + 4) : (i + 1) * (CODES + 4)]
        block = mine.clone()
        for k in range(CODES):
            block[dicts[i].indices[str(k)] if dictionaries else k + 4] = mine[4 + k]
        blocks.append(block)
    sd["label_embs_concat"] = torch.cat(blocks)
    sd["encoder_cqt_model.spec_layer.cqt_kernels_real"] = torch.randn(cfg.cqt_bins, 1, 8)
    sd["encoder_cqt_model.spec_layer.lenghts"] = torch.ones(cfg.cqt_bins)
    sd["logit_temp_list"] = torch.ones(heads)

    model_cfg = fairseq_model_cfg(cfg, tied=tied)
    task_cfg = {
        "_name": "mert_pretraining",
        "labels": ["encodec_0", "encodec_1"],
        "label_rate": 75.0,
        "sample_rate": cfg.sample_rate,
        "normalize": False,
    }
    criterion_cfg = {"_name": "hubert", "loss_weights": [cfg.feature_pen_weight, cfg.cqt_weight]}
    ckpt: dict[str, Any] = {
        "args": None,
        "cfg": {"_name": None, "model": model_cfg, "task": task_cfg, "criterion": criterion_cfg},
        "model": sd,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "HubertCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": np.float64(3.25)},
                "num_updates": np.int64(400000),
            }
        ],
        "task_state": {"dictionaries": dicts} if dictionaries else {},
        "extra_state": {
            "metrics": OrderedDict(train=[(0, "loss", "AverageMeter", {"val": 2.5, "round": 3})]),
            "meter": AverageMeter(),
            "previous_training_time": 12.5,
            "train_iterator": {"version": 2, "epoch": 3, "iterations_in_epoch": 0, "shuffle": True},
            "val_loss": np.float32(3.5),
        },
        "last_optimizer_state": {
            "state": {0: {"step": 5, "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.98), "params": [0]}],
            "loss_scale": 128.0,
        },
    }
    if legacy_args:  # pre-hydra fairseq: one flat argparse.Namespace and no cfg
        ckpt["cfg"] = None
        ckpt["args"] = argparse.Namespace(**{**criterion_cfg, **task_cfg, **model_cfg})
    _save_with_fake_modules(
        ckpt, path, {"fairseq.data.dictionary": Dictionary, "fairseq.logging.meters": AverageMeter}
    )
    return sd


VARIANTS = {
    # 95M-like: GroupNorm front end, post-LN, untied final_proj, dictionaries, weight_g / weight_v
    "group-postln": dict(
        cfg=dict(
            dropout=0.1, attention_dropout=0.1, layerdrop=0.05, feature_grad_mult=0.1, dropout_input=0.1
        ),
        write=dict(dictionaries=True, tied=False, legacy_args=False, plain_pos_weight=False),
    ),
    # 330M-like: pre-LN, attention relaxation; plus a LayerNorm front end, a tied final_proj, no
    # dictionaries, a legacy args Namespace and a pos conv stored without weight norm
    "layer-preln": dict(
        cfg=dict(
            feat_extract_norm="layer",
            layer_norm_first=True,
            attention_relax=32.0,
            dropout=0.0,
            noise_prob=0.3,  # MERT's mixture_prob 0.7: mixes a clip when rand > 0.7
        ),
        write=dict(dictionaries=False, tied=True, legacy_args=True, plain_pos_weight=True),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_fairseq_checkpoint_loads_into_our_model(tmp_path: Path, variant: str) -> None:
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    original = MERT(tiny_config(**spec["cfg"])).eval()
    if spec["write"]["tied"]:  # make ours a tied projection too: fairseq's one chunk, once per codebook
        with torch.no_grad():
            proj, dim = original.final_proj, original.cfg.final_dim
            proj.weight.copy_(proj.weight[:dim].repeat(len(original.heads), 1))
            proj.bias.copy_(proj.bias[:dim].repeat(len(original.heads)))
    path = tmp_path / "MERT-tiny_fairseq.pt"
    written = write_checkpoint(path, original, **spec["write"])
    safe_before = set(torch.serialization.get_safe_globals())

    with pytest.MonkeyPatch.context() as mp:  # the reader needs no fairseq: importing it would fail here
        mp.setitem(sys.modules, "fairseq", None)
        ckpt = load_fairseq_checkpoint(path)

    assert set(torch.serialization.get_safe_globals()) == safe_before  # the allow-list did not leak
    # the config: every shape and knob of the tiny model comes back
    cfg = original.cfg
    for name, value in ckpt.model_fields.items():
        assert getattr(cfg, name) == (pytest.approx(value) if isinstance(value, float) else value), name
    shapes = ["conv_dim", "conv_kernels", "conv_strides", "feat_extract_norm", "embed_dim", "num_layers"]
    shapes += ["num_heads", "ffn_dim", "layer_norm_first", "pos_conv_kernel", "pos_conv_groups", "final_dim"]
    shapes += ["attention_relax", "cqt_bins", "cqt_bins_per_octave", "cqt_weight", "feature_pen_weight"]
    assert set(shapes) <= set(ckpt.model_fields)
    assert ckpt.label_classes == [("encodec_0", CODES), ("encodec_1", CODES)]
    assert codebooks_from_labels(ckpt.label_classes, {"encodec": "rvq"}) == cfg.codebooks
    # the tensors: every one of ours, exactly, and our model takes them
    expected = original.state_dict()
    assert set(ckpt.state) == set(expected)
    effective = "encoder.pos_conv_embed.conv.parametrizations.weight"
    for name, tensor in expected.items():
        if spec["write"]["plain_pos_weight"] and name.startswith(effective):
            continue  # only g * v / |v| is defined by a plain weight: compared through the model below
        assert torch.equal(ckpt.state[name], tensor), name
    rebuilt = MERT(
        ModelConfig(
            **ckpt.model_fields, codebooks=codebooks_from_labels(ckpt.label_classes, {"encodec": "rvq"})
        )
    )
    result = rebuilt.load_state_dict(ckpt.state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rebuilt.eval()
    torch.testing.assert_close(
        rebuilt.encoder.pos_conv_embed.conv.weight, original.encoder.pos_conv_embed.conv.weight
    )
    audio = torch.randn(2, 3200)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(audio, None)[0], original.encode(audio, None)[0])
    # the label embeddings: every row kept; code k of codebook i is our row i * (CODES + 4) + 4 + k
    assert ckpt.heads["label_embs_concat"] == {"rows": 2 * (CODES + 4), "special_rows_per_label": 4}
    assert ckpt.model_fields["label_specials"] == 4
    fairseq_emb = written["label_embs_concat"]
    assert torch.equal(ckpt.state["label_embs_concat"][4 + 3], fairseq_emb[4 + 3])
    assert torch.equal(ckpt.state["label_embs_concat"][:4], fairseq_emb[:4])  # <s> <pad> </s> <unk>
    if spec["write"]["dictionaries"]:  # codebook 1's dictionary lists the codes in reverse
        assert torch.equal(
            ckpt.state["label_embs_concat"][CODES + 4 + 4 + 3], fairseq_emb[CODES + 4 + 4 + CODES - 1 - 3]
        )
    mode = "tied, tiled once per codebook" if spec["write"]["tied"] else "untied"
    assert ckpt.heads["final_proj"]["mode"] == mode
    assert ckpt.heads["cqt_head"] == {"source": "encoder_cqt_model.fc", "bins": cfg.cqt_bins}
    # nothing silently lost: the keys we did not map are listed with their reasons
    dropped = dict(ckpt.dropped)
    assert set(dropped) == {
        "encoder_cqt_model.spec_layer.cqt_kernels_real",
        "encoder_cqt_model.spec_layer.lenghts",
        "logit_temp_list",
    }
    assert "nnAudio" in dropped["encoder_cqt_model.spec_layer.lenghts"]
    assert "learnable" in dropped["logit_temp_list"]
    if spec["write"]["dictionaries"]:
        assert ckpt.warnings == []
    else:
        assert len(ckpt.warnings) == 1 and "no dictionaries" in ckpt.warnings[0]


def test_stand_ins_rebuild_the_trainer_state(tmp_path: Path) -> None:
    """The fairseq objects come back as inert stand-ins, numpy scalars as numpy scalars."""
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    write_checkpoint(
        path, MERT(tiny_config()), dictionaries=True, tied=False, legacy_args=False, plain_pos_weight=False
    )
    raw = fc._safe_load(path)
    dictionary = raw["task_state"]["dictionaries"][1]
    assert type(dictionary).__module__ == "fairseq.data.dictionary" and dictionary.nspecial == 4
    assert dictionary.symbols[4] == str(CODES - 1)
    assert raw["extra_state"]["meter"].sum == 250.0
    assert raw["extra_state"]["val_loss"] == np.float32(3.5)
    assert raw["optimizer_history"][0]["lr_scheduler_state"]["best"] == np.float64(3.25)
    assert raw["optimizer_history"][0]["num_updates"] == np.int64(400000)


def _refused(path: Path) -> str:
    with pytest.raises(ValueError) as err:
        load_fairseq_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_pickles_naming_other_globals_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"mask_emb": torch.zeros(4)}, "cfg": Evil(marker)}, evil)
    assert f"{os.system.__module__}.system" in _refused(evil)  # posix.system on Linux
    # a hand-written legacy (non-zip) pickle calling os.system directly
    raw = tmp_path / "raw.pt"
    raw.write_bytes(b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    assert "os.system" in _refused(raw)
    # a class no allow-list knows
    gadget = tmp_path / "gadget.pt"
    _save_with_fake_modules(
        {"model": {"mask_emb": torch.zeros(4)}, "cfg": Gadget()}, gadget, {"evil.gadgets": Gadget}
    )
    assert "evil.gadgets.Gadget" in _refused(gadget)
    assert not marker.exists()


def test_files_that_are_not_fairseq_mert_checkpoints_are_refused(tmp_path: Path) -> None:
    no_model = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, no_model)
    assert "no 'model' state dict" in _refused(no_model)
    no_cfg = tmp_path / "no_cfg.pt"
    torch.save({"model": {"mask_emb": torch.zeros(4)}, "args": None}, no_cfg)
    assert "no cfg" in _refused(no_cfg)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert "cannot read" in _refused(text)
    assert "no such file" in _refused(tmp_path / "missing.pt")


def test_codebooks_from_labels() -> None:
    labels = [(f"encodec_{i}", 1024) for i in range(8)] + [("km", 500)]
    assert codebooks_from_labels(labels, {"encodec": "rvq"}) == [("rvq", 8, 1024), ("km", 1, 500)]
    with pytest.raises(ValueError, match="encodec_1"):
        codebooks_from_labels([("encodec_1", 1024)])
