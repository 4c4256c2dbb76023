"""The MERT model's pieces: frame counts and alignment, span masking, the noise mixture, the CQT target,
module names, and the losses' behaviour in train and eval mode."""

from __future__ import annotations

import math

import pytest
import torch

from mert_pipeline.trainer.model import (
    CQT,
    MERT,
    ModelConfig,
    conv_frames,
    flops_per_clip,
    mix_noise,
    span_mask,
)
from mert_pipeline.trainer.pretrain import load_config

TINY = "trainer/configs/tiny.yaml"


def tiny_model(**overrides: object) -> MERT:
    cfg, _ = load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])
    cfg.codebooks = [("rvq", 2, 8), ("kmeans", 1, 4)]
    torch.manual_seed(0)
    return MERT(cfg)


def test_frames_match_the_reference_and_the_labels() -> None:
    cfg = ModelConfig()
    assert cfg.hop == 320
    assert conv_frames(120000, cfg) == 374  # the reference's 5 s crop
    assert conv_frames(122880, cfg) == 383
    for frames in (50, 375, 384):  # crops are multiples of 320: conv gives one frame less than labels
        assert conv_frames(320 * frames, cfg) == frames - 1 == math.ceil(320 * frames / 320) - 1
    model = tiny_model()
    with torch.no_grad():
        feats = model.feature_extractor(torch.zeros(2, 16000))
    assert feats.shape == (2, 32, conv_frames(16000, model.cfg)) == (2, 32, 49)


def test_span_mask_statistics() -> None:
    torch.manual_seed(0)
    mask = span_mask(64, 374, 0.8, 5, 2)
    assert mask.shape == (64, 374) and mask.dtype == torch.bool
    assert 0.50 < mask.float().mean() < 0.60  # the reference's "about 55%"
    assert len(set(mask.sum(1).tolist())) == 1  # fairseq's require_same_masks (test_recipe: the algorithm)
    # before that trim drops random masked frames, every masked frame lies in a window of 5 masked frames
    loose = span_mask(64, 374, 0.8, 5, 2, same_count=False).float()
    windows = loose.unfold(1, 5, 1).prod(-1)  # window starting at s fully masked
    covered = torch.nn.functional.pad(windows, (4, 4)).unfold(1, 5, 1).amax(-1)  # some s in [t-4, t]
    assert bool((covered >= loose).all())
    few = span_mask(8, 12, 0.05, 5, 2)  # min_masks: 2 distinct spans where prob alone gives 0 or 1
    assert bool((few.sum(1) >= 6).all())


def test_noise_mixture_adds_segments_of_other_clips() -> None:
    torch.manual_seed(1)
    audio = torch.zeros(6, 8000)
    for row in range(6):
        audio[row] = 10.0**row  # each clip a distinct constant: the sum tells which clips were mixed in
    mixed = mix_noise(audio, 0.5, 1000, 2000, 3)
    changed = [row for row in range(6) if not torch.equal(mixed[row], audio[row])]
    assert 0 < len(changed) < 6
    for row in changed:
        extra = (mixed[row] - audio[row]).round()
        assert float(extra.min()) == 0.0  # added, never replaced
        digits = {int(v) for v in extra.unique().tolist()}
        for value in digits:  # sums of up to 3 other clips' constants, never the clip's own
            parts = [int(d) for d in str(value).zfill(6)[::-1]]
            assert sum(parts) <= 3 and parts[row] == 0
        segment = int((extra > 0).sum())
        assert 1000 <= segment <= 3 * 2000
    assert torch.equal(mix_noise(audio[:1], 1.0, 1000, 2000, 3), audio[:1])  # nothing to mix with


def test_cqt_shape_alignment_and_pitch() -> None:
    model = tiny_model()
    cqt = model.cqt
    assert isinstance(cqt, CQT)
    t = torch.arange(16000) / 24000
    tone = torch.sin(2 * math.pi * 261.63 * t)[None]  # C4: 12 bins above fmin C3
    frames = conv_frames(16000, model.cfg)
    spec = cqt(tone, frames)
    assert spec.shape == (1, frames, model.cfg.cqt_bins)
    assert int(spec[0, 10:40].mean(0).argmax()) == 12
    # no CQT kernels in the checkpoint: they are rebuilt, and at 336 bins they are ~180 MB
    assert not any(key.startswith("cqt.") for key in model.state_dict())
    full = CQT(ModelConfig())
    assert full.cqt.cqt_kernels_real.shape[0] == 336 and full.pad < 120000 // 2


def test_module_names_follow_transformers_hubert() -> None:
    keys = set(tiny_model(layer_norm_first="true").state_dict())
    expected = {
        "feature_extractor.conv_layers.0.conv.weight",
        "feature_extractor.conv_layers.0.layer_norm.weight",
        "feature_extractor.conv_layers.6.conv.weight",
        "feature_projection.layer_norm.weight",
        "feature_projection.projection.weight",
        "encoder.pos_conv_embed.conv.bias",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
        "encoder.layer_norm.weight",
        "encoder.layers.1.attention.q_proj.weight",
        "encoder.layers.1.attention.out_proj.bias",
        "encoder.layers.1.layer_norm.weight",
        "encoder.layers.1.feed_forward.intermediate_dense.weight",
        "encoder.layers.1.feed_forward.output_dense.weight",
        "encoder.layers.1.final_layer_norm.weight",
        "masked_spec_embed",
    }
    assert expected <= keys
    assert "feature_extractor.conv_layers.1.layer_norm.weight" not in keys  # GroupNorm on layer 0 only
    assert not any(k.endswith("conv.bias") for k in keys if k.startswith("feature_extractor"))


@pytest.mark.parametrize("pre_ln", [False, True])
def test_losses_train_and_eval(pre_ln: bool) -> None:
    model = tiny_model(layer_norm_first=pre_ln, attention_relax=0 if pre_ln else 32)
    audio = 0.1 * torch.randn(3, 16000)
    labels = {"rvq": torch.randint(0, 8, (3, 2, 50)), "kmeans": torch.randint(0, 4, (3, 1, 50))}
    out = model(audio, labels)
    assert set(out) >= {
        "loss",
        "loss_rvq",
        "loss_kmeans",
        "acc_rvq_0",
        "acc_rvq_1",
        "acc_kmeans_0",
        "cqt_mse",
        "masked",
        "frames",
    }
    means = MERT.per_frame({k: float(v.detach()) for k, v in out.items()})  # sums -> per-frame means
    # summed over the 2 codebooks; cosine logits / 0.1 span [-10, 10], so near but not at 2 log 8
    assert 2 * math.log(8) / 3 < means["loss_rvq"] < 3 * 2 * math.log(8)
    assert 0.4 < means["mask_frac"] < 0.8 and 0.0 <= means["acc_rvq_0"] <= 1.0
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers" not in n)
    model.eval()
    torch.manual_seed(3)
    first = model(audio, labels)["loss"]
    torch.manual_seed(3)
    assert torch.equal(first, model(audio, labels)["loss"])  # no noise, no dropout: masks decide


def test_relaxed_attention_equals_sdpa() -> None:
    plain, relaxed = tiny_model(), tiny_model(attention_relax=32)
    relaxed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 30, 64)
    layer_a, layer_b = plain.encoder.layers[0].attention.eval(), relaxed.encoder.layers[0].attention.eval()
    torch.testing.assert_close(layer_a(x), layer_b(x), rtol=1e-5, atol=1e-5)


def test_flops_estimate_scale() -> None:
    cfg = ModelConfig()
    flops = flops_per_clip(cfg, 120000)
    # 95M: ~85M transformer params x 374 frames x 6 is ~0.2 TFLOP, plus the conv front end
    assert 2.0e11 < flops < 6.0e11


def test_pred_nomask_weight_adds_the_unmasked_frames_loss_and_counts_them_as_fairseq_does() -> None:
    """0 (MERT's recipe): only masked frames are predicted and sample_size is their count. w > 0: the
    unmasked frames' cross-entropy joins the loss with weight w, and sample_size (what the trainer divides
    by) counts every frame, as fairseq's hubert criterion does; the masked part is unchanged."""
    audio = torch.randn(3, 16000) * 0.1
    frames = conv_frames(16000, tiny_model().cfg)
    labels = {
        "rvq": torch.randint(0, 8, (3, 2, frames + 1)),
        "kmeans": torch.randint(0, 4, (3, 1, frames + 1)),
    }
    mask = span_mask(3, frames, 0.8, 5, 2)
    outs = {}
    for weight in (0.0, 0.5, 1.0):
        model = tiny_model(noise_prob=0.0, pred_nomask_weight=weight).eval()
        with torch.no_grad():
            outs[weight] = model(audio, labels, mask=mask)
    plain, half, full = outs[0.0], outs[0.5], outs[1.0]
    assert plain["sample_size"] == plain["masked"] == mask.sum() and "loss_rvq_u" not in plain
    assert full["sample_size"] == half["sample_size"] == mask.numel()
    assert torch.allclose(full["loss_rvq"], plain["loss_rvq"])  # the masked part is the same
    unmasked_ce = full["loss_rvq_u"] + full["loss_kmeans_u"]
    assert unmasked_ce > 0
    # w scales the unmasked cross-entropy only (the feature penalty is per predicted frame in both)
    assert torch.allclose(full["loss"] - half["loss"], 0.5 * unmasked_ce, rtol=1e-4)
    means = MERT.per_frame({k: float(v) for k, v in full.items()})  # each figure over the frames it sums
    assert means["loss"] == pytest.approx(float(full["loss"]) / mask.numel())
    assert means["loss_rvq"] == pytest.approx(float(full["loss_rvq"]) / float(mask.sum()))
    assert means["acc_rvq_0"] == pytest.approx(float(full["acc_rvq_0"]) / float(mask.sum()))
    assert means["loss_rvq_u"] == pytest.approx(float(full["loss_rvq_u"]) / float((~mask).sum()))
    assert means["mask_frac"] == pytest.approx(float(mask.float().mean()))
