"""`--init-from`: MERT weights from a Hugging Face MERT-v1 directory (built here in the published format),
an `export hf` directory or one of our checkpoints; shapes from the source, heads per codebook, every tensor
accounted for; the published 95M and 330M sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mert_pipeline.hf_export import encoder_state, hf_hidden_states, hubert_config, mert_hidden_states
from mert_pipeline.trainer.model import MERT, ModelConfig
from mert_pipeline.trainer.weights import (
    WeightsError,
    apply_shape,
    encoder_parameters,
    hf_fields,
    initialise,
    read_source,
)

TINY = ModelConfig(
    conv_dim=32,
    embed_dim=48,
    num_layers=2,
    num_heads=4,
    ffn_dim=96,
    pos_conv_kernel=16,
    pos_conv_groups=4,
    final_dim=8,
    cqt_bins=24,
    cqt_bins_per_octave=12,
    codebooks=[("rvq", 2, 16)],
)


def trained_looking(cfg: ModelConfig, seed: int, noise: float = 0.05) -> MERT:
    """A model whose every tensor is away from any init, so that a test passes only if it was copied."""
    torch.manual_seed(seed)
    model = MERT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise)
    return model.eval()


def write_mert_hf(directory: Path, model: MERT, model_type: str = "mert_model") -> Path:
    """A directory as the released MERT-v1 checkpoints are: MERTConfig fields, HubertModel keys, the
    positional conv as old-style weight_g / weight_v, weights in pytorch_model.bin."""
    directory.mkdir(parents=True)
    config = hubert_config(model.cfg)
    if model_type == "mert_model":
        config.update(
            model_type="mert_model",
            architectures=["MERTModel"],
            auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
            feature_extractor_cqt=False,
            feature_extractor_cqt_bins=336,
            attention_relax=-1.0,
            deepnorm=False,
            sample_rate=24000,
        )
    (directory / "config.json").write_text(json.dumps(config))
    state = {}
    for key, value in encoder_state(model.state_dict()).items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        state[key] = value.clone()
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_an_hf_mert_directory_initialises_the_model_exactly(tmp_path: Path) -> None:
    """At step 0 our model initialised from a MERT-format directory gives the hidden states of
    transformers' HubertModel loaded from the same weights."""
    from transformers import AutoModel

    source_model = trained_looking(TINY, seed=1)
    mert_dir = write_mert_hf(tmp_path / "mert", source_model)
    hubert_dir = write_mert_hf(tmp_path / "hubert", source_model, model_type="hubert")
    # the run's own config differs in shape: the source decides it
    cfg, changed = apply_shape(ModelConfig(codebooks=[("rvq", 2, 16)]), read_source(mert_dir, False), set())
    assert cfg.embed_dim == 48 and cfg.num_layers == 2 and any("embed_dim 768 -> 48" in c for c in changed)
    cfg = dataclasses.replace(cfg, final_dim=8, cqt_bins=24, cqt_bins_per_octave=12)
    torch.manual_seed(0)
    model = MERT(cfg).eval()
    report = initialise(model, read_source(mert_dir))
    assert report["kind"] == "hf" and len(report["sha256"]) == 64
    assert sorted(report["reinitialised"]) == ["cqt_head", "head rvq[0]", "head rvq[1]"]
    assert report["unused"] == {} and report["loaded"] == len(encoder_state(model.state_dict()))
    hf = AutoModel.from_pretrained(str(hubert_dir), local_files_only=True).eval()
    audio = torch.randn(1, 24000) * 0.1
    ours = mert_hidden_states(model, audio)
    theirs, _ = hf_hidden_states(hf, audio)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_shape_overrides_are_refused_and_knobs_allowed(tmp_path: Path) -> None:
    source = read_source(write_mert_hf(tmp_path / "mert", trained_looking(TINY, seed=2)), with_state=False)
    base = dataclasses.replace(TINY, embed_dim=64)
    with pytest.raises(WeightsError, match=r"embed_dim=64 changes the shape of .* whose embed_dim is 48"):
        apply_shape(base, source, {"embed_dim"})
    cfg, _ = apply_shape(dataclasses.replace(TINY, dropout=0.3), source, {"dropout"})
    assert cfg.dropout == 0.3 and cfg.embed_dim == 48


def test_our_checkpoint_keeps_heads_that_fit_and_reinitialises_the_others(tmp_path: Path) -> None:
    source_model = trained_looking(TINY, seed=3)
    path = tmp_path / "ckpt-00000010.pt"
    config = {"model": dataclasses.asdict(TINY), "train": {}}
    torch.save({"model": source_model.state_dict(), "config": config, "step": 10}, path)
    other = dataclasses.replace(TINY, codebooks=[("rvq", 2, 16), ("kmeans100", 1, 100)])
    torch.manual_seed(0)
    model = MERT(other).eval()
    report = initialise(model, read_source(tmp_path))  # a run folder: its newest checkpoint
    assert report["kind"] == "checkpoint" and report["loaded_heads"] == ["rvq[0]", "rvq[1]", "cqt_head"]
    assert report["reinitialised"] == ["head kmeans100[0]"]
    torch.testing.assert_close(model.label_embs_concat[:40], source_model.label_embs_concat)  # 2 x (4 + 16)
    torch.testing.assert_close(model.final_proj.weight[:16], source_model.final_proj.weight)
    assert not torch.equal(model.label_embs_concat[40:], torch.zeros(104, 8))


def test_a_checkpoint_from_before_label_specials_loads_its_codes(tmp_path: Path) -> None:
    """Our checkpoints written before the parity fix have heads of codes only (no special rows, no
    label_specials in their config): their code rows load code by code and the special rows are listed as
    re-initialised, so --init-from such a run moves it onto fairseq's objective."""
    old_cfg = dataclasses.replace(TINY, label_specials=0)
    source_model = trained_looking(old_cfg, seed=3)
    config = {"model": {k: v for k, v in dataclasses.asdict(old_cfg).items() if k != "label_specials"}}
    torch.save(
        {"model": source_model.state_dict(), "config": config, "step": 10}, tmp_path / "ckpt-00000010.pt"
    )
    model = MERT(TINY).eval()
    report = initialise(model, read_source(tmp_path))
    assert report["loaded_heads"] == ["rvq[0]", "rvq[1]", "cqt_head"]
    assert report["reinitialised"] == ["special label rows 0..3 of the loaded heads"]
    old, new = source_model.label_embs_concat, model.label_embs_concat
    torch.testing.assert_close(new[4:20], old[:16])
    torch.testing.assert_close(new[24:40], old[16:32])
    # the other way round, the rows the model has no place for are listed as unused, not lost silently
    back = MERT(old_cfg).eval()
    torch.save(
        {"model": model.state_dict(), "config": {"model": dataclasses.asdict(TINY)}, "step": 1},
        tmp_path / "ckpt-00000011.pt",
    )
    report = initialise(back, read_source(tmp_path / "ckpt-00000011.pt"))
    why = "this model keeps 0 special rows a head (label_specials)"
    assert report["unused"] == {"label_embs_concat special rows 0..3 of each head": why}
    torch.testing.assert_close(back.label_embs_concat[:16], new[4:20])


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file"):
        read_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a model: looked for ckpt"):
        read_source(tmp_path / "empty")
    cqt_input = write_mert_hf(tmp_path / "cqt", trained_looking(TINY, seed=4))
    config = json.loads((cqt_input / "config.json").read_text())
    (cqt_input / "config.json").write_text(json.dumps({**config, "feature_extractor_cqt": True}))
    with pytest.raises(WeightsError, match="feature_extractor_cqt is true"):
        read_source(cqt_input)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (
            {
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
            },
            94_371_712,
        ),
        (
            {
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "intermediate_size": 4096,
                "do_stable_layer_norm": True,
            },
            315_428_992,
        ),
    ],
)
def test_the_published_sizes_from_their_config_fields(size: dict, expected: int) -> None:
    """MERT-v1-95M (94.37M encoder parameters) and -330M (315.43M), on the meta device."""
    config = {
        "conv_dim": [512] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "feat_extract_norm": "group",
        "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16,
        **size,
    }
    cfg = ModelConfig(**hf_fields(config), codebooks=[("rvq", 8, 1024)])
    assert encoder_parameters(cfg) == expected


def test_the_official_fairseq_checkpoint_initialises_encoder_and_heads(tmp_path: Path) -> None:
    """A fairseq trainer pickle (stub classes at fairseq's module paths, 4 special rows per codebook):
    --init-from maps the encoder and the encodec_k heads onto the RVQ teacher's codebooks."""
    from tests.trainer.test_fairseq_checkpoint import tiny_config, write_checkpoint

    torch.manual_seed(0)
    original = MERT(tiny_config()).eval()
    path = tmp_path / "MERT-v1-95M_fairseq.pt"
    write_checkpoint(path, original, dictionaries=True, tied=False, legacy_args=False, plain_pos_weight=False)
    source = read_source(path)
    assert source.kind == "fairseq" and source.heads == [("rvq", 0, 16), ("rvq", 1, 16)]
    torch.manual_seed(1)
    model = MERT(tiny_config()).eval()
    report = initialise(model, read_source(path))
    assert report["loaded_heads"] == ["rvq[0]", "rvq[1]", "cqt_head"] and report["reinitialised"] == []
    for name, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # a run with another class count for the teacher keeps the encoder and re-initialises those heads
    model = MERT(tiny_config(codebooks=[("rvq", 2, 32)])).eval()
    report = initialise(model, read_source(path))
    assert report["reinitialised"] == ["head rvq[0]", "head rvq[1]"]


def test_embed_and_probe_read_a_mert_v1_directory_without_remote_code(tmp_path: Path) -> None:
    from mert_pipeline.embed import load_embedder

    source_model = trained_looking(TINY, seed=6)
    mert_dir = write_mert_hf(tmp_path / "MERT-v1-95M", source_model)
    embedder = load_embedder(mert_dir, "cpu")
    audio = torch.randn(1, 8000) * 0.1
    expected = torch.stack(mert_hidden_states(source_model, audio))
    torch.testing.assert_close(embedder.hidden_states(audio), expected, atol=1e-5, rtol=0)
    baseline = load_embedder(mert_dir, "cpu", random_init=True)
    assert baseline.num_layers == 2 and not torch.allclose(baseline.hidden_states(audio), expected)


def test_an_export_hf_directory_initialises_the_encoder(tmp_path: Path) -> None:
    """A `mert-pipe export hf` directory (model.safetensors, parametrized weight norm) as --init-from."""
    from mert_pipeline.hf_export import build_encoder, export_hf, load_checkpoint
    from tests.mert_pipeline.test_hf_export import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "run", pre_ln=True, seed=7)
    export_hf(checkpoint, tmp_path / "hf", verify=False)
    cfg, state, _ = load_checkpoint(checkpoint)
    source = read_source(tmp_path / "hf")
    assert (
        source.kind == "hf" and source.path.name == "model.safetensors" and source.fields["layer_norm_first"]
    )
    model = MERT(dataclasses.replace(cfg, **{k: v for k, v in source.fields.items()})).eval()
    initialise(model, source)
    audio = torch.randn(1, 8000) * 0.1
    for a, b in zip(
        mert_hidden_states(model, audio), mert_hidden_states(build_encoder(cfg, state), audio), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
