"""MERT: a HuBERT encoder on 24 kHz audio that predicts acoustic-teacher codes and a CQT on masked frames.

Module names follow transformers' `HubertModel` (feature_extractor.conv_layers.N.conv, feature_projection,
encoder.pos_conv_embed.conv, encoder.layers.N.attention.q_proj, ..., masked_spec_embed), so exporting the
encoder is a rename-free copy of these keys; `final_proj`, `label_embs_concat` and `cqt_head` are
training-only and dropped at export.

Frames and alignment: the conv front end (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) turns n samples
into floor((n - 400) / 320) + 1 frames, so a crop of n = 320 k samples (the loader's crops are multiples
of 320) gives k - 1 frames (120000 -> 374), while the teachers label ceil(n / 320) = k frames (375).
Frame t of the conv features covers samples [320 t, 320 t + 400), label frame t starts at 320 t and CQT
frame t (center=True) is centred on 320 t: all three start on the same grid, so labels and CQT are sliced
to the first k - 1 frames and the teachers' last frame, which no conv window covers fully, is dropped.

Losses are sums, as in fairseq's hubert criterion: `forward` returns the loss summed over the masked
frames and the masked frame count (fairseq's sample_size); the trainer divides by the count of all ranks,
so the gradient does not depend on how a batch is split over GPUs (`MERT.per_frame` makes the logged means).

All random choices of a step (noise mixture, masking, layerdrop) come from torch's CPU generator, and
dropout from the device's; the trainer reseeds both at every step, which is what makes resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    # conv front end (320 samples per frame at 24 kHz = 75 Hz)
    conv_dim: int = 512
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    feat_extract_norm: str = "group"  # "group": GroupNorm on layer 0 only; "layer": LayerNorm on every layer
    # transformer
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False  # pre-LN (transformers' do_stable_layer_norm); False = post-LN
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1  # after the feature projection (fairseq's dropout_input)
    layerdrop: float = 0.05
    attention_relax: float = 0.0  # > 0: softmax((s/a - max(s/a)) * a), an fp16 guard; 0: SDPA
    feature_grad_mult: float = 0.1
    # masking
    mask_prob: float = 0.8
    mask_length: int = 5
    min_masks: int = 2
    # losses
    final_dim: int = 64
    logit_temp: float = 0.1
    # rows of each head's label embeddings that are never a target: fairseq's Dictionary puts <s>, <pad>,
    # </s> and <unk> before the codes, and HuBERT/MERT's softmax runs over all its rows, so these are extra
    # negatives of every head (MERT-v1: 1028 rows a codebook). 0 is the objective before the parity fix.
    label_specials: int = 4
    feature_pen_weight: float = 10.0
    pred_nomask_weight: float = 0.0  # fairseq's: > 0 also predicts the labels of the unmasked frames
    cqt_weight: float = 1.0
    cqt_fmin: float = 32.7
    cqt_bins: int = 336
    cqt_bins_per_octave: int = 48
    cqt_pad_mode: str = "constant"  # MERT's; nnAudio's default "reflect" changes the lowest octave
    # in-batch noise mixture (training only)
    noise_prob: float = 0.5
    noise_min_samples: int = 12000
    noise_max_samples: int = 24000
    noise_max_segments: int = 3
    sample_rate: int = 24000
    # (teacher, n_q, num_classes) of each selected teacher; set by the trainer from the shard index
    codebooks: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def hop(self) -> int:
        return math.prod(self.conv_strides)


def conv_frames(num_samples: int, cfg: ModelConfig) -> int:
    """Frames the conv front end makes of `num_samples` samples (no padding)."""
    n = num_samples
    for kernel, stride in zip(cfg.conv_kernels, cfg.conv_strides, strict=True):
        n = (n - kernel) // stride + 1
    return n


# ---------------------------------------------------------------------------------------------------
# random choices: span masking and the in-batch noise mixture
# ---------------------------------------------------------------------------------------------------


def span_counts(
    uniform: torch.Tensor, frames: int, prob: float, length: int, min_masks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq's span count and start range of each row, from one uniform draw per row: n = max(min_masks,
    int(prob * frames / length + u)) starts, drawn from [0, frames - length), or from [0, n] when that range
    holds n or fewer (fairseq's `min_len` correction). Returns (n, range size) per row."""
    counts = (prob * frames / length + uniform.double()).long().clamp(min=min_masks)
    ranges = torch.where(frames - length <= counts, counts + 1, torch.full_like(counts, frames - length))
    return counts, ranges


def span_starts(
    batch: int, frames: int, prob: float, length: int, min_masks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The span starts of fairseq's `compute_mask_indices` (static lengths, overlap allowed), drawn from
    torch's CPU generator: `span_counts`, then each row's n starts without replacement from its range.
    Returns (batch, most) starts and which of them a row really has (rows differ in n)."""
    counts, ranges = span_counts(torch.rand(batch, dtype=torch.float64), frames, prob, length, min_masks)
    width, most = int(ranges.max()), int(counts.max())
    keys = torch.rand(batch, width, dtype=torch.float64)  # a random order of each row's range...
    keys.masked_fill_(torch.arange(width) >= ranges[:, None], 2.0)
    starts = keys.argsort(dim=1)[:, :most]  # ...whose first n entries are n draws without replacement
    return starts, torch.arange(most) < counts[:, None]


def spans_to_mask(starts: torch.Tensor, real: torch.Tensor, frames: int, length: int) -> torch.Tensor:
    """The union of the spans [start, start + length) clipped to the row, for the `real` starts: (B, n)
    starts -> (B, frames) bool, fairseq's `np.unique(mask_idc[mask_idc < sz])`."""
    batch = starts.shape[0]
    spans = starts[:, :, None] + torch.arange(length)
    keep = real[:, :, None] & (spans < frames)
    hits = torch.zeros(batch, frames, dtype=torch.long)  # spans overlap: count, then threshold
    hits.scatter_add_(1, spans.clamp(max=frames - 1).flatten(1), keep.flatten(1).long())
    return hits > 0


def span_mask(
    batch: int, frames: int, prob: float, length: int, min_masks: int, same_count: bool = True
) -> torch.Tensor:
    """HuBERT/MERT span masking as fairseq's `compute_mask_indices` draws it (mask_type static, no_overlap
    False, mask_dropout 0; checked against installed fairseq in tests/trainer/test_fairseq_parity.py):
    `span_starts`, `spans_to_mask`, and with `same_count` (fairseq's require_same_masks) every row trimmed
    to the batch's smallest masked count by keeping a uniform subset of its masked frames. Prob 0.8, length
    5 masks about 55% of 374 frames; prob <= 0 masks nothing, as HuBERT skips masking then. Bool (batch,
    frames) on the CPU."""
    if prob <= 0:
        return torch.zeros(batch, frames, dtype=torch.bool)
    mask = spans_to_mask(*span_starts(batch, frames, prob, length, min_masks), frames, length)
    counts = mask.sum(dim=1)
    if same_count and bool((counts > counts.min()).any()):  # random keys: a uniform subset of each row
        mask = trim_to_fewest(mask, torch.rand(batch, frames, dtype=torch.float64))
    return mask


def trim_to_fewest(mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """fairseq's require_same_masks: every row keeps the batch's smallest masked count, its masked frames
    taken lowest key first (fairseq draws them with rng.choice without replacement)."""
    fewest = int(mask.sum(dim=1).min())
    order = keys.double().masked_fill(~mask, math.inf).argsort(dim=1)[:, :fewest]
    return torch.zeros_like(mask).scatter_(1, order, True)


def mix_noise(
    audio: torch.Tensor, prob: float, min_samples: int, max_samples: int, max_segments: int
) -> torch.Tensor:
    """MERT's in-batch noise mixture: each clip, with probability `prob`, gets 1..max_segments segments of
    min..max samples added at random positions at volume 1. As in the official code the segments are cut
    from one pool, the batch's *other* clean clips laid end to end, so a segment may run from one clip into
    the next, and never comes from the clip itself. Segments are at most as long as a clip."""
    batch, length = audio.shape
    if batch < 2 or prob <= 0:
        return audio
    flat = audio.reshape(-1)
    longest = min(max_samples, length)
    shortest = min(min_samples, longest)
    mixed = audio.clone()
    for row in (torch.rand(batch) < prob).nonzero().flatten().tolist():
        count = int(torch.randint(1, max_segments + 1, ()))
        starts = torch.randint(0, (batch - 1) * length - longest + 1, (count,)).tolist()
        sizes = torch.randint(shortest, longest + 1, (count,)).tolist()
        for start, size in zip(starts, sizes, strict=True):
            dst = int(torch.randint(0, length - size + 1, ()))
            index = torch.arange(start, start + size, device=audio.device)
            index += length * (index >= row * length)  # pool position -> batch position, skipping `row`
            mixed[row, dst : dst + size] += flat[index]
    return mixed


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


# ---------------------------------------------------------------------------------------------------
# encoder
# ---------------------------------------------------------------------------------------------------


class ConvLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, norm: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=False)
        self.norm = norm
        if norm == "group":
            self.layer_norm = nn.GroupNorm(c_out, c_out)
        elif norm == "layer":
            self.layer_norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm == "group":
            x = self.layer_norm(x)
        elif self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers = []
        for i, (kernel, stride) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides, strict=True)):
            norm = "layer" if cfg.feat_extract_norm == "layer" else ("group" if i == 0 else None)
            layers.append(ConvLayer(1 if i == 0 else cfg.conv_dim, cfg.conv_dim, kernel, stride, norm))
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x  # (B, C, T)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim)
        self.projection = nn.Linear(cfg.conv_dim, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projection(self.layer_norm(x)))


class PositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        conv = nn.Conv1d(
            cfg.embed_dim,
            cfg.embed_dim,
            cfg.pos_conv_kernel,
            padding=cfg.pos_conv_kernel // 2,
            groups=cfg.pos_conv_groups,
        )
        std = math.sqrt(4.0 / (cfg.pos_conv_kernel * cfg.embed_dim))  # fairseq's init
        nn.init.normal_(conv.weight, mean=0.0, std=std)
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if cfg.pos_conv_kernel % 2 == 0 else 0  # transformers' HubertSamePadLayer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.remove:
            y = y[:, :, : -self.remove]
        return F.gelu(y).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.relax = cfg.attention_relax
        dim = cfg.embed_dim
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = x.shape
        q, k, v = (
            proj(x).view(batch, frames, self.heads, dim // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        dropout = self.dropout if self.training else 0.0
        if self.relax > 0:  # MERT's attention relaxation: equal to softmax, kept for fidelity
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) / self.relax
            scores = (scores - scores.amax(-1, keepdim=True).detach()) * self.relax
            probs = F.dropout(scores.float().softmax(-1).to(v.dtype), dropout, self.training)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_dropout = nn.Dropout(cfg.activation_dropout)
        self.intermediate_dense = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.output_dense = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.output_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.layer_norm_first
        self.attention = Attention(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.feed_forward = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:  # transformers' HubertEncoderLayerStableLayerNorm
            x = x + self.dropout(self.attention(self.layer_norm(x)))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.layer_norm_first
        self.layerdrop = cfg.layerdrop
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv_embed(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = self.dropout(x)
        drops = torch.rand(len(self.layers)) if self.training and self.layerdrop > 0 else None
        for i, layer in enumerate(self.layers):
            if drops is not None and drops[i] < self.layerdrop:
                continue
            x = layer(x)
        return self.layer_norm(x) if self.pre_ln else x


class CQT(nn.Module):
    """nnAudio's CQT as MERT builds it (CQT1992v2: hann, norm 1, center, zero padding, magnitude) in fp32
    whatever the autocast. Its kernels are rebuilt at construction and kept out of the state dict (hundreds
    of MB at 336 bins)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from nnAudio.features import CQT1992v2

        self.cqt = CQT1992v2(
            sr=cfg.sample_rate,
            hop_length=cfg.hop,
            fmin=cfg.cqt_fmin,
            n_bins=cfg.cqt_bins,
            bins_per_octave=cfg.cqt_bins_per_octave,
            norm=1,
            window="hann",
            center=True,
            pad_mode=cfg.cqt_pad_mode,
            output_format="Magnitude",
            verbose=False,
        )
        for name in list(self.cqt._buffers):
            self.cqt.register_buffer(name, self.cqt._buffers.pop(name), persistent=False)

    @property
    def pad(self) -> int:
        return self.cqt.kernel_width // 2

    def forward(self, audio: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, N) audio -> (B, frames, bins) magnitudes, frame t centred on sample hop * t."""
        with torch.autocast(audio.device.type, enabled=False):
            spec = self.cqt(audio.float())
        return spec[:, :, :frames].transpose(1, 2)


class MERT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.codebooks:
            raise ValueError("ModelConfig.codebooks is empty: select at least one teacher")
        if cfg.label_specials < 0:
            raise ValueError(f"label_specials is {cfg.label_specials}, not a row count")
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.masked_spec_embed = nn.Parameter(torch.empty(cfg.embed_dim).uniform_())
        self.encoder = Encoder(cfg)
        self.heads = [(name, q) for name, n_q, _ in cfg.codebooks for q in range(n_q)]
        self.classes = [classes for _, n_q, classes in cfg.codebooks for _ in range(n_q)]
        # each head's block of label_embs_concat: label_specials never-target rows, then its codes in order
        self.rows = [cfg.label_specials + classes for classes in self.classes]
        self.final_proj = nn.Linear(cfg.embed_dim, cfg.final_dim * len(self.heads))
        self.label_embs_concat = nn.Parameter(torch.empty(sum(self.rows), cfg.final_dim).uniform_())
        self.cqt_head = nn.Linear(cfg.embed_dim, cfg.cqt_bins) if cfg.cqt_weight > 0 else None
        self.cqt = CQT(cfg) if cfg.cqt_weight > 0 else None
        self.apply(_init_weights)

    @staticmethod
    def per_frame(sums: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
        """Means of `forward`'s sums, summed over steps and ranks first (so they do not depend on the batch
        split), each over the frames it sums: `loss` and `feature_pen` per sample_size, as fairseq logs them;
        accuracies, masked cross-entropies and the CQT error per masked frame; `loss_*_u` per unmasked
        frame. Adds mask_frac; {} if none masked."""
        masked = float(sums.get("masked", 0.0))
        if not masked:
            return {}
        size = float(sums.get("sample_size", masked))
        unmasked = max(size - masked, 1.0)
        means = {}
        for key, value in sums.items():
            if key in ("masked", "frames", "sample_size"):
                continue
            divisor = size if key in ("loss", "feature_pen") else unmasked if key.endswith("_u") else masked
            means[key] = float(value) / divisor
        means["mask_frac"] = masked / float(sums["frames"])
        return means

    def encode(self, audio: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio (B, N) -> (hidden states (B, T, D), feature penalty of each clip (B,)); `mask` (B, T) frames
        get mask_emb."""
        features = self.feature_extractor(audio)
        mult = self.cfg.feature_grad_mult
        if self.training and mult != 1.0:
            features = GradMultiply.apply(features, mult) if mult > 0 else features.detach()
        features = features.transpose(1, 2)
        penalty = features.float().pow(2).mean(dim=(1, 2))
        x = self.feature_projection(features)
        if mask is not None:
            x = torch.where(mask[..., None], self.masked_spec_embed.to(x.dtype), x)
        return self.encoder(x), penalty

    def head_logits(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each head's logits (M, label_specials + classes) for M frames' hidden states: the cosine of the
        head's chunk of final_proj to every row of its label-embedding block (the special rows are
        negatives, as in fairseq's compute_nce), over logit_temp, in fp32."""
        embeddings = F.normalize(self.label_embs_concat.float(), dim=-1).split(self.rows)
        chunks = self.final_proj(rows).float().chunk(len(self.heads), dim=-1)
        temp = self.cfg.logit_temp
        return [F.normalize(c, dim=-1) @ e.T / temp for c, e in zip(chunks, embeddings, strict=True)]

    def forward(
        self, audio: torch.Tensor, labels: dict[str, torch.Tensor], mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Summed losses and metrics of one batch, as fairseq's hubert criterion sums them: `loss` = cross-
        entropy summed over masked frames and codebooks + feature_pen_weight x penalty x masked frames +
        cqt_weight x CQT squared error (a mean over bins) summed over masked frames, and with
        pred_nomask_weight > 0 that weight x the cross-entropy summed over unmasked frames; `sample_size`
        what the trainer divides by (the masked frames, plus the unmasked ones when they are predicted, as
        fairseq counts), `masked` the masked frames, `frames` all frames (per_frame: means).
        `audio` (B, N) clean 24 kHz audio, N a multiple of the hop; `labels[teacher]` (B, n_q, >= T) codes;
        `mask` (B, T) fixes the masked frames (default: drawn by span_mask). Training mode mixes noise."""
        cfg = self.cfg
        clean = audio
        if self.training and cfg.noise_prob > 0:
            audio = mix_noise(
                audio, cfg.noise_prob, cfg.noise_min_samples, cfg.noise_max_samples, cfg.noise_max_segments
            )
        frames = conv_frames(audio.shape[1], cfg)
        if mask is None:
            mask = span_mask(audio.shape[0], frames, cfg.mask_prob, cfg.mask_length, cfg.min_masks)
        mask = mask.to(audio.device, non_blocking=True)
        hidden, penalty = self.encode(audio, mask)
        per_clip = mask.sum(dim=1).float()
        count = per_clip.sum()
        masked = hidden[mask]  # (M, D): the losses are on masked frames only
        first = cfg.label_specials  # code k is row first + k of its head's block
        out: dict[str, torch.Tensor] = {}
        # fairseq: penalty x sample_size; per clip it is the same when rows mask equally (require_same_masks)
        # and splits exactly over ranks when they do not
        predicted = torch.full_like(per_clip, frames) if cfg.pred_nomask_weight > 0 else per_clip
        pen_sum = (penalty * predicted).sum()
        loss = cfg.feature_pen_weight * pen_sum
        for (name, q), logits in zip(self.heads, self.head_logits(masked), strict=True):
            target = labels[name][:, q, :frames][mask].long() + first
            ce = F.cross_entropy(logits, target, reduction="sum")
            loss = loss + ce
            out[f"loss_{name}"] = out.get(f"loss_{name}", 0.0) + ce.detach()
            out[f"acc_{name}_{q}"] = (logits.argmax(-1) == target).sum().float().detach()
        sample_size = count
        if cfg.pred_nomask_weight > 0:  # fairseq: the unmasked frames' loss, and sample_size counts them too
            kept = hidden[~mask]
            sample_size = count + kept.shape[0]
            for (name, q), logits in zip(self.heads, self.head_logits(kept), strict=True):
                target = labels[name][:, q, :frames][~mask].long() + first
                ce = F.cross_entropy(logits, target, reduction="sum")
                loss = loss + cfg.pred_nomask_weight * ce
                out[f"loss_{name}_u"] = out.get(f"loss_{name}_u", 0.0) + ce.detach()
        if self.cqt is not None and self.cqt_head is not None:
            target = self.cqt(clean, frames)[mask]
            sq_err = F.mse_loss(self.cqt_head(masked).float(), target, reduction="sum") / cfg.cqt_bins
            loss = loss + cfg.cqt_weight * sq_err
            out["cqt_mse"] = sq_err.detach()
        out["feature_pen"] = pen_sum.detach()
        out["masked"] = count.detach()
        out["sample_size"] = torch.as_tensor(sample_size, dtype=torch.float32).detach()
        out["frames"] = torch.tensor(float(mask.numel()), device=count.device)
        out["loss"] = loss
        return out


def _init_weights(module: nn.Module) -> None:
    """transformers' Hubert init: Linear N(0, 0.02) with zero bias, norms at identity, convs Kaiming."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv1d) and module.kernel_size[0] < 100 and module.groups == 1:
        nn.init.kaiming_normal_(module.weight)


def flops_per_clip(cfg: ModelConfig, num_samples: int) -> float:
    """Training FLOPs (forward + backward) for one clip, for the MFU estimate: 6 x matmul parameters x
    frames, attention scores 12 x layers x T^2 x D, and the conv front end (its first layer has no input
    gradient). The CQT target (a fixed conv) and the elementwise ops are not counted."""
    frames = conv_frames(num_samples, cfg)
    conv, n = 0.0, num_samples
    for i, (kernel, stride) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides, strict=True)):
        n = (n - kernel) // stride + 1
        c_in = 1 if i == 0 else cfg.conv_dim
        conv += 2 * c_in * cfg.conv_dim * kernel * n * (2 if i == 0 else 3)
    d, f, layers = cfg.embed_dim, cfg.ffn_dim, cfg.num_layers
    dense = layers * (4 * d * d + 2 * d * f) + cfg.conv_dim * d
    dense += d * d * cfg.pos_conv_kernel // cfg.pos_conv_groups
    attention = 12 * layers * frames * frames * d
    return conv + 6 * dense * frames + attention
