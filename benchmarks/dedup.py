"""Near-duplicate recordings: does `dedup` find the copies of a recording, and only those, and does its
index scale to millions of tracks?

Run from the repository root (after `pip install -e .`, on a Debian or Ubuntu machine):

    .venv/bin/python benchmarks/dedup.py                      # everything, figures for RESULTS.md
    .venv/bin/python benchmarks/dedup.py --parts quality,speed  # without the index at scale
    .venv/bin/python benchmarks/dedup.py --sizes 10000,100000   # a smaller scale run

1. **quality**: real music from Debian's game soundtracks (`apt-get download`, as benchmarks/learning.py
   fetches them): distinct tracks, and of some of them a copy made with each transformation that separates
   copies of one recording (lossy codecs at low rates, sample rate, bit depth, channels, gain, silence added
   or trimmed, crops; and, as a harder row, a 2% speed change). All of it goes through the real pipeline
   (`manifest`, `resample`, `dedup` on the local pool). Per transformation: recall of (original, copy)
   pairs. Negatives: every pair of different tracks, most of them from one soundtrack (one composer, same
   instruments): precision of the pairs found.
2. **speed**: Chromaprint on the resampled files, x real time on one core (in memory: beside the stage's
   decode; and from the FLAC file, decode included), and the fingerprint's size per hour of audio.
3. **scale**: the candidate search (`DedupStage`'s partitioned tasks and the pair merge) on synthetic
   postings of 10k, 100k and 1M tracks, whose keys follow the statistics measured on the real corpus
   (keys per track, the share of keys that other tracks hold too), with 1% of tracks copied. Time and
   peak memory of each process, extrapolated to 3M tracks.

Writes DIR/dedup.json and prints the tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning_data  # noqa: E402

from mert_pipeline import chromaprint, pipeline  # noqa: E402
from mert_pipeline.dedup import BUCKETS, bucket_of, fingerprint_file, index_keys  # noqa: E402
from mert_pipeline.executor import ExecutorConfig, Task  # noqa: E402
from mert_pipeline.stages.dedup import POSTING, DedupConfig, DedupStage, FingerprintStage  # noqa: E402

PACKAGES = ["colobot-common-sounds", "drascula-music", "fretsonfire-songs-muldjord"]
LOCAL = ExecutorConfig(kind="local", workers=2)
TRANSFORMS = [
    "mp3_64kbps", "mp3_320kbps", "ogg_vorbis_q0", "aac_96kbps", "rate_22050", "rate_48000_pcm24",
    "mono", "gain_minus_12db", "gain_plus_6db", "silence_added_3s", "silence_trimmed", "crop_30s",
    "crop_60pct", "speed_plus_2pct", "speed_minus_2pct",
]  # fmt: skip
HARD = ("speed_plus_2pct", "speed_minus_2pct")


# --------------------------------------------------------------------------------------------------
# 1. quality
# --------------------------------------------------------------------------------------------------


def source_tracks(root: Path, limit: int) -> list[Path]:
    """Real music, at least 60 s a track, from Debian packages, in a stable order."""
    found = []
    for package in PACKAGES:
        deb = learning_data.download([package], root / "debs")[0]
        folder = learning_data.extract(deb, root / "packages")
        pattern = learning_data.PACKAGES[package][1]
        for path in sorted(folder.glob(pattern)):
            if sf.info(path).duration >= 60:
                found.append(path)
    return found[:limit]


def _encode_ffmpeg(audio: np.ndarray, rate: int, out: Path, codec: list[str]) -> None:
    wav = out.with_suffix(".src.wav")
    sf.write(wav, audio, rate, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), *codec, str(out)], check=True)
    wav.unlink()


def transform(name: str, audio: np.ndarray, rate: int, out: Path) -> Path:
    """Write `audio` (a track, float32 frames x channels) transformed by `name` under OUT.*; the path."""
    stereo = audio if audio.ndim == 2 else np.stack([audio, audio], axis=1)
    if name.startswith("mp3"):
        path, bitrate = out.with_suffix(".mp3"), name.split("_")[1].removesuffix("kbps")
        _encode_ffmpeg(stereo, rate, path, ["-c:a", "libmp3lame", "-b:a", f"{bitrate}k"])
    elif name == "aac_96kbps":
        path = out.with_suffix(".m4a")
        _encode_ffmpeg(stereo, rate, path, ["-c:a", "aac", "-b:a", "96k"])
        wav = out.with_suffix(".wav")  # libsndfile reads no MP4: decode it as a user's tools would
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(path), str(wav)], check=True)
        path.unlink()
        path = wav
    elif name == "ogg_vorbis_q0":  # lowest Vorbis quality (about 64 kbps); in blocks: libsndfile's
        path = out.with_suffix(".ogg")  # Vorbis and MP3 writers crash on whole long tracks at once
        with sf.SoundFile(path, "w", rate, 2, format="OGG", subtype="VORBIS", compression_level=1.0) as o:
            for start in range(0, len(stereo), 1 << 16):
                o.write(stereo[start : start + (1 << 16)])
    else:
        path, subtype, data, new_rate = out.with_suffix(".flac"), "PCM_16", stereo, rate
        if name == "rate_22050":
            data, new_rate = soxr.resample(stereo, rate, 22050), 22050
        elif name == "rate_48000_pcm24":
            data, new_rate, subtype = soxr.resample(stereo, rate, 48000), 48000, "PCM_24"
        elif name == "mono":
            data = stereo.mean(axis=1)
        elif name == "gain_minus_12db":
            data = stereo * 0.25
        elif name == "gain_plus_6db":
            data = np.clip(stereo * 2.0, -1, 1)
        elif name == "silence_added_3s":
            pad = np.zeros((3 * rate, 2), np.float32)
            data = np.concatenate([pad, stereo, pad[: 2 * rate]])
        elif name == "silence_trimmed":
            data = stereo[int(1.5 * rate) : len(stereo) - 2 * rate]
        elif name == "crop_30s":  # the loudest 30 s (some game tracks are mostly silence after a cue)
            power = np.add.reduceat((stereo**2).sum(axis=1), np.arange(0, len(stereo), rate))
            window = np.convolve(power, np.ones(30), mode="valid")
            start = int(np.argmax(window)) * rate if len(window) else 0
            data = stereo[start : start + 30 * rate]
        elif name == "crop_60pct":
            data = stereo[int(0.2 * len(stereo)) : int(0.8 * len(stereo))]
        elif name.startswith("speed"):
            factor = 1.02 if "plus" in name else 0.98  # played faster: fewer samples at the same rate
            data = soxr.resample(stereo, rate * factor, rate)
        else:
            raise ValueError(name)
        sf.write(path, data, new_rate, subtype=subtype)
    return path


def build_quality_corpus(root: Path, tracks: int, copies_per_transform: int) -> dict[str, object]:
    """ROOT/corpus: the originals, and copies of the first ones, a different original per transformation
    and copy; truth.json names each copy's original and transformation."""
    corpus = root / "corpus"
    truth_file = root / "truth.json"
    if truth_file.exists():
        return json.loads(truth_file.read_text())
    sources = source_tracks(root, tracks)
    originals, copies = [], []
    for i, source in enumerate(sources):  # files already written are kept: an interrupted build resumes
        target = corpus / "originals" / f"{i:03d}_{source.parent.name}_{source.stem}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            audio, rate = sf.read(source, dtype="float32", always_2d=True)
            sf.write(target, audio, rate, subtype="PCM_16")
        package = source.parts[source.parts.index("packages") + 1]
        originals.append({"path": str(target), "package": package})
    for t, name in enumerate(TRANSFORMS):
        for c in range(copies_per_transform):
            index = (t * copies_per_transform + c) % len(originals)
            out = corpus / "copies" / name / f"{index:03d}"
            out.parent.mkdir(parents=True, exist_ok=True)
            done = [p for p in out.parent.glob(f"{out.name}.*") if ".src." not in p.name]
            if done:
                path = done[0]
            else:
                audio, rate = sf.read(originals[index]["path"], dtype="float32", always_2d=True)
                path = transform(name, audio, rate, out)
            copies.append({"path": str(path), "original": originals[index]["path"], "transform": name})
    truth = {"originals": originals, "copies": copies}
    truth_file.write_text(json.dumps(truth, indent=1))
    return truth


def quality(root: Path, tracks: int, copies_per_transform: int) -> dict[str, object]:
    truth = build_quality_corpus(root, tracks, copies_per_transform)
    work = root / "work"
    start = time.perf_counter()
    pipeline.manifest([str(root / "corpus")], work, valid_percent=0.0, executor=LOCAL)
    pipeline.resample(work, executor=LOCAL)
    middle = time.perf_counter()
    report = pipeline.dedup(work, executor=LOCAL)
    seconds = time.perf_counter() - middle
    group_of: dict[str, int] = {}
    for g, line in enumerate((work / "dedup" / "groups.jsonl").read_text().splitlines()):
        group = json.loads(line)
        for member in [group["kept"], *group["dropped"], *group["also_kept"]]:
            group_of[member["path"]] = g
    rows = {}
    for name in TRANSFORMS:
        pairs = [c for c in truth["copies"] if c["transform"] == name]
        found = sum(
            c["path"] in group_of and group_of.get(c["original"]) == group_of[c["path"]] for c in pairs
        )
        rows[name] = {"pairs": len(pairs), "found": found, "recall": found / max(1, len(pairs))}
    # precision: every pair in a group is a predicted pair; it is right when both are one original's files
    recording = {o["path"]: o["path"] for o in truth["originals"]}
    recording.update({c["path"]: c["original"] for c in truth["copies"]})
    members: dict[int, list[str]] = {}
    for path, g in group_of.items():
        members.setdefault(g, []).append(path)
    predicted = wrong = 0
    for paths in members.values():
        for i, a in enumerate(paths):
            for b in paths[i + 1 :]:
                predicted += 1
                wrong += recording.get(a) != recording.get(b)
    files = len(truth["originals"]) + len(truth["copies"])
    negatives = len(truth["originals"]) * (len(truth["originals"]) - 1) // 2
    same_soundtrack = sum(
        1
        for i, a in enumerate(truth["originals"])
        for b in truth["originals"][i + 1 :]
        if a["package"] == b["package"]
    )
    return {
        "files": files,
        "originals": len(truth["originals"]),
        "copies": len(truth["copies"]),
        "negative_pairs": negatives,
        "negative_pairs_same_soundtrack": same_soundtrack,
        "predicted_pairs": predicted,
        "wrong_pairs": wrong,
        "precision": (predicted - wrong) / max(1, predicted),
        "transforms": rows,
        "dedup_seconds": seconds,
        "manifest_resample_seconds": middle - start,
        "counts": report.summary["counts"],
    }


# --------------------------------------------------------------------------------------------------
# 2. speed
# --------------------------------------------------------------------------------------------------


def speed(root: Path, files: int = 20) -> dict[str, float]:
    """x real time on one core (this process: torch-free, one thread), median of 3 passes."""
    audio_dir = root / "work" / "audio_24k"
    paths = sorted(audio_dir.glob("*/*.flac"))[:files]
    decoded = [sf.read(p, dtype="int16")[0] for p in paths]
    seconds = sum(len(a) for a in decoded) / 24000
    memory, on_file = [], []
    for _ in range(3):
        start = time.perf_counter()
        items = sum(len(chromaprint.fingerprint(a, 24000)) for a in decoded)
        memory.append(time.perf_counter() - start)
        start = time.perf_counter()
        for path in paths:
            fingerprint_file(str(path))
        on_file.append(time.perf_counter() - start)
    return {
        "audio_seconds": seconds,
        "x_real_time_fingerprint": seconds / float(np.median(memory)),
        "x_real_time_with_flac_decode": seconds / float(np.median(on_file)),
        "items_per_second_of_audio": items / seconds,
        "bytes_per_hour": items / seconds * 3600 * 4,
    }


# --------------------------------------------------------------------------------------------------
# 3. scale
# --------------------------------------------------------------------------------------------------


def key_statistics(root: Path) -> dict[str, float]:
    """From the real corpus' distinct tracks (the originals, not their copies): index keys per second of
    audio, and the share of postings whose key another distinct track holds too (chance sharing)."""
    import pyarrow.parquet as pq

    work = root / "work"
    truth = json.loads((root / "truth.json").read_text())
    facts = {r["source_path"]: r for r in pq.read_table(work / "dedup" / "files.parquet").to_pylist()}
    keys, seconds = [], 0.0
    for original in truth["originals"]:
        row = facts.get(original["path"])
        if row and row["items"]:
            fp = np.load(
                work / "dedup" / "fingerprints" / row["content_hash"][:2] / f"{row['content_hash'][:16]}.npy"
            )
            keys.append(index_keys(fp, 4))
            seconds += len(fp) * chromaprint.item_seconds()
    _, counts = np.unique(np.concatenate(keys), return_counts=True)
    return {
        "tracks": len(keys),
        "keys_per_second": float(sum(len(k) for k in keys) / seconds),
        "shared_share": float(counts[counts > 1].sum() / counts.sum()),
    }


def _write_synthetic_postings(
    stage: FingerprintStage, tracks: int, stats: dict[str, float], seed: int
) -> int:
    """Postings of `tracks` synthetic tracks in the fingerprint stage's format (a task of 1000 tracks a
    file): keys per track from a log-normal track length (median 160 s), values uniform 32-bit except a
    `shared_share` drawn from a pool of common keys (Zipf), and 1% of tracks copied (half their keys)."""
    rng = np.random.default_rng(seed)
    per_task = 1000
    pool = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ranks = 0
    total = 0
    for rank, start in enumerate(range(0, tracks, per_task)):
        n = min(per_task, tracks - start)
        seconds = np.exp(rng.normal(np.log(160), 0.5, n))
        counts = np.maximum(1, (seconds * stats["keys_per_second"]).astype(np.int64))
        keys = rng.integers(0, 2**32, counts.sum(), dtype=np.uint64).astype(np.uint32)
        common = rng.random(counts.sum()) < stats["shared_share"]
        keys[common] = pool[np.minimum(rng.zipf(1.3, common.sum()), len(pool)) - 1]
        files = np.repeat(np.arange(start, start + n, dtype=np.uint64) + np.uint64(1 << 40), counts)
        copy = rng.random(n) < 0.01  # a copy: the next track id takes half this track's keys
        offsets = np.concatenate([[0], np.cumsum(counts)])
        extra_k, extra_f = [], []
        for i in np.flatnonzero(copy):
            own = keys[offsets[i] : offsets[i + 1]]
            extra_k.append(own[: len(own) // 2])
            extra_f.append(np.full(len(own) // 2, np.uint64(1 << 41) + np.uint64(start + i)))
        if extra_k:
            keys = np.concatenate([keys, *extra_k])
            files = np.concatenate([files, *extra_f])
        buckets = bucket_of(keys)
        order = np.argsort(buckets, kind="stable")
        postings = np.empty(len(keys), POSTING)
        postings["key"], postings["file"] = keys[order], files[order]
        index = np.searchsorted(buckets[order], np.arange(BUCKETS + 1)).astype(np.int64)
        folder = stage.config.workdir / ".work" / stage.name
        for sub in ("postings", "listing", "completions"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        np.save(folder / "postings" / f"{rank:05d}.npy", postings)
        np.save(folder / "postings" / f"{rank:05d}.index.npy", index)
        (folder / "listing" / f"{rank:05d}.jsonl").write_text("")
        (folder / "completions" / f"{rank:05d}").write_text(f"synthetic-{seed}-{rank}")
        ranks += 1
        total += len(keys)
    return total


def _run_task(stage: DedupStage, task: Task) -> tuple[float, float]:
    from collections import Counter

    start = time.perf_counter()
    stage.run(task, Counter())
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def scale_one(root: Path, tracks: int, stats: dict[str, float]) -> dict[str, float]:
    work = root / f"scale-{tracks}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = DedupConfig(workdir=work)
    postings = _write_synthetic_postings(FingerprintStage(config), tracks, stats, seed=tracks)
    stage = DedupStage(config)
    start = time.perf_counter()
    tasks = stage.plan()
    planned = time.perf_counter() - start
    with ProcessPoolExecutor(2) as pool:  # each worker's peak: the largest partition it held
        results = list(pool.map(_run_task, [stage] * len(tasks), tasks))
    searched = time.perf_counter() - start
    candidates = pairs = 0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for unique, shared in stage._candidates(tasks):
        pairs += len(unique)
        candidates += int((shared >= config.settings.min_shared).sum())
    merged = time.perf_counter() - start
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    disk = sum(p.stat().st_size for p in (work / ".work").rglob("*.npy"))
    shutil.rmtree(work)
    return {
        "tracks": tracks,
        "postings": postings,
        "tasks": len(tasks),
        "plan_s": planned,
        "search_s": searched - planned,
        "merge_s": merged - searched,
        "total_s": merged,
        "worker_peak_gib": max(r[1] for r in results),
        "driver_peak_gib": driver_rss,
        "driver_rss_before_merge_gib": rss_before,
        "pairs_sharing_a_key": pairs,
        "candidates": candidates,
        "bytes_on_disk": disk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "mert-pipeline" / "dedup")
    parser.add_argument("--parts", default="quality,speed,scale")
    parser.add_argument("--tracks", type=int, default=60, help="distinct real tracks")
    parser.add_argument("--copies", type=int, default=10, help="copies per transformation")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    if not shutil.which("ffmpeg"):  # it makes the MP3 and AAC copies: Debian's, as the music is
        if not shutil.which("apt-get"):
            raise SystemExit("ffmpeg makes the MP3 and AAC copies: install it (a Debian or Ubuntu machine)")
        print("installing ffmpeg with apt-get (it makes the MP3 and AAC copies)", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "ffmpeg"], check=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_file = args.dir / "dedup.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    parts = args.parts.split(",")
    results["machine"] = {"cpu": _cpu(), "cores": os.cpu_count(), "chromaprint": chromaprint.version()}
    if "quality" in parts:
        results["quality"] = quality(args.dir, args.tracks, args.copies)
        print(
            json.dumps({k: v for k, v in results["quality"].items() if k != "counts"}, indent=1), flush=True
        )
    if "speed" in parts:
        results["speed"] = speed(args.dir)
        print(json.dumps(results["speed"], indent=1), flush=True)
    if "scale" in parts:
        stats = key_statistics(args.dir)
        results["key_statistics"] = stats
        sizes = [int(s) for s in args.sizes.split(",")]
        rows = [r for r in results.get("scale", []) if r["tracks"] not in sizes]  # other sizes' rows stay
        for size in sizes:
            row = scale_one(args.dir, size, stats)
            rows.append(row)
            print(json.dumps(row), flush=True)
        results["scale"] = sorted(rows, key=lambda r: r["tracks"])
    out_file.write_text(json.dumps(results, indent=1))
    print_tables(results)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_tables(results: dict) -> None:
    q = results.get("quality")
    if q:
        print("\n| transformation | pairs | found | recall |\n|---|---:|---:|---:|")
        for name, row in q["transforms"].items():
            mark = " (hard row)" if name in HARD else ""
            print(f"| {name}{mark} | {row['pairs']} | {row['found']} | {row['recall']:.3f} |")
        print(
            f"\nprecision {q['precision']:.4f}: {q['predicted_pairs']} pairs found, "
            f"{q['wrong_pairs']} wrong, "
            f"among {q['negative_pairs']} pairs of different tracks ({q['negative_pairs_same_soundtrack']} "
            f"of one soundtrack); dedup {q['dedup_seconds']:.1f} s for {q['files']} files"
        )
    s = results.get("speed")
    if s:
        print(
            f"\nChromaprint: {s['x_real_time_fingerprint']:.0f}x real time (in memory), "
            f"{s['x_real_time_with_flac_decode']:.0f}x with the FLAC decode; "
            f"{s['bytes_per_hour'] / 1024:.0f} KiB an hour"
        )
    rows = results.get("scale")
    if rows:
        print(
            "\n| tracks | postings | tasks | search s | merge s | total s | worker peak GiB "
            "| driver peak GiB | candidates |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for r in rows:
            print(
                f"| {r['tracks']:,} | {r['postings']:,} | {r['tasks']} | {r['search_s']:.1f} "
                f"| {r['merge_s']:.1f} | {r['total_s']:.1f} | {r['worker_peak_gib']:.2f} "
                f"| {r['driver_peak_gib']:.2f} | {r['candidates']:,} |"
            )
        last = rows[-1]
        factor = 3_000_000 / last["tracks"]
        print(f"\nextrapolated to 3M tracks: {last['total_s'] * factor / 60:.1f} min")


if __name__ == "__main__":
    main()
