"""End to end: the official approach against `run`, from raw audio, in one process tree.

Run from the repository root (after `pip install -c constraints-lock.txt -e .`):

    python benchmarks/e2e.py                  # 8 tracks of 1 to 10 minutes, 44.1/48 kHz stereo
    python benchmarks/e2e.py --repeat 2       # each approach twice, in the order a b b a; means
    python benchmarks/e2e.py --tracks 2 --max-minutes 1   # a quick sanity run
    python benchmarks/e2e.py --compressed --repeat 2        # real Ogg Vorbis tracks instead (Debian's)

What is timed, on the same raw tracks (synthesized music; FLAC at 44.1 kHz and WAV at 48 kHz, stereo),
each in a child process of this one, one after the other:

(a) the official MERT approach: for each file, the whole file loaded (soundfile), `encodec.utils.
    convert_audio` to 24 kHz mono, the whole-file `EncodecModel.encode`, codes saved; one file at a time,
    torch on every core;
(b) `run` as a user calls it (`mert_pipeline.run_pipeline`, every stage's defaults): manifest -> resample
    -> tokenize --teacher rvq -> shard -> verify, from the raw tracks to verified shards.

With `--compressed` the corpus is real recorded music as users have it: 8 Ogg Vorbis tracks (44.1 kHz
stereo, about 31 minutes) of Debian's `colobot-common-sounds`, fetched with `apt-get download` as
benchmarks/learning.py fetches its corpus (`learning_data.download`). Each approach then also reports the
seconds it spent decoding (the official one times `sf.read`; `run` decodes in resample, streamed).

Both are reported against real time (seconds of audio per second), their ratio, and their peak RSS: the
largest sum, over the child's whole process tree (workers included), sampled every 50 ms from /proc.

Weights: the encodec package's pretrained 24 kHz weights when `--codec-checkpoint` names them; otherwise
the test codec (the real architecture, random weights): the same computation, so the same speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as handle:
                rss[int(entry)] = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def measured(command: list[str]) -> tuple[dict, float]:
    """Run `command` (it prints one JSON line last); return what it printed and its tree's peak RSS."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak[0] / 2**30


def make_corpus(root: Path, tracks: int, low: float, high: float) -> float:
    """`tracks` raw files of `low` to `high` minutes, evenly spread; returns the seconds of audio."""
    import numpy as np
    import soundfile as sf

    from mert_pipeline.demo.synth import render_track

    root.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for i in range(tracks):
        minutes = low + (high - low) * (i / max(1, tracks - 1))
        rate, fmt = (44100, "FLAC") if i % 2 == 0 else (48000, "WAV")
        path = root / f"track{i:02d}.{fmt.lower()}"
        seconds = round(minutes * 60, 1)
        if not path.exists():
            audio = render_track(1000 + i, seconds, rate, 2)
            sf.write(path, np.clip(audio, -1, 1), rate, format=fmt, subtype="PCM_16")
        total += sf.info(path).duration
    return total


COMPRESSED = ("colobot-common-sounds", "usr/share/games/colobot/music")
COMPRESSED_TRACKS = (
    "Humanitarian",
    "Hv2",
    "Infinite",
    "Proton",
    "Prototype",
    "Quite",
    "music003",
    "music004",
)


def compressed_corpus(root: Path) -> float:
    """8 Ogg Vorbis tracks of a Debian music package (copied, not linked: `run` refuses links out of the
    tree); returns the seconds of audio."""
    import shutil

    import soundfile as sf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import learning_data

    package = learning_data.extract(
        learning_data.download([COMPRESSED[0]], root / "debs")[0], root / "packages"
    )
    corpus = root / "corpus-ogg"
    corpus.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for name in COMPRESSED_TRACKS:
        target = corpus / f"{name}.ogg"
        if not target.exists():
            shutil.copyfile(package / COMPRESSED[1] / f"{name}.ogg", target)
        total += sf.info(target).duration
    return total


def official(corpus: Path, codec: str | None, out: Path) -> dict:
    """(a): whole file, convert_audio, whole-file encode, one file at a time."""
    import numpy as np
    import soundfile as sf
    import torch
    from encodec.utils import convert_audio

    from mert_pipeline.teachers.rvq import load_codec

    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_codec(codec, 6.0, "cpu")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    audio_seconds = decode = 0.0
    for path in sorted(corpus.iterdir()):
        begin = time.perf_counter()
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        decode += time.perf_counter() - begin
        wav = convert_audio(torch.from_numpy(data.T.copy()), rate, model.sample_rate, model.channels)
        with torch.no_grad():
            frames = model.encode(wav[None])
        codes = torch.cat([codes for codes, _ in frames], dim=-1)[0]
        np.save(out / f"{path.stem}.npy", codes.numpy().astype(np.int16))
        audio_seconds += len(data) / rate
    return {"seconds": time.perf_counter() - start, "audio_seconds": audio_seconds, "decode_seconds": decode}


def pipeline(corpus: Path, codec: str | None, work: Path) -> dict:
    """(b): `run`, with every stage's defaults."""
    from mert_pipeline import PipelineConfig, run_pipeline

    start = time.perf_counter()
    report = run_pipeline(PipelineConfig(roots=[str(corpus)], workdir=work, codec_checkpoint=codec))
    seconds = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"verify found problems: {report.verify.problems[:3]}")  # type: ignore[union-attr]
    manifest = report.stages[0].summary["counts"]
    return {
        "seconds": seconds,
        "audio_seconds": manifest["audio_seconds"],
        "stages": {r.stage: round(r.seconds, 2) for r in report.stages},
        "shards": report.totals.get("shards", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--min-minutes", type=float, default=1.0)
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument(
        "--codec-checkpoint", default=None, help="EnCodec 24 kHz weights (default: test codec)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="Where the corpus and outputs go (kept)")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of each approach, in ABBA order")
    parser.add_argument(
        "--compressed", action="store_true", help="Real Ogg Vorbis tracks of a Debian package as the corpus"
    )
    parser.add_argument("--run", choices=["official", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # a child: one approach, one JSON line
        run = official if args.run == "official" else pipeline
        print(json.dumps(run(args.corpus, args.codec_checkpoint, args.out)))
        return
    base = args.dir or Path(tempfile.mkdtemp(prefix="mert-e2e-"))
    if args.compressed:
        corpus, audio = base / "corpus-ogg", compressed_corpus(base)
    else:
        corpus = base / "corpus"
        audio = make_corpus(corpus, args.tracks, args.min_minutes, args.max_minutes)
    codec = args.codec_checkpoint
    if codec is None:
        from mert_pipeline.demo.test_codec import make_test_codec

        codec = str(base / "test-codec.pt")
        if not Path(codec).exists():
            make_test_codec(codec, seed=0)
    tracks = len(list(corpus.iterdir()))
    print(f"corpus: {tracks} tracks, {audio / 60:.1f} min of audio in {corpus}", flush=True)
    order = ["official", "pipeline", "pipeline", "official"] * args.repeat  # ABBA: drift cancels out
    results: dict[str, list[dict]] = {"official": [], "pipeline": []}
    for name in order[: 2 * args.repeat]:
        out = base / f"out-{name}-{time.time_ns()}"
        command = [sys.executable, __file__, "--run", name, "--corpus", str(corpus), "--out", str(out)]
        result, peak = measured([*command, "--codec-checkpoint", codec])
        result["peak_rss_gib"] = peak
        results[name].append(result)
        print(f"{name}: {json.dumps(result)}", flush=True)
    mean = {}
    for name, runs in results.items():
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        mean[name] = {**runs[-1], "seconds": seconds, "peak_rss_gib": max(r["peak_rss_gib"] for r in runs)}
    a, b = mean["official"], mean["pipeline"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"runs per approach: {args.repeat} (order {' '.join(order[: 2 * args.repeat])}); "
        "mean seconds, max RSS"
    )
    print("| what | seconds | x real time | vs (a) | peak RSS (process tree) |")
    print("|---|---:|---:|---:|---:|")
    for label, r in (("(a) official", a), ("(b) `run`", b)):
        print(
            f"| {label} | {r['seconds']:.1f} | {r['audio_seconds'] / r['seconds']:.1f}x | "
            f"{a['seconds'] / r['seconds']:.2f}x | {r['peak_rss_gib']:.2f} GiB |"
        )
    print(f"\n(b) by stage, seconds: {b['stages']}")
    print(f"(a) decoding (sf.read of whole files): {a['decode_seconds']:.1f} s of {a['seconds']:.1f} s")


if __name__ == "__main__":
    main()
