"""The test codec: the real EnCodec 24 kHz architecture with seeded random weights and k-means codebooks.

Tests and the demo need a teacher without the 90 MB download (no internet here), and its codes must behave
like real ones: diverse, well separated, deterministic. Its codes exercise every stage but are NOT MERT's
teacher; the demo says so whenever it uses it. Loaded like any EnCodec checkpoint,
`teachers.rvq.load_codec(path)`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from encodec.modules.conv import SConv1d
from torch import nn

from mert_pipeline.fs import atomic_write_bytes
from mert_pipeline.grid import SAMPLE_RATE
from mert_pipeline.teachers.rvq import CODEBOOK_SIZE, TEST_CODEC_MARK, _build_model

_TEST_CODEC_TRACKS = 6  # test codec: 6 x 5 s of synthesized music = 2250 frames for 1024-entry k-means
_TEST_CODEC_TRACK_S = 5.0
_TEST_CODEC_KMEANS_ITERS = 6
_TEST_CODEC_DIMS = 32  # principal directions the test codec's embedding keeps
# Noise added to the residuals a codebook is fitted on, relative to their spread: (first codebook, others).
# Small for the first keeps it sharp; ~1 for the rest keeps new audio's residuals at the scale of theirs.
_TEST_CODEC_JITTER = (0.1, 1.0)


def _kmeans(
    data: torch.Tensor, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means started from k distinct data vectors; empty clusters keep their previous centre.

    Returns the centres and the final cluster sizes.
    """
    distinct = torch.unique(data, dim=0)
    if distinct.shape[0] < k:
        raise ValueError(f"k-means needs {k} distinct vectors, got {distinct.shape[0]}")
    centres = distinct[torch.randperm(distinct.shape[0], generator=generator)[:k]].clone()
    counts = torch.zeros(k, dtype=data.dtype)
    for _ in range(iters):
        assign = (centres.pow(2).sum(1) - 2 * data @ centres.T).argmin(1)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres, counts


def _normalised_embeddings(encoder: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """Data-dependent init (Salimans & Kingma's, for weight norm) of every conv, in one forward pass.

    With the default random init, activations shrink layer after layer until the embedding is a nearly
    constant vector whose variations are comparable to float rounding, and chunked vs whole-file rounding
    then flips many codes. Rescaling each conv's g and bias so its outputs have zero mean and unit variance
    on real music keeps the embedding's spread ~1, like a trained encoder's. Returns the embeddings.
    """

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        conv = module.conv
        std, mean = torch.std_mean(output, dim=(0, 2))
        std = std.clamp_min(1e-4)
        conv.weight_g.div_(std[:, None, None])
        conv.bias.sub_(mean).div_(std)
        return (output - mean[None, :, None]) / std[None, :, None]

    handles = [m.conv.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, SConv1d)]
    try:
        return encoder(audio)
    finally:
        for handle in handles:
            handle.remove()


def _project_output(layer: SConv1d, proj: torch.Tensor, mean: torch.Tensor) -> None:
    """Make a weight-normed conv output proj @ (y - mean) instead of y (new v = the mixed weight)."""
    conv = layer.conv.conv
    weight = conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(1, 2), keepdim=True)
    mixed = torch.einsum("oc,cik->oik", proj, weight)
    conv.weight_v.copy_(mixed)
    conv.weight_g.copy_(mixed.norm(dim=(1, 2), keepdim=True))
    conv.bias.copy_(proj @ (conv.bias - mean))


def make_test_codec(path: str | Path, seed: int = 0) -> Path:
    """Write a deterministic stand-in teacher: the real 24 kHz architecture with seeded random weights.

    Tests and demos need a teacher without the 90 MB download, and its codes must behave like real ones:
    diverse, well separated, deterministic. So, on the embeddings of a few seconds of synthesized music:

    * every encoder conv gets a data-dependent rescaling (see ``_normalised_embeddings``);
    * the last conv is restricted to the embedding's leading principal directions: a random encoder
      spreads music over ~90 near-equal directions, where 1024 k-means centres fitted on a few thousand
      frames become "hubs" that swallow most frames of new audio (only ~70 codes used on 4 s); in 32
      dimensions new audio uses ~180 of them;
    * a fresh model's RVQ codebooks are all zero (the package k-means-initialises them on the first
      training forward), so each of the 32 codebooks is fitted in turn by seeded Lloyd iterations on the
      residual left by the previous ones, plus seeded noise so that no centre sits exactly on a training
      vector (whose residual would then be zero, collapsing the deeper codebooks onto a few frames); the
      ``inited`` flag is set and ``embed_avg``/``cluster_size`` are filled the way the package's own
      k-means initialisation leaves them.

    Saved as a state dict wrapped with a TEST_CODEC_MARK entry, so every label set made with it records
    `weights: test` and says so; the bytes depend only on the seed. Loaded through ``load_codec(path)``.
    """
    path = Path(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sums split over threads round differently: the bytes must not depend on it
    try:
        model = _fitted_model(seed)
    finally:
        torch.set_num_threads(threads)
    buffer = io.BytesIO()  # saving to a file would put its name into the archive, and so into its hash
    marked = {"state_dict": model.state_dict(), TEST_CODEC_MARK: {"seed": seed, "weights": "random"}}
    torch.save(marked, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _fitted_model(seed: int) -> Any:
    """The test codec's model: seeded weights, normalised convs, projected output, fitted codebooks."""
    from mert_pipeline.demo.synth import render_track

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(pretrained=False)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    tracks = [
        render_track(seed * 1000 + i, _TEST_CODEC_TRACK_S, SAMPLE_RATE, 1) for i in range(_TEST_CODEC_TRACKS)
    ]
    with torch.no_grad():
        emb = _normalised_embeddings(model.encoder, torch.from_numpy(np.stack(tracks))[:, None])
        frames = emb.transpose(1, 2).reshape(-1, emb.shape[1])  # (frames, 128)
        mean = frames.mean(0)
        basis = torch.linalg.svd(frames - mean, full_matrices=False).Vh[:_TEST_CODEC_DIMS]
        proj = basis.T @ basis
        _project_output(model.encoder.model[-1], proj, mean)
        residual = (frames - mean) @ proj
        for index, layer in enumerate(model.quantizer.vq.layers):
            jitter = _TEST_CODEC_JITTER[0] if index == 0 else _TEST_CODEC_JITTER[1]
            noise = (torch.randn(residual.shape, generator=generator) * (jitter * residual.std(0))) @ proj
            centres, counts = _kmeans(residual + noise, CODEBOOK_SIZE, _TEST_CODEC_KMEANS_ITERS, generator)
            book = layer._codebook
            book.embed.copy_(centres)
            book.embed_avg.copy_(centres)
            book.cluster_size.copy_(counts)
            book.inited.fill_(1.0)
            residual = residual - book.dequantize(book.quantize(residual))
    return model
