"""The k-means teacher: sample frames, fit centroids (faiss, or fairseq's sklearn recipe), assign labels, and
measure label quality; `KMeansTeacher` is what `tokenize --teacher kmeans` runs, `fit_from_features` is
`mert-pipe kmeans fit`.

The HuBERT recipe (fairseq ``simple_kmeans``) fits ``MiniBatchKMeans`` on a sample of MFCC frames; that is
the reference for quality. faiss's Lloyd iterations from k-means++ seeds reach the same inertia 20-30 times
faster, which is what makes refitting per iteration cheap (see `fit_kmeans` and benchmarks/kmeans.py).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mert_pipeline.devices import set_threads
from mert_pipeline.fs import atomic_save_npy, atomic_write_json, sha256_file
from mert_pipeline.grid import HOP, SAMPLE_RATE
from mert_pipeline.layout import KMeansFit, Workdir
from mert_pipeline.manifests.records import Reject
from mert_pipeline.teachers import FileToLabel, label_frames

__all__ = [
    "FAISS_DEFAULTS",
    "SKLEARN_RECIPE",
    "JointCounts",
    "KMeansInputError",
    "KMeansResult",
    "KMeansTeacher",
    "ReservoirSampler",
    "assign",
    "assign_with_distances",
    "cluster_usage",
    "fit_from_features",
    "fitted_teacher",
    "fit_kmeans",
    "last_centroids",
    "teacher_agreement",
    "usage_from_counts",
]

# Rows per distance block: a (1024, k) float32 block stays in cache for k in the hundreds (1024-row blocks
# ran 1.5x faster than 4096-row ones for k=500).
_ASSIGN_BLOCK = 1024


# --------------------------------------------------------------------------------------------------
# Frame sampling
# --------------------------------------------------------------------------------------------------


class ReservoirSampler:
    """A uniform sample of at most `capacity` frames from a stream of per-file feature arrays.

    `add` is Algorithm R, vectorised per file: the frame at 0-based stream position p >= capacity draws
    j uniform in [0, p] and, if j < capacity, replaces slot j (within one file, a later frame that draws the
    same slot wins, as it would one frame at a time). After every `add` the kept frames are a uniform
    random subset of the frames seen. The sample is a pure function of the seed and the sequence of
    arrays passed to `add` (same file order, same per-file arrays).

    `merge` combines samplers fed disjoint streams (one per worker): the merged sample must be a uniform
    subset of size k = min(capacity, na + nb) of the union. In such a subset the number of frames from A
    follows the hypergeometric law (na, nb, k), and given that number, the frames from A are a uniform
    subset of A; a uniform subset of A's reservoir (itself uniform) is one. So merge draws that number
    exactly (k distinct positions out of na + nb, counting those below na; numpy's hypergeometric sampler
    stops at 1e9 frames) and then uniform subsets of each reservoir. Merging is associative in law, so
    workers can be reduced in any tree; feeding more frames afterwards keeps the sample uniform.
    Positions are stream positions of the merged stream "A then B" (B's are offset by na).
    """

    def __init__(self, capacity: int, dim: int, seed: int | Iterable[int] = 0) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"capacity and dim must be >= 1, got {capacity}, {dim}")
        self.capacity, self.dim = capacity, dim
        self.seen = 0
        self._data = np.empty((capacity, dim), dtype=np.float32)  # pages are touched only as slots fill
        self._positions = np.empty(capacity, dtype=np.int64)
        self._rng = np.random.default_rng(seed if isinstance(seed, int) else list(seed))

    @property
    def size(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def frames(self) -> np.ndarray:
        """The sampled frames (size, dim), float32 (a copy)."""
        return self._data[: self.size].copy()

    @property
    def positions(self) -> np.ndarray:
        """Stream position of each sampled frame, in the same order as `frames`."""
        return self._positions[: self.size].copy()

    def add(self, frames: np.ndarray) -> None:
        """Offer the frames of one file, shaped (n, dim)."""
        frames = np.asarray(frames)
        if frames.ndim != 2 or frames.shape[1] != self.dim:
            raise ValueError(f"expected frames shaped (n, {self.dim}), got {frames.shape}")
        n = len(frames)
        fill = min(n, max(0, self.capacity - self.seen))
        if fill:
            self._data[self.seen : self.seen + fill] = frames[:fill]
            self._positions[self.seen : self.seen + fill] = np.arange(self.seen, self.seen + fill)
        if n > fill:
            stream_pos = np.arange(self.seen + fill, self.seen + n, dtype=np.int64)
            slots = self._rng.integers(0, stream_pos + 1)
            accepted = np.flatnonzero(slots < self.capacity)
            if len(accepted):
                slots = slots[accepted]
                # Keep the last frame offered to each slot: np.unique on the reversed slots finds it.
                _, last = np.unique(slots[::-1], return_index=True)
                rows = accepted[len(accepted) - 1 - last]
                self._data[slots[len(slots) - 1 - last]] = frames[rows]
                self._positions[slots[len(slots) - 1 - last]] = stream_pos[rows]
        self.seen += n

    def merge(self, other: ReservoirSampler) -> ReservoirSampler:
        """Fold in a sampler of a disjoint stream (same capacity and dim); uses this sampler's generator."""
        if other.capacity != self.capacity or other.dim != self.dim:
            raise ValueError("can only merge samplers of equal capacity and dim")
        total = self.seen + other.seen
        if total <= self.capacity:
            mine, theirs = np.arange(self.size), np.arange(other.size)
        else:
            k = self.capacity
            from_self = int(np.count_nonzero(self._rng.choice(total, size=k, replace=False) < self.seen))
            mine = np.sort(self._rng.choice(self.size, size=from_self, replace=False))
            theirs = np.sort(self._rng.choice(other.size, size=k - from_self, replace=False))
        kept = len(mine)
        self._data[:kept] = self._data[mine]
        self._positions[:kept] = self._positions[mine]
        self._data[kept : kept + len(theirs)] = other._data[theirs]
        self._positions[kept : kept + len(theirs)] = other._positions[theirs] + self.seen
        self.seen = total
        return self


# --------------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------------

# fairseq examples/hubert/simple_kmeans/learn_kmeans.py defaults (random_state added for reproducibility).
SKLEARN_RECIPE: dict[str, Any] = {
    "init": "k-means++",
    "max_iter": 100,
    "batch_size": 10000,
    "tol": 0.0,
    "max_no_improvement": 100,
    "n_init": 20,
    "reassignment_ratio": 0.0,
    "compute_labels": False,
}

# Chosen by measurement against SKLEARN_RECIPE (benchmarks/kmeans.py): see fit_kmeans.
FAISS_DEFAULTS: dict[str, Any] = {
    "niter": 20,
    "nredo": 1,
    "max_points_per_centroid": 256,
    "seeding": "sklearn",
    "seed_points_per_centroid": 16,
}


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 (k, D)
    inertia: float  # sum over the fitted frames of the squared distance to the nearest centroid
    backend: str
    seconds: float  # the fit, seeding included; not the inertia pass
    config: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # process CPU time of the fit: less sensitive than `seconds` to other load

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def fit_kmeans(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    backend: Literal["faiss", "sklearn"] = "faiss",
    niter: int | None = None,
    gpu: bool | None = None,
    nredo: int | None = None,
    max_points_per_centroid: int | None = None,
    seeding: Literal["sklearn", "faiss"] | None = None,
    verbose: bool = False,
) -> KMeansResult:
    """Fit k centroids to frames x (N, D) and report the inertia of x, computed by `assign_with_distances`
    for both backends so that they compare.

    faiss: `niter` Lloyd iterations on at most ``max_points_per_centroid * k`` frames (faiss subsamples
    above that), from k-means++ seeds. Seeding is what decides the quality: from faiss's default random
    seeds the inertia stays 1.2-1.7% above the sklearn recipe's even after 40 iterations, from k-means++
    seeds it is at or below it after 20. ``seeding="sklearn"`` (default) runs sklearn's greedy
    ``kmeans_plusplus`` (2 + ln k candidates per step, as MiniBatchKMeans does) on a uniform subsample of
    16 frames per centroid and hands the seeds to faiss; ``seeding="faiss"`` uses faiss's plain k-means++
    (faiss >= 1.14) on faiss's whole subsample. Measured on MFCC frames of synthesized music, k=500, seeds
    0-2 (benchmarks/kmeans.py): greedy seeds give 0.989-0.990x the recipe's inertia at 200k frames and
    1.000-1.003x at 1M, faiss's seeds 0.993-0.994x and 1.003-1.005x, at about the same time (~1.6 s on
    2 cores, 20-30x faster than the recipe), and the greedy path works with any faiss version.

    `gpu=None` uses the GPU when faiss sees one (seeding stays on the CPU). On CPU the result is
    deterministic for a seed and a fixed OpenMP thread count (faiss splits its reductions by thread;
    `faiss.omp_set_num_threads` pins the count); GPU results can differ in the last bits between runs.

    sklearn: fairseq's HuBERT recipe, ``MiniBatchKMeans(**SKLEARN_RECIPE, random_state=seed)``; `niter`
    overrides its max_iter (passes over the data).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"need frames shaped (N >= k={k}, D), got {x.shape}")
    if not 1 <= k <= 32768:
        raise ValueError(f"k must be in [1, 32768] for int16 labels, got {k}")
    n, d = x.shape
    config: dict[str, Any] = {"backend": backend, "k": k, "seed": seed, "n": n, "dim": d}
    if backend == "faiss":
        import faiss

        use_gpu = faiss.get_num_gpus() > 0 if gpu is None else bool(gpu)
        seeding = FAISS_DEFAULTS["seeding"] if seeding is None else seeding
        params = {
            "niter": FAISS_DEFAULTS["niter"] if niter is None else niter,
            "nredo": FAISS_DEFAULTS["nredo"] if nredo is None else nredo,
            "max_points_per_centroid": (
                FAISS_DEFAULTS["max_points_per_centroid"]
                if max_points_per_centroid is None
                else max_points_per_centroid
            ),
        }
        extra: dict[str, Any] = {}
        if seeding == "sklearn":
            if params["nredo"] != 1:
                raise ValueError("nredo > 1 needs seeding='faiss' (each redo reseeds)")
            init = f"k-means++ (sklearn greedy, {FAISS_DEFAULTS['seed_points_per_centroid']} frames/centroid)"
        elif seeding == "faiss":
            if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
                raise ValueError(f"faiss {faiss.__version__} has no k-means++ seeding; use seeding='sklearn'")
            extra["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
            init = "k-means++ (faiss)"
        else:
            raise ValueError(f"unknown seeding {seeding!r} (sklearn or faiss)")
        config.update(params, init=init, gpu=use_gpu, omp_threads=faiss.omp_get_max_threads())
        km = faiss.Kmeans(d, k, seed=seed, gpu=use_gpu, verbose=verbose, spherical=False, **params, **extra)
        start, cpu = time.perf_counter(), time.process_time()
        if seeding == "sklearn":
            km.train(x, init_centroids=_greedy_seeds(x, k, seed, FAISS_DEFAULTS["seed_points_per_centroid"]))
        else:
            km.train(x)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    elif backend == "sklearn":
        from sklearn.cluster import MiniBatchKMeans

        params = dict(SKLEARN_RECIPE)
        if niter is not None:
            params["max_iter"] = niter
        config.update(params)
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, verbose=int(verbose), **params)
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(x)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        centroids = np.ascontiguousarray(model.cluster_centers_, dtype=np.float32)
    else:
        raise ValueError(f"unknown backend {backend!r} (faiss or sklearn)")
    _, sq = assign_with_distances(x, centroids)
    return KMeansResult(centroids, float(sq.sum(dtype=np.float64)), backend, seconds, config, cpu)


def _greedy_seeds(x: np.ndarray, k: int, seed: int, points_per_centroid: int) -> np.ndarray:
    """sklearn's greedy k-means++ on a uniform subsample: seeds cost O(points_per_centroid * k^2 * D)."""
    from sklearn.cluster import kmeans_plusplus

    size = min(len(x), k * points_per_centroid)
    rng = np.random.default_rng(seed)
    sample = x if size == len(x) else x[np.sort(rng.choice(len(x), size=size, replace=False))]
    centers, _ = kmeans_plusplus(sample, k, random_state=seed)
    return np.ascontiguousarray(centers, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Assign
# --------------------------------------------------------------------------------------------------


def assign_with_distances(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid (squared L2) and its squared distance for each frame.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``: the argmin over c does not need |x|^2, so each block is one
    matrix product plus a broadcast add of the precomputed |c|^2. Blocks of rows bound memory to
    (block, k). The expansion loses about eps * |x|^2 to cancellation, so the returned distance (float32)
    is recomputed directly as |x - c_best|^2, which costs one pass over the block. Labels are int16.
    """
    x = np.asarray(features, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"features {x.shape} and centroids {c.shape} must be (T, D) and (k, D)")
    if len(c) > 32768:
        raise ValueError(f"{len(c)} centroids do not fit int16 labels")
    minus_2ct = np.ascontiguousarray(-2.0 * c.T)
    c_sq = np.einsum("ij,ij->i", c, c)
    labels = np.empty(len(x), dtype=np.int16)
    distances = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _ASSIGN_BLOCK):
        block = x[start : start + _ASSIGN_BLOCK]
        scores = block @ minus_2ct
        scores += c_sq
        best = scores.argmin(axis=1)
        labels[start : start + len(block)] = best
        diff = block - c[best]
        distances[start : start + len(block)] = np.einsum("ij,ij->i", diff, diff)
    return labels, distances


def assign(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """int16 label (T,) of the nearest centroid of each frame (exact, squared L2)."""
    return assign_with_distances(features, centroids)[0]


# --------------------------------------------------------------------------------------------------
# Label quality
# --------------------------------------------------------------------------------------------------


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def cluster_usage(labels: np.ndarray | Iterable[np.ndarray], k: int) -> dict[str, float]:
    """How much of the codebook a labelling uses: clusters used, entropy (bits) and perplexity 2^H.

    Accepts one label array or an iterable of per-file arrays (counted one file at a time).
    """
    counts = np.zeros(k, dtype=np.int64)
    for part in [labels] if isinstance(labels, np.ndarray) else labels:
        part = np.asarray(part).ravel()
        if len(part) and (part.min() < 0 or part.max() >= k):
            raise ValueError(f"labels outside [0, {k})")
        counts += np.bincount(part.astype(np.int64), minlength=k)
    return usage_from_counts(counts)


def usage_from_counts(counts: np.ndarray) -> dict[str, float]:
    """`cluster_usage` figures from a per-cluster histogram (for callers counting several rows at once)."""
    counts = np.asarray(counts)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no labels")
    entropy = _entropy_bits(counts / total)
    return {
        "frames": total,
        "used": int(np.count_nonzero(counts)),
        "entropy_bits": entropy,
        "perplexity": float(2.0**entropy),
    }


class JointCounts:
    """Joint histogram of two frame-aligned labellings, accumulated file by file (ka * kb int64 counts)."""

    def __init__(self, ka: int, kb: int) -> None:
        self.ka, self.kb = ka, kb
        self.counts = np.zeros((ka, kb), dtype=np.int64)

    def update(self, labels_a: np.ndarray, labels_b: np.ndarray) -> JointCounts:
        a = np.asarray(labels_a).astype(np.int64).ravel()
        b = np.asarray(labels_b).astype(np.int64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"labellings are not frame-aligned: {a.shape} vs {b.shape}")
        if len(a) and (a.min() < 0 or a.max() >= self.ka or b.min() < 0 or b.max() >= self.kb):
            raise ValueError(f"labels outside [0, {self.ka}) x [0, {self.kb})")
        self.counts += np.bincount(a * self.kb + b, minlength=self.ka * self.kb).reshape(self.ka, self.kb)
        return self

    def metrics(self) -> dict[str, float]:
        """fairseq measure_teacher_quality.py's figures, in bits, from the joint distribution p(a, b).

        - ``purity_a_given_b`` = sum_b max_a p(a, b): accuracy of predicting a from b by mapping each b
          label to its most frequent a label (fairseq's "ref pur" with a as the reference, HuBERT's phone
          purity); ``purity_b_given_a`` the other way round (fairseq's "hyp pur").
        - ``mutual_information`` I(a; b); ``mi_over_entropy_a`` = I / H(a) (fairseq's "MI/H(ref)"),
          ``mi_over_entropy_b``; ``nmi`` = I / mean(H(a), H(b)) (sklearn's normalized_mutual_info_score).
        """
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no frames counted")
        p = self.counts / total
        pa, pb = p.sum(axis=1), p.sum(axis=0)
        nz = p > 0
        outer = np.outer(pa, pb)
        mi = max(0.0, float((p[nz] * np.log2(p[nz] / outer[nz])).sum()))
        ha, hb = _entropy_bits(pa), _entropy_bits(pb)
        mean_h = (ha + hb) / 2.0
        return {
            "frames": total,
            "entropy_a": ha,
            "entropy_b": hb,
            "mutual_information": mi,
            "mi_over_entropy_a": mi / ha if ha > 0 else math.nan,
            "mi_over_entropy_b": mi / hb if hb > 0 else math.nan,
            "nmi": mi / mean_h if mean_h > 0 else math.nan,
            "purity_a_given_b": float(p.max(axis=0).sum()),
            "purity_b_given_a": float(p.max(axis=1).sum()),
        }


def teacher_agreement(labels_a: np.ndarray, labels_b: np.ndarray, ka: int, kb: int) -> dict[str, float]:
    """Agreement of two frame-aligned labellings (see `JointCounts.metrics`); for many files, feed a
    `JointCounts` one file at a time instead."""
    return JointCounts(ka, kb).update(labels_a, labels_b).metrics()


# --------------------------------------------------------------------------------------------------
# The fit: centroids from the features stage's sample (`mert-pipe kmeans fit`)
# --------------------------------------------------------------------------------------------------


class KMeansInputError(ValueError):
    """A fit or report cannot start: a missing or too small input, named in one line."""


def fit_from_features(
    workdir: Path,
    features: str = "mfcc",
    k: int = 500,
    sample_frames: int | None = None,
    seed: int = 0,
    backend: Literal["faiss", "sklearn"] = "faiss",
    name: str | None = None,
) -> dict[str, Any]:
    """Fit k centroids to the features stage's sample and record them as the last fit; return fit.json."""
    layout = Workdir(workdir)
    try:
        source = layout.features(features)
        described = json.loads(source.description.read_text())
        sample = np.load(source.sample, mmap_mode="r")
    except FileNotFoundError as exc:
        raise KMeansInputError(
            f"{source.sample} not found: run `mert-pipe features {workdir} --kind {features}` first"
        ) from exc
    except ValueError as exc:  # a name that is no folder name
        raise KMeansInputError(str(exc)) from exc
    available = len(sample)
    rng = np.random.default_rng(seed)
    if sample_frames is not None and sample_frames < available:
        rows = np.sort(rng.choice(available, size=sample_frames, replace=False))
        x = np.ascontiguousarray(sample[rows], dtype=np.float32)
    else:
        x = np.ascontiguousarray(sample, dtype=np.float32)
    if len(x) < k:
        raise KMeansInputError(
            f"the sample holds {len(x)} frames, fewer than k={k}: lower --k or rerun `mert-pipe features` "
            "with a larger --sample-frames (or on more audio)"
        )
    result = fit_kmeans(x, k, seed=seed, backend=backend)
    out = layout.kmeans(name or f"{features}_k{k}")
    atomic_save_npy(out.centroids, result.centroids)
    fit = {
        "name": out.name,
        "centroids": str(out.centroids),
        "centroids_sha256": sha256_file(out.centroids),
        "k": k,
        "dim": int(x.shape[1]),
        "seed": seed,
        "backend": backend,
        "features": features,
        "features_config_hash": described["config_hash"],
        "features_extractor": described["config"],  # what `tokenize --teacher kmeans` must recompute
        "features_checkpoint": described.get("checkpoint"),  # model features: the checkpoint's path
        "sample_frames": len(x),
        "sample_available": available,
        "sample_requested": sample_frames,
        "inertia": result.inertia,
        "inertia_per_frame": result.inertia / len(x),
        "fit_seconds": result.seconds,
        "fit_config": result.config,
    }
    atomic_write_json(out.fit, fit)
    atomic_write_json(layout.kmeans_last, {"name": out.name, "centroids": fit["centroids"]})
    return fit


def fitted_teacher(workdir: Path, centroids_sha256: str) -> KMeansTeacher:
    """The k-means teacher of WORKDIR's fit whose centroids have this sha256, resolved: what a k-means label
    set's teacher.json names (its labels came from those centroids and the features they were fitted on)."""
    layout = Workdir(workdir)
    for fit_json in sorted(layout.kmeans_root.glob("*/fit.json")):
        fit = KMeansFit(fit_json.parent)
        if json.loads(fit_json.read_text()).get("centroids_sha256") == centroids_sha256:
            teacher = KMeansTeacher(str(fit.centroids)).resolve()
            if teacher.centroids_sha256 == centroids_sha256:
                return teacher
    raise KMeansInputError(
        f"no fit in {layout.kmeans_root} has the centroids these labels were made with "
        f"(sha256 {centroids_sha256[:12]})"
    )


def last_centroids(workdir: Path) -> Path:
    """The centroids `kmeans fit` wrote last in WORKDIR."""
    try:
        last = json.loads(Workdir(workdir).kmeans_last.read_text())
    except FileNotFoundError as exc:
        raise KMeansInputError(
            f"no centroids fitted in {workdir}: run `mert-pipe kmeans fit {workdir}` or pass --centroids"
        ) from exc
    return Path(last["centroids"])


# --------------------------------------------------------------------------------------------------
# The teacher the tokenize stage runs
# --------------------------------------------------------------------------------------------------

FILES_PER_TASK = 16  # files of a tokenize task: signal features run hundreds of times real time or more
_FEATURE_TEACHERS: dict[tuple, Any] = {}  # per process: (kind, identity) -> loaded state


@dataclass(frozen=True)
class KMeansTeacher:
    """Nearest of k centroids to each frame's features, computed from the audio: the features the centroids
    were fitted on, as `kmeans fit` recorded them in `fit.json` beside the centroids (`features_extractor`):
    39-dim MFCC (HuBERT iteration 1; also for centroids without a fit.json, unless `features` says otherwise),
    the 168-dim log-CQT of the music teacher, or a checkpoint's layer (HuBERT iteration 2).

    Signal features are computed on the fly (MFCC thousands, log-CQT hundreds of times real time, see
    benchmarks/RESULTS.md) rather than read from `mert-pipe features`: tokenizing then needs no feature
    store, and the labels equal the assignment of stored features bit for bit because both stream the same
    blocks through `stream_features`. `resolve()` rebuilds the recorded extractor (refusing one whose
    configuration this version no longer computes), checks the centroids' dimension against it, loads the
    centroids once on the driver and records their sha256, which is part of the teacher's identity; workers
    check it when they load them. For model features it sets `model` and the teacher recomputes the layer.
    """

    centroids: str  # path of a (k, dim) float32 .npy
    centroids_sha256: str = ""
    num_classes: int = 0  # k, from the centroids
    threads: int = 1  # torch intra-op threads of each worker
    features: str = "mfcc"  # the kind of features the centroids were fitted on: mfcc, cqt or model
    model: Any = None  # a ModelFeatures when the centroids were fitted on model features

    kind: str = "kmeans"
    sampling_rate: int = SAMPLE_RATE
    hop: int = HOP
    n_q: int = 1

    def resolve(self) -> KMeansTeacher:
        """Check the centroids here (errors surface before workers start) and fill in k and the hash."""
        fitted = _fitted_features(Path(self.centroids))
        resolved = replace(self, features=fitted[0], model=fitted[1]) if fitted is not None else self
        centroids = _load_centroids(self.centroids, resolved._extractor().dim)
        return replace(resolved, centroids_sha256=sha256_file(self.centroids), num_classes=len(centroids))

    def model_device(self) -> str | None:
        return self.model.device if self.model is not None else None

    def files_per_task(self) -> int:
        return FILES_PER_TASK

    def _extractor(self) -> Any:
        from mert_pipeline.teachers.features import make_extractor  # torch: where labels are made

        return self.model if self.model is not None else make_extractor(self.features)

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.kind,
            "features": self._extractor().config(),
            "k": self.num_classes,
            "centroids_sha256": self.centroids_sha256,
            "distance": "squared_l2, exact",
        }

    def _state(self) -> tuple[Any, np.ndarray]:
        key = (self.kind, self.centroids_sha256)
        if key not in _FEATURE_TEACHERS:
            set_threads(self.threads)
            if sha256_file(self.centroids) != self.centroids_sha256:
                raise RuntimeError(f"{self.centroids} changed during the run; rerun")
            extractor = self._extractor()
            _FEATURE_TEACHERS[key] = (extractor, _load_centroids(self.centroids, extractor.dim))
        return _FEATURE_TEACHERS[key]

    def label(self, files: list[FileToLabel], stats: Counter) -> Iterator[tuple[str, np.ndarray | Reject]]:
        if not files:
            return
        extractor, centroids = self._state()
        yield from label_frames(files, extractor, lambda block: assign(block, centroids)[None], 1)

    def label_blocks(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """int16 labels of one clip given as 24 kHz mono sample blocks, block by block (`kmeans report
        --probe-data` labels clips that are not in WORKDIR this way)."""
        extractor, centroids = self._state()
        for features in extractor.stream(blocks):
            yield assign(features, centroids)


def _fitted_features(centroids: Path) -> tuple[str, Any] | None:
    """The kind of features `kmeans fit` recorded beside these centroids (fit.json), and for model features
    the extractor; None for centroids without a fit.json (the teacher's `features`, MFCC by default)."""
    try:
        fit = json.loads(KMeansFit(centroids.parent).fit.read_text())
    except (OSError, ValueError):
        return None
    saved = fit.get("features_extractor") or {}
    kind = saved.get("kind", "mfcc")
    if kind != "model":
        from mert_pipeline.teachers.features import SIGNAL_KINDS, make_extractor

        if kind not in SIGNAL_KINDS or make_extractor(kind).config() != saved:
            raise ValueError(
                f"{centroids} were fitted on {kind} features of a configuration this version does not "
                "compute (their fit.json says which); run `mert-pipe features` and `kmeans fit` again"
            )
        return kind, None
    from mert_pipeline.teachers.model_features import ModelFeatures

    model = ModelFeatures.from_checkpoint(
        fit["features_checkpoint"], saved["layer"], batch_windows=saved["batch_windows"]
    )
    if model.config() != saved:
        raise ValueError(
            f"{centroids} were fitted on features of checkpoint sha256 {saved['checkpoint_sha256'][:12]}, "
            f"but {model.checkpoint} is now {model.checkpoint_sha256[:12]}"
        )
    return kind, model


def _load_centroids(path: str, dim: int = 39) -> np.ndarray:
    """A (k, dim) finite float32 array, k in [1, 32768]; anything else is a ValueError naming the file."""
    try:
        centroids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read centroids {path}: {exc}") from exc
    if centroids.ndim != 2 or centroids.shape[1] != dim or not 1 <= len(centroids) <= 32768:
        raise ValueError(f"centroids {path} have shape {centroids.shape}, expected (k <= 32768, {dim})")
    if not np.issubdtype(centroids.dtype, np.floating) or not np.isfinite(centroids).all():
        raise ValueError(f"centroids {path} must be finite floats")
    return np.ascontiguousarray(centroids, dtype=np.float32)
