"""Which features should the music k-means teacher cluster? The label quality of k-means labels (k=100) of
candidate features on notes of instruments the fit never heard.

Run from the repository root (fluidsynth and the Fluid R3 soundfont on the machine: `apt-get install
fluidsynth fluid-soundfont-gm`, or the soundfont is fetched with `apt-get download`):

    .venv/bin/python benchmarks/music_features.py             # figures for benchmarks/RESULTS.md
    .venv/bin/python benchmarks/music_features.py --notes 6   # a quicker run

1. **Notes**: `--notes` notes of each of the 88 General MIDI instruments of benchmarks/learning_data.py
   (11 families x 8; pitches over three octaves, from MIDI 36 for the bass family and 48 for the others),
   rendered through the Fluid R3 soundfont by fluidsynth with that file's `render_notes` (2 s clips, the key
   held 1.5 s). Cached in --dir.
2. **Split by instrument**: k-means is fitted on the notes of the even-numbered programs and measured on
   the odd ones, four unseen instruments per family.
3. **Two conditions**: `held`, each note's clip on its own, the frames of the 1.5 s the key is held (113
   frames a note); `fast`, each instrument's notes cut to their first 0.25 s and spliced one after the
   other, every frame labelled by the note its centre falls in (so long analysis windows straddle note
   changes, as in real music).
4. **Candidates**: features from `mert_pipeline.teachers.features` (MFCC, `LogCQT` at 12 bins an octave
   from C1 and at 24 from C2, chroma folded from the 12-bin CQT), raw, or with each dimension standardised
   by the mean and std of the fit frames (what the features stage's statistics would give).
5. **Label quality**: k-means k=100 (`fit_kmeans`, faiss, seeds 0, 1, 2) on the fit frames; the held-out
   frames assigned to the centroids; per task, MI(label; class) / H(class) (`JointCounts`, as `kmeans
   report --probe-data` measures it), the mean over the seeds (their range is in the JSON, with purities).
6. **Speed** of each extractor on one core: a 2-minute concatenation of notes, best of 3, in x real time;
   beside them nnAudio's CQT1992v2 (the same kernels as time-domain convolutions) and CQT2010v2 (one
   octave's kernels on a signal halved octave by octave) with `LogCQT`'s settings, on 30 s.

Writes DIR/music_features.json and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import learning_data  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mert_pipeline.grid import num_frames  # noqa: E402
from mert_pipeline.teachers.features import C1_HZ, C2_HZ, MFCC, LogCQT  # noqa: E402
from mert_pipeline.teachers.kmeans import JointCounts, assign, fit_kmeans  # noqa: E402

SYSTEM_FONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
HELD = num_frames(int(1.5 * learning_data.RATE))  # frames of the 1.5 s the key is held
FAST = int(0.25 * learning_data.RATE)  # samples of each note in the `fast` condition
SEEDS = (0, 1, 2)
CONDITIONS = ("held", "fast")


def soundfont(root: Path) -> Path:
    """Debian's installed Fluid R3 soundfont, else the package fetched with apt-get download."""
    if SYSTEM_FONT.exists():
        return SYSTEM_FONT
    deb = learning_data.download([learning_data.SOUNDFONT[0]], root / "debs")[0]
    return learning_data.extract(deb, root / "packages") / learning_data.SOUNDFONT[1]


def render(root: Path, notes: int, seed: int) -> dict[str, np.ndarray]:
    """Every program's `notes` notes: clips (n, 48000) float32, program, pitch; cached in ROOT."""
    cache = root / f"notes-{notes}-seed{seed}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return dict(data)
    font = soundfont(root)
    rng = np.random.default_rng(seed)
    work = root / "render"
    work.mkdir(parents=True, exist_ok=True)
    clips, programs, pitches = [], [], []
    for program in range(8 * len(learning_data.FAMILIES)):
        low = 36 if learning_data.FAMILIES[program // 8] == "bass" else 48
        plan = [(int(rng.integers(low, low + 36)), int(rng.integers(70, 115))) for _ in range(notes)]
        for clip, (pitch, _) in zip(learning_data.render_notes(font, program, plan, work), plan, strict=True):
            clips.append(np.pad(clip, (0, 2 * learning_data.RATE - len(clip))))
            programs.append(program)
            pitches.append(pitch)
    data = {"clips": np.stack(clips), "program": np.array(programs), "pitch": np.array(pitches)}
    np.savez(cache, **data)
    return data


def _chroma(log_cqt: np.ndarray, offset: float) -> np.ndarray:
    """log of the CQT magnitudes (12 bins an octave from C) summed over octaves per pitch class."""
    magnitudes = np.exp(log_cqt.astype(np.float64)) - offset
    return np.log(magnitudes.reshape(len(log_cqt), -1, 12).sum(axis=1) + offset).astype(np.float32)


def candidates() -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], bool]]:
    """name -> (what it is, clip -> (frames, dim), standardised before k-means)."""
    mfcc, cqt12, cqt24 = MFCC(), LogCQT(fmin=C1_HZ, bins_per_octave=12), LogCQT()
    assert (cqt24.fmin, cqt24.bins_per_octave, cqt24.dim) == (C2_HZ, 24, 168)  # the music teacher's

    def chroma_mfcc(x: np.ndarray) -> np.ndarray:
        return np.concatenate([_chroma(cqt12(x), cqt12.log_offset), mfcc(x)], axis=1)

    def cqt12_mfcc(x: np.ndarray) -> np.ndarray:
        return np.concatenate([cqt12(x), mfcc(x)], axis=1)

    return {
        "mfcc": ("MFCC-39 (today's k-means teacher)", mfcc, False),
        "mfcc_std": ("MFCC-39, standardised", mfcc, True),
        "cqt12": ("log-CQT, 12 bins/octave, C1-B7 (84)", cqt12, False),
        "cqt12_std": ("log-CQT, 12 bins/octave, C1-B7, standardised", cqt12, True),
        "cqt24": ("log-CQT, 24 bins/octave, C2-B8 (168)", cqt24, False),
        "cqt24_std": ("log-CQT, 24 bins/octave, C2-B8, standardised", cqt24, True),
        "chroma_mfcc_std": ("chroma-12 + MFCC-39 (51), standardised", chroma_mfcc, True),
        "cqt12_mfcc_std": ("log-CQT 12 bins/octave + MFCC-39 (123), standardised", cqt12_mfcc, True),
    }


def pieces(notes: dict[str, np.ndarray], condition: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(program, audio, the note of each frame kept) of every piece of audio of a condition."""
    if condition == "held":
        return [
            (int(p), clip, np.full(HELD, i))
            for i, (p, clip) in enumerate(zip(notes["program"], notes["clips"], strict=True))
        ]
    out = []
    for program in np.unique(notes["program"]):
        which = np.flatnonzero(notes["program"] == program)
        audio = np.concatenate([notes["clips"][i][:FAST] for i in which])
        centres = np.arange(num_frames(len(audio))) * 320 + 160
        out.append((int(program), audio, which[np.minimum(centres // FAST, len(which) - 1)]))
    return out


def label_quality(
    extract: Callable[[np.ndarray], np.ndarray], standardise: bool, notes: dict[str, np.ndarray], k: int
) -> dict[str, Any]:
    """Per condition: k-means on the fit instruments' frames; MI/H(class) and purity on the held-out ones."""
    tasks = {"pitch": notes["pitch"] % 12, "instrument": notes["program"] // 8}
    out: dict[str, Any] = {}
    for condition in CONDITIONS:
        parts = [(p, extract(audio)[: len(note)], note) for p, audio, note in pieces(notes, condition)]
        x_fit = np.concatenate([f for p, f, _ in parts if p % 2 == 0])
        shift, scale = (x_fit.mean(axis=0), x_fit.std(axis=0) + 1e-6) if standardise else (0.0, 1.0)
        x_fit = ((x_fit - shift) / scale).astype(np.float32)
        held_out = [(((f - shift) / scale).astype(np.float32), note) for p, f, note in parts if p % 2 == 1]
        scores: dict[str, dict[str, list[float]]] = {t: {"mi_over_h": [], "purity": []} for t in tasks}
        for seed in SEEDS:
            centroids = fit_kmeans(x_fit, k, seed=seed).centroids
            labels = [assign(f, centroids) for f, _ in held_out]
            for task, classes in tasks.items():
                counts = JointCounts(int(classes.max()) + 1, k)
                for (_, note), label in zip(held_out, labels, strict=True):
                    counts.update(classes[note], label)
                m = counts.metrics()
                scores[task]["mi_over_h"].append(round(m["mi_over_entropy_a"], 4))
                scores[task]["purity"].append(round(m["purity_a_given_b"], 4))
        out[condition] = {
            "fit_frames": len(x_fit),
            "held_out_frames": sum(len(n) for _, n in held_out),
            **scores,
        }
    return {"dim": int(x_fit.shape[1]), **out}


def speed(extractor: Any, notes: dict[str, np.ndarray], seconds: float = 120.0) -> float:
    """x real time of one extractor on one core: a `seconds`-long concatenation of notes, best of 3."""
    audio = np.concatenate(list(notes["clips"]))[: int(seconds * learning_data.RATE)]
    extractor(audio[: learning_data.RATE])
    best = min(_timed(lambda: extractor(audio)) for _ in range(3))
    return len(audio) / learning_data.RATE / best


def nnaudio_cqts() -> dict[str, Callable[[np.ndarray], Any]]:
    """nnAudio's two CQTs with the music teacher's bins and hop, as callables on a numpy signal."""
    from nnAudio.features import CQT1992v2, CQT2010v2

    settings = {
        "sr": learning_data.RATE,
        "hop_length": 320,
        "fmin": C2_HZ,
        "n_bins": 168,
        "bins_per_octave": 24,
    }
    modules = {
        "nnaudio_cqt1992v2": CQT1992v2(**settings, verbose=False),
        "nnaudio_cqt2010v2": CQT2010v2(**settings, verbose=False),
    }
    return {name: _numpy_call(module) for name, module in modules.items()}


def _numpy_call(module: torch.nn.Module) -> Callable[[np.ndarray], Any]:
    return lambda x: module(torch.from_numpy(x)[None])


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| features | dim | pitch class, held | pitch class, fast | instrument family, held | "
        "instrument family, fast |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["candidates"].values():
        cells = [
            f"{np.mean(r[condition][task]['mi_over_h']):.3f}"
            for task in ("pitch", "instrument")
            for condition in CONDITIONS
        ]
        lines.append(f"| {r['what']} | {r['dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path.home() / ".cache" / "mert-pipeline" / "music_features"
    )
    parser.add_argument("--notes", type=int, default=12, help="notes per instrument (88 instruments)")
    parser.add_argument("--k", type=int, default=100, help="clusters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the notes' pitches and velocities")
    args = parser.parse_args()
    root = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    start = time.perf_counter()
    notes = render(root, args.notes, args.seed)
    print(f"{len(notes['clips'])} notes of 88 instruments ({time.perf_counter() - start:.0f} s)", flush=True)
    results: dict[str, Any] = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "notes": len(notes["clips"]),
        "k": args.k,
        "seeds": list(SEEDS),
        "candidates": {},
    }
    for name, (what, extract, standardise) in candidates().items():
        start = time.perf_counter()
        scores = label_quality(extract, standardise, notes, args.k)
        results["candidates"][name] = {"what": what, "standardised": standardise, **scores}
        print(f"{name}: {json.dumps(scores)} ({time.perf_counter() - start:.0f} s)", flush=True)
    results["speed_x_real_time"] = {
        "mfcc": round(speed(MFCC(), notes)),
        "cqt12": round(speed(LogCQT(fmin=C1_HZ, bins_per_octave=12), notes)),
        "cqt24": round(speed(LogCQT(), notes)),
        **{name: round(speed(module, notes, 30.0)) for name, module in nnaudio_cqts().items()},
    }
    print(json.dumps(results["speed_x_real_time"]))
    (root / "music_features.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nCPU: {results['cpu']}; MI/H(class), k={args.k}, mean over seeds {list(SEEDS)}\n")
    print(table(results))


if __name__ == "__main__":
    main()
