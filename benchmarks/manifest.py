"""Benchmark of the `manifest` stage: executors side by side on one synthetic corpus.

Run from the repository root (the script puts the repository on sys.path and PYTHONPATH itself):

    /tmp/v1/bin/python benchmarks/manifest.py            # 2000 files x 30 s: 4.5 GB, 16.7 h of audio
    /tmp/v1/bin/python benchmarks/manifest.py --quick    # 200 files x 10 s: a fast sanity run

The figures in benchmarks/RESULTS.md come from

    /tmp/v1/bin/python benchmarks/manifest.py --repeats 3 --deep-one-worker

The corpus is built once under --corpus (default /tmp/mert-bench-corpus/n{FILES}_s{SECONDS}/audio) and
reused by later runs with the same size. It is made from a few distinct synthesized tracks (--bases, 16 by
default, each its own seed, cycling 44.1/48 kHz and mono/stereo) written many times with a different gain
per file (0.70-1.15, never clipping), so every file
has its own content hash (the stage rejects duplicate content) without rendering every file. Formats
cycle 6:1:1 over FLAC PCM_16, WAV PCM_16 and OGG Vorbis.

What is timed, on the same corpus and after one untimed warm-up run (so figures are warm page cache):

- the stage through `execute`: local executor with 1 and 2 workers, Ray with 2 workers (ray.init and
  shutdown included), each quick probing; and local with 2 workers and ``deep=True`` (with
  --deep-one-worker also local with 1 worker and ``deep=True``). Every run uses a fresh workdir and
  ``force=True``, so each one really walks, hashes and probes every file. Besides wall time the table
  shows the tasks' own seconds summed (from their stats files): wall minus that, for one worker, is the
  driver's share (walk, finalize) plus, for pools and Ray, process start-up;
- Ray start and stop alone (``ray.init`` / ``ray.shutdown`` with the executor's arguments);
- the raw parts of one probe, in this one process over all files: xxh3-128 hashing (``hash_file``),
  ``soundfile.info``, and ``probe_audio(deep=False)`` (header plus edge decode), also split by format.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Spawned pool workers get sys.path from the parent, Ray workers only the environment: set both.
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
)

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from mert_pipeline.audio import hash_file, probe_audio  # noqa: E402
from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.executor import ExecutorConfig, execute, stage_dir  # noqa: E402
from mert_pipeline.stages.manifest import ManifestConfig, ManifestStage, resolve_roots  # noqa: E402

CORPUS_VERSION = 1
MARKER = "corpus.json"
BUILDING = ".building"
# Six FLAC for each WAV and OGG: FLAC is the common archive format and keeps the corpus small.
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("FLAC", "PCM_16", ".flac"),
    ("FLAC", "PCM_16", ".flac"),
    ("WAV", "PCM_16", ".wav"),
    ("FLAC", "PCM_16", ".flac"),
    ("OGG", "VORBIS", ".ogg"),
    ("FLAC", "PCM_16", ".flac"),
    ("FLAC", "PCM_16", ".flac"),
    ("FLAC", "PCM_16", ".flac"),
)
RATES = (44100, 48000)
LAYOUTS = (1, 2)
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
Kind = Literal["local", "ray"]


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """One distinct rendered track; many corpus files are gain-scaled copies of it."""

    seed: int
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class FileSpec:
    relpath: str
    base: int
    format: str
    subtype: str
    gain: float


def plan_bases(n_bases: int, seed: int) -> list[Base]:
    """Bases cycle through sample rates and channel layouts so each combination is covered."""
    return [
        Base(seed * 1000 + k, RATES[k % len(RATES)], LAYOUTS[(k // len(RATES)) % len(LAYOUTS)])
        for k in range(n_bases)
    ]


def plan_files(n_files: int, n_bases: int) -> list[FileSpec]:
    """Blocks of 8 consecutive files share a base and cover every format; gains are all distinct."""
    specs = []
    for i in range(n_files):
        fmt, subtype, ext = FORMATS[i % len(FORMATS)]
        base = (i // len(FORMATS)) % n_bases
        # Renders peak at <= 0.85, so gains in [0.70, 1.15) never clip at the 0.99 limit.
        gain = 0.70 + 0.45 * ((i * GOLDEN) % 1.0)
        relpath = f"artist_{i // 100:03d}/album_{(i // 20) % 5}/track_{i % 20:02d}{ext}"
        specs.append(FileSpec(relpath, base, fmt, subtype, gain))
    return specs


def _write_base(job: tuple[Path, Base, float, list[FileSpec]]) -> int:
    """Render one base and write every file made from it; returns the bytes written."""
    root, base, seconds, specs = job
    audio = render_track(base.seed, seconds, base.sample_rate, base.channels)
    written = 0
    for spec in specs:
        path = root / spec.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(
            path, audio * np.float32(spec.gain), base.sample_rate, format=spec.format, subtype=spec.subtype
        )
        written += path.stat().st_size
    return written


def build_corpus(corpus: Path, n_files: int, seconds: float, n_bases: int, seed: int, jobs: int) -> Path:
    """Build the corpus under corpus/n{FILES}_s{SECONDS}/audio, or reuse it if its marker matches."""
    home = corpus / f"n{n_files}_s{seconds:g}"
    root = home / "audio"
    wanted = {"version": CORPUS_VERSION, "files": n_files, "seconds": seconds, "bases": n_bases, "seed": seed}
    marker = home / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted and root.is_dir():
        print(f"corpus: reusing {root}")
        return root
    if home.exists():
        if not ((home / BUILDING).exists() or marker.exists()):
            raise SystemExit(f"{home} exists but was not made by this script; pass another --corpus")
        shutil.rmtree(home)
    home.mkdir(parents=True)
    (home / BUILDING).touch()
    bases = plan_bases(n_bases, seed)
    specs = plan_files(n_files, n_bases)
    by_base: dict[int, list[FileSpec]] = defaultdict(list)
    for spec in specs:
        by_base[spec.base].append(spec)
    work = [(root, bases[k], seconds, by_base[k]) for k in sorted(by_base)]
    print(f"corpus: writing {n_files} files x {seconds:g} s from {len(work)} distinct tracks to {root} ...")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        written = sum(pool.map(_write_base, work))
    print(f"corpus: wrote {written / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    marker.write_text(json.dumps(wanted, sort_keys=True))
    (home / BUILDING).unlink()
    return root


def list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def describe_corpus(paths: list[Path], seconds: float) -> dict[str, Any]:
    """Size, audio hours and per-extension counts of the corpus (audio length is known from the plan)."""
    by_ext: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in paths:
        entry = by_ext[path.suffix.lower()]
        entry[0] += 1
        entry[1] += path.stat().st_size
    total = sum(b for _, b in by_ext.values())
    return {
        "files": len(paths),
        "bytes": total,
        "audio_hours": len(paths) * seconds / 3600.0,
        "by_ext": {ext: {"files": n, "bytes": b} for ext, (n, b) in sorted(by_ext.items())},
    }


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    config: str
    seconds: list[float]
    files: int
    audio_seconds: float
    task_seconds: list[float] = field(default_factory=list)  # per run: sum of the tasks' own seconds

    @property
    def wall(self) -> float:
        return statistics.median(self.seconds)


def run_stage(
    root: Path, workdir: Path, kind: Kind, workers: int, deep: bool, files_per_task: int
) -> tuple[float, float, dict[str, Any]]:
    """One full manifest run in a fresh workdir with force=True.

    Returns the wall seconds, the sum of the tasks' own seconds (from their stats files) and the counts.
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    stage = ManifestStage(
        ManifestConfig(
            roots=resolve_roots([root]),
            workdir=workdir,
            files_per_task=files_per_task,
            deep=deep,
            min_seconds=1.0,
        )
    )
    report = execute(stage, ExecutorConfig(kind=kind, workers=workers, force=True))
    if not report.ok:
        raise SystemExit(f"{kind} x{workers}: failed tasks {[(o.rank, o.error) for o in report.failed]}")
    task_seconds = sum(
        json.loads(p.read_text())["seconds"] for p in (stage_dir(stage) / "stats").glob("*.json")
    )
    return report.seconds, task_seconds, report.summary["counts"]


def check_counts(label: str, counts: dict[str, Any], n_files: int) -> None:
    """Every corpus file must be seen and accepted; anything else means the timing is not comparable."""
    if counts.get("files_seen") != n_files or counts.get("accepted") != n_files:
        print(f"WARNING {label}: expected {n_files} files seen and accepted, got {counts}")


def time_ray_start(workers: int) -> tuple[float, float]:
    """ray.init and ray.shutdown alone, with the arguments the executor uses for a local cluster."""
    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=max(1, workers),
        num_gpus=None,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=True,
    )
    started = time.perf_counter()
    ray.shutdown()
    return started - start, time.perf_counter() - started


def time_per_file(paths: list[Path], fn: Callable[[Path], object]) -> tuple[float, dict[str, float]]:
    """Total seconds of fn over all paths in this process, and seconds summed per file extension."""
    per_ext: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        fn(path)
        per_ext[path.suffix.lower()] += time.perf_counter() - t0
    return time.perf_counter() - start, dict(per_ext)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown"
    mem = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    except OSError:
        pass
    import pyarrow
    import ray
    import xxhash

    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram": mem,
        "python": platform.python_version(),
        "libsndfile": sf.__libsndfile_version__,
        "soundfile": sf.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "xxhash": xxhash.VERSION,
        "ray": ray.__version__,
    }


def table(rows: list[Row], reference: Row) -> str:
    """Markdown table: wall time, throughput and speed relative to the reference row."""
    lines = [
        "| config | wall s | files/s | audio h probed/s | speed vs local 1 worker | sum of task s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        spread = f" ({min(row.seconds):.2f}-{max(row.seconds):.2f})" if len(row.seconds) > 1 else ""
        tasks = f"{statistics.median(row.task_seconds):.2f}" if row.task_seconds else "-"
        lines.append(
            f"| {row.config} | {row.wall:.2f}{spread} | {row.files / row.wall:.0f} | "
            f"{row.audio_seconds / 3600.0 / row.wall:.2f} | {reference.wall / row.wall:.2f}x | {tasks} |"
        )
    return "\n".join(lines)


def format_table(per_ext: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    """Milliseconds per file of each raw measurement, split by file extension."""
    names = list(per_ext)
    lines = ["| format | files | " + " | ".join(f"{n} ms/file" for n in names) + " |"]
    lines.append("|---|---:|" + "---:|" * len(names))
    for ext in sorted(counts):
        cells = " | ".join(f"{1000.0 * per_ext[n].get(ext, 0.0) / counts[ext]:.2f}" for n in names)
        lines.append(f"| {ext} | {counts[ext]} | {cells} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", type=Path, default=Path("/tmp/mert-bench-corpus"), help="corpus cache dir"
    )
    parser.add_argument("--files", type=int, default=None, help="corpus files (default 2000; --quick 200)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per file (default 30; --quick 10)"
    )
    parser.add_argument("--bases", type=int, default=16, help="distinct rendered tracks in the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesized tracks")
    parser.add_argument(
        "--files-per-task",
        type=int,
        default=None,
        help="stage task size (default 200, as the CLI; --quick 25)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per config; the table shows the median")
    parser.add_argument("--quick", action="store_true", help="small corpus (200 x 10 s) for a sanity run")
    parser.add_argument(
        "--deep-one-worker",
        action="store_true",
        help="also time deep probing with 1 local worker (shows 2-worker scaling on decode-bound work)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where run workdirs go (default: a tmp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    args.files = args.files if args.files is not None else (200 if args.quick else 2000)
    args.seconds = args.seconds if args.seconds is not None else (10.0 if args.quick else 30.0)
    if args.files_per_task is None:
        args.files_per_task = 25 if args.quick else 200
    if args.files < 1 or args.seconds < 1.0 or args.bases < 1 or args.repeats < 1:
        parser.error("--files, --bases and --repeats must be >= 1 and --seconds >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    jobs = len(os.sched_getaffinity(0))
    root = build_corpus(args.corpus, args.files, args.seconds, args.bases, args.seed, jobs)
    paths = list_files(root)
    corpus = describe_corpus(paths, args.seconds)
    print(
        f"corpus: {corpus['files']} files, {corpus['bytes'] / 1e9:.2f} GB, {corpus['audio_hours']:.2f} h "
        f"of audio; " + ", ".join(f"{e}: {v['files']}" for e, v in corpus["by_ext"].items())
    )
    n = corpus["files"]
    audio_s = corpus["audio_hours"] * 3600.0
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="mert-bench-work-")) if own_tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    fpt = args.files_per_task

    configs: list[tuple[str, Kind, int, bool]] = [
        ("local, 1 worker", "local", 1, False),
        ("local, 2 workers", "local", 2, False),
        ("ray, 2 workers (incl. start/stop)", "ray", 2, False),
        ("local, 2 workers, deep", "local", 2, True),
    ]
    if args.deep_one_worker:
        configs.append(("local, 1 worker, deep", "local", 1, True))
    try:
        print("warm-up: one untimed local 2-worker run (reads every byte into the page cache) ...")
        seconds, _, counts = run_stage(root, work / "warmup", "local", 2, False, fpt)
        check_counts("warm-up", counts, n)
        print(f"warm-up: {seconds:.2f} s, counts {counts}")

        raw_fns: dict[str, Callable[[Path], object]] = {
            "xxh3 hash": hash_file,
            "sf.info": sf.info,
            "quick probe": lambda p: probe_audio(p, deep=False),
        }
        raw_rows: list[Row] = []
        raw_ext: dict[str, dict[str, float]] = {}
        for name, fn in raw_fns.items():
            runs = sorted((time_per_file(paths, fn) for _ in range(args.repeats)), key=lambda r: r[0])
            times = [total for total, _ in runs]
            raw_ext[name] = runs[(len(runs) - 1) // 2][1]  # the per-format split of the median run
            raw_rows.append(Row(f"raw: {name} only, 1 process", times, n, audio_s))
            print(f"raw {name}: {statistics.median(times):.2f} s")

        stage_rows = [Row(label, [], n, audio_s) for label, *_ in configs]
        ray_start: list[float] = []
        ray_stop: list[float] = []
        for rep in range(args.repeats):
            for row, (label, kind, workers, deep) in zip(stage_rows, configs, strict=True):
                if kind == "ray":
                    init_s, stop_s = time_ray_start(workers)
                    ray_start.append(init_s)
                    ray_stop.append(stop_s)
                    print(f"ray.init alone: {init_s:.2f} s, ray.shutdown alone: {stop_s:.2f} s")
                seconds, task_s, counts = run_stage(
                    root, work / f"{kind}{workers}{'-deep' if deep else ''}-{rep}", kind, workers, deep, fpt
                )
                check_counts(label, counts, n)
                row.seconds.append(seconds)
                row.task_seconds.append(task_s)
                row.audio_seconds = float(counts.get("audio_seconds", audio_s))
                print(f"{label}: {seconds:.2f} s (tasks' own seconds summed: {task_s:.2f})")
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)

    reference = stage_rows[0]
    ray_row = Row(
        "ray.init + ray.shutdown alone", [a + b for a, b in zip(ray_start, ray_stop, strict=True)], n, audio_s
    )
    ext_counts = {ext: v["files"] for ext, v in corpus["by_ext"].items()}
    print()
    print(
        f"corpus: {n} files x {args.seconds:g} s, {corpus['bytes'] / 1e9:.2f} GB, "
        f"{corpus['audio_hours']:.2f} h; files_per_task={fpt}; repeats={args.repeats}; warm page cache"
    )
    print()
    print(table([*stage_rows, *raw_rows], reference))
    print()
    print(
        f"ray.init alone: {statistics.median(ray_start):.2f} s, ray.shutdown alone: "
        f"{statistics.median(ray_stop):.2f} s (median of {len(ray_start)})"
    )
    print()
    print("raw measurements by format (one process, warm cache):")
    print(format_table(raw_ext, ext_counts))
    if args.json is not None:
        result = {
            "machine": info,
            "corpus": corpus,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": [
                {
                    "config": r.config,
                    "seconds": r.seconds,
                    "task_seconds": r.task_seconds,
                    "files": r.files,
                    "audio_seconds": r.audio_seconds,
                }
                for r in [*stage_rows, *raw_rows, ray_row]
            ],
            "ray_init_seconds": ray_start,
            "ray_shutdown_seconds": ray_stop,
            "raw_seconds_by_ext": raw_ext,
        }
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
