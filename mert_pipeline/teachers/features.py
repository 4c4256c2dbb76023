"""Frame-level features at 75 Hz for the pseudo-label teachers: MFCC (k-means), log-CQT (the music k-means
teacher) and log-mel (BEST-RQ).

Every teacher must emit exactly ``ceil(num_samples / 320)`` frames for 24 kHz mono audio, the frame count of
the EnCodec RVQ teacher, so that labels from different teachers line up frame for frame.

**Alignment rule.** Frame ``i`` describes the hop ``[i * 320, (i + 1) * 320)``: its analysis window is centred
on sample ``i * 320 + 160``, the middle of that hop, whatever the window length. This is Kaldi's
``snip_edges=False`` framing (window start ``i * hop + hop // 2 - win // 2``) extended by one frame: Kaldi
emits ``round(n / hop)`` frames, we emit ``ceil(n / hop)`` so that a trailing partial hop gets its own
frame. Samples outside the file are mirrored the way Kaldi does it (``x[-1 - k] = x[k]``,
``x[n + k] = x[n - 1 - k]``), repeated for files shorter than a window, so any file of at least one sample
gets features.

**MFCC window: 25 ms (600 samples).** The HuBERT recipe defines its window in milliseconds (25 ms at 16 kHz is
400 samples), and it sets the spectral resolution of the features, so 25 ms keeps the recipe's
time-frequency trade-off at 24 kHz instead of widening it to 640 samples (26.7 ms) for the sake of a round
multiple of the hop; the centring above does not need one. Both pad to a 1024-point FFT, so the cost is the
same. Everything else is Kaldi's ``compute-mfcc-feats`` defaults as fairseq's ``dump_mfcc_feature.py`` uses
them (23 mel bins from 20 Hz to Nyquist, povey window, pre-emphasis 0.97, DC removal, lifter 22, no
energy), with dither 0 so the features are deterministic, followed by deltas and delta-deltas
(``compute_deltas``, window 5, replicate padding at the file edges): 39 dims.

**Log-mel for BEST-RQ: 128 HTK mel bins over a 2048-sample (85 ms) periodic Hann window, 0 Hz to Nyquist,
power spectrum, ``log(mel + 1e-6)``.** MusicFM's input features at 24 kHz (n_fft 2048, 128 mels); only the hop
changes, from 240 to 320, to align with the other teachers. A 1024-point FFT would leave the lowest of 128
HTK mel filters narrower than one FFT bin (23.4 Hz), so several of them would be empty.

**Log-CQT for the music k-means teacher: 24 bins an octave over 7 octaves from C2 (65.4 Hz), nnAudio's
CQT1992v2 kernels, log(magnitude + 1e-4).** MFCC's k-means labels hold little pitch (a 23-band mel
envelope cannot tell a semitone apart); a constant-Q spectrum resolves every semitone from 65 Hz up while
keeping the spectral envelope. `LogCQT` says how it is computed, and why by FFT. Its dimensions are not
standardised before k-means: all are log amplitudes in one unit, and standardising each lowered the labels'
pitch information (measured, benchmarks/RESULTS.md), as it lowered MFCC's.

The extractors are vectorised over frames (and over files with ``batch``), and they stream: ``stream`` takes
the blocks of one file and yields feature blocks equal (to float rounding) to the whole-file result while
holding at most about 6.8 s of input (gathered so that per-block overhead stays small), one window and four
frames of delta context.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from mert_pipeline.grid import HOP, SAMPLE_RATE, num_frames

__all__ = [
    "C1_HZ",
    "C2_HZ",
    "SIGNAL_KINDS",
    "STREAM_MIN_SAMPLES",
    "MFCC",
    "LogCQT",
    "LogMel",
    "RunningStats",
    "frame_signal",
    "log_mel",
    "make_extractor",
    "mfcc",
]

_KALDI_EPS = float(torch.finfo(torch.float32).eps)  # Kaldi's floor on mel energies before the log
# Frames per vectorised step: temporaries of a few MB stay in cache and in malloc's free lists (4096-frame
# steps measured several times slower on the 2-core VM, from page faults on freshly mapped buffers).
_CHUNK_FRAMES = 512
STREAM_MIN_SAMPLES = _CHUNK_FRAMES * HOP  # `stream` processes input in pieces of at least this many samples


def _mirror_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer positions onto [0, n) by repeated mirroring with the edge sample repeated (Kaldi's)."""
    index = torch.remainder(index, 2 * n)
    return torch.where(index >= n, 2 * n - 1 - index, index)


def frame_signal(waveform: torch.Tensor, win: int, hop: int = HOP) -> torch.Tensor:
    """All analysis windows of a whole file, shape (ceil(n / hop), win): a view of one mirror-padded copy.

    Window i starts at sample ``i * hop + hop // 2 - win // 2`` (centred on the middle of hop i).
    """
    if win < hop:
        raise ValueError(f"window ({win}) must be at least one hop ({hop})")
    n = waveform.shape[0]
    m = num_frames(n, hop)
    if m == 0:
        return waveform.new_zeros((0, win))
    left = win // 2 - hop // 2
    right = (m - 1) * hop + win - left - n
    head = waveform[_mirror_index(torch.arange(-left, 0), n)]
    tail = waveform[_mirror_index(torch.arange(n, n + right), n)]
    return torch.cat([head, waveform, tail]).unfold(0, win, hop)


def _as_mono_tensor(waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(waveform)
    if tensor.ndim != 1:
        raise ValueError(f"expected mono samples shaped (num_samples,), got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32)


class _Framer:
    """Cuts the blocks of one file into the windows of `frame_signal`, keeping under a window between blocks.

    Nothing is emitted before `win` samples have arrived, so the mirror at the start needs only the first
    samples; `win` samples of tail are kept for the mirror at the end. Files shorter than a window are framed
    whole at `finish` (they are tiny).
    """

    def __init__(self, win: int, hop: int) -> None:
        if win < hop:
            raise ValueError(f"window ({win}) must be at least one hop ({hop})")
        self.win, self.hop, self.left = win, hop, win // 2 - hop // 2
        self._pending: list[torch.Tensor] = []
        self._received = 0
        self._emitted = 0
        self._buf: torch.Tensor | None = None  # padded signal from the next window's start on
        self._tail = torch.zeros(0)

    def push(self, block: torch.Tensor) -> torch.Tensor:
        if block.shape[0] == 0:
            return block.new_zeros((0, self.win))
        self._received += block.shape[0]
        if self._buf is None:
            self._pending.append(block)
            if self._received < self.win:
                return block.new_zeros((0, self.win))
            x = torch.cat(self._pending)
            self._pending = []
            self._buf = torch.cat([x[: self.left].flip(0), x])
            self._tail = x[-self.win :].clone()
        else:
            self._buf = torch.cat([self._buf, block])
            tail = block if block.shape[0] >= self.win else torch.cat([self._tail, block])
            self._tail = tail[-self.win :].clone()  # a copy: a view would keep the whole block alive
        return self._take()

    def _take(self) -> torch.Tensor:
        assert self._buf is not None
        if self._buf.shape[0] < self.win:
            return self._buf.new_zeros((0, self.win))
        count = (self._buf.shape[0] - self.win) // self.hop + 1
        windows = self._buf[: (count - 1) * self.hop + self.win].unfold(0, self.win, self.hop)
        self._buf = self._buf[count * self.hop :].clone()
        self._emitted += count
        return windows

    def finish(self) -> torch.Tensor:
        if self._buf is None:
            if not self._pending:
                return torch.zeros((0, self.win))
            return frame_signal(torch.cat(self._pending), self.win, self.hop)
        total = num_frames(self._received, self.hop)
        right = (total - 1) * self.hop + self.win - self.left - self._received
        assert 0 <= right <= self._tail.shape[0]
        self._buf = torch.cat([self._buf, self._tail[self._tail.shape[0] - right :].flip(0)])
        windows = self._take()
        assert self._emitted == total, (self._emitted, total)
        return windows


class _DeltaStream:
    """Deltas of a stream of frames, equal to ``compute_deltas(win_length=5, mode="replicate")`` on the whole.

    The replicate padding is real data at the file's edges (two copies of the first frame, then of the last
    at `final`); in between, each delta needs two frames either side, so four frames are carried over.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def push(self, x: torch.Tensor, final: bool = False) -> torch.Tensor:
        if self._buf is None:
            if x.shape[0] == 0:
                return x
            self._buf = torch.cat([x[:1].expand(2, -1), x])
        else:
            self._buf = torch.cat([self._buf, x])
        if final:
            self._buf = torch.cat([self._buf, self._buf[-1:].expand(2, -1)])
        b = self._buf
        size = b.shape[0]
        if size < 5:
            return b[:0]
        out = (b[3 : size - 1] - b[1 : size - 3] + 2.0 * (b[4:] - b[: size - 4])) / 10.0
        self._buf = b[size - 4 :]
        return out


class _WithDeltas:
    """[c, delta c, delta-delta c] of a stream of frames c: delta-deltas lag the input by four frames."""

    def __init__(self, dim: int) -> None:
        self._d1, self._d2 = _DeltaStream(), _DeltaStream()
        self._c = torch.zeros((0, dim))
        self._d = torch.zeros((0, dim))

    def push(self, c: torch.Tensor, final: bool = False) -> torch.Tensor:
        d = self._d1.push(c, final)
        dd = self._d2.push(d, final)
        self._c = torch.cat([self._c, c])
        self._d = torch.cat([self._d, d])
        k = dd.shape[0]
        out = torch.cat([self._c[:k], self._d[:k], dd], dim=1)
        self._c, self._d = self._c[k:], self._d[k:]
        return out


class _Identity:
    def push(self, c: torch.Tensor, final: bool = False) -> torch.Tensor:
        return c


class _Extractor(ABC):
    """Shared framing, batching and streaming; subclasses turn windows into per-frame features."""

    chunk_frames: int = _CHUNK_FRAMES  # frames per vectorised step (long windows take fewer)
    win: int
    hop: int
    base_dim: int  # per-frame features before deltas
    dim: int  # output features

    @abstractmethod
    def _frame_features(self, windows: torch.Tensor) -> torch.Tensor:
        """(frames, win) windows -> (frames, base dim) features."""

    def _post(self) -> _Identity | _WithDeltas:
        return _Identity()

    def _post_whole(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Every setting that changes the output, for fingerprints of derived data."""

    def _features(self, windows: torch.Tensor) -> torch.Tensor:
        """Frame features in chunks, so that a long file's temporaries stay small."""
        if windows.shape[0] == 0:
            return windows.new_zeros((0, self.base_dim))  # MKL's rfft rejects empty batches
        step = self.chunk_frames
        if windows.shape[0] <= step:
            return self._frame_features(windows)
        return torch.cat([self._frame_features(windows[i : i + step]) for i in range(0, len(windows), step)])

    @torch.inference_mode()
    def __call__(self, waveform: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features of one whole file: float32 (ceil(n / hop), dim)."""
        windows = frame_signal(_as_mono_tensor(waveform), self.win, self.hop)
        return self._post_whole(self._features(windows)).numpy()

    @torch.inference_mode()
    def batch(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        """Features of many files, their frames computed together (short clips pay the per-call cost once)."""
        out: list[np.ndarray] = []
        group: list[torch.Tensor] = []
        frames = 0

        def flush() -> None:
            feats = self._features(torch.cat(group)) if len(group) > 1 else self._features(group[0])
            for part in feats.split([len(w) for w in group]):
                out.append(self._post_whole(part).numpy())
            group.clear()

        for waveform in waveforms:
            windows = frame_signal(_as_mono_tensor(waveform), self.win, self.hop)
            group.append(windows)
            frames += len(windows)
            if frames >= self.chunk_frames:
                flush()
                frames = 0
        if group:
            flush()
        return out

    @torch.inference_mode()
    def stream(
        self, blocks: Iterable[np.ndarray | torch.Tensor], min_block: int = STREAM_MIN_SAMPLES
    ) -> Iterator[np.ndarray]:
        """Feature blocks of one file given as consecutive sample blocks (any sizes); never the whole file.

        The concatenated output equals ``self(whole_file)`` up to float rounding. Input blocks are gathered
        up to `min_block` samples (default about 6.8 s) before they are processed: per-block overhead would
        otherwise dominate (1-second blocks ran at a third of the whole-file speed). Memory stays bounded by
        that, one input block and one window. Empty feature blocks are not yielded.
        """
        framer = _Framer(self.win, self.hop)
        post = self._post()
        pending: list[torch.Tensor] = []
        size = 0

        def flush() -> torch.Tensor:
            nonlocal pending, size
            samples = torch.cat(pending) if len(pending) > 1 else pending[0]
            pending, size = [], 0
            return post.push(self._features(framer.push(samples)))

        for block in blocks:
            pending.append(_as_mono_tensor(block))
            size += pending[-1].shape[0]
            if size >= min_block:
                feats = flush()
                if feats.shape[0]:
                    yield feats.numpy()
        if pending:
            feats = flush()
            if feats.shape[0]:
                yield feats.numpy()
        feats = post.push(self._features(framer.finish()), final=True)
        if feats.shape[0]:
            yield feats.numpy()


class MFCC(_Extractor):
    """13 Kaldi MFCC + deltas + delta-deltas (39 dims) at 75 Hz, the numbers of torchaudio's kaldi.mfcc.

    Vectorised re-implementation of Kaldi's pipeline with the constant parts (window, mel banks, DCT times
    lifter) built once: per frame, remove the DC offset, pre-emphasise (first sample against itself),
    apply the povey window, zero-pad to a power of two, power spectrum, mel banks, log (floored at float32
    eps), DCT, lifter.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        hop: int = HOP,
        frame_length: int = 600,
        num_mel_bins: int = 23,
        num_ceps: int = 13,
        deltas: bool = True,
    ) -> None:
        self.sample_rate, self.hop, self.win = sample_rate, hop, frame_length
        self.num_mel_bins, self.num_ceps, self.deltas = num_mel_bins, num_ceps, deltas
        self.low_freq, self.high_freq = 20.0, 0.0
        self.preemphasis, self.cepstral_lifter = 0.97, 22.0
        self.n_fft = 1 << (frame_length - 1).bit_length()
        self.base_dim, self.dim = num_ceps, num_ceps * (3 if deltas else 1)
        self.window = torch.hann_window(frame_length, periodic=False, dtype=torch.float64).pow(0.85).float()
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            num_mel_bins, self.n_fft, float(sample_rate), self.low_freq, self.high_freq, 100.0, -500.0, 1.0
        )
        # Kaldi's banks stop one bin short of Nyquist: that bin gets weight 0.
        self.mel_banks = torch.nn.functional.pad(
            banks.float(), (0, 1)
        ).T.contiguous()  # (n_fft // 2 + 1, mels)
        dct = torchaudio.functional.create_dct(num_mel_bins, num_mel_bins, "ortho")
        dct[:, 0] = math.sqrt(1.0 / num_mel_bins)
        i = torch.arange(num_ceps, dtype=torch.float32)
        lifter = 1.0 + 0.5 * self.cepstral_lifter * torch.sin(math.pi * i / self.cepstral_lifter)
        self.dct_lifter = (dct[:, :num_ceps] * lifter).contiguous()  # (mels, ceps)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "mfcc",
            "sample_rate": self.sample_rate,
            "hop": self.hop,
            "frame_length": self.win,
            "n_fft": self.n_fft,
            "window": "povey",
            "num_mel_bins": self.num_mel_bins,
            "num_ceps": self.num_ceps,
            "low_freq": self.low_freq,
            "high_freq": self.high_freq,
            "preemphasis": self.preemphasis,
            "cepstral_lifter": self.cepstral_lifter,
            "dither": 0.0,
            "deltas": self.deltas,
            "alignment": "centre of hop i = i*hop + hop//2, mirrored edges, ceil(n/hop) frames",
        }

    def _frame_features(self, windows: torch.Tensor) -> torch.Tensor:
        x = windows - windows.mean(dim=1, keepdim=True)
        # Pre-emphasis and window written straight into the zero-padded FFT input: rfft(n=...) on the
        # unpadded frames is several times slower than on a contiguous padded buffer.
        padded = x.new_zeros((x.shape[0], self.n_fft))
        torch.mul(x[:, :1], (1.0 - self.preemphasis) * self.window[:1], out=padded[:, :1])
        torch.mul(x[:, 1:] - self.preemphasis * x[:, :-1], self.window[1:], out=padded[:, 1 : self.win])
        spectrum = torch.fft.rfft(padded)
        power = spectrum.real.square() + spectrum.imag.square()
        log_mel = (power @ self.mel_banks).clamp_(min=_KALDI_EPS).log_()
        return log_mel @ self.dct_lifter

    def _post(self) -> _Identity | _WithDeltas:
        return _WithDeltas(self.num_ceps) if self.deltas else _Identity()

    def _post_whole(self, feats: torch.Tensor) -> torch.Tensor:
        """fairseq's dump_mfcc_feature.py: [mfcc, delta, delta-delta], deltas as torchaudio's compute_deltas.

        The streaming delta code run over the whole file: slices instead of compute_deltas' grouped conv1d,
        which is several times slower on 13 channels; the tests check both give the same numbers.
        """
        if not self.deltas:
            return feats
        return _WithDeltas(self.num_ceps).push(feats, final=True)


class LogMel(_Extractor):
    """log(mel power + 1e-6) at 75 Hz for BEST-RQ: 128 HTK mels, 2048-sample periodic Hann window."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        hop: int = HOP,
        n_fft: int = 2048,
        n_mels: int = 128,
        log_offset: float = 1e-6,
    ) -> None:
        self.sample_rate, self.hop, self.win, self.n_fft = sample_rate, hop, n_fft, n_fft
        self.n_mels, self.log_offset, self.base_dim, self.dim = n_mels, log_offset, n_mels, n_mels
        self.window = torch.hann_window(n_fft, periodic=True)
        self.mel_banks = torchaudio.functional.melscale_fbanks(
            n_fft // 2 + 1, 0.0, sample_rate / 2.0, n_mels, sample_rate, norm=None, mel_scale="htk"
        ).contiguous()  # (n_fft // 2 + 1, n_mels)

    def config(self) -> dict[str, Any]:
        return {
            "kind": "log_mel",
            "sample_rate": self.sample_rate,
            "hop": self.hop,
            "n_fft": self.n_fft,
            "window": "hann_periodic",
            "n_mels": self.n_mels,
            "mel_scale": "htk",
            "f_min": 0.0,
            "f_max": self.sample_rate / 2.0,
            "power": 2.0,
            "log_offset": self.log_offset,
            "alignment": "centre of hop i = i*hop + hop//2, mirrored edges, ceil(n/hop) frames",
        }

    def _frame_features(self, windows: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(windows * self.window)
        power = spectrum.real.square() + spectrum.imag.square()
        return (power @ self.mel_banks).add_(self.log_offset).log_()


C1_HZ = 440.0 * 2.0 ** ((24 - 69) / 12)  # 32.70 Hz, MIDI note 24: where MERT's CQT target starts
C2_HZ = 2.0 * C1_HZ  # 65.41 Hz: where the music k-means teacher's CQT starts
_DENSE_FFT = 1024  # octaves whose kernels fit a sub-window this long are computed exactly from its FFT
_SUPPORT = 1e-5  # a long kernel's spectrum is kept where it is above this fraction of its peak


class LogCQT(_Extractor):
    """log(CQT magnitude + 1e-4) at 75 Hz, the music k-means teacher's features: by default 24 bins an
    octave over 7 octaves from C2 (65.4 Hz to 8.1 kHz), 168 dims, chosen by measurement
    (benchmarks/music_features.py, RESULTS.md): the k-means labels of these hold the most about the pitch
    class of notes of unseen instruments (0.78 of its entropy, MFCC's 0.31; more than 12 bins an octave or
    either mixed with MFCC) and about as much about their instrument family as MFCC's.

    The kernels are nnAudio's CQT1992v2 (and librosa's): bin k at ``fmin * 2 ** (k / bins_per_octave)``
    Hz, a periodic Hann window of ``ceil(Q * 24000 / f_k)`` samples with
    ``Q = 1 / (2 ** (1 / bins_per_octave) - 1)``, L1-normalised, centred in the frame; the magnitudes are
    CQT1992v2's ``normalization_type="wrap"``: a sinusoid of amplitude a reads a in its bin. The window is
    the longest kernel's power of two (16384 samples, 0.68 s, by default), centred on sample
    ``i * 320 + 160`` like every feature here, with the same mirrored edges.

    Why by FFT: the lowest kernel is 12,523 samples long, so a time-domain convolution (nnAudio's) costs
    that many multiply-adds per bin and frame. By Parseval a frame's inner product with a kernel is that
    of their spectra, and a long kernel is narrow-band: its spectrum is kept where it is above 1e-5 of its
    peak, a few hundred to about a thousand FFT bins an octave, so one 16384-point FFT and a small matrix
    product per octave replace the convolution (within 1e-3 of the exact magnitudes, relative). Short
    kernels (the top three octaves) end on a relatively larger step of the periodic window, so their
    spectra decay slowly: each such octave is computed exactly from the FFT of a centred sub-window its
    kernels fit (1024, 512 and 256 samples). About 400x real time on one core (RESULTS.md).
    """

    chunk_frames = 128  # 16384-sample windows: 8 MB of FFT input a step, and faster than 512 frames

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        hop: int = HOP,
        fmin: float = C2_HZ,
        octaves: int = 7,
        bins_per_octave: int = 24,
        log_offset: float = 1e-4,
    ) -> None:
        if octaves < 1 or bins_per_octave < 1 or not 0 < fmin * 2.0**octaves <= sample_rate / 2:
            raise ValueError(
                f"a CQT of {octaves} octaves from {fmin:g} Hz must end below Nyquist ({sample_rate / 2:g} Hz)"
            )
        self.sample_rate, self.hop, self.fmin = sample_rate, hop, fmin
        self.octaves, self.bins_per_octave, self.log_offset = octaves, bins_per_octave, log_offset
        self.base_dim = self.dim = octaves * bins_per_octave
        self.n_fft, self._plan = _cqt_plan(sample_rate, fmin, octaves, bins_per_octave)
        self.win = self.n_fft

    def config(self) -> dict[str, Any]:
        return {
            "kind": "cqt",
            "sample_rate": self.sample_rate,
            "hop": self.hop,
            "n_fft": self.n_fft,
            "fmin": self.fmin,
            "octaves": self.octaves,
            "bins_per_octave": self.bins_per_octave,
            "kernels": "nnAudio CQT1992v2: periodic hann, L1 norm, wrap scaling (amplitude a reads a)",
            "support": _SUPPORT,
            "dense_fft": _DENSE_FFT,
            "log_offset": self.log_offset,
            "alignment": "centre of hop i = i*hop + hop//2, mirrored edges, ceil(n/hop) frames",
        }

    def magnitudes(self, windows: torch.Tensor) -> torch.Tensor:
        """(frames, win) windows -> (frames, bins) CQT magnitudes."""
        frames = windows.shape[0]
        out = windows.new_empty((frames, self.dim))
        for size, blocks in self._plan.items():
            start = (self.win - size) // 2
            spectrum = torch.view_as_real(torch.fft.rfft(windows[:, start : start + size]))
            for lo, hi, matrix, first in blocks:
                parts = (spectrum[:, lo:hi].reshape(frames, -1) @ matrix).view(frames, -1, 2)
                out[:, first : first + parts.shape[1]] = torch.linalg.vector_norm(parts, dim=2)
        return out

    def _frame_features(self, windows: torch.Tensor) -> torch.Tensor:
        return self.magnitudes(windows).add_(self.log_offset).log_()


@functools.cache
def _cqt_plan(
    sample_rate: int, fmin: float, octaves: int, bins_per_octave: int
) -> tuple[int, dict[int, list[tuple[int, int, torch.Tensor, int]]]]:
    """The window (the longest kernel's power of two) and, per FFT size, each octave's (first FFT bin, last
    + 1, real matrix, first output bin); built once per process (0.1 s), read-only after."""
    freqs = fmin * 2.0 ** (np.arange(octaves * bins_per_octave) / bins_per_octave)
    q = 1.0 / (2.0 ** (1.0 / bins_per_octave) - 1.0)
    lengths = np.ceil(q * sample_rate / freqs).astype(np.int64)
    n_fft = _next_pow2(int(lengths.max()))
    plan: dict[int, list[tuple[int, int, torch.Tensor, int]]] = {}
    for first in range(0, len(freqs), bins_per_octave):
        block = slice(first, first + bins_per_octave)
        size = _next_pow2(int(lengths[block].max()))
        dense = size <= _DENSE_FFT
        size = size if dense else n_fft
        spectra = _cqt_kernel_spectra(freqs[block], lengths[block], size, sample_rate)
        if dense:
            lo, hi = 0, spectra.shape[1]
        else:
            magnitude = np.abs(spectra).max(axis=2)  # (bins, fft bins)
            kept = np.flatnonzero((magnitude >= _SUPPORT * magnitude.max(axis=1, keepdims=True)).any(0))
            lo, hi = int(kept[0]), int(kept[-1]) + 1
        plan.setdefault(size, []).append((lo, hi, _real_matrix(spectra, size, lo, hi), first))
    return n_fft, plan


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cqt_kernel_spectra(freqs: np.ndarray, lengths: np.ndarray, size: int, sample_rate: int) -> np.ndarray:
    """rfft of the real and imaginary parts of nnAudio's CQT kernels centred in `size` samples:
    complex (bins, size // 2 + 1, 2), float64."""
    kernels = np.zeros((len(freqs), size), dtype=np.complex128)
    for row, (freq, length) in enumerate(zip(freqs, lengths.tolist(), strict=True)):
        start = math.ceil(size / 2 - length / 2) - length % 2  # nnAudio's centring
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / length)  # periodic Hann
        kernel = window * np.exp(2j * np.pi * np.arange(-length // 2, length // 2) * freq / sample_rate)
        kernels[row, start : start + length] = kernel / np.abs(kernel).sum()
    return np.stack([np.fft.rfft(kernels.real), np.fft.rfft(kernels.imag)], axis=2)


def _real_matrix(spectra: np.ndarray, size: int, lo: int, hi: int) -> torch.Tensor:
    """The real matrix taking a frame's rfft bins [lo, hi), as interleaved (re, im) pairs, to its inner
    products with the kernels' real and imaginary parts, interleaved per kernel, times 2 (wrap scaling).

    For real x and a real kernel part a: sum_n x a = (1 / N) sum over all N bins of X conj(A) = sum over the
    rfft bins of w (Re X Re A + Im X Im A), with w = 1 / N at DC and Nyquist and 2 / N elsewhere."""
    weight = np.full(size // 2 + 1, 2.0 / size)
    weight[0] = weight[-1] = 1.0 / size
    spectra = spectra[:, lo:hi] * weight[lo:hi, None]
    matrix = np.empty((hi - lo, 2, spectra.shape[0], 2))
    for part in range(2):  # the kernel's real part, then its imaginary part
        matrix[:, 0, :, part] = spectra[:, :, part].real.T
        matrix[:, 1, :, part] = spectra[:, :, part].imag.T
    return torch.from_numpy(2.0 * matrix.reshape(2 * (hi - lo), -1)).float()


SIGNAL_KINDS = ("mfcc", "log_mel", "cqt")  # the signal features, by the `kind` of their config()


def make_extractor(kind: str) -> MFCC | LogMel | LogCQT:
    """The default extractor of a kind: what `features --kind KIND` stores and the k-means teacher
    recomputes for centroids fitted on it."""
    extractors: dict[str, type[MFCC | LogMel | LogCQT]] = {"mfcc": MFCC, "log_mel": LogMel, "cqt": LogCQT}
    if kind not in extractors:
        raise ValueError(f"signal feature kind must be one of {', '.join(SIGNAL_KINDS)}, not {kind!r}")
    return extractors[kind]()


def mfcc(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    """39-dim MFCC features (T, 39) of one 24 kHz mono file with the default `MFCC` settings."""
    return _default_mfcc()(waveform)


def log_mel(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    """128-dim log-mel features (T, 128) of one 24 kHz mono file with the default `LogMel` settings."""
    return _default_log_mel()(waveform)


@functools.cache
def _default_mfcc() -> MFCC:
    return MFCC()


@functools.cache
def _default_log_mel() -> LogMel:
    return LogMel()


# --------------------------------------------------------------------------------------------------
# BEST-RQ
# --------------------------------------------------------------------------------------------------


class RunningStats:
    """Per-dimension count, mean and sum of squared deviations (M2), in float64, one pass, mergeable.

    Chan et al.'s pairwise update: each batch's own mean and M2 are combined with the running ones, which
    is numerically stable (no sum of squares minus square of sums) and lets workers merge their partial
    statistics in any grouping with the same result up to rounding.
    """

    _ROWS = 1 << 16  # rows converted to float64 at a time

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._m2 = np.zeros(dim, dtype=np.float64)

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def update(self, x: np.ndarray) -> RunningStats:
        """Add frames x shaped (N, dim)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected frames shaped (N, {self.dim}), got {x.shape}")
        for start in range(0, len(x), self._ROWS):
            block = x[start : start + self._ROWS].astype(np.float64)
            mean = block.mean(axis=0)
            block -= mean
            self._combine(len(block), mean, np.einsum("ij,ij->j", block, block))
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another worker's statistics (of disjoint frames) into these."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self._combine(other.count, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no frames seen")
        return self._mean.copy()

    @property
    def var(self) -> np.ndarray:
        """Population variance (divides by N): the statistic that normalises the frames themselves."""
        if self.count == 0:
            raise ValueError("no frames seen")
        return self._m2 / self.count

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def save(self, path: Path | str) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, count=np.int64(self.count), mean=self._mean, m2=self._m2)

    @classmethod
    def load(cls, path: Path | str) -> RunningStats:
        with np.load(path) as data:
            stats = cls(int(data["mean"].shape[0]))
            stats.count = int(data["count"])
            stats._mean = data["mean"].astype(np.float64)
            stats._m2 = data["m2"].astype(np.float64)
        return stats
