"""How the driver's planning and finalize grow with the corpus: synthetic WORKDIRs of 10k to 1M tracks.

Run from the repository root (after `pip install -e .`):

    .venv/bin/python benchmarks/scale.py                          # 10k, 100k, 1M tracks
    .venv/bin/python benchmarks/scale.py --sizes 10000,100000     # a quick look

A WORKDIR here holds what the stages' plans read and nothing else: the source `manifest.parquet`,
`audio_24k/manifest.parquet` and one teacher's `labels/kmeans100/labels.parquet` (+ teacher.json). Track
lengths are drawn like a music corpus (log-normal, median 160 s, mean 192 s, at least 10 s): about 7
segments of 30 s a track, as MERT-v1-330M's 3M tracks and 20M segments. No audio is written: no plan
opens a file.

Measured per size, each in a fresh process (its peak RSS is VmHWM, its own):
- `resample`, `features` (MFCC) and `tokenize` (k-means) plans: the manifest streamed into task listings;
- `shard` plan: admission against the labels, segmentation, the seeded shuffle per split, dealing into
  shards, task listings; and `shard` finalize (index.json from every shard's part, rejects, pruning), with
  the parts written beforehand as the workers would.
The growth from one size to the next, and a least-squares line through every size, extrapolated to 3M
tracks and 20M segments, go to DIR/scale.json and a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RATE = 24000
TEACHER = "kmeans100"
GOAL_TRACKS, GOAL_SEGMENTS = 3_000_000, 20_000_000
STAGES = ("resample", "features", "tokenize", "shard")  # every stage whose plan reads the manifests


def build_workdir(work: Path, tracks: int, seed: int = 0) -> dict[str, int]:
    """The three manifests of a `tracks`-file WORKDIR, written with pyarrow in the toolkit's schemas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mert_pipeline.layout import Workdir
    from mert_pipeline.manifests.io import META_ROOT, META_VERSION
    from mert_pipeline.manifests.records import (
        SCHEMA_VERSION,
        SCHEMAS,
        AudioRecord,
        LabelRecord,
        ResampledRecord,
    )

    rng = np.random.default_rng(seed)
    seconds = np.maximum(10.0, rng.lognormal(np.log(160.0), 0.6, tracks))
    num_samples = (seconds * RATE).astype(np.int64)
    raw = rng.integers(0, 2**63, size=tracks, dtype=np.int64).astype(np.uint64) * 2 + 1
    ids = [f"{x:016x}" for x in raw.tolist()]
    hashes = [f"{i}{x:016x}" for i, x in zip(ids, rng.integers(0, 2**63, size=tracks).tolist(), strict=True)]
    split = np.where(rng.random(tracks) < 0.01, "valid", "train")
    layout = Workdir(work)
    audio = layout.audio(RATE)
    source_rel = [f"artist{i % 997}/album{i % 31}/track{i:07d}.flac" for i in range(tracks)]
    flac_rel = [f"{i[:2]}/{i}.flac" for i in ids]
    size = (num_samples * 1.2).astype(np.int64)
    common = {"id": ids, "format": ["FLAC"] * tracks, "subtype": ["PCM_16"] * tracks}
    common |= {"sampling_rate": np.full(tracks, RATE, np.int32), "num_samples": num_samples}
    common |= {"duration": num_samples / RATE, "channels": np.ones(tracks, np.int32), "split": split}

    def write(path: Path, record: type, columns: dict, root: str, extra: dict | None = None) -> None:
        schema = SCHEMAS[record]
        meta = {META_ROOT: root.encode(), META_VERSION: SCHEMA_VERSION.encode(), **(extra or {})}
        table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd", row_group_size=65536)

    source = {**common, "path": [f"/music/{r}" for r in source_rel], "relpath": source_rel}
    source |= {"size_bytes": size, "content_hash": hashes}
    write(layout.manifest, AudioRecord, source, "/music")
    resampled = {**common, "path": [f"{audio.path}/{r}" for r in flac_rel], "relpath": flac_rel}
    resampled |= {"size_bytes": size, "content_hash": hashes, "source_path": source["path"]}
    resampled |= {"source_hash": hashes, "source_sampling_rate": np.full(tracks, 44100, np.int32)}
    resampled |= {"source_channels": np.full(tracks, 2, np.int32), "source_num_samples": num_samples}
    resampled |= {"peak": np.full(tracks, 0.9), "clipped_samples": np.zeros(tracks, np.int64)}
    resampled |= {"silent": np.zeros(tracks, bool), "clipped": np.zeros(tracks, bool)}
    write(audio.manifest, ResampledRecord, resampled, str(audio.path))
    facts = {"config": {"k": 100}, "config_hash": "0123456789abcdef", "hop": 320, "kind": "kmeans"}
    facts |= {"label_rate": 75.0, "n_q": 1, "name": TEACHER, "num_classes": 100, "sampling_rate": RATE}
    label_set = layout.labels(TEACHER)
    frames = -(-num_samples // 320)
    labels = {"id": ids, "teacher": [TEACHER] * tracks, "kind": ["kmeans"] * tracks}
    labels |= {"config_hash": [facts["config_hash"]] * tracks, "relpath": [f"{i[:2]}/{i}.npy" for i in ids]}
    labels |= {
        "n_q": np.ones(tracks, np.int16),
        "frames": frames,
        "num_classes": np.full(tracks, 100, np.int32),
    }
    labels |= {"label_rate": np.full(tracks, 75.0), "num_samples": num_samples}
    labels |= {"sampling_rate": np.full(tracks, RATE, np.int32), "split": split}
    write(label_set.manifest, LabelRecord, labels, str(label_set.path))
    label_set.teacher.write_text(json.dumps(facts, indent=2, sort_keys=True))
    return {"tracks": tracks, "hours": int(seconds.sum() / 3600)}


def measure(stage: str, work: Path) -> dict[str, float]:
    """One stage's driver work on WORKDIR, in this process: seconds and peak RSS (MB)."""
    from mert_pipeline.executor import rank_path

    def rss(field: str) -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith(field))
        return int(line.split()[1]) / 1024

    out: dict[str, float] = {}
    if stage != "shard":
        step = _streaming_stage(stage, work)
        out["base_mb"] = rss("VmRSS")
        start = time.perf_counter()
        tasks = step.plan()
        out["plan_s"] = time.perf_counter() - start
    else:
        from mert_pipeline.stages.shard import ShardConfig, ShardStage

        shards = work / "shards"
        step = ShardStage(ShardConfig(workdir=work, out=str(shards), teachers=(TEACHER,)))
        out["base_mb"] = rss("VmRSS")
        start = time.perf_counter()
        tasks = step.plan()
        out["plan_s"] = time.perf_counter() - start
        plan_peak = rss("VmHWM")
        names = json.loads((rank_path(step, "listing", 0, ".jsonl").parent.parent / "plan.json").read_text())
        rank_path(step, "parts", 0, ".json").parent.mkdir(parents=True, exist_ok=True)
        for task, name in zip(tasks, names["shards"], strict=True):  # what the workers would have written
            part = {
                "shard": name,
                "split": name.split("/")[0],
                "samples": task.size,
                "bytes": 1,
                "sha256": "0",
            }
            rank_path(step, "parts", task.rank, ".json").write_text(json.dumps({**part, "seconds": 1.0}))
        start = time.perf_counter()
        step.finalize(tasks, {"samples": sum(t.size for t in tasks)})
        out["finalize_s"] = time.perf_counter() - start
        out["plan_peak_mb"] = plan_peak
        out["segments"] = sum(t.size for t in tasks)
    out["tasks"] = len(tasks)
    out["peak_mb"] = rss("VmHWM")
    return out


def _streaming_stage(stage: str, work: Path) -> Any:
    """The file-by-file stage `stage` on WORKDIR: resample, features (MFCC) or tokenize (k-means on
    centroids made here: the plan reads only their hash)."""
    if stage == "resample":
        from mert_pipeline.stages.resample import ResampleConfig, ResampleStage

        return ResampleStage(ResampleConfig(workdir=work))
    if stage == "features":
        from mert_pipeline.stages.features import FeaturesConfig, FeaturesStage

        return FeaturesStage(FeaturesConfig(workdir=work))
    from mert_pipeline.stages.tokenize import TokenizeConfig, TokenizeStage
    from mert_pipeline.teachers.kmeans import KMeansTeacher

    centroids = work / "scale_centroids.npy"
    np.save(centroids, np.random.default_rng(0).standard_normal((100, 39)).astype(np.float32))
    teacher = KMeansTeacher(centroids=str(centroids), threads=1).resolve()
    return TokenizeStage(TokenizeConfig(workdir=work, teacher=teacher, name="scale_k100"))


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """The least-squares line through (xs, ys), evaluated at `at`."""
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    return float(slope * at + intercept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "mert-pipeline" / "scale")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated track counts")
    parser.add_argument("--measure", nargs=2, metavar=("STAGE", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep each size's WORKDIR (they are big)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    root = args.dir.resolve()
    results: dict[str, dict] = {}
    for tracks in [int(s) for s in args.sizes.split(",")]:
        work = root / f"work-{tracks}"
        shutil.rmtree(work, ignore_errors=True)  # the benchmark's own folder, remade for each size
        start = time.perf_counter()
        made = build_workdir(work, tracks)
        print(f"{tracks} tracks ({made['hours']} h) built in {time.perf_counter() - start:.0f} s", flush=True)
        row = {**made}
        for stage in STAGES:
            cmd = [sys.executable, __file__, "--measure", stage, str(work)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{stage} at {tracks} tracks failed:\n{done.stderr[-3000:]}")
            row[stage] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {stage}: {row[stage]}", flush=True)
        results[str(tracks)] = row
        if not args.keep:
            shutil.rmtree(work)
    sizes = sorted(int(k) for k in results)
    report = {"sizes": results}
    if len(sizes) >= 2:
        segs = [results[str(s)]["shard"]["segments"] for s in sizes]
        report["extrapolated_3M"] = {
            "segments_per_track": segs[-1] / sizes[-1],
            "shard_plan_s": fit(segs, [results[str(s)]["shard"]["plan_s"] for s in sizes], GOAL_SEGMENTS),
            "shard_plan_peak_mb": fit(
                segs, [results[str(s)]["shard"]["plan_peak_mb"] for s in sizes], GOAL_SEGMENTS
            ),
            "shard_finalize_s": fit(
                sizes, [results[str(s)]["shard"]["finalize_s"] for s in sizes], GOAL_TRACKS
            ),
        }
        for stage in STAGES[:-1]:
            times = [results[str(s)][stage]["plan_s"] for s in sizes]
            report["extrapolated_3M"][f"{stage}_plan_s"] = fit(sizes, times, GOAL_TRACKS)
    (root / "scale.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


def table(report: dict) -> str:
    """Markdown: per size, each measure, and its growth from the size before."""
    lines = [
        "| tracks | segments | resample plan s | features plan s | tokenize plan s | their peak MB | "
        "shard plan s | shard plan peak MB | shard finalize s | growth (tracks x) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    previous = None
    for size, row in sorted(report["sizes"].items(), key=lambda kv: int(kv[0])):
        shard = row["shard"]
        streaming = " | ".join(f"{row[stage]['plan_s']:.1f}" for stage in STAGES[:-1])
        streaming += f" | {max(row[stage]['peak_mb'] for stage in STAGES[:-1]):.0f}"
        growth = ""
        if previous is not None:
            ratio = int(size) / int(previous[0])
            p = previous[1]
            growth = (
                f"x{ratio:.0f}: plan x{shard['plan_s'] / p['shard']['plan_s']:.1f}, "
                f"memory above base x{(shard['plan_peak_mb'] - shard['base_mb']) / max(1.0, p['shard']['plan_peak_mb'] - p['shard']['base_mb']):.1f}, "  # noqa: E501
                f"finalize x{shard['finalize_s'] / p['shard']['finalize_s']:.1f}"
            )
        lines.append(
            f"| {int(size):,} | {shard['segments']:,} | {streaming} | {shard['plan_s']:.1f} | "
            f"{shard['plan_peak_mb']:.0f} | {shard['finalize_s']:.1f} | {growth} |"
        )
        previous = (size, row)
    if "extrapolated_3M" in report:
        e = report["extrapolated_3M"]
        lines.append(
            f"\nExtrapolated to 3M tracks / 20M segments: shard plan {e['shard_plan_s'] / 60:.1f} min, "
            f"{e['shard_plan_peak_mb'] / 1024:.2f} GB peak; shard finalize {e['shard_finalize_s']:.0f} s; "
            + "; ".join(f"{stage} plan {e[stage + '_plan_s'] / 60:.1f} min" for stage in STAGES[:-1])
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
