"""Benchmark of the k-means teacher: fairseq's sklearn recipe vs faiss on one frame sample, assignment
throughput, and MFCC extraction speed against torchaudio's Kaldi MFCC.

Run from the repository root (the script puts the repository on sys.path itself):

    /tmp/v1/bin/python benchmarks/kmeans.py                    # 1M frames x 39, k=500
    /tmp/v1/bin/python benchmarks/kmeans.py --frames 200000    # a quicker run

Frames (``--source synth``, the default) are real 39-dim MFCC+delta features
(`mert_pipeline.teachers.features.MFCC`)
of 30-second tracks from `mert_pipeline.demo.synth.render_track` (seeds 0, 1, 2, ...), cut to ``--frames``;
they are cached as .npy under --cache. ``--source gmm`` draws ``--dim``-dim frames from a seeded mixture of
anisotropic Gaussians instead (any dim, no synthesis).

What is timed, on the same frames:

- the fairseq HuBERT recipe: ``MiniBatchKMeans(k, init="k-means++", max_iter=100, batch_size=10000,
  tol=0, max_no_improvement=100, n_init=20, reassignment_ratio=0)``, fitted once (it is the slow one);
- `fit_kmeans(backend="faiss")` with this repository's settings (greedy k-means++ seeds from sklearn on 16
  frames per centroid, 20 Lloyd iterations on at most 256 frames per centroid), the same with faiss's own
  k-means++ seeds, and faiss's library defaults (random seeds, 25 iterations), each the median of
  --repeats fits after one warm-up fit; fit times include seeding but never the inertia pass;
- fit times are wall time and process CPU time (`time.process_time`, every thread of this process):
  on a shared machine the CPU time is the less distorted of the two;
- both inertias are the exact sum of squared distances of all frames to their nearest centroid
  (`assign_with_distances`), so they compare directly;
- `assign` of all frames to the faiss centroids (median of --repeats): frames/s;
- MFCC extraction of --mfcc-files tracks of 30 s: `MFCC` per file, `MFCC.batch`, `MFCC.stream` in
  1-second blocks, against fairseq's ``torchaudio.compliance.kaldi.mfcc`` + two ``compute_deltas`` one file
  at a time (median of --repeats, after one warm-up), as times real time.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from mert_pipeline.demo.synth import render_track  # noqa: E402
from mert_pipeline.grid import HOP, SAMPLE_RATE  # noqa: E402
from mert_pipeline.teachers.features import MFCC  # noqa: E402
from mert_pipeline.teachers.kmeans import assign, assign_with_distances, fit_kmeans  # noqa: E402

TRACK_SECONDS = 30.0


def synth_mfcc_frames(frames: int, cache: Path) -> np.ndarray:
    path = cache / f"synth_mfcc_{frames}.npy"
    if path.exists():
        return np.load(path)
    extractor, parts, got, seed = MFCC(), [], 0, 0
    start = time.perf_counter()
    while got < frames:
        feats = extractor(render_track(seed, TRACK_SECONDS, SAMPLE_RATE))
        parts.append(feats)
        got += len(feats)
        seed += 1
    x = np.concatenate(parts)[:frames]
    print(f"synthesized {seed} tracks -> {x.shape} MFCC frames in {time.perf_counter() - start:.1f} s")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    return x


def gmm_frames(frames: int, dim: int, seed: int = 0, components: int = 2000) -> np.ndarray:
    """MFCC-like frames: many anisotropic Gaussian clusters with uneven weights, variance falling with dim."""
    rng = np.random.default_rng(seed)
    scale = 30.0 / np.sqrt(np.arange(1, dim + 1))
    means = rng.standard_normal((components, dim)) * scale
    weights = rng.dirichlet(np.full(components, 0.5))
    labels = rng.choice(components, size=frames, p=weights)
    x = np.empty((frames, dim), dtype=np.float32)
    for c in range(components):
        rows = np.flatnonzero(labels == c)
        if len(rows) == 0:
            continue
        basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0] * rng.uniform(0.2, 3.0, dim)
        x[rows] = means[c] + (rng.standard_normal((len(rows), dim)) * scale * 0.3) @ basis
    return x


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def kaldi_fairseq(x: np.ndarray) -> torch.Tensor:
    """fairseq dump_mfcc_feature.py at 24 kHz / 75 Hz (snip_edges=False: Kaldi's centred framing)."""
    with torch.no_grad():
        mfccs = torchaudio.compliance.kaldi.mfcc(
            torch.from_numpy(x).view(1, -1),
            sample_frequency=SAMPLE_RATE,
            frame_shift=1000.0 * HOP / SAMPLE_RATE,
            frame_length=25.0,
            use_energy=False,
            snip_edges=False,
        ).T
        deltas = torchaudio.functional.compute_deltas(mfccs)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        return torch.cat([mfccs, deltas, ddeltas]).T.contiguous()


def bench_mfcc(files: int, repeats: int) -> list[dict[str, Any]]:
    tracks = [render_track(1000 + s, TRACK_SECONDS, SAMPLE_RATE) for s in range(files)]
    audio_s = files * TRACK_SECONDS
    extractor = MFCC()
    block = SAMPLE_RATE  # one-second blocks

    def streamed() -> list[np.ndarray]:
        return [
            np.concatenate(list(extractor.stream(t[i : i + block] for i in range(0, len(t), block))))
            for t in tracks
        ]

    candidates: list[tuple[str, Callable[[], Any]]] = [
        (
            "torchaudio kaldi.mfcc + compute_deltas, per file (fairseq)",
            lambda: [kaldi_fairseq(t) for t in tracks],
        ),
        ("MFCC, per file", lambda: [extractor(t) for t in tracks]),
        ("MFCC.batch, all files", lambda: extractor.batch(tracks)),
        ("MFCC.stream, 1 s blocks, per file", streamed),
    ]
    rows = []
    for name, fn in candidates:
        fn()  # warm-up
        med, times, _ = median_time(fn, repeats)
        rows.append({"config": name, "seconds": med, "times": times, "x_real_time": audio_s / med})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_kaldi"] = base / row["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--dim", type=int, default=39)
    parser.add_argument("--source", choices=["synth", "gmm"], default="synth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mfcc-files", type=int, default=16, help="30 s tracks for the MFCC timing")
    parser.add_argument("--skip-sklearn", action="store_true", help="faiss and the rest only")
    parser.add_argument(
        "--threads", type=int, help="threads for torch, faiss, BLAS and OpenMP (default: every core)"
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mert-bench-kmeans"))
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.source == "synth" and args.dim != 39:
        parser.error("--source synth gives 39-dim MFCC frames; use --source gmm for another --dim")
    if args.threads:
        # One limit for every pool: torch's, faiss's OpenMP, and the BLAS/OpenMP pools sklearn uses.
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)

    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads, {faiss.get_num_gpus()} GPUs), "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}"
    )
    # Other processes on the box wreck these timings (2-thread OpenMP pools spin when a core is taken):
    # the load average before and after says whether the run had the machine to itself.
    print(f"load average at start: {os.getloadavg()}")
    x = (
        synth_mfcc_frames(args.frames, args.cache)
        if args.source == "synth"
        else gmm_frames(args.frames, args.dim)
    )
    print(f"frames: {x.shape} from {args.source}, k={args.k}, seed={args.seed}")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "fits": []}

    rows: list[dict[str, Any]] = []
    if not args.skip_sklearn:
        sk = fit_kmeans(x, args.k, seed=args.seed, backend="sklearn")
        rows.append(
            {
                "config": "fairseq recipe: sklearn MiniBatchKMeans, n_init=20",
                "times": [sk.seconds],
                "cpu_times": [sk.cpu_seconds],
                "inertia": sk.inertia,
            }
        )
        print(f"{rows[-1]['config']}: {sk.seconds:.1f} s", flush=True)

    for name, seeding in [
        ("faiss, this repo: greedy k-means++ seeds (sklearn, 16 frames/centroid), niter 20", "sklearn"),
        ("faiss, faiss's own k-means++ seeds, niter 20", "faiss"),
    ]:
        if seeding == "faiss" and not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            continue  # faiss < 1.14
        fit_kmeans(x, args.k, seed=args.seed, backend="faiss", seeding=seeding)  # warm-up
        fits = [
            fit_kmeans(x, args.k, seed=args.seed, backend="faiss", seeding=seeding)
            for _ in range(args.repeats)
        ]
        rows.append(
            {
                "config": name,
                "times": [fit.seconds for fit in fits],
                "cpu_times": [fit.cpu_seconds for fit in fits],
                "inertia": fits[0].inertia,
            }
        )
        print(f"{name}: median {statistics.median(rows[-1]['times']):.2f} s", flush=True)
        if seeding == "sklearn":
            ours = fits[0]

    def fit_library_defaults() -> np.ndarray:
        km = faiss.Kmeans(x.shape[1], args.k, niter=25, seed=args.seed, gpu=faiss.get_num_gpus() > 0)
        km.train(x)
        return km.centroids

    cpu_start = time.process_time()
    med, times, centroids = median_time(fit_library_defaults, args.repeats)
    cpu_each = (time.process_time() - cpu_start) / args.repeats
    _, sq = assign_with_distances(x, centroids)
    rows.append(
        {
            "config": "faiss, library defaults: random init, niter 25, <= 256 frames/centroid",
            "times": times,
            "cpu_times": [cpu_each] * args.repeats,
            "inertia": float(sq.sum(dtype=np.float64)),
        }
    )
    print(f"{rows[-1]['config']}: median {med:.2f} s", flush=True)

    reference = rows[0] if not args.skip_sklearn else None
    for row in rows:
        row["seconds"] = statistics.median(row["times"])
        row["cpu_seconds"] = statistics.median(row["cpu_times"])
        row["inertia_per_frame"] = row["inertia"] / len(x)
        if reference:
            row["speedup"] = reference["seconds"] / row["seconds"]
            row["cpu_speedup"] = reference["cpu_seconds"] / row["cpu_seconds"]
            row["inertia_ratio"] = row["inertia"] / reference["inertia"]
    results["fits"] = rows

    centroids = ours.centroids
    assign(x[:10000], centroids)  # warm-up
    med, times, _ = median_time(lambda: assign(x, centroids), args.repeats)
    results["assign"] = {"seconds": med, "times": times, "frames_per_s": len(x) / med, "k": args.k}
    results["mfcc"] = bench_mfcc(args.mfcc_files, args.repeats)

    print()
    print(f"### k-means, {len(x):,} x {x.shape[1]} frames ({args.source}), k={args.k}")
    print()
    print(
        "| config | fit s (wall) | speed-up, wall | fit CPU s | speed-up, CPU | inertia / frame "
        "| inertia vs recipe |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        speed = f"{row['speedup']:.1f}x" if reference else "-"
        cpu_speed = f"{row['cpu_speedup']:.1f}x" if reference else "-"
        ratio = f"{row['inertia_ratio']:.4f}" if reference else "-"
        print(
            f"| {row['config']} | {row['seconds']:.2f} | {speed} | {row['cpu_seconds']:.2f} | {cpu_speed} "
            f"| {row['inertia_per_frame']:.3f} | {ratio} |"
        )
    a = results["assign"]
    print()
    print(
        f"assign (exact, {len(x):,} frames to k={args.k}): {a['seconds']:.2f} s, "
        f"{a['frames_per_s'] / 1e6:.2f} M frames/s ({a['frames_per_s'] / 75 / 3600:.1f} h of audio per s)"
    )
    print()
    print(f"### MFCC+deltas (39 dims, 75 Hz), {args.mfcc_files} tracks x {TRACK_SECONDS:.0f} s")
    print()
    print("| extractor | s | x real time | speed-up vs kaldi.mfcc |")
    print("|---|---:|---:|---:|")
    for row in results["mfcc"]:
        print(
            f"| {row['config']} | {row['seconds']:.3f} | {row['x_real_time']:.0f} | "
            f"{row['speedup_vs_kaldi']:.2f}x |"
        )
    print()
    print(f"load average at end: {os.getloadavg()}")
    results["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
