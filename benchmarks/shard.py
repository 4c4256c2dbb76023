"""Benchmark of the shard stage: write speed against `cp`, and read+decode speed with webdataset.

Run from the repository root:

    /tmp/v1/bin/python benchmarks/shard.py            # the figures in benchmarks/RESULTS.md
    /tmp/v1/bin/python benchmarks/shard.py --quick    # fewer, shorter tracks: a sanity run

Inputs, made in a temporary folder on the disk under test (`--dir`, default the system temp folder):
synthesized music-like tracks (44.1 kHz stereo FLAC, as most corpora) through the real `manifest` and
`resample` stages (24 kHz mono FLAC PCM_16 with a seek table of its frames), and one label set of 8
codebooks in the tokenize layout (random int16 codes: the shard stage's cost does not depend on the
values, and running the EnCodec teacher on CPU would take far longer).

Write: the shard stage, one local worker, 30 s segments, 256 MB shards; MB/s of tar bytes written
(plan and finalize included). `cp -r` copies the very same tar bytes to another folder of the same disk.
Four variants of the stage, each against a `cp` of its own output:
- `flac`: the stage as it is (segments cut by copying the source's FLAC frames, found by its seek table);
- `flac_scan`: the same, the frames found by scanning the file (a FLAC without a seek table: one that
  resample copied because it already was 24 kHz mono);
- `reencode`: the previous path, forced for comparison (every segment decoded and FLAC-encoded again);
- `npy`: raw PCM shards, what the issue asks to report next to FLAC: every segment decoded to int16
  and stored as `.npy` (the benchmark swaps the stage's audio function; the member keeps its name).
Two ways to time each: warm page cache (the stage and `cp` return when their bytes are in memory: the
ratio is what the stage costs over moving its output bytes in RAM), and synced (each run followed by an
fsync of every file it wrote: the ratio against a copy bound by this disk). Before each synced run,
`sync` flushes what earlier runs left dirty. Repeats are interleaved; medians are reported.

Read: `webdataset.WebDataset` over the shards, decoding every sample (FLAC -> int16 via soundfile, the
labels via numpy), in the main process and through a `torch.utils.data.DataLoader` with 2 workers;
samples/s and seconds of audio per second (x real time).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

import mert_pipeline.flac_frames as flac_frames  # noqa: E402
import mert_pipeline.stages.shard as shard_stage  # noqa: E402
from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.executor import ExecutorConfig, execute  # noqa: E402
from mert_pipeline.flac_frames import NotCopyable  # noqa: E402
from mert_pipeline.fs import atomic_write_json  # noqa: E402
from mert_pipeline.manifests import LabelRecord, ResampledRecord, iter_records  # noqa: E402
from mert_pipeline.manifests.io import ManifestWriter  # noqa: E402
from mert_pipeline.shards import npy_bytes, read_segment  # noqa: E402
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots  # noqa: E402
from mert_pipeline.stages.resample import ResampleConfig, ResampleStage  # noqa: E402

LOCAL = ExecutorConfig(kind="local", workers=1)


def make_inputs(root: Path, tracks: int, seconds: float) -> Path:
    corpus, work = root / "corpus", root / "work"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(tracks):
        length = seconds * rng.uniform(0.6, 1.4)
        n = int(
            length * 44100
        )  # CD-rate stereo sources, as most corpora: resample encodes (and indexes) them
        sf.write(corpus / f"t{i:04d}.flac", render_track(i, length, 44100, 2)[:n], 44100, subtype="PCM_16")
    config = ManifestConfig(roots=resolve_roots([corpus]), workdir=work, valid_percent=0.05, min_seconds=1.0)
    assert execute(ManifestStage(config), LOCAL).ok
    assert execute(ResampleStage(ResampleConfig(workdir=work)), LOCAL).ok
    labels = work / "labels" / "rvq"
    facts = {"name": "rvq", "kind": "encodec_24khz", "config_hash": "bench", "config": {}, "n_q": 8}
    facts |= {"num_classes": 1024, "label_rate": 75.0, "hop": 320, "sampling_rate": 24000}
    with ManifestWriter(labels / "labels.parquet", str(labels), record_type=LabelRecord) as writer:
        for audio in iter_records(work / "audio_24k/manifest.parquet", record_type=ResampledRecord):
            frames = -(-audio.num_samples // 320)
            relpath = f"{audio.id[:2]}/{audio.id}.npy"
            (labels / relpath).parent.mkdir(parents=True, exist_ok=True)
            np.save(labels / relpath, rng.integers(0, 1024, (8, frames), dtype=np.int16))
            writer.write(
                LabelRecord(
                    audio.id,
                    "rvq",
                    "encodec_24khz",
                    "bench",
                    relpath,
                    8,
                    frames,
                    1024,
                    75.0,
                    audio.num_samples,
                    24000,
                    audio.split,
                )  # fmt: skip
            )
    atomic_write_json(labels / "teacher.json", facts)
    return work


def raw_pcm_segment(row: dict, rate: int, stats: object) -> bytes:
    """The `npy` variant's audio member: the segment decoded to int16 and saved as .npy."""
    samples = read_segment(
        row["path"], row["subtype"], row["offset"], row["num_samples"], row["source_num_samples"]
    )
    return npy_bytes(samples)


def never_copy(*args: object, **kwargs: object) -> bytes:
    """The `reencode` variant: no segment is cut from frames (whole tracks are still copied)."""
    raise NotCopyable("benchmark", "the reencode variant")


def cut_by_scan(*args: object, **kwargs: object) -> bytes:
    """The `flac_scan` variant: frames found by scanning the file, as for a FLAC without a seek table."""
    table = flac_frames._from_table
    flac_frames._from_table = lambda *_: None
    try:
        return flac_frames.cut_segment(*args, **kwargs)  # type: ignore[arg-type]
    finally:
        flac_frames._from_table = table


VARIANTS = {
    "flac": {},
    "flac_scan": {"cut_segment": cut_by_scan},
    "reencode": {"cut_segment": never_copy},
    "npy": {"segment_flac": raw_pcm_segment},
}


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`: its bytes are on the disk when this returns."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_shards(work: Path, out: Path, variant: str, synced: bool) -> tuple[float, int, dict]:
    """Seconds, bytes and the audio counters of one full shard run into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    swapped = {name: getattr(shard_stage, name) for name in VARIANTS[variant]}
    for name, function in VARIANTS[variant].items():
        setattr(shard_stage, name, function)
    if synced:
        os.sync()
    try:
        config = shard_stage.ShardConfig(workdir=work, out=out, segment_seconds=30.0, shard_bytes=256 * 10**6)
        start = time.perf_counter()
        report = execute(shard_stage.ShardStage(config), LOCAL)
        if synced:
            fsync_tree(out)
        seconds = time.perf_counter() - start
    finally:
        for name, function in swapped.items():
            setattr(shard_stage, name, function)
    assert report.ok, report.failed
    audio = {k: int(v) for k, v in report.stats.items() if k.startswith("audio_") and k != "audio_seconds"}
    return seconds, int(report.stats["bytes"]), audio


def cp_seconds(source: Path, target: Path, synced: bool) -> float:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    folders = [str(source / split) for split in ("train", "valid") if (source / split).is_dir()]
    if synced:
        os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", *folders, str(target)], check=True)
    if synced:
        fsync_tree(target)
    return time.perf_counter() - start


def decode(sample: dict) -> tuple[int, int]:
    audio, _ = sf.read(io.BytesIO(sample["flac"]), dtype="int16")
    labels = np.load(io.BytesIO(sample["rvq.npy"]))
    return len(audio), labels.shape[1]


class Decoded:
    """Picklable map for DataLoader workers."""

    def __call__(self, sample: dict) -> int:
        return decode(sample)[0]


def read_rate(shards: Path, workers: int) -> tuple[float, float]:
    """Samples/s and audio seconds per second of reading + decoding every sample once."""
    import torch
    import webdataset as wds

    urls = sorted(str(p) for p in shards.rglob("shard-*.tar"))
    start = time.perf_counter()
    if workers == 0:
        lengths = [decode(s)[0] for s in wds.WebDataset(urls, shardshuffle=False)]
    else:
        dataset = wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker).map(Decoded())
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        lengths = [int(n) for n in loader]
    seconds = time.perf_counter() - start
    return len(lengths) / seconds, sum(lengths) / 24000 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tracks, seconds = (8, 45.0) if args.quick else (48, 75.0)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min): {load}, cpus: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        work = make_inputs(root, tracks, seconds)
        audio_hours = sum(r.duration for r in iter_records(work / "audio_24k/manifest.parquet",
                                                            record_type=ResampledRecord)) / 3600  # fmt: skip
        print(f"inputs: {tracks} tracks, {audio_hours:.3f} h of 24 kHz mono audio, 8 codebooks of labels")
        times: dict[tuple[str, str], list[float]] = {}
        sizes: dict[str, int] = {}
        counters: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                for synced in (False, True):
                    mode = "synced" if synced else "warm"
                    taken, size, audio = write_shards(work, root / f"shards_{variant}", variant, synced)
                    times.setdefault((variant, mode), []).append(taken)
                    sizes[variant], counters[variant] = size, audio
                    copied = cp_seconds(root / f"shards_{variant}", root / f"copy_{variant}", synced)
                    times.setdefault((f"cp_{variant}", mode), []).append(copied)
            print(f"  repeat done, load {os.getloadavg()[0]:.2f}")
        print(f"\nwrite ({args.repeats} interleaved repeats, medians; MB/s of shard bytes):")
        print(f"  {'variant':9s} {'MB':>7s} | {'stage':>7s} {'cp':>7s} {'ratio':>5s} {'x rt':>5s} | synced: "
              f"{'stage':>7s} {'cp':>7s} {'ratio':>5s}")  # fmt: skip
        for variant in VARIANTS:
            row = []
            for mode in ("warm", "synced"):
                stage = sizes[variant] / 1e6 / statistics.median(times[(variant, mode)])
                cp = sizes[variant] / 1e6 / statistics.median(times[(f"cp_{variant}", mode)])
                row.append((stage, cp))
            realtime = audio_hours * 3600 / statistics.median(times[(variant, "warm")])
            (warm, warm_cp), (on_disk, disk_cp) = row
            megabytes = sizes[variant] / 1e6
            print(
                f"  {variant:9s} {megabytes:7.1f} | {warm:7.1f} {warm_cp:7.1f} {warm / warm_cp:5.2f} "
                f"{realtime:5.0f} | synced: {on_disk:7.1f} {disk_cp:7.1f} {on_disk / disk_cp:5.2f}"
            )
        for variant in ("flac", "reencode"):
            print(f"  how the {variant} variant made each audio member: {counters[variant]}")
        print("\nread + decode every sample (FLAC shards):")
        for workers in (0, 2):
            rates = [read_rate(root / "shards_flac", workers) for _ in range(args.repeats)]
            samples = statistics.median(r[0] for r in rates)
            xrt = statistics.median(r[1] for r in rates)
            where = "main process" if workers == 0 else f"DataLoader, {workers} workers"
            print(f"  {where:24s}: {samples:7.1f} samples/s ({xrt:6.0f} x real time)")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
