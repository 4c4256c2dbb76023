"""k-means teacher: reservoir sampling, faiss/sklearn fits, exact assignment, label-quality metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from mert_pipeline.demo.synth import render_track
from mert_pipeline.grid import SAMPLE_RATE
from mert_pipeline.teachers.features import MFCC
from mert_pipeline.teachers.kmeans import (
    JointCounts,
    KMeansResult,
    ReservoirSampler,
    assign,
    assign_with_distances,
    cluster_usage,
    fit_kmeans,
    teacher_agreement,
)

# --------------------------------------------------------------------------------------------------
# Reservoir sampling
# --------------------------------------------------------------------------------------------------


def _stream(n: int, seed: int, dim: int = 2) -> list[np.ndarray]:
    """n frames split into files of random sizes; frame p carries its stream position p in column 0."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, max(1, n // 15)), replace=False))
    frames = np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1)
    return np.split(frames, cuts)


def test_sampler_never_holds_more_than_capacity_and_keeps_true_frames() -> None:
    sampler = ReservoirSampler(capacity=50, dim=2, seed=0)
    seen = 0
    for part in _stream(2000, seed=1):
        sampler.add(part)
        seen += len(part)
        assert sampler.seen == seen
        assert len(sampler.frames) == len(sampler.positions) == min(seen, 50)
        assert sampler._data.shape == (50, 2)  # the only frame storage, allocated once
    positions = sampler.positions
    assert len(np.unique(positions)) == 50 and positions.max() < 2000
    assert np.array_equal(sampler.frames[:, 0], positions.astype(np.float32))  # frame i is stream frame p_i


def test_sampler_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> np.ndarray:
        sampler = ReservoirSampler(capacity=40, dim=2, seed=seed)
        for part in _stream(1000, seed=3):
            sampler.add(part)
        return sampler.frames

    assert np.array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def _inclusion_counts(n: int, capacity: int, trials: int, merge_at: int | None = None) -> np.ndarray:
    counts = np.zeros(n, dtype=np.int64)
    for trial in range(trials):
        parts = _stream(n, seed=trial, dim=1)
        if merge_at is None:
            sampler = ReservoirSampler(capacity, 1, seed=trial)
            for part in parts:
                sampler.add(part)
        else:
            # Two workers see disjoint halves, files interleaved; a third continues after the merge.
            a = ReservoirSampler(capacity, 1, seed=(trial, 0))
            b = ReservoirSampler(capacity, 1, seed=(trial, 1))
            head = np.concatenate(parts)[:merge_at]
            a.add(head[: merge_at // 3])
            for part in np.array_split(head[merge_at // 3 :], 5):
                b.add(part)
            sampler = a.merge(b)
            sampler.add(np.concatenate(parts)[merge_at:])
        counts[sampler.positions] += 1
    return counts


@pytest.mark.parametrize("merge_at", [None, 150])
def test_sampler_is_uniform(merge_at: int | None) -> None:
    """Every stream position is kept with probability capacity / n (chi-square over 1500 seeded runs).

    A sampler biased to the start or the end of the stream, or to one worker, fails by a wide margin."""
    n, capacity, trials = 200, 20, 1500
    counts = _inclusion_counts(n, capacity, trials, merge_at)
    assert counts.sum() == trials * capacity
    assert chisquare(counts).pvalue > 1e-3
    # The first and the last tenth of the stream are kept as often as the rest.
    tenth = counts.reshape(10, -1).sum(axis=1)
    assert np.abs(tenth / tenth.mean() - 1).max() < 0.06


def test_merge_of_small_streams_keeps_everything() -> None:
    a, b = ReservoirSampler(10, 2, seed=0), ReservoirSampler(10, 2, seed=1)
    a.add(np.repeat(np.arange(4, dtype=np.float32)[:, None], 2, axis=1))
    b.add(np.repeat(np.arange(100, 105, dtype=np.float32)[:, None], 2, axis=1))
    a.merge(b)
    assert a.seen == 9
    assert sorted(a.frames[:, 0]) == [0, 1, 2, 3, 100, 101, 102, 103, 104]
    assert sorted(a.positions) == list(range(9))  # b's positions follow a's
    with pytest.raises(ValueError):
        a.merge(ReservoirSampler(11, 2))


# --------------------------------------------------------------------------------------------------
# Fit and assign
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mfcc_frames() -> np.ndarray:
    """20000 MFCC frames (39 dims) of synthesized music: the HuBERT iteration-1 input."""
    return np.concatenate(MFCC().batch([render_track(s, 30.0, SAMPLE_RATE) for s in range(9)]))[:20000]


@pytest.fixture(scope="module")
def recipe_fit(mfcc_frames: np.ndarray) -> KMeansResult:
    with threadpool_limits(limits=1):  # as fast on this small sample, and no OpenMP spin-waits on a busy box
        return fit_kmeans(mfcc_frames, 50, seed=0, backend="sklearn")


@pytest.mark.parametrize(("seeding", "threads"), [("sklearn", None), ("faiss", 1)])
def test_faiss_fit_is_deterministic(mfcc_frames: np.ndarray, seeding: str, threads: int | None) -> None:
    """Same seed, same centroids bit for bit; threads=None runs with every core (2 here)."""
    with threadpool_limits(limits=threads):
        first = fit_kmeans(mfcc_frames, 50, seed=0, backend="faiss", gpu=False, seeding=seeding)
        second = fit_kmeans(mfcc_frames, 50, seed=0, backend="faiss", gpu=False, seeding=seeding)
        other_seed = fit_kmeans(mfcc_frames, 50, seed=1, gpu=False, seeding=seeding)
    assert first.centroids.dtype == np.float32 and first.centroids.shape == (50, 39)
    assert np.array_equal(first.centroids, second.centroids)
    assert first.inertia == second.inertia
    assert not np.array_equal(other_seed.centroids, first.centroids)
    assert first.config["init"].startswith(f"k-means++ ({seeding}")
    assert first.config["gpu"] is False and first.backend == "faiss"


@pytest.mark.parametrize("seeding", ["faiss", "sklearn"])
def test_faiss_inertia_matches_fairseq_sklearn_recipe(
    mfcc_frames: np.ndarray, recipe_fit: KMeansResult, seeding: str
) -> None:
    sk = recipe_fit
    with threadpool_limits(limits=1):
        fa = fit_kmeans(mfcc_frames, 50, seed=0, backend="faiss", gpu=False, seeding=seeding)
    assert sk.config["n_init"] == 20 and sk.config["batch_size"] == 10000  # the fairseq recipe
    # Both inertias come from the same exact assignment of the same frames.
    for result in (sk, fa):
        _, sq = assign_with_distances(mfcc_frames, result.centroids)
        assert result.inertia == pytest.approx(float(sq.sum(dtype=np.float64)), rel=1e-9)
    assert fa.inertia <= 1.05 * sk.inertia
    assert sk.inertia <= 1.05 * fa.inertia  # and neither fit is degenerate


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        fit_kmeans(np.zeros((10, 3), np.float32), 20)
    with pytest.raises(ValueError, match="backend"):
        fit_kmeans(np.zeros((100, 3), np.float32), 2, backend="torch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nredo"):
        fit_kmeans(np.zeros((100, 3), np.float32), 2, nredo=2, seeding="sklearn")
    with pytest.raises(ValueError, match="seeding"):
        fit_kmeans(np.zeros((100, 3), np.float32), 2, seeding="random")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("t", "k", "d"), [(0, 5, 3), (1, 1, 4), (1023, 7, 39), (5000, 500, 39), (3000, 300, 128)]
)
def test_assign_matches_brute_force(t: int, k: int, d: int) -> None:
    rng = np.random.default_rng(t + k)
    x = rng.standard_normal((t, d)).astype(np.float32) * 3
    c = rng.standard_normal((k, d)).astype(np.float32) * 3
    labels, sq = assign_with_distances(x, c)
    assert labels.dtype == np.int16 and labels.shape == (t,)
    assert np.array_equal(assign(x, c), labels)
    if t == 0:
        return
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    dist = np.concatenate([((x64[i : i + 256, None] - c64[None]) ** 2).sum(-1) for i in range(0, t, 256)])
    best = dist.min(axis=1)
    chosen = dist[np.arange(t), labels]
    assert np.all(chosen <= best + 1e-4 * (1 + best))  # identical except float32 near-ties
    assert (labels == dist.argmin(axis=1)).mean() > 0.999
    np.testing.assert_allclose(sq, best, rtol=1e-4, atol=1e-3)


def test_assign_frame_on_a_centroid_has_zero_distance() -> None:
    c = np.random.default_rng(0).standard_normal((20, 39)).astype(np.float32) * 100
    labels, sq = assign_with_distances(c[::-1], c)
    assert np.array_equal(labels, np.arange(19, -1, -1))
    assert (sq >= 0).all() and sq.max() < 1e-2


# --------------------------------------------------------------------------------------------------
# Label quality
# --------------------------------------------------------------------------------------------------


def test_cluster_usage() -> None:
    uniform = np.tile(np.arange(8), 100)
    usage = cluster_usage(uniform, 16)
    assert usage["used"] == 8 and usage["frames"] == 800
    assert usage["entropy_bits"] == pytest.approx(3.0) and usage["perplexity"] == pytest.approx(8.0)
    single = cluster_usage(np.zeros(50, np.int16), 4)
    assert single["used"] == 1 and single["entropy_bits"] == 0.0 and single["perplexity"] == 1.0
    skewed = np.array([0] * 3 + [1])
    assert cluster_usage(skewed, 2)["entropy_bits"] == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )
    assert cluster_usage([uniform[:300], uniform[300:]], 16) == usage  # streamed per file
    with pytest.raises(ValueError):
        cluster_usage(np.array([0, 16]), 16)


def test_agreement_of_identical_and_relabelled_labellings() -> None:
    a = np.random.default_rng(0).integers(0, 10, 5000)
    same = teacher_agreement(a, a, 10, 10)
    assert same["purity_a_given_b"] == pytest.approx(1.0) and same["purity_b_given_a"] == pytest.approx(1.0)
    assert same["mutual_information"] == pytest.approx(same["entropy_a"])
    assert same["nmi"] == pytest.approx(1.0) and same["mi_over_entropy_a"] == pytest.approx(1.0)
    relabelled = teacher_agreement(a, (a * 7 + 3) % 10, 10, 10)  # a permutation of the label names
    assert relabelled["purity_a_given_b"] == pytest.approx(1.0) and relabelled["nmi"] == pytest.approx(1.0)


def test_agreement_hand_made_case() -> None:
    # b refines a (a is a function of b), not the other way round.
    a = np.array([0, 0, 0, 0, 1, 1])
    b = np.array([0, 0, 1, 1, 2, 2])
    m = teacher_agreement(a, b, 2, 3)
    h_a = -(4 / 6 * math.log2(4 / 6) + 2 / 6 * math.log2(2 / 6))
    assert m["purity_a_given_b"] == pytest.approx(1.0)  # every b cluster is pure in a
    assert m["purity_b_given_a"] == pytest.approx(4 / 6)
    assert m["entropy_a"] == pytest.approx(h_a) and m["entropy_b"] == pytest.approx(math.log2(3))
    assert m["mutual_information"] == pytest.approx(h_a)  # I(a; b) = H(a) when a = f(b)
    assert m["mi_over_entropy_a"] == pytest.approx(1.0)
    assert m["mi_over_entropy_b"] == pytest.approx(h_a / math.log2(3))


def test_agreement_of_independent_labellings_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    m = teacher_agreement(rng.integers(0, 8, 200_000), rng.integers(0, 5, 200_000), 8, 5)
    assert m["mutual_information"] < 1e-3 and m["nmi"] < 1e-3
    assert m["purity_b_given_a"] == pytest.approx(0.2, abs=0.01)  # chance: the largest b class


def test_agreement_matches_sklearn_and_streams() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 30, 40_000)
    b = np.where(rng.random(40_000) < 0.6, a % 12, rng.integers(0, 12, 40_000))  # correlated, noisy
    m = teacher_agreement(a, b, 30, 12)
    assert m["mutual_information"] == pytest.approx(mutual_info_score(a, b) / math.log(2), rel=1e-9)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(a, b), rel=1e-9)
    joint = JointCounts(30, 12)
    for part_a, part_b in zip(np.array_split(a, 7), np.array_split(b, 7), strict=True):
        joint.update(part_a.astype(np.int16), part_b.astype(np.int16))
    assert joint.metrics() == pytest.approx(m)
    with pytest.raises(ValueError, match="aligned"):
        JointCounts(30, 12).update(a[:10], b[:11])
