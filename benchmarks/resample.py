"""Benchmark of resampling: resampler quality and speed side by side, then the stage's cost per core.

Run from the repository root:

    /tmp/v1/bin/python benchmarks/resample.py             # the figures in benchmarks/RESULTS.md
    /tmp/v1/bin/python benchmarks/resample.py --quick     # shorter signals, a sanity run

Part 1, resamplers (44.1 kHz -> 24 kHz and 48 kHz -> 24 kHz, float64 analysis of float32 output):

- soxr HQ and VHQ (`soxr.resample`, the library the stage streams with),
- torchaudio `functional.resample` with its defaults (Hann-windowed sinc, width 6, rolloff 0.99) and
  with librosa's "kaiser_best" settings (width 64, rolloff 0.9476, Kaiser beta 14.77),
- scipy `signal.resample_poly` with its default Kaiser(5.0) window.

Quality, from pure tones through each resampler (tones fitted by least squares away from the edges):

- passband: the largest gain deviation in dB for tones from 20 Hz to 10 kHz (the ripple), and the gain
  at 11 kHz (92% of the output Nyquist), where a gentle filter starts to roll off;
- aliasing: input tones from 12.5 kHz up to the input Nyquist must vanish (the output holds nothing at
  their frequency or their alias); the worst output level in dB relative to the input tone;
- agreement: RMS difference from soxr VHQ on a synthesized music track, in dB below the signal RMS.

Speed: x-real-time of resampling a mono music track, one thread, median of 5.

Part 2, the stage's cost per core: music-like tracks at 44.1 kHz stereo as FLAC PCM_16 and OGG Vorbis.
x-real-time of decoding alone (libsndfile, `BLOCK_FRAMES` blocks into a reused buffer) against the
stage's whole per-file path (`resample_file`: decode, downmix, soxr HQ, quantize, FLAC encode), one
process, medians of 7 interleaved repeats, warm cache. The issue's goal: the stage costs at most 2x
decoding alone. The last columns add what the stage also does to each FLAC it encodes: a seek table of
its frames for `shard` (`flac_frames.add_seektable`: one checked scan and a rewrite of the file).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.signal  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402
import torchaudio.functional as AF  # noqa: E402

from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.flac_frames import add_seektable  # noqa: E402
from mert_pipeline.resample import BLOCK_FRAMES, OutputSpec, resample_file  # noqa: E402

torch.set_num_threads(1)
Resampler = Callable[[np.ndarray, int, int], np.ndarray]


def _torch(**kw: float | int | str) -> Resampler:
    def run(x: np.ndarray, src: int, dst: int) -> np.ndarray:
        return AF.resample(torch.from_numpy(x), src, dst, **kw).numpy()

    return run


METHODS: dict[str, Resampler] = {
    "soxr HQ": lambda x, src, dst: soxr.resample(x, src, dst, "HQ"),
    "soxr VHQ": lambda x, src, dst: soxr.resample(x, src, dst, "VHQ"),
    "torchaudio default": _torch(),
    "torchaudio kaiser_best": _torch(
        lowpass_filter_width=64,
        rolloff=0.9475937167399596,
        resampling_method="sinc_interp_kaiser",
        beta=14.769656459379492,
    ),
    "scipy resample_poly": lambda x, src, dst: scipy.signal.resample_poly(
        x, dst // np.gcd(src, dst), src // np.gcd(src, dst)
    ).astype(np.float32),
}


def tone_gain(method: Resampler, freq: float, src: int, dst: int, seconds: float) -> float:
    """Output level (dB re input) at the tone's own frequency or, above the output Nyquist, the worst of
    the tone's frequency and its alias, fitted on the middle 80% of the output."""
    n = int(src * seconds)
    t = np.arange(n) / src
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    y = method(x, src, dst).astype(np.float64)
    ty = np.arange(len(y)) / dst
    keep = slice(len(y) // 10, len(y) - len(y) // 10)
    candidates = [freq] if freq < dst / 2 else [abs(dst * round(freq / dst) - freq)]
    level = 0.0
    for f in candidates:
        basis = np.stack([np.sin(2 * np.pi * f * ty[keep]), np.cos(2 * np.pi * f * ty[keep])], axis=1)
        coef, *_ = np.linalg.lstsq(basis, y[keep], rcond=None)
        level = max(level, float(np.hypot(*coef)))
    if freq >= dst / 2:  # everything left in the output is leakage: take the larger of fit and RMS
        level = max(level, float(np.sqrt(2 * np.mean(y[keep] ** 2))))
    return 20 * np.log10(max(level, 1e-12) / 0.5)


def quality(method: Resampler, src: int, dst: int, seconds: float) -> dict[str, float]:
    passband = [tone_gain(method, f, src, dst, seconds) for f in np.geomspace(20, 10000, 25)]
    stopband_freqs = np.linspace(dst / 2 + 500, src / 2 - 50, 12)
    stopband = [tone_gain(method, f, src, dst, seconds) for f in stopband_freqs]
    return {
        "ripple_db": max(abs(g) for g in passband),
        "gain_11k_db": tone_gain(method, 11000, src, dst, seconds),
        "alias_db": max(stopband),
    }


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part1(seconds: float, music_seconds: float) -> None:
    print(f"\n## Resamplers (tones {seconds:g} s, music {music_seconds:g} s, one thread)\n")
    for src in (44100, 48000):
        dst = 24000
        music = render_track(11, music_seconds, src, 1).astype(np.float32)
        reference = METHODS["soxr VHQ"](music, src, dst).astype(np.float64)
        print(f"### {src} Hz -> {dst} Hz\n")
        print(
            "| method | max gain error 20 Hz-10 kHz (dB) | gain at 11 kHz (dB) | worst alias (dB) "
            "| diff vs soxr VHQ (dB) | x real time | output length |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, method in METHODS.items():
            q = quality(method, src, dst, seconds)
            y = method(music, src, dst).astype(np.float64)
            n = min(len(y), len(reference))
            diff = np.sqrt(np.mean((y[:n] - reference[:n]) ** 2)) / np.sqrt(np.mean(reference[:n] ** 2))
            diff_db = 20 * np.log10(max(diff, 1e-12))
            secs = timed(lambda m=method, x=music, a=src, b=dst: m(x, a, b), 5)
            print(
                f"| {name} | {q['ripple_db']:.5f} | {q['gain_11k_db']:.3f} | {q['alias_db']:.1f} | "
                f"{diff_db:.1f} | {music_seconds / secs:.0f}x | {len(y)} |"
            )
        print()


def decode_only(path: Path) -> None:
    with sf.SoundFile(path) as handle:
        buffer = np.empty((BLOCK_FRAMES, handle.channels), dtype=np.float32)
        while len(handle.read(BLOCK_FRAMES, dtype="float32", always_2d=True, out=buffer)):
            pass


def write_blocks(path: Path, audio: np.ndarray, sr: int, fmt: str, subtype: str) -> None:
    with sf.SoundFile(path, "w", sr, audio.shape[1], subtype, format=fmt) as handle:
        for i in range(0, len(audio), 8192):  # libvorbis crashes on very large single writes
            handle.write(audio[i : i + 8192])


def part2(tracks: int, seconds: float, workdir: Path, repeats: int) -> None:
    print(f"\n## Stage cost per core ({tracks} tracks x {seconds:g} s, 44.1 kHz stereo, one process)\n")
    sources: dict[str, list[Path]] = {"FLAC PCM_16": [], "OGG Vorbis": []}
    for i in range(tracks):
        audio = render_track(100 + i, seconds, 44100, 2)
        for label, fmt, subtype, ext in (
            ("FLAC PCM_16", "FLAC", "PCM_16", "flac"),
            ("OGG Vorbis", "OGG", "VORBIS", "ogg"),
        ):
            path = workdir / f"t{i}.{ext}"
            write_blocks(path, audio, 44100, fmt, subtype)
            sources[label].append(path)
    total = tracks * seconds
    print(
        "| input | decode alone x RT | stage HQ x RT | stage VHQ x RT | stage HQ / decode time "
        "| HQ + seek table x RT | HQ + seek table / decode time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, paths in sources.items():
        # Interleaved repeats (decode, HQ, VHQ, decode, ...) so a burst of load on this shared machine
        # hits all three alike; medians, and the ratio as the median of the per-repeat ratios.
        runs: dict[str, list[float]] = {"decode": [], "HQ": [], "VHQ": [], "HQ+table": []}
        for _ in range(repeats):
            runs["decode"].append(timed(lambda paths=paths: [decode_only(p) for p in paths], 1))
            for name in ("HQ", "VHQ", "HQ+table"):
                spec = OutputSpec(quality=name.split("+")[0])

                def run(
                    paths: list[Path] = paths, spec: OutputSpec = spec, table: bool = "+" in name
                ) -> None:
                    for p in paths:
                        resample_file(str(p), workdir / "out.flac", spec)
                        if table:  # what the stage adds to each FLAC it encodes (for `shard`)
                            add_seektable(workdir / "out.flac")

                runs[name].append(timed(run, 1))
        decode, hq, vhq, tabled = (statistics.median(runs[k]) for k in ("decode", "HQ", "VHQ", "HQ+table"))
        ratio = statistics.median(h / d for h, d in zip(runs["HQ"], runs["decode"], strict=True))
        ratio_t = statistics.median(h / d for h, d in zip(runs["HQ+table"], runs["decode"], strict=True))
        print(
            f"| {label} | {total / decode:.0f}x | {total / hq:.0f}x | {total / vhq:.0f}x | {ratio:.2f}x "
            f"| {total / tabled:.0f}x | {ratio_t:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter signals, fewer tracks")
    args = parser.parse_args()
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"soxr {soxr.__version__}, "
        f"torch {torch.__version__}, torchaudio {torchaudio.__version__}, scipy {scipy.__version__}, "
        f"libsndfile {sf.__libsndfile_version__}"
    )
    part1(seconds=0.5 if args.quick else 2.0, music_seconds=10.0 if args.quick else 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        part2(
            tracks=2 if args.quick else 6,
            seconds=20.0 if args.quick else 120.0,
            workdir=Path(tmp),
            repeats=3 if args.quick else 7,
        )


if __name__ == "__main__":
    main()
