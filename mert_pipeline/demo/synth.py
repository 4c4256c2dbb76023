"""Deterministic synthesizer for a small, music-like demo corpus.

No audio blobs are committed to git, yet the demo and the tests need a realistic music collection:
nested artist/album folders, a mix of formats (FLAC, WAV, OGG Vorbis), sample rates, channel counts,
awkward file names, plus a few deliberately broken files that the pipeline must reject.

The audio is "music-like" on purpose so that downstream pitch / timbre / beat teachers have structure
to learn from: every track has a tempo, a key and mode, a chord progression, a bass line, a melody built
from repeating motifs, and a drum kit. Instruments use different synthesis methods (additive wavetables,
FM, Karplus-Strong plucked strings) so their timbres really differ, and for multichannel output every
instrument is panned to its own position so channels are not copies of each other.

Everything is a pure function of its arguments: the only randomness is ``numpy.random.default_rng(seed)``,
so the same arguments give bit-identical samples (on the same platform / numpy build) and byte-identical
FLAC and WAV files. OGG Vorbis bytes differ on every write (random Ogg serial number) but decode identically.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "TrackSpec",
    "plan_corpus",
    "render_track",
    "synthesize_demo_corpus",
    "write_bad_files",
    "write_edge_cases",
    "write_corpus",
]

_EXTENSIONS: dict[str, str] = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg"}

# Scale modes as semitone offsets of the 7 scale degrees.
_MODES: tuple[tuple[int, ...], ...] = (
    (0, 2, 4, 5, 7, 9, 11),  # major
    (0, 2, 3, 5, 7, 8, 10),  # natural minor
    (0, 2, 3, 5, 7, 9, 10),  # dorian
    (0, 2, 4, 5, 7, 9, 10),  # mixolydian
)
# Chord progressions as scale-degree roots, one chord per bar.
_PROGRESSIONS: tuple[tuple[int, ...], ...] = (
    (0, 4, 5, 3),
    (0, 5, 3, 4),
    (5, 3, 0, 4),
    (0, 3, 4, 0),
    (0, 3, 5, 4),
    (1, 4, 0, 0),
)
# Bass patterns within one 16-step bar: (step, duration in steps, scale-degree offset from chord root).
_BASS_PATTERNS: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((0, 4, 0), (4, 4, 0), (8, 4, 4), (12, 4, 0)),
    ((0, 6, 0), (6, 2, 0), (8, 6, 4), (14, 2, 7)),
    ((0, 2, 0), (2, 2, 7), (4, 2, 0), (6, 2, 7), (8, 2, 0), (10, 2, 7), (12, 2, 4), (14, 2, 7)),
    ((0, 8, 0), (8, 6, 4), (14, 2, 2)),
)
_KICK_PATTERNS: tuple[tuple[int, ...], ...] = ((0, 8), (0, 6, 8), (0, 8, 10), (0, 4, 8, 12))
_SNARE_PATTERNS: tuple[tuple[int, ...], ...] = ((4, 12), (4, 12, 15), (4, 10, 12))


# --------------------------------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Instrument:
    """Synthesis recipe; one tone per pitch is rendered once and reused, like a sampler."""

    kind: str  # "additive" | "fm" | "pluck"
    attack: float
    decay: float
    sustain: float
    release: float
    tilt: float = 1.0  # additive: amplitude of partial k ~ k**-tilt
    n_partials: int = 8
    odd_only: bool = False  # additive: clarinet-like hollow spectrum
    darkening: float = 0.3  # additive: how strongly upper partials fade over time
    bright_tau: float = 0.3  # additive: time constant of that fade (s)
    detune_cents: float = 0.0  # additive: second detuned oscillator (chorus) when > 0
    fm_ratio: float = 1.0
    fm_index: float = 2.0
    fm_tau: float = 0.3
    t60: float = 1.0  # pluck: decay time to -60 dB (s)
    brightness: float = 0.5  # pluck: 1 = raw noise excitation, 0 = heavily smoothed


_MELODY_INSTRUMENTS: tuple[_Instrument, ...] = (
    _Instrument("additive", 0.03, 0.10, 0.8, 0.08, tilt=1.8, n_partials=6, darkening=0.2),  # flute-ish
    _Instrument("additive", 0.02, 0.08, 0.85, 0.06, tilt=1.0, n_partials=11, odd_only=True),  # clarinet
    _Instrument("fm", 0.004, 0.30, 0.45, 0.15, fm_ratio=1.0, fm_index=2.5, fm_tau=0.25),  # e-piano
    _Instrument("fm", 0.002, 0.60, 0.25, 0.30, fm_ratio=3.5, fm_index=1.8, fm_tau=0.4),  # bell
    _Instrument("pluck", 0.002, 0.0, 1.0, 0.05, t60=1.2, brightness=0.75),  # plucked string
)
_BASS_INSTRUMENTS: tuple[_Instrument, ...] = (
    _Instrument("pluck", 0.002, 0.0, 1.0, 0.06, t60=1.6, brightness=0.4),
    _Instrument("fm", 0.005, 0.20, 0.6, 0.06, fm_ratio=1.0, fm_index=1.5, fm_tau=0.15),
    _Instrument("additive", 0.005, 0.15, 0.7, 0.06, tilt=1.0, n_partials=10, darkening=0.5, bright_tau=0.15),
)
_CHORD_INSTRUMENTS: tuple[tuple[str, _Instrument], ...] = (
    (
        "pad",
        _Instrument("additive", 0.25, 0.5, 0.7, 0.4, tilt=1.3, n_partials=8, darkening=0.1, detune_cents=7),
    ),
    ("stab", _Instrument("fm", 0.005, 0.25, 0.35, 0.12, fm_ratio=2.0, fm_index=1.2, fm_tau=0.2)),
    ("arp", _Instrument("pluck", 0.002, 0.0, 1.0, 0.08, t60=0.8, brightness=0.6)),
)


def _midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


_PHASE_BITS = 20  # fractional bits of the fixed-point wavetable phase accumulator


def _table_lookup(tables: np.ndarray, freq: float, n: int, sr: int) -> list[np.ndarray]:
    """Linear-interpolated wavetable oscillators (one per row of tables, size 2**k + 1 with wrap).

    Far cheaper than one np.sin per partial per sample; the fixed-point integer phase avoids a slow
    floating-point modulo and never loses precision on long notes.
    """
    size = tables.shape[-1] - 1
    acc = np.arange(n, dtype=np.int64)
    acc *= int(round(freq * size / sr * (1 << _PHASE_BITS)))
    idx = (acc >> _PHASE_BITS) & (size - 1)
    frac = (acc & ((1 << _PHASE_BITS) - 1)).astype(np.float64)
    frac *= 1.0 / (1 << _PHASE_BITS)
    slopes = np.diff(tables, axis=-1)
    out: list[np.ndarray] = []
    for table, slope in zip(tables, slopes, strict=True):
        y = slope.take(idx)
        y *= frac
        y += table.take(idx)
        out.append(y)
    return out


def _additive_tone(inst: _Instrument, freq: float, n: int, sr: int) -> np.ndarray:
    """Harmonic partials whose upper harmonics fade (bright attack, darker sustain)."""
    k_max = max(1, min(inst.n_partials, int(0.45 * sr / freq)))
    k = np.arange(1, k_max + 1, dtype=np.float64)
    bright = k**-inst.tilt
    if inst.odd_only:
        bright[1::2] *= 0.08
    dark = bright * np.exp(-inst.darkening * (k - 1.0))
    size = 2048
    phase = np.arange(size + 1, dtype=np.float64) / size
    basis = np.sin(2.0 * np.pi * np.outer(k, phase))
    tables = np.stack([bright @ basis, dark @ basis]) / bright.sum()
    t = np.arange(n, dtype=np.float64) / sr
    mix = np.exp(-t / inst.bright_tau)
    b, d = _table_lookup(tables, freq, n, sr)
    y = d + (b - d) * mix
    if inst.detune_cents > 0:
        b2, d2 = _table_lookup(tables, freq * 2.0 ** (inst.detune_cents / 1200.0), n, sr)
        y = 0.6 * y + 0.4 * (d2 + (b2 - d2) * mix)
    return y


def _fm_tone(inst: _Instrument, freq: float, n: int, sr: int) -> np.ndarray:
    """Two-operator FM with a decaying index: metallic attack that mellows, like an e-piano/bell."""
    t = np.arange(n, dtype=np.float64) / sr
    fm = freq * inst.fm_ratio
    # Carson's rule: keep most sideband energy below Nyquist to avoid harsh aliasing.
    max_index = max(0.0, (0.45 * sr - freq) / fm - 1.0)
    index0 = min(inst.fm_index, max_index)
    index = index0 * (0.25 + 0.75 * np.exp(-t / inst.fm_tau))
    return np.sin(2.0 * np.pi * freq * t + index * np.sin(2.0 * np.pi * fm * t))


def _pluck_tone(inst: _Instrument, freq: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong string, computed one delay-line period at a time with numpy slices.

    y[i] = rho * (h0 y[i-N] + h1 y[i-N-1] + h2 y[i-N-2]) only depends on samples at least N back, so a
    whole block of N samples is one vector operation instead of a per-sample Python loop. The 3-tap
    loop filter is the classic two-point average convolved with a linear-interpolation fractional
    delay, so the loop length is N + 0.5 + w exactly and notes are in tune, not rounded to whole samples.
    """
    loop = sr / freq
    period = max(2, int(math.floor(loop - 0.5)))
    w = min(max(loop - 0.5 - period, 0.0), 1.0)
    rho = 10.0 ** (-3.0 / (freq * inst.t60))  # per pass through the loop: -60 dB after t60 seconds
    h0, h1, h2 = 0.5 * (1.0 - w) * rho, 0.5 * rho, 0.5 * w * rho
    excitation = rng.uniform(-1.0, 1.0, period + 2)
    width = 1 + int(round((1.0 - inst.brightness) * 6))
    if width > 1:
        excitation = np.convolve(excitation, np.ones(width) / width, mode="same")
    excitation -= excitation.mean()
    excitation /= max(float(np.abs(excitation).max()), 1e-9)
    y = np.zeros(n, dtype=np.float64)
    head = min(n, period + 2)
    y[:head] = excitation[:head]
    start = period + 2
    while start < n:
        stop = min(start + period, n)
        back = start - period
        seg = y[start:stop]
        np.multiply(y[back : back + stop - start], h0, out=seg)
        seg += h1 * y[back - 1 : stop - period - 1]
        seg += h2 * y[back - 2 : stop - period - 2]
        start = stop
    return y


def _render_tone(inst: _Instrument, midi: int, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    freq = _midi_to_hz(midi)
    if inst.kind == "additive":
        return _additive_tone(inst, freq, n, sr)
    if inst.kind == "fm":
        return _fm_tone(inst, freq, n, sr)
    return _pluck_tone(inst, freq, n, sr, rng)


def _adsr(inst: _Instrument, on: int, rel: int, sr: int) -> np.ndarray:
    """Attack/decay/sustain while the note is held, then a release from wherever the level is."""
    a = max(1.0, inst.attack * sr)
    d = max(1.0, inst.decay * sr)
    t = np.arange(on, dtype=np.float64)
    env_on = np.interp(t, [0.0, a, a + d], [0.0, 1.0, inst.sustain])
    level = float(np.interp(float(on), [0.0, a, a + d], [0.0, 1.0, inst.sustain]))
    env_off = level * (1.0 - np.arange(rel, dtype=np.float64) / max(rel, 1)) ** 2
    return np.concatenate([env_on, env_off])


def _render_tonal(
    inst: _Instrument,
    events: list[tuple[int, int, int, float]],
    frames: int,
    sr: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Mix note events (start sample, held samples, midi, velocity) of one instrument into a stem."""
    stem = np.zeros(frames, dtype=np.float64)
    rel = max(1, int(inst.release * sr))
    needed: dict[int, int] = {}
    for start, on, midi, _vel in events:
        if start < frames:
            needed[midi] = max(needed.get(midi, 0), min(on + rel, frames - start))
    tones = {midi: _render_tone(inst, midi, length, sr, rng) for midi, length in sorted(needed.items())}
    envelopes: dict[int, np.ndarray] = {}
    for start, on, midi, vel in events:
        if start >= frames:
            continue
        env = envelopes.get(on)
        if env is None:
            env = envelopes[on] = _adsr(inst, on, rel, sr)
        length = min(on + rel, frames - start)
        stem[start : start + length] += vel * tones[midi][:length] * env[:length]
    return stem


# --------------------------------------------------------------------------------------------------
# Drums
# --------------------------------------------------------------------------------------------------


def _band_noise(n: int, sr: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """White noise band-limited in the FFT domain: a vectorised stand-in for a bandpass filter."""
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    hi = min(hi, 0.49 * sr)
    lo = min(lo, 0.5 * hi)
    mask = 1.0 / (1.0 + (lo / np.maximum(freqs, 1.0)) ** 4) / (1.0 + (freqs / hi) ** 4)
    y = np.fft.irfft(spec * mask, n)
    return y / max(float(np.abs(y).max()), 1e-9)


def _kick(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Pitched-down sine sweep with a short click, the classic drum-machine kick."""
    n = int(0.35 * sr)
    t = np.arange(n, dtype=np.float64) / sr
    f_end = rng.uniform(40.0, 60.0)
    f_start = rng.uniform(120.0, 200.0)
    freq = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.02, 0.04))
    phase = 2.0 * np.pi * np.cumsum(freq) / sr
    body = np.sin(phase) * np.exp(-t / rng.uniform(0.08, 0.18))
    click = 0.3 * rng.uniform(-1.0, 1.0, n) * np.exp(-t / 0.003)
    return body + click


def _snare(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Short tonal body plus a mid/high filtered noise burst."""
    n = int(0.25 * sr)
    t = np.arange(n, dtype=np.float64) / sr
    body = 0.5 * np.sin(2.0 * np.pi * rng.uniform(170.0, 230.0) * t) * np.exp(-t / 0.04)
    noise = _band_noise(n, sr, 1000.0, 9000.0, rng) * np.exp(-t / rng.uniform(0.05, 0.09))
    return body + noise


def _hihat(sr: int, rng: np.random.Generator, open_: bool) -> np.ndarray:
    """High-passed noise; open hats ring longer than closed ones."""
    n = int((0.3 if open_ else 0.08) * sr)
    t = np.arange(n, dtype=np.float64) / sr
    tau = 0.08 if open_ else rng.uniform(0.01, 0.025)
    return _band_noise(n, sr, 6000.0, 16000.0, rng) * np.exp(-t / tau)


def _place(stem: np.ndarray, start: int, sample: np.ndarray, gain: float) -> None:
    if start < stem.shape[0]:
        length = min(sample.shape[0], stem.shape[0] - start)
        stem[start : start + length] += gain * sample[:length]


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


def _degree_to_midi(tonic: int, mode: tuple[int, ...], degree: int) -> int:
    return tonic + 12 * (degree // 7) + mode[degree % 7]


def _snap_to_chord(degree: int, root: int) -> int:
    """Move a melody degree to the nearest chord tone so strong beats sound consonant."""
    candidates = [root + x + 7 * o for o in range(-3, 4) for x in (0, 2, 4)]
    return min(candidates, key=lambda c: (abs(c - degree), c))


def _motif(rng: np.random.Generator, n_steps: int = 32) -> list[tuple[int, int, int]]:
    """A two-bar phrase (step, duration, degree) made by a mostly stepwise random walk."""
    notes: list[tuple[int, int, int]] = []
    pos = 0
    degree = int(rng.integers(0, 5))
    while pos < n_steps:
        dur = min(int(rng.choice([1, 2, 2, 2, 3, 4, 4, 6, 8])), n_steps - pos)
        if pos == 0 or rng.random() > 0.15:
            notes.append((pos, dur, degree))
        degree = int(np.clip(degree + int(rng.choice([-3, -2, -1, -1, 0, 1, 1, 2, 3])), -2, 9))
        pos += dur
    return notes


def _channel_gains(pans: np.ndarray, channels: int) -> np.ndarray:
    """(stems, channels) gains: each stem is loudest in the channels nearest its pan position."""
    if channels == 1:
        return np.ones((pans.shape[0], 1))
    positions = np.linspace(-1.0, 1.0, channels)
    gains = np.exp(-((positions[None, :] - pans[:, None]) ** 2) / (2.0 * 0.8**2))
    return gains / np.sqrt((gains**2).sum(axis=1, keepdims=True))


def render_track(seed: int, seconds: float, sample_rate: int, channels: int = 1) -> np.ndarray:
    """Render one deterministic, music-like track.

    Returns float32 samples shaped (frames,) for mono or (frames, channels), with
    frames == round(seconds * sample_rate) and a peak between 0.6 and 0.85. All musical choices
    (tempo, key, instruments, patterns, panning) come from ``numpy.random.default_rng(seed)``.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
    frames = int(round(seconds * sample_rate))
    sr = int(sample_rate)
    rng = np.random.default_rng(seed)

    tempo = float(round(rng.uniform(80.0, 160.0)))
    step_s = 60.0 / tempo / 4.0  # sixteenth notes
    tonic_pc = int(rng.integers(0, 12))
    mode = _MODES[int(rng.integers(len(_MODES)))]
    progression = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]
    melody_inst = _MELODY_INSTRUMENTS[int(rng.integers(len(_MELODY_INSTRUMENTS)))]
    bass_inst = _BASS_INSTRUMENTS[int(rng.integers(len(_BASS_INSTRUMENTS)))]
    chord_style, chord_inst = _CHORD_INSTRUMENTS[int(rng.integers(len(_CHORD_INSTRUMENTS)))]
    bass_pattern = _BASS_PATTERNS[int(rng.integers(len(_BASS_PATTERNS)))]
    kick_pattern = _KICK_PATTERNS[int(rng.integers(len(_KICK_PATTERNS)))]
    snare_pattern = _SNARE_PATTERNS[int(rng.integers(len(_SNARE_PATTERNS)))]
    sixteenth_hats = bool(rng.random() < 0.4)
    motifs = (_motif(rng), _motif(rng))
    # Stem order: kick, snare, hihat, bass, chords, melody.
    pans = np.array(
        [
            0.0,
            rng.uniform(-0.2, 0.2),
            rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.8),
            rng.uniform(-0.15, 0.15),
            rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.7),
            rng.uniform(-0.5, 0.5),
        ]
    )
    pans[5] = np.clip(pans[5] - 0.5 * np.sign(pans[4]), -0.8, 0.8)  # keep melody away from chords
    # Mix balance as RMS level (dB) per stem, so it does not depend on which instrument was drawn.
    stem_db = np.array([0.0, -6.0, -14.0, -3.0, -7.0, -2.0]) + rng.uniform(-2.0, 2.0, 6)
    target_peak = rng.uniform(0.6, 0.85)

    def at(step: float) -> int:
        return int(round(step * step_s * sr))

    n_steps = int(math.ceil(seconds / step_s)) + 1
    n_bars = (n_steps + 15) // 16
    bass_tonic = 36 + tonic_pc
    chord_tonic = 48 + tonic_pc
    melody_tonic = 60 + tonic_pc

    bass_ev: list[tuple[int, int, int, float]] = []
    chord_ev: list[tuple[int, int, int, float]] = []
    melody_ev: list[tuple[int, int, int, float]] = []
    kick_ev: list[tuple[int, float]] = []
    snare_ev: list[tuple[int, float]] = []
    hat_ev: list[tuple[int, float, bool]] = []
    vel_jitter = rng.uniform(0.85, 1.0, size=(n_bars, 4, 16))

    for bar in range(n_bars):
        s0 = 16 * bar
        root = progression[bar % len(progression)]
        jit = vel_jitter[bar]
        for step, dur, off in bass_pattern:
            midi = _degree_to_midi(bass_tonic, mode, root + off)
            bass_ev.append((at(s0 + step), at(s0 + step + dur * 0.9) - at(s0 + step), midi, jit[0, step]))
        voices = [_degree_to_midi(chord_tonic, mode, root + x) for x in (0, 2, 4)]
        voices = [m - 12 if m > 66 else m for m in voices]
        if chord_style == "pad":
            for m in voices:
                chord_ev.append((at(s0), at(s0 + 16) - at(s0), m, 0.8))
        elif chord_style == "stab":
            for step, dur in ((0, 5), (6, 5), (12, 3)):
                for m in voices:
                    chord_ev.append((at(s0 + step), at(s0 + step + dur) - at(s0 + step), m, jit[1, step]))
        else:
            arp = [*sorted(voices), sorted(voices)[0] + 12]
            for i, step in enumerate(range(0, 16, 2)):
                chord_ev.append((at(s0 + step), at(s0 + step + 2) - at(s0 + step), arp[i % 4], jit[1, step]))
        phrase = bar // 2
        motif = motifs[1] if phrase % 4 == 2 else motifs[0]
        for step, dur, degree in motif:
            if step // 16 != bar % 2:
                continue
            local = step % 16
            if local % 8 == 0:
                degree = _snap_to_chord(degree, root)
            midi = _degree_to_midi(melody_tonic, mode, degree)
            start = at(s0 + local)
            vel = (1.0 if local % 4 == 0 else 0.8) * jit[2, local]
            melody_ev.append((start, at(s0 + local + dur * 0.92) - start, midi, vel))
        fill = bar % 4 == 3
        for step in kick_pattern:
            kick_ev.append((at(s0 + step), jit[3, step]))
        for step in sorted({*snare_pattern, 13, 14, 15}) if fill else snare_pattern:
            snare_ev.append((at(s0 + step), (1.0 if step in snare_pattern else 0.6) * jit[3, step]))
        for step in range(0, 16, 1 if sixteenth_hats else 2):
            accent = 1.0 if step % 4 == 0 else 0.6
            hat_ev.append((at(s0 + step), accent * jit[3, step], (not fill) and step == 14))

    stems = np.zeros((6, frames), dtype=np.float64)
    kicks = [_kick(sr, rng) for _ in range(2)]
    snares = [_snare(sr, rng) for _ in range(3)]
    hats = [_hihat(sr, rng, open_=False) for _ in range(3)]
    open_hat = _hihat(sr, rng, open_=True)
    for i, (start, vel) in enumerate(kick_ev):
        _place(stems[0], start, kicks[i % 2], vel)
    for i, (start, vel) in enumerate(snare_ev):
        _place(stems[1], start, snares[i % 3], vel)
    for i, (start, vel, is_open) in enumerate(hat_ev):
        _place(stems[2], start, open_hat if is_open else hats[i % 3], vel)
    stems[3] = _render_tonal(bass_inst, bass_ev, frames, sr, rng)
    stems[4] = _render_tonal(chord_inst, chord_ev, frames, sr, rng)
    stems[5] = _render_tonal(melody_inst, melody_ev, frames, sr, rng)

    # Sources peak near 1 and play at RMS ~0.1-0.4; the 0.02 floor keeps a stem that is nearly silent
    # in a very short excerpt (a pad still in its attack) from being blown up to full level.
    rms = np.sqrt((stems**2).mean(axis=1)) if frames else np.zeros(6)
    stem_gain = 10.0 ** (stem_db / 20.0) / np.maximum(rms, 0.02)
    gains = _channel_gains(pans, channels) * stem_gain[:, None]
    mix = gains.T @ stems  # (channels, frames)
    fade = min(frames // 2, int(0.005 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        mix[:, :fade] *= ramp
        mix[:, frames - fade :] *= ramp[::-1]
    peak = float(np.abs(mix).max()) if frames else 0.0
    if peak > 0.0:
        mix *= target_peak / peak
    out = np.clip(mix, -0.99, 0.99).astype(np.float32)
    if channels == 1:
        return np.ascontiguousarray(out[0])
    return np.ascontiguousarray(out.T)


# --------------------------------------------------------------------------------------------------
# Corpus planning and writing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackSpec:
    """Everything needed to (re)create one corpus file; small and hashable so plans can be compared."""

    relpath: str
    seconds: float
    sample_rate: int
    channels: int
    format: str
    subtype: str
    seed: int

    @property
    def frames(self) -> int:
        """Exact frame count the written file must have (what render_track produces)."""
        return int(round(self.seconds * self.sample_rate))


# Cycled independently (5 and 7 are coprime) so formats meet many different sample rates.
_FORMAT_CYCLE: tuple[tuple[str, str], ...] = (
    ("FLAC", "PCM_16"),
    ("WAV", "PCM_16"),
    ("FLAC", "PCM_24"),
    ("OGG", "VORBIS"),
    ("WAV", "FLOAT"),
)
_RATE_CYCLE: tuple[int, ...] = (44100, 22050, 48000, 32000, 24000, 44100, 48000)
_SPACES_STEM = "The Night Shift/Live at the Hall/07 - Slow Burn (live)"
_UNICODE_STEM = "Café del Mar/naïve – 東京"


def plan_corpus(
    n_tracks: int = 24, seed: int = 0, min_seconds: float = 6.0, max_seconds: float = 20.0
) -> list[TrackSpec]:
    """Plan a deterministic, deliberately heterogeneous collection.

    The variety (rates incl. 24 kHz, mono/stereo/6-channel, FLAC 16/24, WAV PCM_16/FLOAT, OGG Vorbis,
    nested folders, a name with spaces and one with non-ASCII characters) exercises every branch of
    the ingest code: resampling, downmixing, format probing and path handling.
    """
    if n_tracks < 0:
        raise ValueError(f"n_tracks must be >= 0, got {n_tracks}")
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    rng = np.random.default_rng([seed, 0x5EED])
    base_seed = int(rng.integers(0, 2**31 - 1 - max(n_tracks, 1)))
    specs: list[TrackSpec] = []
    for i in range(n_tracks):
        fmt, subtype = _FORMAT_CYCLE[i % len(_FORMAT_CYCLE)]
        rate = _RATE_CYCLE[i % len(_RATE_CYCLE)]
        # Mono / stereo / random on a 3-cycle, so every format meets both layouts within 15 tracks.
        coin = 2 if rng.random() < 0.5 else 1
        channels = (1, 2, coin)[i % 3]
        if i == 6 and n_tracks >= 12:
            channels = 6
        seconds = min(max(round(float(rng.uniform(min_seconds, max_seconds)), 2), min_seconds), max_seconds)
        ext = _EXTENSIONS[fmt]
        if n_tracks >= 8 and i == 3:
            stem = _SPACES_STEM
        elif n_tracks >= 8 and i == 5:
            stem = _UNICODE_STEM
        elif i % 7 == 4:  # a few loose tracks directly in the artist folder
            stem = f"artist_{i // 5:02d}/track_{i % 5 + 1:02d}"
        else:
            stem = f"artist_{i // 5:02d}/album_{(i // 2) % 2 + 1}/track_{i % 5 + 1:02d}"
        specs.append(TrackSpec(stem + ext, seconds, rate, channels, fmt, subtype, base_seed + i))
    return specs


def _zero_wav_peak_timestamp(path: Path) -> None:
    """libsndfile stamps float WAVs' PEAK chunk with time(NULL); zero it so bytes are reproducible."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    changed = False
    while pos + 8 <= len(data):
        chunk_id = bytes(data[pos : pos + 4])
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk_id == b"PEAK" and size >= 8:
            data[pos + 12 : pos + 16] = b"\x00\x00\x00\x00"  # after the 4-byte version field
            changed = True
        if chunk_id == b"data":
            break
        pos += 8 + size + (size & 1)
    if changed:
        path.write_bytes(bytes(data))


def _ogg_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def _fix_ogg_serial(path: Path, serial: int) -> None:
    """libsndfile draws a random Ogg stream serial; set it from the seed and redo each page's CRC.

    The serial (bytes 14-17 of every page header) is the only random part, so after this the bytes
    are reproducible.
    """
    data = bytearray(path.read_bytes())
    pos = 0
    while pos + 27 <= len(data) and data[pos : pos + 4] == b"OggS":
        segments = data[pos + 26]
        length = 27 + segments + sum(data[pos + 27 : pos + 27 + segments])
        data[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        data[pos + 22 : pos + 26] = b"\x00\x00\x00\x00"
        crc = 0
        for byte in data[pos : pos + length]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
        data[pos + 22 : pos + 26] = crc.to_bytes(4, "little")
        pos += length
    path.write_bytes(bytes(data))


def write_corpus(root: Path, specs: list[TrackSpec]) -> list[Path]:
    """Render and write every planned track under root, returning the paths in spec order.

    Bytes are reproducible for every format, so the corpus (and every id derived from content hashes)
    is the same on every machine: float WAVs get their PEAK timestamp zeroed and OGG files a serial
    number from the seed instead of libsndfile's random one.
    """
    root = Path(root)
    paths: list[Path] = []
    for spec in specs:
        path = root / spec.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        audio = render_track(spec.seed, spec.seconds, spec.sample_rate, spec.channels)
        sf.write(path, audio, spec.sample_rate, format=spec.format, subtype=spec.subtype)
        if spec.format == "WAV":
            _zero_wav_peak_timestamp(path)
        elif spec.format == "OGG":
            _fix_ogg_serial(path, spec.seed & 0x7FFFFFFF)
        paths.append(path)
    return paths


def write_bad_files(root: Path) -> dict[str, str]:
    """Write broken inputs under root/bad/ that ingest must reject, mapped to the expected reason code."""
    root = Path(root)
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0xBAD)
    expected: dict[str, str] = {}

    (bad / "empty.wav").write_bytes(b"")
    expected["bad/empty.wav"] = "empty"

    text = "This is not audio, just text with a .wav name.\n" * 20
    (bad / "actually_text.wav").write_text(text, encoding="utf-8")
    expected["bad/actually_text.wav"] = "not_audio"

    noise = bytearray(rng.bytes(4096))
    noise[:4] = b"\x00\x01\x02\x03"  # never a valid container magic, whatever the RNG says
    (bad / "random_bytes.ogg").write_bytes(bytes(noise))
    expected["bad/random_bytes.ogg"] = "not_audio"

    buf = io.BytesIO()
    sf.write(buf, render_track(4242, 4.0, 22050, 1), 22050, format="FLAC", subtype="PCM_16")
    full = buf.getvalue()
    (bad / "truncated.flac").write_bytes(full[: len(full) // 3])  # STREAMINFO still claims all frames
    expected["bad/truncated.flac"] = "decode_error"

    sf.write(bad / "too_short.wav", render_track(4243, 0.01, 24000, 1), 24000, format="WAV", subtype="PCM_16")
    expected["bad/too_short.wav"] = "too_short"

    notes = "Liner notes: not an audio file, skipped by extension.\n"
    (bad / "notes.txt").write_text(notes, encoding="utf-8")
    expected["bad/notes.txt"] = "extension"
    return expected


def write_edge_cases(root: Path) -> dict[str, str]:
    """Write files under root/edge/ that a quick manifest probe accepts but whole-file decoding judges.

    Maps each relpath to what the resample stage must make of it: a reject reason (`non_finite`,
    `decode_error`), a flag it keeps the file with (`silent`, `clipped`), or `copied` for a file that
    already is 24 kHz mono 16-bit FLAC.
    """
    root = Path(root)
    edge = root / "edge"
    edge.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    sf.write(edge / "silence.flac", np.zeros(5 * 24000, dtype=np.int16), 24000, subtype="PCM_16")
    expected["edge/silence.flac"] = "silent"

    loud = np.clip(render_track(4244, 5.0, 44100, 2) * 8.0, -1.0, 1.0)  # hard-clipped master
    sf.write(edge / "clipped.wav", loud, 44100, format="WAV", subtype="PCM_16")
    expected["edge/clipped.wav"] = "clipped"

    nan_middle = render_track(4245, 5.0, 32000, 1).astype(np.float32)
    nan_middle[len(nan_middle) // 2] = np.nan  # the quick probe decodes only the edges
    sf.write(edge / "nan_middle.wav", nan_middle, 32000, format="WAV", subtype="FLOAT")
    _zero_wav_peak_timestamp(edge / "nan_middle.wav")
    expected["edge/nan_middle.wav"] = "non_finite"

    buf = io.BytesIO()
    sf.write(buf, render_track(4246, 8.0, 44100, 2), 44100, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # frames lost mid-file; header, head and tail intact
    (edge / "corrupt_middle.flac").write_bytes(bytes(data))
    expected["edge/corrupt_middle.flac"] = "decode_error"

    sf.write(edge / "already_24k.flac", render_track(4247, 4.0, 24000, 1), 24000, subtype="PCM_16")
    expected["edge/already_24k.flac"] = "copied"
    return expected


def write_near_duplicates(root: Path, track: Path) -> dict[str, str]:
    """Write two more copies of one recording under root/copies/, as collections hold them: a radio edit
    (the middle 60% of the track, as Ogg Vorbis) and a quieter 48 kHz remaster 0.1 s shorter. `dedup`
    keeps the original (the longest) and rejects both as `near_duplicate`: maps their relpaths to that."""
    root = Path(root)
    audio, rate = sf.read(track, dtype="float32", always_2d=True)
    copies = root / "copies"
    copies.mkdir(parents=True, exist_ok=True)
    start, stop = int(0.2 * len(audio)), int(0.8 * len(audio))
    edit = copies / f"{track.stem}_radio_edit.ogg"
    sf.write(edit, audio[start:stop], rate, format="OGG", subtype="VORBIS")
    _fix_ogg_serial(edit, 0x5EED)
    remaster = copies / f"{track.stem}_remaster.wav"
    quieter = soxr.resample(audio * 0.5, rate, 48000) if rate != 48000 else audio * 0.5
    sf.write(remaster, quieter[: int(len(audio) * 48000 / rate) - 4800], 48000, subtype="PCM_16")
    _zero_wav_peak_timestamp(remaster)
    return {f"copies/{edit.name}": "near_duplicate", f"copies/{remaster.name}": "near_duplicate"}


def synthesize_demo_corpus(
    root: Path,
    n_tracks: int = 24,
    seed: int = 0,
    with_bad_files: bool = True,
    with_edge_cases: bool = False,
    with_near_duplicates: bool = False,
) -> tuple[list[Path], dict[str, str]]:
    """One call for demos and tests: plan + write the corpus, optionally add the broken and edge files and
    two near-duplicate copies of the longest track.

    Returns the track paths and the expected outcome of each broken/edge/copied file by relpath.
    """
    root = Path(root)
    paths = write_corpus(root, plan_corpus(n_tracks=n_tracks, seed=seed))
    expected = write_bad_files(root) if with_bad_files else {}
    if with_edge_cases:
        expected.update(write_edge_cases(root))
    if with_near_duplicates:
        longest = max(paths, key=lambda path: (sf.info(path).duration, -paths.index(path)))
        expected.update(write_near_duplicates(root, longest))
    return paths, expected
