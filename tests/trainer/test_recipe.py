"""The official MERT-v1 recipe, measured: the CQT target's zero padding, fairseq 0.12.2's span masking, the
loss normalised by the masked frames of all ranks (real torchrun, gloo) and the in-batch noise pool."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mert_pipeline.trainer.model import CQT, MERT, ModelConfig, conv_frames, mix_noise, span_mask, span_starts
from mert_pipeline.trainer.pretrain import load_config
from tests.helpers import REPO

TINY = "trainer/configs/tiny.yaml"
CODEBOOKS = [("rvq", 2, 8), ("kmeans", 1, 4)]
DETERMINISTIC = ["layerdrop=0", "noise_prob=0", "feature_grad_mult=0.1"]  # tiny has no dropout


def tiny_model(overrides: list[str]) -> MERT:
    cfg, _ = load_config(TINY, overrides)
    cfg.codebooks = list(CODEBOOKS)
    torch.manual_seed(0)
    return MERT(cfg)


def fake_batch(batch: int, samples: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(batch, samples, generator=gen)
    frames = samples // 320
    labels = {
        "rvq": torch.randint(0, 8, (batch, 2, frames), generator=gen),
        "kmeans": torch.randint(0, 4, (batch, 1, frames), generator=gen),
    }
    return audio, labels


# ---------------------------------------------------------------------------------------------------
# 1. the CQT target: nnAudio CQT1992v2 with pad_mode='constant', as MERT's model_cqt_pred builds it
# ---------------------------------------------------------------------------------------------------


def test_cqt_is_nnaudio_with_zero_padding_and_reflect_would_differ() -> None:
    from nnAudio.features import CQT1992v2

    cfg = ModelConfig()
    assert cfg.cqt_pad_mode == "constant"
    t = torch.arange(120000) / 24000  # a 5 s clip: a low A1 (55 Hz, lowest octave), C3 and noise
    gen = torch.Generator().manual_seed(0)
    clip = 0.3 * torch.sin(2 * math.pi * 55.0 * t) * (1 + 0.5 * torch.sin(2 * math.pi * 0.7 * t))
    clip = clip + 0.2 * torch.sin(2 * math.pi * 130.81 * t) + 0.05 * torch.randn(120000, generator=gen)
    clip = clip[None]
    frames = conv_frames(120000, cfg)
    ours = CQT(cfg)(clip, frames)  # (1, 374, 336)
    official = CQT1992v2(
        sr=24000,
        hop_length=320,
        fmin=32.7,
        fmax=None,
        n_bins=336,
        bins_per_octave=336 // 7,
        filter_scale=1,
        norm=1,
        window="hann",
        center=True,
        pad_mode="constant",
        trainable=False,
        output_format="Magnitude",
        verbose=False,
    )
    zero_padded = official(clip)[:, :, :frames].transpose(1, 2)
    assert ours.shape == (1, 374, 336)
    torch.testing.assert_close(ours, zero_padded, rtol=1e-6, atol=1e-7)
    official.pad_mode = "reflect"  # nnAudio's default; read at every forward
    reflected = official(clip)[:, :, :frames].transpose(1, 2)
    low = slice(0, 48)  # the lowest octave: kernels of up to 65536 samples reach far past the clip's ends
    rel = (ours[0, :, low] - reflected[0, :, low]).abs().sum(-1) / ours[0, :, low].abs().sum(-1)
    assert float((rel > 0.01).float().mean()) > 0.1, float((rel > 0.01).float().mean())
    top = slice(288, 336)  # short kernels: the padding only touches the first and last frames
    torch.testing.assert_close(ours[0, 10:-10, top], reflected[0, 10:-10, top], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 2. span masking: fairseq 0.12.2 compute_mask_indices (static, overlap, min_masks 2, same masks)
# ---------------------------------------------------------------------------------------------------


def reference_mask(
    rng: np.random.Generator, batch: int, frames: int, prob: float, length: int, min_masks: int
) -> np.ndarray:
    """The documented algorithm, written out with numpy row by row: n = max(min_masks, int(prob * T / L +
    u)) starts without replacement from range(T - L) (range(n + 1) when T - L <= n), spans of L kept < T,
    unique, then every row cut to the batch's smallest count by dropping random masked frames."""
    rows = []
    for _ in range(batch):
        n = max(min_masks, int(prob * frames / length + rng.random()))
        low = length if frames - length > n else frames - n - 1
        starts = rng.choice(frames - low, n, replace=False)
        idx = (starts[:, None] + np.arange(length)).ravel()
        rows.append(np.unique(idx[idx < frames]))
    least = min(len(r) for r in rows)
    mask = np.zeros((batch, frames), dtype=bool)
    for i, r in enumerate(rows):
        mask[i, rng.choice(r, least, replace=False) if len(r) > least else r] = True
    return mask


@pytest.mark.parametrize(("frames", "prob"), [(374, 0.8), (50, 0.8), (12, 0.8), (6, 0.8), (12, 0.05)])
def test_span_mask_matches_the_fairseq_algorithm(frames: int, prob: float) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    draws = 800
    ref = np.array([reference_mask(rng, 8, frames, prob, 5, 2).sum(1)[0] for _ in range(draws)], float)
    ours = np.array([int(span_mask(8, frames, prob, 5, 2).sum(1)[0]) for _ in range(draws)], float)
    error = 4 * math.sqrt((ref.var() + ours.var()) / draws) + 1e-9
    assert abs(ref.mean() - ours.mean()) < error, (ref.mean(), ours.mean(), error)
    assert ours.std() == pytest.approx(ref.std(), rel=0.15, abs=0.05)
    if frames == 374:  # the reference's "about 55%"
        assert 0.53 < ours.mean() / frames < 0.57 and 0.53 < ref.mean() / frames < 0.57


def test_span_mask_rows_equal_and_starts_never_repeat() -> None:
    torch.manual_seed(1)
    mask = span_mask(16, 374, 0.8, 5, 2)
    assert mask.shape == (16, 374) and mask.dtype == torch.bool
    assert len(set(mask.sum(1).tolist())) == 1  # require_same_masks: every row the batch's smallest count
    loose = span_mask(16, 374, 0.8, 5, 2, same_count=False)
    assert len(set(loose.sum(1).tolist())) > 1  # without the trim, rows differ: the trim is what equalises
    starts, real = span_starts(256, 374, 0.8, 5, 2)
    counts = real.sum(1)
    assert set(counts.tolist()) <= {59, 60}  # int(0.8 * 374 / 5 + u) = int(59.84 + u)
    assert 0.7 < float((counts == 60).float().mean()) < 0.95  # probabilistic rounding: 60 with p 0.84
    for row, n in zip(starts.tolist(), counts.tolist(), strict=True):
        drawn = row[:n]
        assert len(set(drawn)) == n  # without replacement (with it, ~5 repeats a row would be expected)
        assert 0 <= min(drawn) and max(drawn) < 374 - 5


def test_min_masks_for_short_clips() -> None:
    torch.manual_seed(2)
    starts, real = span_starts(64, 12, 0.05, 5, 2)
    assert bool((real.sum(1) == 2).all())  # int(0.05 * 12 / 5 + u) is 0 or 1: still min_masks spans
    assert all(len(set(r[:2])) == 2 and max(r[:2]) < 7 for r in starts.tolist())
    assert bool((span_mask(64, 12, 0.05, 5, 2).sum(1) >= 6).all())  # two distinct spans of 5 cover >= 6
    assert not span_mask(4, 374, 0.0, 5, 2).any()  # prob 0: HuBERT draws no mask at all (mask_prob > 0 gate)
    for frames in (1, 2, 3, 5, 6):  # T - L <= n: fairseq draws from range(n + 1) and clips to the row
        mask = span_mask(8, frames, 0.8, 5, 2)
        assert mask.shape == (8, frames) and len(set(mask.sum(1).tolist())) == 1


# ---------------------------------------------------------------------------------------------------
# 3. the loss: sums over masked frames, normalised by the masked frames of all ranks
# ---------------------------------------------------------------------------------------------------


def test_forward_returns_sums_and_per_frame_means() -> None:
    model = tiny_model(DETERMINISTIC).eval()
    audio, labels = fake_batch(3, 16000, seed=3)
    frames = conv_frames(16000, model.cfg)
    torch.manual_seed(4)
    mask = span_mask(3, frames, 0.8, 5, 2)
    with torch.no_grad():
        out = model(audio, labels, mask=mask)
        hidden, penalty = model.encode(audio, mask)
        assert model.cqt is not None and model.cqt_head is not None
        pred = model.cqt_head(hidden[mask])
        target = model.cqt(audio, frames)[mask]
    masked = int(mask.sum())
    assert float(out["masked"]) == masked and float(out["frames"]) == 3 * frames
    parts = out["loss_rvq"] + out["loss_kmeans"] + 10 * out["feature_pen"] + out["cqt_mse"]
    torch.testing.assert_close(out["loss"], parts)
    means = MERT.per_frame({k: float(v) for k, v in out.items()})
    # fairseq's criterion / sample_size: the MSE mean over masked frames and bins, penalty the features' mean
    assert means["cqt_mse"] == pytest.approx(float(F.mse_loss(pred, target)), rel=1e-5)
    assert means["feature_pen"] == pytest.approx(float(penalty.mean()), rel=1e-5)  # rows mask equally
    assert means["mask_frac"] == pytest.approx(masked / (3 * frames))
    assert 0 <= means["acc_rvq_0"] <= 1 and 2 * math.log(8) / 3 < means["loss_rvq"] < 6 * math.log(8)
    assert MERT.per_frame({"masked": 0.0, "frames": 10.0, "loss": 0.0}) == {}


def run_grad_worker(world: int, inputs: Path, out: Path) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    command += ["tests/trainer/grad_worker.py", str(inputs), str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_ranks_give_the_gradient_of_one_rank_on_the_whole_batch(tmp_path: Path) -> None:
    """Each rank draws its own masks (rows of a rank mask equally, ranks differ): with the loss divided by
    the masked frames of all ranks, DDP's average over 2 gloo processes on the halves equals 1 process on
    the whole batch; a per-rank mean (the previous trainer) does not."""
    audio, labels = fake_batch(4, 16000, seed=5)
    frames = conv_frames(16000, ModelConfig())
    seed = 0
    while True:  # masks whose halves differ in masked count, so the normalisation matters
        torch.manual_seed(seed)
        halves = [span_mask(2, frames, 0.8, 5, 2) for _ in range(2)]
        if int(halves[0].sum()) != int(halves[1].sum()):
            break
        seed += 1
    mask = torch.cat(halves)
    inputs = tmp_path / "batch.pt"
    torch.save({"audio": audio, "labels": labels, "mask": mask, "overrides": DETERMINISTIC}, inputs)
    whole = run_grad_worker(1, inputs, tmp_path / "one.pt")
    split = run_grad_worker(2, inputs, tmp_path / "two.pt")
    assert set(whole) == set(split) and "feature_extractor.conv_layers.0.conv.weight" in whole
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)

    model = tiny_model(DETERMINISTIC)  # the per-rank mean, emulated in process: it weights the halves wrongly
    for rows in (slice(0, 2), slice(2, 4)):
        out = model(audio[rows], {k: v[rows] for k, v in labels.items()}, mask=mask[rows])
        (out["loss"] / out["masked"] / 2).backward()
    differs = [
        name
        for name, p in model.named_parameters()
        if p.grad is not None and not torch.allclose(p.grad, whole[name], rtol=1e-3, atol=1e-6)
    ]
    assert len(differs) > len(whole) // 2, differs


# ---------------------------------------------------------------------------------------------------
# 4. the in-batch noise mixture: one pool of the other clips, training only
# ---------------------------------------------------------------------------------------------------


def test_noise_segments_come_from_one_pool_of_the_other_clips() -> None:
    batch, length = 4, 1000
    audio = (torch.arange(batch * length, dtype=torch.float32) + 1).reshape(batch, length)  # place + 1
    straddles = skips_own = 0
    for seed in range(12):
        torch.manual_seed(seed)
        mixed = mix_noise(audio, 1.0, 300, 900, 1)  # every clip, one segment each
        for row in range(batch):
            extra = (mixed[row] - audio[row]).round().long()
            where = extra.nonzero().flatten()
            assert 300 <= len(where) <= 900 and int(where[-1] - where[0]) + 1 == len(where)
            flat = extra[where] - 1  # the places in the batch the segment was cut from
            rows = flat // length
            assert not bool((rows == row).any())  # never the clip itself
            pool = flat - length * (rows > row).long()  # places in the pool of the other clips
            assert bool((pool.diff() == 1).all())  # one contiguous cut of the pool
            straddles += int(rows[0] != rows[-1])
            skips_own += int(bool((rows == row - 1).any() and (rows == row + 1).any()))
    assert straddles > 5 and skips_own > 0  # a segment runs from one clip into the next, over the clip itself


def test_eval_never_mixes_and_targets_see_clean_audio() -> None:
    model = tiny_model(["noise_prob=1.0", "layerdrop=0"])
    audio, labels = fake_batch(3, 16000, seed=6)
    seen: dict[str, torch.Tensor] = {}
    model.feature_extractor.register_forward_hook(lambda m, args, out: seen.update(encoder=args[0].clone()))
    assert model.cqt is not None
    model.cqt.register_forward_hook(lambda m, args, out: seen.update(cqt=args[0].clone()))
    with torch.no_grad():
        model.eval()
        model(audio, labels)
        assert torch.equal(seen["encoder"], audio) and torch.equal(seen["cqt"], audio)
        model.train()
        model(audio, labels)
        assert not torch.equal(seen["encoder"], audio)  # training mixes (noise_prob 1)...
        assert torch.equal(seen["cqt"], audio)  # ...but the CQT target is the clean audio's
